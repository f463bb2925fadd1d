"""The typed example job ``hash``: CPU-bound, so it runs in the process-pool handler."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from ajs_examples.proto.ajs.examples.v1.hash_pb2 import Algorithm, HashRequest, HashResponse
from ajs_grpc import Request
from ajs_grpc.jobs import PermanentError, RetryPolicy, SyncJobContext, job

_ALGORITHMS: dict[int, Callable[[bytes], bytes]] = {
    Algorithm.ALGORITHM_SHA256: lambda data: hashlib.sha256(data).digest(),
    Algorithm.ALGORITHM_SHA512: lambda data: hashlib.sha512(data).digest(),
    Algorithm.ALGORITHM_BLAKE2B: lambda data: hashlib.blake2b(data).digest(),
}
# Progress Responses per job, at most.
PROGRESS_STEPS = 20


@job(
    "hash",
    input_type=HashRequest,
    output_type=HashResponse,
    handler="process",
    retry=RetryPolicy(max_attempts=2),
)
def hash_job(request: Request, ctx: SyncJobContext) -> HashResponse:
    """Hashes data, then its digest again, `rounds` times (0 counts as 1); returns the hex digest."""
    task = ctx.input
    assert isinstance(task, HashRequest)
    digest = _ALGORITHMS.get(task.algorithm)
    if digest is None:
        raise PermanentError(f"algorithm must be one of {', '.join(Algorithm.keys()[1:])}")
    rounds = max(task.rounds, 1)
    every = max(rounds // PROGRESS_STEPS, 1)
    value = task.data
    for done in range(1, rounds + 1):
        value = digest(value)
        if done % every == 0 or done == rounds:
            ctx.raise_if_cancelled()
            ctx.progress(done / rounds, f"{done}/{rounds} rounds")
    return HashResponse(hex_digest=value.hex())
