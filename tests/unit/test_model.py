"""The state rules of the core model."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from ajs_grpc.core.errors import Code, FailedPrecondition
from ajs_grpc.core.model import ErrorStatus, Job, Progress, Request, RequestState, Response, Update

S = RequestState


def new_job() -> Job:
    job, first = Job.create(Request(id="r1", type="echo", data={"k": "v"}))
    assert first.sequence == 1
    assert first.state is S.CREATED
    return job


def test_create_starts_queued_with_response_one() -> None:
    job = new_job()
    assert job.state is S.CREATED
    assert job.attempt == 0
    assert job.last_response.sequence == 1
    assert job.request.create_time == job.last_response.create_time


def test_sequences_are_gapless_and_claim_counts_attempts() -> None:
    job = new_job()
    job, claimed = job.advance(Update(S.PENDING))
    job, progress = job.advance(Update(S.PENDING, progress=Progress(0.5, "half")))
    job, final = job.advance(Update(S.FINISHED, data={"out": "x"}))
    assert [claimed.sequence, progress.sequence, final.sequence] == [2, 3, 4]
    assert job.attempt == 1
    assert final.is_final
    assert job.is_final
    assert not progress.is_final


def test_nothing_follows_the_final_response() -> None:
    job = new_job()
    job, _ = job.advance(Update(S.PENDING))
    job, _ = job.advance(Update(S.FAILED, error=ErrorStatus(Code.UNKNOWN, "x")))
    for state in S:
        with pytest.raises(FailedPrecondition) as raised:
            job.advance(Update(state))
        assert raised.value.reason == "REQUEST_ALREADY_FINAL"


@pytest.mark.parametrize(
    ("state", "allowed"),
    [
        (S.UNSPECIFIED, False),
        (S.CREATED, False),
        (S.PENDING, True),
        (S.FINISHED, False),
        (S.FAILED, False),
        (S.CANCELLED, True),
    ],
)
def test_what_may_follow_created(state: RequestState, allowed: bool) -> None:
    job = new_job()
    if allowed:
        assert job.advance(Update(state))[0].state is state
    else:
        with pytest.raises(FailedPrecondition):
            job.advance(Update(state))


def test_handing_back_requeues_and_next_claim_is_a_new_attempt() -> None:
    job = new_job()
    job, _ = job.advance(Update(S.PENDING))
    job, back = job.advance(Update(S.CREATED))
    assert back.state is S.CREATED
    assert not back.is_final
    job, _ = job.advance(Update(S.PENDING))
    assert job.attempt == 2


def test_cancel_queued_job_ends_it() -> None:
    job, response = new_job().cancel()
    assert job.state is S.CANCELLED
    assert response is not None
    assert response.is_final
    assert response.error is not None
    assert response.error.code is Code.CANCELLED


def test_cancel_running_job_only_marks_it() -> None:
    job, _ = new_job().advance(Update(S.PENDING))
    marked, response = job.cancel()
    assert response is None
    assert marked.cancel_requested
    assert marked.state is S.PENDING


def test_cancel_finished_job_is_a_failed_precondition() -> None:
    job, _ = new_job().advance(Update(S.PENDING))
    job, _ = job.advance(Update(S.FINISHED))
    with pytest.raises(FailedPrecondition):
        job.cancel()


def test_same_content_ignores_server_fields() -> None:
    a = Request(id="x", type="t", data={"a": "1"}, creator="alice")
    assert a.same_content(Request(id="x", type="t", data={"a": "1"}))
    assert not a.same_content(Request(id="x", type="t", data={"a": "2"}))
    assert not a.same_content(Request(id="x", type="u", data={"a": "1"}))
    assert not a.same_content(Request(id="x", type="t", data={"a": "1"}, parent_id="p"))


def test_progress_fraction_is_bounded() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        Progress(1.5)


def test_request_data_cannot_be_changed_after_creation() -> None:
    data = {"a": "1"}
    request = Request(id="x", type="t", data=data)
    data["a"] = "2"
    assert request.data["a"] == "1"
    with pytest.raises(TypeError):
        request.data["a"] = "3"  # type: ignore[index]


def test_an_expired_lease_of_a_cancelled_job_ends_it_cancelled_even_without_attempts_left() -> None:
    job, _ = Job.create(Request(id="r", type="t"), max_attempts=1)
    job, _ = job.advance(Update(S.PENDING))
    job, _ = job.cancel()
    job, response = job.expire()
    assert job.state is S.CANCELLED
    assert response.is_final


def test_a_refunded_hand_back_does_not_use_up_an_attempt() -> None:
    job, _ = Job.create(Request(id="r", type="t"), max_attempts=1)
    job, _ = job.advance(Update(S.PENDING))
    job, _ = job.advance(Update(S.CREATED, refund_attempt=True))
    assert job.attempt == 0
    assert job.attempts_left
    job, _ = job.advance(Update(S.PENDING))
    assert job.attempt == 1
    assert not job.attempts_left


def test_as_dict_is_the_json_form_ajs_get_prints() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    request = Request("r1", "echo", {"k": "v"}, parent_id="p", creator="alice", create_time=at, priority=3)
    error = ErrorStatus(Code.ABORTED, "boom", "WHY", {"m": "n"})
    last = Response("r1", 5, at, S.FAILED, is_final=True, data={"x": "y"}, progress=Progress(0.5, "half"), error=error)
    job = Job(request, S.FAILED, 2, last, at, cancel_requested=True, max_attempts=3, due_time=None)
    stamp = "2026-01-02T03:04:05+00:00"
    assert job.as_dict() == {
        "id": "r1",
        "type": "echo",
        "queue": "default",
        "state": "FAILED",
        "attempt": 2,
        "max_attempts": 3,
        "priority": 3,
        "run_after": None,
        "due_time": None,
        "parent_id": "p",
        "depends_on": [],
        "expire_time": None,
        "timeout": None,
        "creator": "alice",
        "create_time": stamp,
        "update_time": stamp,
        "cancel_requested": True,
        "data": {"k": "v"},
        "last_response": {
            "sequence": 5,
            "state": "FAILED",
            "is_final": True,
            "data": {"x": "y"},
            "progress": {"fraction": 0.5, "message": "half"},
            "error": {"code": "ABORTED", "message": "boom"},
        },
    }
    # `ajs get` prints the keys in this order.
    assert list(job.as_dict()) == [
        "id",
        "type",
        "queue",
        "state",
        "attempt",
        "max_attempts",
        "priority",
        "run_after",
        "due_time",
        "parent_id",
        "depends_on",
        "expire_time",
        "timeout",
        "creator",
        "create_time",
        "update_time",
        "cancel_requested",
        "data",
        "last_response",
    ]
    assert list(last.as_dict()) == ["sequence", "state", "is_final", "data", "progress", "error"]
    assert json.loads(json.dumps(job.as_dict())) == job.as_dict()
