"""The ListOperations filter (a subset of AIP-160) and operation names, without a server."""

from __future__ import annotations

import pytest

from ajs_grpc.core.errors import InvalidArgument
from ajs_grpc.core.model import RequestState
from ajs_grpc.edge.operations import OperationFilter, parse_filter, request_id_of

S = RequestState


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", OperationFilter()),
        ("   ", OperationFilter()),
        ("state = FAILED", OperationFilter(states=frozenset({S.FAILED}))),
        ("metadata.state = request_state_failed", OperationFilter(states=frozenset({S.FAILED}))),
        ("state != FINISHED", OperationFilter(states=frozenset({S.CREATED, S.PENDING, S.FAILED, S.CANCELLED}))),
        ("done = true", OperationFilter(states=frozenset({S.FINISHED, S.FAILED, S.CANCELLED}))),
        ("done != true", OperationFilter(states=frozenset({S.CREATED, S.PENDING}))),
        ("done = FALSE", OperationFilter(states=frozenset({S.CREATED, S.PENDING}))),
        ("state = FAILED OR done = false", OperationFilter(states=frozenset({S.FAILED, S.CREATED, S.PENDING}))),
        ('type = "count down\\"s"', None),  # not a type name: refused below
        ('type="a.b:c/d-e"', OperationFilter(types=frozenset({"a.b:c/d-e"}))),
        ("metadata.request.type = echo OR type = x", OperationFilter(types=frozenset({"echo", "x"}))),
        (
            "(state = FAILED OR state = CANCELLED) AND type = countdown",
            OperationFilter(states=frozenset({S.FAILED, S.CANCELLED}), types=frozenset({"countdown"})),
        ),
        (
            "state = FAILED OR state = CANCELLED AND type = countdown",
            OperationFilter(states=frozenset({S.FAILED, S.CANCELLED}), types=frozenset({"countdown"})),
        ),
        ("done = true AND state = PENDING", OperationFilter(matches_nothing=True)),
        ("type = a AND type = b", OperationFilter(matches_nothing=True)),
        ("type = a AND (type = a OR type = b)", OperationFilter(types=frozenset({"a"}))),
        ('parent_id = "batch/7@v2"', OperationFilter(parent_id="batch/7@v2")),
        ("metadata.request.parent_id = p AND parent_id = q", OperationFilter(matches_nothing=True)),
    ],
)
def test_filters_that_parse(text: str, expected: OperationFilter | None) -> None:
    if expected is None:
        with pytest.raises(InvalidArgument):
            parse_filter(text)
        return
    assert parse_filter(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "state",
        "state =",
        "= FAILED",
        "state = FAILED)",
        "(state = FAILED) OR (state = CANCELLED)",
        "((state = FAILED))",
        "state = FAILED and type = x",
        "state: FAILED",
        "-state = FAILED",
        "state = FAILED OR",
        "type = echo AND AND",
    ],
)
def test_filters_refused_name_the_filter_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_filter(text)
    assert [violation.field for violation in raised.value.violations] == ["filter"]


def test_an_operation_name_is_the_prefix_and_the_whole_id() -> None:
    assert request_id_of("operations/a/b@c") == "a/b@c"
    assert request_id_of("operations/~alice/x") == "~alice/x"
    assert request_id_of("operations/operations/x") == "operations/x"
    for bad in ("", "operation/x", "operations/", "operations/a b", "/operations/x"):
        with pytest.raises(InvalidArgument) as raised:
            request_id_of(bad)
        assert [violation.field for violation in raised.value.violations] == ["name"]
