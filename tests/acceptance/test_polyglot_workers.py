"""Workers in other languages: the Go and the Node.js example workers run typed jobs submitted from Python.

Both are built from the generated stubs (`clients/go/test.sh` builds `clients/go/bin/ajs-go-worker`;
`npm ci` in `clients/node` installs what `examples/hash-worker.js` needs), as `.ci/run` does before
the tests. Both declare the same type here (`poly-hash`, typed `ajs.examples.v1.HashRequest` ->
`HashResponse`), so a job one of them was running when it was SIGKILLed runs again in the other.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ajs_examples.proto.ajs.examples.v1.hash_pb2 import ALGORITHM_SHA256, ALGORITHM_SHA512, HashRequest, HashResponse
from google.protobuf import any_pb2

from ajs_grpc.client import AsyncClient
from ajs_grpc.core.errors import AjsError
from ajs_grpc.core.model import RequestState, Response
from tests.serve_process import Served, WorkerProcess, start_server

S = RequestState
ROOT = Path(__file__).resolve().parents[2]
GO_WORKER = ROOT / "clients" / "go" / "bin" / "ajs-go-worker"
NODE_WORKER = ROOT / "clients" / "node" / "examples" / "hash-worker.js"
TYPE = "poly-hash"


def _missing() -> str:
    if not GO_WORKER.exists():
        return f"{GO_WORKER} is not built (clients/go/test.sh builds it)"
    if shutil.which("node") is None or not (ROOT / "clients" / "node" / "node_modules").exists():
        return "node or clients/node/node_modules is missing (npm ci in clients/node)"
    return ""


@pytest.fixture(autouse=True)
def _built() -> None:
    missing = _missing()
    if missing:
        if os.environ.get("CI"):  # .ci/run builds both first: missing there is a failure, not a skip
            pytest.fail(missing)
        pytest.skip(missing)


class LanguageWorker(WorkerProcess):
    """The Go or Node.js example worker as a process, registered."""

    def __init__(self, language: str, target: str, home: Path, name: str) -> None:
        self.language = language
        command = [str(GO_WORKER)] if language == "go" else ["node", str(NODE_WORKER)]
        command += ["--target", target, "--name", name, "--type", TYPE, "--max-concurrent", "2"]
        super().__init__(command, home, home / f"{name}.out", r"^registered \S+", errors=home / f"{name}.err")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    # A long lease: a job handed back only when its lease ran out would make the SIGKILL test time out.
    server = start_server(tmp_path, "--lease", "60s", "--cancel-grace", "5s")
    yield server
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(30)


def digest(data: bytes, algorithm: int, rounds: int) -> str:
    hashing = hashlib.sha256 if algorithm == ALGORITHM_SHA256 else hashlib.sha512
    value = data
    for _ in range(max(rounds, 1)):
        value = hashing(value).digest()
    return value.hex()


def output_of(response: Response) -> str:
    assert isinstance(response.output, any_pb2.Any)
    result = HashResponse()
    assert response.output.Unpack(result)
    return result.hex_digest


@pytest.mark.parametrize("language", ["go", "node"])
async def test_a_typed_job_from_python_runs_in_the_worker_with_progress_watched(
    language: str, served: Served, tmp_path: Path
) -> None:
    worker = LanguageWorker(language, served.target, tmp_path, f"{language}-1")
    try:
        async with AsyncClient(served.target) as client:
            types = {t.name: t for t in await client.job_types()}
            assert types[TYPE].handler == "remote"
            assert types[TYPE].input_type == "ajs.examples.v1.HashRequest"
            task = HashRequest(data=b"polyglot", algorithm=ALGORITHM_SHA512, rounds=4)
            submitted = await client.submit(TYPE, input=task)
            responses = [r async for r in client.watch(submitted.job.request.id)]
            with pytest.raises(AjsError, match=r"ajs\.examples\.v1\.HashRequest"):
                await client.submit(TYPE, data={"no": "input"})  # typed input checked at submit
        final = responses[-1]
        assert final.state is S.FINISHED
        assert output_of(final) == digest(b"polyglot", ALGORITHM_SHA512, 4)
        assert final.data["language"] == language
        assert [r.progress.fraction for r in responses if r.progress] == [0.25, 0.5, 0.75, 1.0]
    finally:
        assert worker.stop() == 0  # drained on SIGTERM


@pytest.mark.parametrize("language", ["go", "node"])
async def test_a_cancel_from_python_reaches_the_worker(language: str, served: Served, tmp_path: Path) -> None:
    worker = LanguageWorker(language, served.target, tmp_path, f"{language}-1")
    try:
        async with AsyncClient(served.target) as client:
            task = HashRequest(data=b"slow", algorithm=ALGORITHM_SHA256, rounds=600)
            submitted = await client.submit(TYPE, input=task, data={"pause_ms": "100"})
            request_id = submitted.job.request.id
            async for response in client.watch(request_id):
                if response.progress is not None:
                    break  # it runs in the worker now
            began = time.monotonic()
            await client.cancel(request_id)
            responses = [r async for r in client.watch(request_id)]
            stopped_in = time.monotonic() - began
        final = responses[-1]
        assert final.state is S.CANCELLED
        assert final.error is not None
        assert final.error.reason == "CANCELLED_BY_CLIENT"
        # The worker stopped the job when told (its 60 s of rounds, or the server's 5 s grace, would be longer).
        assert stopped_in < 5
    finally:
        worker.stop()


@pytest.mark.parametrize("victim_language", ["go", "node"])
async def test_a_job_whose_worker_is_killed_runs_again_in_the_other_language_and_ends_once(
    victim_language: str, served: Served, tmp_path: Path
) -> None:
    survivor_language = "node" if victim_language == "go" else "go"
    victim = LanguageWorker(victim_language, served.target, tmp_path, f"{victim_language}-1")
    survivor: LanguageWorker | None = None
    try:
        async with AsyncClient(served.target) as client:
            task = HashRequest(data=b"survive", algorithm=ALGORITHM_SHA256, rounds=30)
            submitted = await client.submit(TYPE, input=task, data={"pause_ms": "100"})
            request_id = submitted.job.request.id
            async for response in client.watch(request_id):
                if response.progress is not None:
                    break  # it runs in the victim, the only worker yet
            survivor = LanguageWorker(survivor_language, served.target, tmp_path, f"{survivor_language}-1")
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(10)
            responses = [r async for r in client.watch(request_id)]
        final = responses[-1]
        assert [r.is_final for r in responses].count(True) == 1
        assert [r.sequence for r in responses] == list(range(1, len(responses) + 1))
        assert final.state is S.FINISHED
        assert output_of(final) == digest(b"survive", ALGORITHM_SHA256, 30)
        assert final.data["language"] == survivor_language
        assert final.data["attempt"] == "2"
        handed_back = [r for r in responses if r.state is S.CREATED and r.error is not None]
        assert [r.error.reason for r in handed_back if r.error] == ["WORKER_LOST"]
    finally:
        victim.stop()
        if survivor is not None:
            survivor.stop()
