"""The ``ajs`` command as a user runs it: a real ``ajs serve`` process and CLI subprocesses."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ajs_grpc.client import AsyncClient
from tests.helpers import eventually_sync
from tests.serve_process import AJS, Served, start_server


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = start_server(tmp_path, "--shutdown-grace", "2", "--cancel-grace", "1")
    yield server
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(20)


def ajs(*args: str, target: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [AJS, *args]
    if target is not None:
        command += ["--target", target]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_submit_countdown_watch_shows_progress_and_finishes(served: Served) -> None:
    result = ajs("submit", "countdown", "--data", "steps=5", "--watch", target=served.target)  # README's command
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\S+ FINISHED", result.stdout, re.MULTILINE)
    assert "100%" in result.stderr  # the progress bar reached the end
    assert "submitted" in result.stderr


def test_health_serving(served: Served) -> None:
    result = ajs("health", target=served.target)
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["SERVING", "role: all (serves JobService and runs jobs)"]


def test_failed_job_exits_1_with_its_message(served: Served) -> None:
    result = ajs("submit", "fail", "--data", "message=no luck", "--watch", target=served.target)
    assert result.returncode == 1
    assert "FAILED: no luck" in result.stdout


def test_unsupported_type_is_refused_with_exit_5(served: Served) -> None:
    result = ajs("submit", "no-such-job", "--watch", target=served.target)
    assert result.returncode == 5
    assert "FAILED_PRECONDITION: no handler here runs requests of type 'no-such-job'" in result.stderr


def test_submit_get_list_and_cancel(served: Served) -> None:
    submitted = ajs(
        "submit",
        "countdown",
        "--id",
        "long-one",
        "--data",
        "steps=1000",
        "--data",
        "interval=0.05",
        target=served.target,
    )
    assert submitted.returncode == 0
    assert submitted.stdout.strip() == "long-one"
    watcher = subprocess.Popen(
        [AJS, "watch", "long-one", "--target", served.target], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 10
    while json.loads(ajs("get", "long-one", target=served.target).stdout)["state"] != "PENDING":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    cancelled = ajs("cancel", "long-one", target=served.target)
    assert cancelled.returncode == 0
    assert "cancellation requested" in cancelled.stdout
    out, _ = watcher.communicate(timeout=20)
    assert watcher.returncode == 3
    assert "long-one CANCELLED" in out

    job = json.loads(ajs("get", "long-one", target=served.target).stdout)
    assert job["state"] == "CANCELLED"
    assert job["data"] == {"steps": "1000", "interval": "0.05"}
    listed = ajs("list", "--state", "cancelled", target=served.target)
    assert listed.returncode == 0
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert rows[0] == ["ID", "TYPE", "STATE", "ATTEMPT", "UPDATED"]
    assert [row[:4] for row in rows[1:]] == [["long-one", "countdown", "CANCELLED", "1"]]
    again = ajs("cancel", "long-one", target=served.target)
    assert again.returncode == 5
    assert "FAILED_PRECONDITION" in again.stderr


def test_errors_are_one_line_without_traceback(served: Served) -> None:
    missing = ajs("get", "ghost", target=served.target)
    assert missing.returncode == 5
    assert missing.stderr.strip() == "ajs: NOT_FOUND: no request with id 'ghost'"
    bad = ajs("submit", "has space", target=served.target)
    assert bad.returncode == 5
    assert "INVALID_ARGUMENT" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_unreachable_server_exits_4() -> None:
    result = ajs("submit", "echo", "--timeout", "3", target="127.0.0.1:1")
    assert result.returncode == 4
    assert result.stderr.startswith("ajs: UNAVAILABLE")
    assert len(result.stderr.strip().splitlines()) == 1
    assert ajs("health", "--timeout", "3", target="127.0.0.1:1").returncode == 4


def test_usage_errors_exit_2() -> None:
    assert ajs("submit", "echo", "--data", "no-equals-sign").returncode == 2
    assert ajs("list", "--state", "sleeping").returncode == 2


def test_sigterm_drains_and_exits_0(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--shutdown-grace", "0.5", "--cancel-grace", "0.5")
    submitted = ajs("submit", "countdown", "--data", "steps=1000", "--data", "interval=0.05", target=server.target)
    assert submitted.returncode == 0
    request_id = submitted.stdout.strip()
    eventually_sync(lambda: json.loads(ajs("get", request_id, target=server.target).stdout)["state"] == "PENDING")
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(20) == 0
    log = server.log.read_text()
    assert "draining" in log
    assert "stopped" in log
    assert ajs("health", "--timeout", "2", target=server.target).returncode == 4


def test_a_taken_port_is_a_clear_error(served: Served, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"  # its own database: only the port is shared
    elsewhere.mkdir()
    second = subprocess.run(
        [AJS, "serve", "--address", served.target], capture_output=True, text=True, timeout=30, cwd=elsewhere
    )
    assert second.returncode == 6
    assert f"ajs serve: cannot listen on {served.target}" in second.stderr
    assert "Traceback" not in second.stderr
    assert ajs("health", target=served.target).returncode == 0  # the first one is unharmed


def test_priority_and_delay(served: Served) -> None:
    submitted = ajs("submit", "echo", "--id", "later", "--priority", "-3", "--delay", "1h", target=served.target)
    assert submitted.returncode == 0
    job = json.loads(ajs("get", "later", target=served.target).stdout)
    assert job["state"] == "CREATED"
    assert job["priority"] == -3
    assert job["due_time"] == job["run_after"]
    assert job["due_time"] > job["create_time"]
    at = ajs("submit", "echo", "--run-after", "2001-01-01T00:00:00+00:00", "--watch", target=served.target)
    assert at.returncode == 0  # a time in the past means now
    assert ajs("submit", "echo", "--run-after", "tomorrow").returncode == 2


def test_an_unusable_database_stops_serve_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken.db").write_bytes(b"garbage" * 1000)
    result = subprocess.run(
        [AJS, "serve", "--address", "127.0.0.1:0", "--database", "broken.db"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 6
    assert result.stderr.strip() == "ajs serve: cannot use broken.db as the queue: file is not a database"


HASH_INPUT = '{"data": "aGVsbG8=", "algorithm": "ALGORITHM_SHA256", "rounds": 1000}'


def test_submit_a_typed_hash_job_from_json(served: Served) -> None:
    result = ajs("submit", "hash", "--input-json", HASH_INPUT, "--watch", target=served.target)
    assert result.returncode == 0, result.stderr
    expected = b"hello"
    for _ in range(1000):
        expected = hashlib.sha256(expected).digest()
    assert json.loads(result.stdout.splitlines()[-1]) == {"hex_digest": expected.hex()}
    assert "1000/1000 rounds" in result.stderr


def test_a_wrong_typed_input_is_refused(served: Served) -> None:
    bad = ajs("submit", "hash", "--input-json", '{"rounds": "many"}', target=served.target)
    assert bad.returncode == 2  # the client tells, from the descriptors: a usage error
    assert "is not a valid ajs.examples.v1.HashRequest" in bad.stderr
    missing = ajs("submit", "hash", target=served.target)
    assert missing.returncode == 5
    assert "request.input: is required" in missing.stderr


def test_types_lists_what_the_server_runs(served: Served) -> None:
    result = ajs("types", target=served.target)
    assert result.returncode == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in result.stdout.splitlines()[1:]}
    assert rows["hash"][1:4] == ["process", "ajs.examples.v1.HashRequest", "ajs.examples.v1.HashResponse"]
    assert rows["echo"][1] == "internal"


def test_plugins_from_directories_run(tmp_path: Path) -> None:
    jobs = tmp_path / "myjobs"
    jobs.mkdir()
    (jobs / "greeting.py").write_text(
        "from ajs_grpc.jobs import job\n\n"
        "@job('greet')\n"
        "async def greet(request, ctx):\n"
        "    return {'hello': request.data['name']}\n\n"
        "@job('square', handler='process')\n"
        "def square(request, ctx):\n"
        "    return {'square': str(int(request.data['n']) ** 2)}\n"
    )
    local = ajs("types", "--local", "--jobs-dir", str(jobs))
    assert local.returncode == 0
    assert "greet\tinternal" in local.stdout
    assert "square\tprocess" in local.stdout
    server = start_server(tmp_path, "--jobs-dir", "myjobs")
    try:
        greet = ajs("submit", "greet", "--data", "name=ada", "--watch", target=server.target)
        assert greet.returncode == 0
        assert '{"hello": "ada"}' in greet.stdout
        square = ajs("submit", "square", "--data", "n=12", "--watch", target=server.target)
        assert square.returncode == 0, square.stdout
        assert '{"square": "144"}' in square.stdout
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--jobs-dir", "nowhere"], 7, "the job plugin directory nowhere does not exist"),
        (["--connector", "cassandra"], 8, "no connector named 'cassandra'"),
        (["--handler", "turbo=echo"], 9, "no handler named 'turbo'"),
        (["--handler", "internal=nothing"], 10, "job type 'nothing'"),
        (["--jobs-dir", "broken"], 10, "failed to import: ZeroDivisionError"),
    ],
)
def test_serve_refuses_a_bad_plugin_configuration_with_its_exit_code(
    tmp_path: Path, args: list[str], code: int, says: str
) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.py").write_text("1 / 0\n")
    result = subprocess.run(
        [AJS, "serve", "--address", "127.0.0.1:0", *args], capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert result.returncode == code, result.stderr
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_config_check_prints_the_effective_configuration(tmp_path: Path) -> None:
    good = subprocess.run(
        [AJS, "config", "check", str(Path(__file__).parents[2] / "examples" / "ajs.toml")],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "AJS_SERVER_MAX_JOBS": "12"},
    )
    assert good.returncode == 0, good.stderr
    assert "max_jobs = 12  # $AJS_SERVER_MAX_JOBS" in good.stdout
    (tmp_path / "bad.toml").write_text("[limits]\nmax_watches = 'lots'\n")
    bad = subprocess.run([AJS, "config", "check", str(tmp_path / "bad.toml")], capture_output=True, text=True)
    assert bad.returncode == 7
    assert "limits.max_watches" in bad.stderr
    missing = subprocess.run([AJS, "config", "check", str(tmp_path / "none.toml")], capture_output=True, text=True)
    assert missing.returncode == 7
    assert "does not exist" in missing.stderr


def test_serve_with_a_config_file_json_logs_and_a_log_file(tmp_path: Path) -> None:
    (tmp_path / "ajs.toml").write_text(
        '[server]\nmax_jobs = 2\n[log]\nformat = "json"\nfile = "ajs.log"\n[storage]\nconnector = "memory"\n'
    )
    server = start_server(tmp_path, "--config", "ajs.toml", log_name="ajs.log")
    try:
        failed = ajs("submit", "fail", "--id", "will-fail", "--watch", target=server.target)
        assert failed.returncode == 1
        assert ajs("health", target=server.target).stdout.startswith("SERVING\n")
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
    lines = [json.loads(line) for line in (tmp_path / "ajs.log").read_text().splitlines()]
    [summary] = [line["message"] for line in lines if line["message"].startswith("configuration: ")]
    assert "server.max_jobs = 2 (ajs.toml)" in summary
    assert 'log.format = "json" (ajs.toml)' in summary
    failure = [line for line in lines if line.get("request_id") == "will-fail"]
    assert failure
    assert "failed as asked" in failure[0]["message"]


def test_health_exits_non_zero_when_not_serving(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--role", "worker", "--connector", "memory")
    try:
        # A worker serves health for the server as a whole, but not JobService.
        assert ajs("health", target=server.target).returncode == 0
        assert ajs("health", "--service", "ajs.v1.JobService", target=server.target).returncode == 4
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
    assert ajs("health", "--timeout", "2", target=server.target).returncode == 4


def test_a_bad_schema_name_is_a_configuration_error_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [AJS, "serve", "--connector", "postgres", "--dsn", "postgresql://127.0.0.1:1/none", "--schema", "my-queue"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 7
    assert result.stderr.strip() == (
        "ajs serve: flag: storage.schema: 'my-queue' is not a schema name: "
        "use 1-63 letters, digits and _, not starting with a digit"
    )


def test_a_failure_message_cannot_forge_log_lines(tmp_path: Path) -> None:
    forged = "2026-11-30 12:00:00,000 WARNING ajs_grpc.edge.auth: token of root accepted"
    server = start_server(tmp_path, "--connector", "memory", "--log-file", "ajs.log", log_name="ajs.log")
    try:
        failed = ajs("submit", "fail", "--id", "liar", "--data", f"message=disk full\n{forged}\r\x1b[2K", "--watch",
                     target=server.target)  # fmt: skip
        assert failed.returncode == 1
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
    lines = (tmp_path / "ajs.log").read_text().splitlines()
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
    assert all(stamp.match(line) for line in lines), lines
    assert not any(line.startswith(forged) for line in lines)
    [failure] = [line for line in lines if "disk full" in line]
    assert failure.endswith(f"disk full\\n{forged}\\r\\x1b[2K")


def test_a_token_in_plain_text_to_another_machine_is_refused() -> None:
    result = ajs("get", "x", "--token", "secret", "--timeout", "1", target="10.255.255.1:50051")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("ajs: refusing to send a token in plain text to 10.255.255.1:50051")
    insecure = ajs("get", "x", "--token", "secret", "--timeout", "1", "--insecure", target="10.255.255.1:50051")
    assert insecure.returncode == 4  # it tried: nobody answers there


def test_submit_count_queues_n_requests_in_batches_and_prints_their_ids(served: Served) -> None:
    result = ajs("submit", "echo", "--count", "25", "--batch-size", "10", "--id", "many", target=served.target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"many-{n}" for n in range(1, 26)]
    assert "submitted 25 requests (25 new, 0 already submitted)" in result.stderr
    again = ajs("submit", "echo", "--count", "25", "--id", "many", target=served.target)
    assert "(0 new, 25 already submitted)" in again.stderr
    watched = ajs("watch", "many-25", target=served.target)
    assert watched.returncode == 0
    assert "many-25 FINISHED" in watched.stdout


def test_submit_jsonl_from_stdin_and_a_bad_line_queues_nothing_of_its_batch(served: Served) -> None:
    lines = [
        json.dumps({"id": "line-1", "type": "echo", "data": {"n": "1"}}),
        json.dumps({"id": "line-2", "data": {"n": "2"}}),  # the TYPE argument's type
        json.dumps({"id": "line-3", "type": "echo", "priority": 5}),
    ]
    result = subprocess.run(
        [AJS, "submit", "echo", "--jsonl", "-", "--target", served.target],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["line-1", "line-2", "line-3"]
    got = json.loads(ajs("get", "line-3", target=served.target).stdout)
    assert got["priority"] == 5
    bad = [json.dumps({"id": "ok-1", "type": "echo"}), json.dumps({"id": "bad one", "type": "echo"})]
    refused = subprocess.run(
        [AJS, "submit", "--jsonl", "-", "--target", served.target],
        input="\n".join(bad),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 5
    assert "request 2: invalid request: request.id: must be printable ASCII without spaces" in refused.stderr
    assert ajs("get", "ok-1", target=served.target).returncode == 5  # nothing of the batch was queued
    unreadable = subprocess.run(
        [AJS, "submit", "--jsonl", "-", "--target", served.target],
        input="{not json\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unreadable.returncode == 2
    assert unreadable.stderr.startswith("ajs: line 1 of - is not an ajs.v1.Request in JSON")


def test_watch_without_an_id_prints_every_matching_jobs_responses_as_json_lines(served: Served) -> None:
    async def bookmark() -> str:
        async with AsyncClient(served.target, timeout=10) as client:
            return (await anext(client.watch_jobs())).token

    token = asyncio.run(bookmark())
    watcher = subprocess.Popen(
        [AJS, "watch", "--type", "echo", "--after-token", token, "--target", served.target],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for name in ("one", "two"):
            assert ajs("submit", "echo", "--id", name, "--data", f"n={name}", target=served.target).returncode == 0
        ajs("submit", "countdown", "--data", "steps=1", "--id", "skipped", target=served.target)
        assert watcher.stdout is not None
        lines: list[dict[str, object]] = []
        while sum(1 for line in lines if line["is_final"]) < 2:
            lines.append(json.loads(watcher.stdout.readline()))
        assert [(line["request_id"], line["sequence"], line["state"]) for line in lines] == [
            ("one", 1, "CREATED"),
            ("one", 2, "PENDING"),
            ("one", 3, "FINISHED"),
            ("two", 1, "CREATED"),
            ("two", 2, "PENDING"),
            ("two", 3, "FINISHED"),
        ]
        assert {(line["type"], line["queue"]) for line in lines} == {("echo", "default")}
        # Each line's token resumes right after it.
        assert (first_after(served, str(lines[2]["resume_token"])) or {}).get("request_id") == "two"
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(10)
        if watcher.stdout is not None:
            watcher.stdout.close()


def first_after(served: Served, token: str) -> dict[str, object] | None:
    """The first line ``ajs watch --type echo --after-token TOKEN`` prints (it never ends by itself)."""
    resumed = subprocess.Popen(
        [AJS, "watch", "--type", "echo", "--after-token", token, "--target", served.target],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert resumed.stdout is not None
        line = resumed.stdout.readline()
        return json.loads(line) if line else None
    finally:
        resumed.send_signal(signal.SIGINT)
        resumed.wait(10)
        if resumed.stdout is not None:
            resumed.stdout.close()


def test_watch_with_an_id_takes_no_filter() -> None:
    refused = ajs("watch", "some-id", "--type", "echo", target="127.0.0.1:1")
    assert refused.returncode == 2
    assert "leave out the id" in refused.stderr
