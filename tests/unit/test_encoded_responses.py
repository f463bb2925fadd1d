"""A Response is encoded once for all the WatchJob streams that send it."""

from __future__ import annotations

from datetime import timedelta

from ajs_grpc.core.model import Progress, RequestState, Response, now
from ajs_grpc.edge.service import EncodedResponses
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb


def response(sequence: int = 2, request_id: str = "~alice/job", **changes: object) -> Response:
    fields: dict[str, object] = {
        "request_id": request_id,
        "sequence": sequence,
        "create_time": now(),
        "state": RequestState.PENDING,
        "progress": Progress(0.5, "half"),
    }
    fields.update(changes)
    return Response(**fields)  # type: ignore[arg-type]


def test_streams_showing_the_same_name_share_one_encoding() -> None:
    cache = EncodedResponses()
    first = response()
    encoded = cache.get(first, "job")
    assert cache.get(first, "job") is encoded  # not encoded again
    decoded = pb.WatchJobResponse.FromString(encoded).response
    assert (decoded.request_id, decoded.sequence, decoded.progress.message) == ("job", 2, "half")
    admin = pb.WatchJobResponse.FromString(cache.get(first, "~alice/job")).response
    assert admin.request_id == "~alice/job"


def test_a_job_submitted_again_under_its_id_is_not_mistaken_for_the_old_one() -> None:
    cache = EncodedResponses()
    old = response(sequence=1, state=RequestState.CREATED, progress=None)
    new = response(sequence=1, state=RequestState.CREATED, progress=None, create_time=old.create_time + timedelta(1))
    assert cache.get(old, "job") != cache.get(new, "job")


def test_the_cache_holds_at_most_its_bytes() -> None:
    cache = EncodedResponses(max_bytes=1000)
    big = {"k": "x" * 300}
    for sequence in range(1, 20):
        cache.get(response(sequence=sequence, data=big), "job")
    assert 0 < cache.size <= 1000
    huge = response(sequence=99, data={"k": "x" * 5000})
    assert len(cache.get(huge, "job")) > 5000  # too big to keep, still encoded
