"""Hostile bytes: a real ``ajs serve`` on each connector fed random, truncated and malformed messages.

Every JobService method gets raw bytes through a channel with identity
serializers, so nothing on the client side cleans them up: random bytes, valid
messages truncated or with bytes flipped, invalid UTF-8 and U+0000 in every
string field, huge maps and ids, overflowing integers, forged page tokens,
unknown enum values, odd wire types, and valid requests mixed in among them.

For every call: the status is one a careful server gives bad input (never UNKNOWN
or INTERNAL), and every refusal carries a ``google.rpc.Status`` with an ErrorInfo,
small enough for a client's default metadata limit to let it through. The one
exception: messages past the receive limit (or gzip that inflates past it) are
refused by gRPC itself, RESOURCE_EXHAUSTED without details, before any servicer.
After every pass: the process is alive and SERVING (connections that speak no
gRPC at all included), the valid requests mixed in were acknowledged and ran to
FINISHED once with gapless Responses, and the server's RSS stays bounded. At the
end, the server's log holds no exception (nothing behind the calls failed either).

The inputs come from a seeded ``random.Random``; the seed is printed, and
``AJS_HOSTILE_SEED=<seed>`` replays a run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import os
import random
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from tests.conftest import drop_schema, postgres_dsn, unique_schema
from tests.faults import report, scale
from tests.serve_process import Served, start_server

SEED = int(os.environ.get("AJS_HOSTILE_SEED") or random.SystemRandom().randrange(2**32))
SERVICE = "/ajs.v1.JobService/"
STREAMING = {"WatchJob"}
METHODS = ("SubmitRequest", "WatchJob", "GetJob", "ListJobs", "CancelJob", "ListJobTypes")
C = grpc.StatusCode
# What a server may answer bad input with; anything else (UNKNOWN, INTERNAL, a deadline, ...) is unexpected.
EXPECTED = {
    C.OK,
    C.INVALID_ARGUMENT,
    C.NOT_FOUND,
    C.ALREADY_EXISTS,
    C.FAILED_PRECONDITION,
    C.RESOURCE_EXHAUSTED,
    C.PERMISSION_DENIED,
    C.UNAUTHENTICATED,
    C.OUT_OF_RANGE,
}
MIB = 1024 * 1024
# The server's default limits (ajs serve --help, [limits]): data entries and bytes, the gRPC message.
MAX_DATA_ENTRIES = 256
MAX_DATA_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 4 * MIB
CALL_TIMEOUT = 20.0
IN_FLIGHT = 8
PASSES = 4
# How far the floor of RSS may rise after the first pass (see the test). Generous on purpose: the stores
# keep every accepted job (the memory connector in the process itself) and the allocator's high-water marks
# move. Keeping what each pass sends (~10 MB of huge inputs), or ~35 KB a call, breaks it at scale 1.
RSS_GROWTH_BOUND_MB = 24.0
LAST_SECOND = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())
FIRST_SECOND = int(datetime(1, 1, 1, tzinfo=UTC).timestamp())
BAD_UTF8 = (b"\xff", b"a\xfeb", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80", b"ok\x80")
NULS = ("\x00", "a\x00b", "tail\x00", "\x00\x00\x00")
HASH_URL = "type.googleapis.com/ajs.examples.v1.HashRequest"


# -- the wire, by hand (protobuf refuses to serialize bad UTF-8) ------------------------------------------


def varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return bytes((value,))
    value &= (1 << 64) - 1  # negative int32/int64 go out as ten bytes, as protobuf does
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def delimited(field: int, payload: bytes) -> bytes:
    return tag(field, 2) + varint(len(payload)) + payload


def number(field: int, value: int) -> bytes:
    return tag(field, 0) + varint(value)


def text(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def request_wire(
    *,
    request_id: str | bytes = b"",
    job_type: str | bytes = b"echo",
    parent_id: str | bytes = b"",
    creator: str | bytes = b"",
    data: list[tuple[str | bytes, str | bytes]] | None = None,
    type_url: str | bytes | None = None,
    input_value: bytes = b"",
    priority: int | None = None,
    run_after: tuple[int, int] | None = None,
) -> bytes:
    """An ``ajs.v1.Request`` on the wire, any string field holding any bytes."""
    out = b""
    if request_id:
        out += delimited(1, text(request_id))
    if parent_id:
        out += delimited(2, text(parent_id))
    if creator:
        out += delimited(3, text(creator))
    if job_type:
        out += delimited(5, text(job_type))
    pairs = data if data is not None else [(b"k", b"v")]
    out += b"".join(delimited(6, delimited(1, text(key)) + delimited(2, text(value))) for key, value in pairs)
    if type_url is not None:
        out += delimited(7, delimited(1, text(type_url)) + (delimited(2, input_value) if input_value else b""))
    if priority is not None:
        out += number(8, priority)
    if run_after is not None:
        seconds, nanos = run_after
        out += delimited(9, number(1, seconds) + number(2, nanos))
    return out


def submit_wire(**fields: object) -> bytes:
    return delimited(1, request_wire(**fields))  # type: ignore[arg-type]


def id_wire(request_id: str | bytes, after_sequence: int | None = None) -> bytes:
    """A WatchJob, GetJob or CancelJob request (request_id is field 1 in each)."""
    out = delimited(1, text(request_id)) if request_id else b""
    if after_sequence is not None:
        out += number(2, after_sequence)
    return out


def list_wire(
    *,
    page_size: int | None = None,
    page_token: str | bytes = b"",
    states: list[int] | None = None,
    packed_states: list[int] | None = None,
    types: list[str | bytes] | None = None,
    parent_id: str | bytes = b"",
) -> bytes:
    out = number(1, page_size) if page_size is not None else b""
    if page_token:
        out += delimited(2, text(page_token))
    out += b"".join(number(3, state) for state in states or ())
    if packed_states:
        out += delimited(3, b"".join(varint(s) for s in packed_states))
    out += b"".join(delimited(4, text(name)) for name in types or ())
    if parent_id:
        out += delimited(5, text(parent_id))
    return out


# -- probes and outcomes ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Probe:
    method: str
    kind: str
    field: str
    raw: bytes
    valid_id: str = ""
    """Set on a valid submit mixed in: it must be acknowledged and its job must FINISH."""
    refuse_nul: bool = False
    """A submit holding U+0000 that would reach the store: it must never be answered OK."""
    transport: bool = False
    """Larger than the server's receive limit: gRPC itself refuses it, before any servicer (no details)."""
    gzip: bool = False
    """Sent gzip-compressed (a small message on the wire that decompresses past the limit)."""


@dataclasses.dataclass
class Outcome:
    probe: Probe
    code: grpc.StatusCode
    message: str
    detailed: bool
    reason: str
    fields: str

    def line(self, connector: str) -> str:
        where = f"{self.probe.method} {self.probe.field} [{self.probe.kind}] on {connector}"
        return f"{where}: {self.code.name} {self.reason} {self.message[:200]!r} {self.fields}".rstrip()


def _details(error: grpc.aio.AioRpcError) -> tuple[bool, str, str]:
    """Whether the error carries a google.rpc.Status with an ErrorInfo; its reason; its field violations."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # the trailer disagrees with the call's code or message
        return False, "", ""
    if status is None:
        return False, "", ""
    reason, fields = "", []
    found = False
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            found, reason = True, info.reason
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return found, reason, ",".join(fields)


async def send(channel: grpc.aio.Channel, probe: Probe) -> Outcome:
    path = SERVICE + probe.method
    compression = grpc.Compression.Gzip if probe.gzip else None
    try:
        if probe.method in STREAMING:
            stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            async for _ in stream(probe.raw, timeout=CALL_TIMEOUT, compression=compression):
                pass
        else:
            unary = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            await unary(probe.raw, timeout=CALL_TIMEOUT, compression=compression)
    except grpc.aio.AioRpcError as error:
        detailed, reason, fields = _details(error)
        return Outcome(probe, error.code(), error.details() or "", detailed, reason, fields)
    return Outcome(probe, C.OK, "", True, "", "")


def unexpected(outcome: Outcome) -> bool:
    if outcome.probe.transport:  # refused by gRPC's receive limit, which cannot attach details
        return outcome.code is not C.RESOURCE_EXHAUSTED
    if outcome.code not in EXPECTED:
        return True
    if outcome.code is not C.OK and not outcome.detailed:
        return True
    return bool(outcome.probe.valid_id) and outcome.code is not C.OK


# -- what each pass sends -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Anchors:
    """Jobs and tokens the probes point at, made before the first pass."""

    finished: str
    """A FINISHED echo job (Watch/Get probes)."""
    token: str
    """A real next_page_token of ListJobs(page_size=1) without filters."""


def forged_tokens(token: str) -> list[tuple[str, str]]:
    """Page tokens holding cursors no page ever had; a token format we cannot read is mangled instead."""
    forged: list[tuple[str, str]] = []
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except ValueError:
        body = None
    if isinstance(body, dict) and "c" in body:
        for name, cursor in [
            ("cursor 2^63-1", 2**63 - 1),
            ("cursor 2^63", 2**63),
            ("cursor 2^64", 2**64),
            ("cursor 10^30", 10**30),
            ("cursor -1", -1),
            ("cursor -2^63-1", -(2**63) - 1),
            ("cursor 1e300", 1e300),
            ("cursor string", "7"),
            ("cursor list", [1]),
            ("cursor true", True),
            ("cursor 4000 digits", int("9" * 4000)),
        ]:
            changed = json.dumps({**body, "c": cursor}).encode()
            forged.append((name, base64.urlsafe_b64encode(changed).decode().rstrip("=")))
        forged.append(("json 5000 digits", base64.urlsafe_b64encode(b'{"c":' + b"9" * 5000 + b"}").decode()))
    deep = base64.urlsafe_b64encode(b"[" * 100_000).decode()
    forged += [
        ("nested json", deep),
        ("not base64", "%%%%"),
        ("token + junk", token + "AAAA"),
        ("token reversed", token[::-1]),
        ("token truncated", token[: len(token) // 2]),
        ("utf-8 token", token + "é"),
    ]
    return forged


def hostile(rng: random.Random, anchors: Anchors, round_: int) -> list[Probe]:
    """The probes of one pass: every kind of bad input for every method, and valid ones mixed in."""
    probes: list[Probe] = []
    tag_ = f"{round_}-{rng.randrange(10**9)}"
    counter = iter(range(10**9))

    def fresh(prefix: str) -> str:
        return f"{prefix}-{tag_}-{next(counter)}"

    def add(method: str, kind: str, field: str, raw: bytes, **extra: object) -> None:
        probes.append(Probe(method, kind, field, raw, **extra))  # type: ignore[arg-type]

    # Valid messages of every method: sent as they are, and the bases of truncation and flips.
    victim = fresh("victim")  # queued far ahead, so cancels have something to cancel
    later = int((datetime.now(UTC) + timedelta(days=30)).timestamp())
    add("SubmitRequest", "valid", "-", submit_wire(request_id=victim, run_after=(later, 0)))
    bases = {
        "SubmitRequest": [
            submit_wire(request_id=fresh("base"), data=[("k", "v"), ("n", str(rng.randrange(1000)))], priority=3),
            submit_wire(request_id=fresh("base"), run_after=(later, 5)),
        ],
        "WatchJob": [id_wire(anchors.finished), id_wire(anchors.finished, 1)],
        "GetJob": [id_wire(anchors.finished)],
        "ListJobs": [
            list_wire(page_size=2, states=[3], types=["echo"]),
            list_wire(page_size=1, page_token=anchors.token),
        ],
        "CancelJob": [id_wire(victim)],
        "ListJobTypes": [b""],
    }
    for method, messages in bases.items():
        for message in messages:
            add(method, "valid", "-", message)
            for _ in range(4):
                cut = rng.randrange(0, len(message)) if message else 0
                add(method, f"truncated at {cut}/{len(message)}", "-", message[:cut])
            for _ in range(5):
                if not message:
                    break
                flipped = bytearray(message)
                for _ in range(rng.randint(1, 3)):
                    flipped[rng.randrange(len(flipped))] = rng.randrange(256)
                add(method, "bytes flipped", "-", bytes(flipped))

    # Random bytes, short and long.
    for method in METHODS:
        for _ in range(4):
            size = rng.choice([1, 2, 3, 5, 8, 16, 64, 256, 4096])
            add(method, f"random {size} bytes", "-", rng.randbytes(size))

    # Invalid UTF-8 and U+0000 in every string field.
    def submit_with(field: str, value: str | bytes, request_id: str) -> bytes:
        parts: dict[str, object] = {"request_id": request_id}
        if field == "request.id":
            parts["request_id"] = value
        elif field == "request.type":
            parts["job_type"] = value
        elif field == "request.parent_id":
            parts["parent_id"] = value
        elif field == "request.creator":
            parts["creator"] = value
        elif field == "request.data.key":
            parts["data"] = [(value, "v")]
        elif field == "request.data.value":
            parts["data"] = [("k", value)]
        elif field == "request.input.type_url":
            parts["job_type"], parts["type_url"] = "hash", value
        return submit_wire(**parts)

    submit_fields = [
        "request.id",
        "request.type",
        "request.parent_id",
        "request.creator",
        "request.data.key",
        "request.data.value",
        "request.input.type_url",
    ]
    other_fields: list[tuple[str, str, Callable[[str | bytes], bytes]]] = [
        ("WatchJob", "request_id", lambda v: id_wire(v)),
        ("GetJob", "request_id", lambda v: id_wire(v)),
        ("CancelJob", "request_id", lambda v: id_wire(v)),
        ("ListJobs", "page_token", lambda v: list_wire(page_token=v)),
        ("ListJobs", "types", lambda v: list_wire(types=["echo", v])),
        ("ListJobs", "parent_id", lambda v: list_wire(parent_id=v)),
    ]
    # Each field gets two of the bad byte strings a pass, turn by turn, so passes together cover them all.
    for i, field in enumerate(submit_fields):
        for bad in (BAD_UTF8[(i + 2 * round_) % len(BAD_UTF8)], BAD_UTF8[(i + 2 * round_ + 1) % len(BAD_UTF8)]):
            add("SubmitRequest", f"invalid utf-8 {bad!r}", field, submit_with(field, b"x" + bad, fresh("utf8")))
        for nul in (NULS[(i + round_) % len(NULS)], NULS[(i + round_ + 2) % len(NULS)]):
            # The creator is the server's to set; the others would reach the store.
            refuse = field != "request.creator"
            add("SubmitRequest", f"U+0000 {nul!r}", field, submit_with(field, nul, fresh("nul")), refuse_nul=refuse)
    for i, (method, field, build) in enumerate(other_fields):
        for bad in (BAD_UTF8[(i + 2 * round_) % len(BAD_UTF8)], BAD_UTF8[(i + 2 * round_ + 1) % len(BAD_UTF8)]):
            add(method, f"invalid utf-8 {bad!r}", field, build(bad))
        for nul in (NULS[(i + round_) % len(NULS)], NULS[(i + round_ + 2) % len(NULS)]):
            add(method, f"U+0000 {nul!r}", field, build(nul))
    nul = NULS[round_ % len(NULS)]
    add("ListJobs", f"U+0000 {nul!r}", "parent_id+types", list_wire(parent_id=nul, types=[nul]))
    # Characters a careful store keeps (valid UTF-8): control characters, non-characters, the last code point.
    for odd in ("\x01\x1f\x7f", "\ufffe\uffff", "\U0010ffff", "\u202e\u2028", "line\nbreak\r"):
        add(
            "SubmitRequest",
            f"odd unicode {odd!r}",
            "request.data",
            submit_wire(request_id=fresh("odd"), data=[(odd, odd)]),
        )
        add("ListJobs", f"odd unicode {odd!r}", "types", list_wire(types=[odd]))

    # Huge maps, ids and messages (built once: they are refused whatever their ids, or idempotent).
    for method, kind, field, raw in huge_probes():
        add(method, kind, field, raw)
    method = METHODS[round_ % len(METHODS)]  # gRPC refuses it before any servicer sees it: one a pass
    add(method, "over max_message_bytes", "-", over_limit(), transport=True)
    method = METHODS[(round_ + 3) % len(METHODS)]
    add(method, "gzip bomb (8 MiB of zeros)", "-", gzip_bomb(), transport=True, gzip=True)
    # Long input inside a refusal: an error that quotes it whole outgrows a client's 8 KiB metadata limit.
    for size in (6_000, 60_000):
        long_ = "q" * size
        for field in ("request.data.key", "request.data.value"):
            raw = submit_with(field, long_ + "\x00", fresh("nul"))
            add("SubmitRequest", f"U+0000 after {size}", field, raw, refuse_nul=True)
        add(
            "SubmitRequest",
            f"type_url of {size}",
            "request.input.type_url",
            submit_wire(job_type="hash", type_url=long_),
        )
    # Many short violations add up the same way: a U+0000 in every one of 256 entries.
    entries = [(f"k{i:03}", "\x00") for i in range(MAX_DATA_ENTRIES)]
    raw = submit_wire(request_id=fresh("nul"), data=entries)
    add("SubmitRequest", "U+0000 in 256 entries", "request.data", raw, refuse_nul=True)

    # Overflowing and extreme integers.
    for name, after in [("2^63-1", 2**63 - 1), ("2^63", 2**63), ("2^64-1", 2**64 - 1), ("-1 as uint64", -1)]:
        add("WatchJob", f"after_sequence {name}", "after_sequence", id_wire(anchors.finished, after))
        add("WatchJob", f"after_sequence {name}, unknown id", "after_sequence", id_wire(fresh("nobody"), after))
    for name, token in forged_tokens(anchors.token):
        add("ListJobs", f"page_token {name}", "page_token", list_wire(page_size=1, page_token=token))
    for priority in (-(2**31), 2**31 - 1, 2**40, -(2**63), 2**64 - 1):
        add(
            "SubmitRequest",
            f"priority {priority}",
            "request.priority",
            submit_wire(request_id=fresh("prio"), priority=priority, run_after=(later, 0)),
        )
    for seconds, nanos in [
        (LAST_SECOND, 999_999_999),
        (FIRST_SECOND, 0),
        (LAST_SECOND + 1, 0),
        (FIRST_SECOND - 1, 0),
        (2**63 - 1, 0),
        (-(2**63), 0),
        (0, 10**9),
        (0, -1),
        (0, 2**31 - 1),
        (later, -(2**31)),
    ]:
        add(
            "SubmitRequest",
            f"run_after {seconds}s {nanos}ns",
            "request.run_after",
            submit_wire(request_id=fresh("when"), run_after=(seconds, nanos)),
        )
    for page_size in (-1, -(2**31), 2**31 - 1, 2**40):
        add("ListJobs", f"page_size {page_size}", "page_size", list_wire(page_size=page_size))
    for state in (0, 6, 99, -1, 2**31 - 1, 2**40):
        add("ListJobs", f"state {state}", "states", list_wire(states=[state]))
        add("ListJobs", f"packed state {state}", "states", list_wire(packed_states=[3, state]))

    # The wire itself: wrong wire types, groups, overlong varints, lengths past the end, unknown fields.
    for method in METHODS:
        add(method, "field 1 as varint", "-", number(1, 7))
        add(method, "field 1 as fixed64", "-", tag(1, 1) + b"\x00" * 8)
        add(method, "open group", "-", tag(1, 3))
        add(method, "stray end group", "-", tag(1, 4))
        add(method, "deep groups", "-", tag(20, 3) * 20_000 + tag(20, 4) * 20_000)
        add(method, "deep unknown messages", "-", _nested(20, 2_000))
        add(method, "overlong varint", "-", tag(1, 0) + b"\xff" * 11)
        add(method, "length past the end", "-", tag(1, 2) + varint(1000) + b"abc")
        add(method, "field number 0", "-", b"\x00\x01")
        add(method, "unknown fields", "-", number(999, 1) + delimited(1000, b"x" * 100))
    add("SubmitRequest", "server-set fields", "request.creator,create_time", _with_server_fields(fresh("srv")))
    add("SubmitRequest", "nested Any", "request.input", _nested_any(fresh("any")))

    # Valid requests mixed in: each must be acknowledged and FINISH.
    for _ in range(12):
        request_id = fresh("valid")
        job_type = rng.choice(["echo", "echo", "countdown", "hash"])
        if job_type == "hash":
            payload = _hash_input(rng.randbytes(64))
            raw = submit_wire(request_id=request_id, job_type="hash", data=[], type_url=HASH_URL, input_value=payload)
        elif job_type == "countdown":
            raw = submit_wire(request_id=request_id, job_type="countdown", data=[("steps", "2"), ("interval", "0.01")])
        else:
            raw = submit_wire(request_id=request_id, data=[("k", "v" * rng.randrange(1, 2000)), ("é", "ü")])
        add("SubmitRequest", f"valid {job_type}", "-", raw, valid_id=request_id)
        if rng.random() < 0.3:  # the same request again: idempotent
            add("SubmitRequest", f"valid {job_type} again", "-", raw)
    at_limit = [(f"k{i:03}", "v" * 200) for i in range(MAX_DATA_ENTRIES)]
    full = fresh("valid")
    add("SubmitRequest", "valid, data at its limits", "-", submit_wire(request_id=full, data=at_limit), valid_id=full)
    rng.shuffle(probes)
    return probes


@functools.cache
def huge_probes() -> list[tuple[str, str, str, bytes]]:
    """The huge inputs, the same on every pass: (method, kind, field, raw)."""
    out: list[tuple[str, str, str, bytes]] = []
    many = [(f"k{i}", "v") for i in range(MAX_DATA_ENTRIES + 1)]
    out.append(
        ("SubmitRequest", f"{len(many)} data entries", "request.data", submit_wire(request_id="map-1", data=many))
    )
    lots = pb.Request(id="map-2", type="echo", data={f"k{i}": str(i) for i in range(30_000)})
    out.append(
        ("SubmitRequest", "30k data entries", "request.data", pb.SubmitRequestRequest(request=lots).SerializeToString())
    )
    same = delimited(6, delimited(1, b"k") + delimited(2, b"v")) * 50_000
    out.append(
        ("SubmitRequest", "one key 50k times", "request.data", delimited(1, request_wire(request_id="map-3") + same))
    )
    big = "x" * (MIB + MIB // 2)
    out += [
        ("SubmitRequest", "1.5 MiB value", "request.data.value", submit_wire(request_id="map-4", data=[("k", big)])),
        ("SubmitRequest", "1.5 MiB key", "request.data.key", submit_wire(request_id="map-5", data=[(big, "v")])),
        (
            "SubmitRequest",
            "data over its bytes",
            "request.data",
            submit_wire(request_id="map-6", data=[("k", "x" * MAX_DATA_BYTES)]),
        ),
        (
            "SubmitRequest",
            "1.5 MiB input",
            "request.input",
            submit_wire(job_type="hash", type_url=HASH_URL, input_value=big.encode()),
        ),
        (
            "SubmitRequest",
            "type_url of 900k",
            "request.input.type_url",
            submit_wire(job_type="hash", type_url="u" * 900_000),
        ),
        (
            "ListJobs",
            "40k distinct types",
            "types",
            pb.ListJobsRequest(types=[f"t{i}" for i in range(40_000)]).SerializeToString(),
        ),
        ("ListJobs", "100k states", "states", list_wire(packed_states=[3] * 100_000)),
    ]
    for size in (129, 4096, 256 * 1024):
        huge = "i" * size
        out += [
            ("SubmitRequest", f"id of {size}", "request.id", submit_wire(request_id=huge)),
            ("SubmitRequest", f"type of {size}", "request.type", submit_wire(request_id="huge-1", job_type=huge)),
            (
                "SubmitRequest",
                f"parent_id of {size}",
                "request.parent_id",
                submit_wire(request_id="huge-2", parent_id=huge),
            ),
            (
                "SubmitRequest",
                f"type_url of {size}",
                "request.input.type_url",
                submit_wire(job_type="hash", type_url=huge),
            ),
            ("WatchJob", f"id of {size}", "request_id", id_wire(huge)),
            ("GetJob", f"id of {size}", "request_id", id_wire(huge)),
            ("CancelJob", f"id of {size}", "request_id", id_wire(huge)),
            ("ListJobs", f"parent_id of {size}", "parent_id", list_wire(parent_id=huge)),
            ("ListJobs", f"type of {size}", "types", list_wire(types=[huge])),
            ("ListJobs", f"page_token of {size}", "page_token", list_wire(page_token=huge)),
        ]
    return out


@functools.cache
def over_limit() -> bytes:
    return delimited(15, b"z" * (MAX_MESSAGE_BYTES + 64))


@functools.cache
def gzip_bomb() -> bytes:
    return delimited(15, bytes(2 * MAX_MESSAGE_BYTES))


def _nested(field: int, depth: int) -> bytes:
    inner = b""
    for _ in range(depth):
        inner = delimited(field, inner)
    return inner


def _with_server_fields(request_id: str) -> bytes:
    request = pb.Request(id=request_id, type="echo", creator="someone-else")
    request.create_time.FromDatetime(datetime(2000, 1, 1, tzinfo=UTC))
    return pb.SubmitRequestRequest(request=request).SerializeToString()


def _nested_any(request_id: str) -> bytes:
    inner = any_pb2.Any()
    for _ in range(200):
        outer = any_pb2.Any()
        outer.Pack(inner)
        inner = outer
    request = pb.Request(id=request_id, type="hash")
    request.input.CopyFrom(inner)
    return pb.SubmitRequestRequest(request=request).SerializeToString()


def _hash_input(data: bytes) -> bytes:
    # ajs.examples.v1.HashRequest: data = 1 (bytes), algorithm = 2 (enum, 1 = SHA256), rounds = 3.
    return delimited(1, data) + number(2, 1) + number(3, 1)


# -- the server -----------------------------------------------------------------------------------------------


class Server:
    def __init__(self, connector: str, home: Path) -> None:
        self.connector = connector
        self.schema = ""
        args = ["--connector", connector, "--max-jobs", "8", "--shutdown-grace", "1"]
        args += ["--cancel-grace", "1"]
        if connector == "postgres":
            self.dsn = postgres_dsn()
            self.schema = unique_schema()
            args += ["--dsn", self.dsn, "--schema", self.schema]
        elif connector == "sqlite":
            args += ["--database", str(home / "hostile.db")]
        self.served: Served = start_server(home, *args)

    @property
    def pid(self) -> int:
        return self.served.process.pid

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        found = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert found, status
        return int(found.group(1)) / 1024

    def errors(self) -> list[str]:
        """The distinct exception lines of the server's log (the last line of each traceback)."""
        lines = self.served.log.read_text(errors="replace").splitlines()
        found: list[str] = []
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                end = i + 1
                while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
                    end += 1
                if end < len(lines) and lines[end] not in found:
                    found.append(lines[end][:300])
        return found

    def stop(self) -> None:
        process = self.served.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if self.schema:
            drop_schema(self.schema)


@contextlib.asynccontextmanager
async def serving(connector: str, home: Path) -> AsyncIterator[Server]:
    server = Server(connector, home)
    try:
        yield server
    finally:
        server.stop()


def channel_to(target: str) -> grpc.aio.Channel:
    unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    return grpc.aio.insecure_channel(target, options=unlimited)


async def until_final(stub: pb_grpc.JobServiceStub, request_id: str, deadline: float) -> pb.Job:
    loop = asyncio.get_running_loop()
    while True:
        job = (await stub.GetJob(pb.GetJobRequest(request_id=request_id), timeout=10)).job
        if job.state >= pb.REQUEST_STATE_FINISHED or loop.time() > deadline:
            return job
        await asyncio.sleep(0.05)


# -- the test -------------------------------------------------------------------------------------------------


async def junk_connections(target: str, rng: random.Random) -> int:
    """Connections that speak no gRPC: random bytes, a broken HTTP/2 preface, HTTP/1.1. The server shrugs them off."""
    host, port = target.rsplit(":", 1)
    junks = [rng.randbytes(300), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(300), b"GET / HTTP/1.1\r\n\r\n"]
    for junk in junks:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(junk)
        with contextlib.suppress(OSError):
            await writer.drain()
            await asyncio.wait_for(reader.read(4096), 5)  # the server's SETTINGS or GOAWAY, or its close
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return len(junks)


@dataclasses.dataclass
class Tally:
    calls: int = 0
    bad: list[Outcome] = dataclasses.field(default_factory=list)
    nul_accepted: list[Outcome] = dataclasses.field(default_factory=list)
    valid_failed: list[str] = dataclasses.field(default_factory=list)
    lost: list[str] = dataclasses.field(default_factory=list)
    duplicated: list[str] = dataclasses.field(default_factory=list)
    reran: list[str] = dataclasses.field(default_factory=list)

    def count(self, outcomes: list[Outcome]) -> None:
        self.calls += len(outcomes)
        self.bad += [o for o in outcomes if unexpected(o)]
        self.nul_accepted += [o for o in outcomes if o.probe.refuse_nul and o.code is C.OK]
        self.valid_failed += [o.probe.valid_id for o in outcomes if o.probe.valid_id and o.code is not C.OK]

    async def check_jobs(self, stub: pb_grpc.JobServiceStub, request_ids: list[str]) -> None:
        """Every acknowledged valid request FINISHED, once, with gapless Responses."""
        deadline = asyncio.get_running_loop().time() + 30
        for request_id in request_ids:
            job = await until_final(stub, request_id, deadline)
            if job.state != pb.REQUEST_STATE_FINISHED:
                self.lost.append(f"{request_id}: {pb.RequestState.Name(job.state)}")
                continue
            watch = stub.WatchJob(pb.WatchJobRequest(request_id=request_id), timeout=10)
            responses = [r.response async for r in watch]
            sequences = [r.sequence for r in responses]
            if sequences != list(range(1, len(sequences) + 1)) or sum(r.is_final for r in responses) != 1:
                self.duplicated.append(f"{request_id}: sequences {sequences}")
            if job.attempt != 1:  # nothing crashed: a second attempt means a write was lost
                self.reran.append(f"{request_id}: attempt {job.attempt}")


async def one_pass(channel: grpc.aio.Channel, probes: list[Probe]) -> list[Outcome]:
    """Sends the big probes one at a time (so RSS measures what each leaves, not how many met), the rest 8 at once."""
    big = [p for p in probes if len(p.raw) > 64 * 1024]
    small = [p for p in probes if len(p.raw) <= 64 * 1024]
    outcomes = [await send(channel, probe) for probe in big]
    queue: asyncio.Queue[Probe] = asyncio.Queue()
    for probe in small:
        queue.put_nowait(probe)

    async def worker() -> None:
        while not queue.empty():
            outcomes.append(await send(channel, queue.get_nowait()))

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return outcomes


@pytest.mark.timeout(180 * scale())
@pytest.mark.parametrize("connector", ["memory", "sqlite", "postgres"])
async def test_hostile_bytes_never_crash_never_answer_internal(connector: str, tmp_path: Path) -> None:
    print(f"hostile bytes on {connector}: seed {SEED} (AJS_HOSTILE_SEED={SEED} replays it)")
    rng = random.Random(SEED)
    passes = PASSES * scale()
    tally = Tally()
    rss: list[float] = []
    junk = 0
    async with serving(connector, tmp_path) as server, channel_to(server.served.target) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        loop = asyncio.get_running_loop()

        # A job due at the last instant a Timestamp can name, queued first so that it is the next due for a
        # while: the claim loop must put it on its own clock without overflowing.
        far = pb.Request(id="anchor-far", type="echo")
        far.run_after.FromDatetime(datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
        await stub.SubmitRequest(pb.SubmitRequestRequest(request=far))
        # Something for the probes to point at: a FINISHED job and a real page token.
        for i in range(3):
            await stub.SubmitRequest(pb.SubmitRequestRequest(request=pb.Request(id=f"anchor-{i}", type="echo")))
        finished = await until_final(stub, "anchor-0", loop.time() + 20)
        assert finished.state == pb.REQUEST_STATE_FINISHED, finished
        token = (await stub.ListJobs(pb.ListJobsRequest(page_size=1))).next_page_token
        assert token
        anchors = Anchors("anchor-0", token)

        for round_ in range(passes):
            began = loop.time()
            outcomes = await one_pass(channel, hostile(rng, anchors, round_))
            junk += await junk_connections(server.served.target, rng)
            sent = loop.time()
            tally.count(outcomes)
            # The server is up and healthy, and the valid requests mixed in FINISHED.
            assert server.served.process.poll() is None, f"the server died (seed {SEED}): {server.errors()}"
            checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
            await tally.check_jobs(stub, [o.probe.valid_id for o in outcomes if o.probe.valid_id and o.code is C.OK])
            rss.append(server.rss_mb())
            timing = f"sent in {sent - began:.1f}s, checked in {loop.time() - sent:.1f}s"
            print(f"pass {round_ + 1}/{passes}: {len(outcomes)} calls ({timing}), RSS {rss[-1]:.1f} MB")
        errors = server.errors()

    # The trend after the first pass, by its floor: the lowest RSS of the later half of the passes against the
    # RSS after the first. Peaks are no leak: the allocator keeps the high-water mark of the huge inputs, and
    # RSS rises and falls by tens of MB between passes (seen: 62 -> 114 -> 68 MB over 16 passes). A leak
    # raises the floor by its rate times half the passes; more passes (AJS_FAULT_SCALE) find smaller leaks.
    growth = min(rss[len(rss) // 2 :]) - rss[0]
    distinct = sorted({o.line(connector) for o in tally.bad})
    nul_lines = sorted({o.line(connector) for o in tally.nul_accepted})
    report(
        f"hostile bytes ({connector})",
        acknowledged=tally.calls,
        lost=len(tally.lost),
        duplicated=len(tally.duplicated),
        unexpected=len(tally.bad),
        rss_growth_mb=round(growth, 1),
        rss_mb=[round(r, 1) for r in rss],
        nul_accepted=len(tally.nul_accepted),
        reran=len(tally.reran),
        logged_exceptions=len(errors),
        junk_connections=junk,
        seed=SEED,
    )
    for line in distinct + nul_lines:
        print("  " + line)
    for line in errors:
        print("  server log: " + line)
    summary = f"seed {SEED}; server log: {errors[:10]}"
    assert not distinct, f"{len(tally.bad)} calls answered unexpectedly ({summary}):\n" + "\n".join(distinct)
    assert not tally.valid_failed, f"valid submits failed: {tally.valid_failed[:10]} ({summary})"
    assert not tally.lost, f"valid jobs that never FINISHED: {tally.lost[:10]} ({summary})"
    assert not tally.duplicated, f"valid jobs with broken Responses: {tally.duplicated[:10]} ({summary})"
    assert not tally.reran, f"valid jobs run twice without a crash (a lost write): {tally.reran[:10]} ({summary})"
    assert not nul_lines, "U+0000 reached the store instead of INVALID_ARGUMENT:\n" + "\n".join(nul_lines)
    # Whatever the callers were answered, nothing behind them failed either (the claim loop, the writers, ...).
    assert not errors, f"the server logged exceptions (seed {SEED}):\n" + "\n".join(errors)
    assert growth <= RSS_GROWTH_BOUND_MB, f"RSS grew {growth:.1f} MB after the first pass: {rss} (seed {SEED})"
