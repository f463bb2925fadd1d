"""The ``ajs`` command as a user runs it: a real ``ajs serve`` process and CLI subprocesses."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    assert result.stdout.strip() == "SERVING"


def test_failed_job_exits_1_with_its_message(served: Served) -> None:
    result = ajs("submit", "fail", "--data", "message=no luck", "--watch", target=served.target)
    assert result.returncode == 1
    assert "FAILED: no luck" in result.stdout


def test_unsupported_type_exits_1(served: Served) -> None:
    result = ajs("submit", "no-such-job", "--watch", target=served.target)
    assert result.returncode == 1
    assert "requests of type 'no-such-job' are not supported" in result.stdout


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
    time.sleep(0.3)
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
