"""The first hour with the ``ajs`` command: each rough edge a new user hit, run as they ran it.

Every test runs ``ajs`` (or ``ajs serve``) as a subprocess; where the behaviour
depends on a terminal (the progress bar, table widths), in a pseudo-terminal
driven by pexpect.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from ajs_grpc.connectors.postgres import SCHEMA_VERSION
from tests.conftest import POSTGRES_DSN, drop_schema, postgres_dsn, unique_schema
from tests.serve_process import AJS, Served, start_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = start_server(tmp_path, "--connector", "memory", "--shutdown-grace", "2", "--cancel-grace", "1")
    yield server
    stop(server)


def stop(server: Served) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)


def ajs(*args: str, target: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [AJS, *args, *(["--target", target] if target else [])]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd)


def in_terminal(*args: str, columns: int = 120) -> tuple[int, str]:
    """Runs ``ajs`` in a pseudo-terminal; returns its exit status and everything it wrote."""
    child = pexpect.spawn(AJS, list(args), dimensions=(40, columns), encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus if child.exitstatus is not None else -1, child.before or ""


# -- 1: brackets are data, not markup -------------------------------------------------


def test_config_check_prints_toml_that_reads_back() -> None:
    result = ajs("config", "check", str(ROOT / "examples" / "ajs.toml"))
    assert result.returncode == 0
    assert "[server]" in result.stdout.splitlines()
    assert "[[handlers]]" in result.stdout.splitlines() or "handlers" not in result.stdout
    document = tomllib.loads(result.stdout)
    assert document["server"]["retention"] == "7d"
    assert document["limits"]["max_priority"] == 100


def test_brackets_links_and_emoji_codes_in_data_are_printed_as_they_are(served: Served) -> None:
    message = "disk [sda1] full [link=https://evil.example]click[/link] :smile: [bold]x"
    failed = ajs("submit", "fail", "--data", f"message={message}", "--watch", target=served.target)
    assert failed.returncode == 1
    assert f"FAILED: {message}" in failed.stdout
    unknown = ajs("get", "nosuch[x]", target=served.target)
    assert unknown.returncode == 5
    assert unknown.stderr.strip() == "ajs: NOT_FOUND: no request with id 'nosuch[x]'"
    markup = ajs("cancel", "x[/y]", target=served.target)
    assert markup.returncode == 5
    assert "Traceback" not in markup.stderr
    assert markup.stderr.strip() == "ajs: NOT_FOUND: no request with id 'x[/y]'"


# -- 2: a worker says what it is ------------------------------------------------------


def test_a_worker_says_its_role_and_answers_job_calls_with_where_to_go(tmp_path: Path) -> None:
    worker = start_server(tmp_path, "--role", "worker", "--connector", "memory")
    try:
        health = ajs("health", target=worker.target)
        assert health.returncode == 0
        assert health.stdout.splitlines() == [
            "SERVING",
            "role: worker (runs jobs; submit, watch and list through an instance with role all or frontend)",
        ]
        job_service = ajs("health", "--service", "ajs.v1.JobService", target=worker.target)
        assert (job_service.returncode, job_service.stdout.strip()) == (4, "NOT_SERVING")
        for command in (["submit", "echo"], ["watch", "x"], ["types"], ["list"]):
            refused = ajs(*command, target=worker.target)
            assert refused.returncode == 5, command
            assert refused.stderr.strip() == (
                "ajs: UNIMPLEMENTED: this instance only runs jobs (role worker): submit, watch and list jobs "
                "through an instance with role all or frontend"
            ), command
    finally:
        stop(worker)


# -- 3: a bad PostgreSQL DSN ------------------------------------------------------------


def test_a_database_that_does_not_exist_fails_at_once_with_its_cause(tmp_path: Path) -> None:
    dsn = postgres_dsn().rsplit("/", 1)[0] + "/nosuchdb"
    started = time.monotonic()
    result = subprocess.run(
        [AJS, "serve", "--address", "127.0.0.1:0", "--connector", "postgres", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    took = time.monotonic() - started
    assert result.returncode == 6
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ajs serve: cannot connect to PostgreSQL: ")
    assert 'database "nosuchdb" does not exist' in lines[0]
    assert took < 8, f"took {took:.1f}s"  # the pool's retries took 10.7 s before; generous for a busy machine


# -- 4: a taken port ----------------------------------------------------------------------


def test_a_taken_port_is_one_line_and_creates_no_database(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [AJS, "serve", "--address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30, cwd=tmp_path
        )
    assert result.returncode == 6
    assert result.stderr.strip() == f"ajs serve: cannot listen on 127.0.0.1:{port}: the address is in use"
    assert list(tmp_path.iterdir()) == []  # no ajs.db, no lock file


def test_a_clean_stop_leaves_only_the_database(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--database", "q.db")
    stop(server)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "serve.log") == ["q.db"]


# -- 5: targets ---------------------------------------------------------------------------


def test_a_target_without_a_port_means_the_default_port_and_a_bad_one_says_why(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--connector", "memory", address="127.0.0.1:50051")
    try:
        assert ajs("health", target="localhost").stdout.startswith("SERVING")
        assert ajs("health", target="127.0.0.1").stdout.startswith("SERVING")
    finally:
        stop(server)
    bad = ajs("health", target="nonsense:::")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "ajs: invalid target 'nonsense:::': expected HOST:PORT, e.g. 127.0.0.1:50051 or [::1]:50051 "
        "(several: comma-separated)"
    )


# -- 6, 10, 11: help and usage ------------------------------------------------------------


def test_help_says_what_flags_do_with_defaults_as_written() -> None:
    text = " ".join(ajs("serve", "--help").stdout.split())
    assert "--no-migrate postgres: refuse a schema not at this version instead of migrating it" in text
    assert "--retention DURATION how long ended jobs are kept, or forever (default 7d)" in text
    assert "(default )" not in text
    assert "(default [])" not in text
    submit = " ".join(ajs("submit", "--help").stdout.split())
    assert "--data KEY=VALUE a data entry (repeat)" in submit


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit"], "ajs submit: the following arguments are required: type; see 'ajs submit --help'"),
        (["list", "--state", "done"], "ajs list: argument --state: unknown state 'done'"),
        (["frobnicate"], "ajs: argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line_pointing_at_help(args: list[str], message: str) -> None:
    result = ajs(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(message)
    assert result.stderr.strip().endswith("--help'")


# -- 7: a clean shutdown is quiet ---------------------------------------------------------


def test_a_clean_shutdown_warns_of_no_abandoned_threads(tmp_path: Path) -> None:
    # Idle threads of the default executor were counted as abandoned jobs (2 runs in 8).
    for run in range(6):
        log = f"serve{run}.log"
        server = start_server(tmp_path, "--database", "q.db", "--log-file", log, log_name=log)
        assert ajs("submit", "echo", "--data", "k=v", "--watch", target=server.target).returncode == 0
        stop(server)
        assert server.process.returncode == 0
        assert "abandoned" not in server.log.read_text()


# -- 8: no bar for a job that does not exist ----------------------------------------------


def test_watching_an_unknown_job_draws_no_bar(served: Served) -> None:
    status, text = in_terminal("watch", "nosuchid", "--target", served.target)
    assert status == 5
    assert "WATCHING" not in text
    assert "%" not in text
    assert text.strip() == "ajs: NOT_FOUND: no request with id 'nosuchid'"
    status, text = in_terminal("submit", "echo", "--watch", "--target", served.target)
    assert status == 0
    assert "100%" in text
    assert "FINISHED" in text


# -- 9: JSON the client refuses is a usage error --------------------------------------------


def test_bad_input_json_is_a_usage_error_naming_where(served: Served) -> None:
    result = ajs("submit", "hash", "--input-json", "{bad json", target=served.target)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "ajs: --input-json is not JSON: Expecting property name enclosed in double quotes at line 1 column 2"
    )


# -- 11: polish ---------------------------------------------------------------------------


def test_types_wrap_long_names_rather_than_cutting_them(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    long_name = "reports.quarterly.regional.revenue.reconciliation"
    (jobs / "long.py").write_text(
        f"from ajs_grpc.jobs import job\n\n\n@job({long_name!r})\nasync def long(request, ctx):\n    return None\n"
    )
    server = start_server(tmp_path, "--connector", "memory", "--jobs-dir", str(jobs))
    try:
        status, text = in_terminal("types", "--target", server.target, columns=60)
    finally:
        stop(server)
    assert status == 0
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert "…" not in plain
    # Folded within its column: the name's pieces start the first lines of the table.
    pieces = [line.split()[0] for line in plain.splitlines()[1:] if line.strip()]
    assert long_name in "".join(pieces)


def test_start_up_logs_the_configuration_in_one_line(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--connector", "memory", "--max-jobs", "3")
    stop(server)
    log = server.log.read_text()
    [line] = [line for line in log.splitlines() if "configuration:" in line]
    assert "server.max_jobs = 3 (flag)" in line
    assert "[server]" not in log  # the whole dump is for --log-level debug


def test_list_shows_newest_first_unless_asked(served: Served) -> None:
    for name in ("first", "second", "third"):
        assert ajs("submit", "echo", "--id", name, target=served.target).returncode == 0
    newest = ajs("list", target=served.target).stdout.splitlines()
    assert [row.split("\t")[0] for row in newest[1:]] == ["third", "second", "first"]
    oldest = ajs("list", "--oldest-first", target=served.target).stdout.splitlines()
    assert [row.split("\t")[0] for row in oldest[1:]] == ["first", "second", "third"]


def test_typed_output_is_printed_with_the_proto_field_names(served: Served) -> None:
    result = ajs(
        "submit",
        "hash",
        "--watch",
        "--input-json",
        '{"data": "aGVsbG8=", "algorithm": "ALGORITHM_SHA256", "rounds": 1}',
        target=served.target,
    )
    assert result.returncode == 0
    assert '"hex_digest"' in result.stdout.splitlines()[-1]


@pytest.mark.skipif(not POSTGRES_DSN, reason="needs AJS_TEST_POSTGRES_DSN")
def test_db_upgrade_says_what_it_did() -> None:
    schema = unique_schema()
    try:
        dsn = ("--dsn", postgres_dsn(), "--schema", schema)
        version = SCHEMA_VERSION
        assert ajs("db", "upgrade", *dsn).stdout.strip() == f"created schema {schema} at version {version}"
        assert (
            ajs("db", "upgrade", *dsn).stdout.strip()
            == f"schema {schema} is already at version {version}; nothing to do"
        )
    finally:
        drop_schema(schema)


def test_ctrl_c_exits_130(served: Served) -> None:
    child = pexpect.spawn(
        AJS, ["submit", "countdown", "--data", "steps=100", "--watch", "--target", served.target], timeout=30
    )
    child.expect("COUNTDOWN|PENDING|CREATED")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 or child.signalstatus == signal.SIGINT
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"130 interrupted \(Ctrl\+C\)", readme)


def test_readme_names_one_dsn_variable_and_its_alias() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "AJS_STORAGE_DSN" in readme
    assert readme.count("AJS_POSTGRES_DSN") == 1  # named once, as the older alias
    assert "the seed" not in readme.lower()
    assert "tests/postgres" in readme  # the Layout section lists every test folder


def test_env_and_alias_both_name_the_dsn(tmp_path: Path) -> None:
    environment = {**os.environ, "AJS_POSTGRES_DSN": "postgresql://alias@h/db"}
    environment.pop("AJS_STORAGE_DSN", None)
    (tmp_path / "c.toml").write_text("")
    result = subprocess.run(
        [AJS, "config", "check", "c.toml"], capture_output=True, text=True, timeout=30, cwd=tmp_path, env=environment
    )
    assert 'dsn = "***"  # $AJS_POSTGRES_DSN' in result.stdout
