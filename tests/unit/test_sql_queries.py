"""The named queries of the SQL connectors: complete for every dialect, and their states follow the enum."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from ajs_grpc.connectors import _sql
from ajs_grpc.connectors.sqlite import SqliteConnector
from ajs_grpc.core.model import RequestState

PACKAGE = Path(_sql.__file__).resolve().parents[1]
DIALECTS = ("sqlite", "postgres")
# A state compared with a number written in the SQL itself: "state = 1", "state IN (1, 2)", "state >= 3".
STATE_LITERAL = re.compile(r"\bstate\s*(=|<>|!=|>=|<=|>|<|\bIN\b)\s*\(?\s*\d", re.IGNORECASE)
# Every query the SQL core runs, by name (what a dialect must define).
CORE_QUERIES = {
    "migration_1",
    "find_job",
    "find_job_locked",
    "find_jobs",
    "jobs_at",
    "job_exists",
    "insert_job",
    "save_job",
    "save_job_claimed",
    "save_job_released",
    "claim_due",
    "renew_leases",
    "expired_jobs",
    "next_due",
    "cancel_tree",
    "mark_cancel_requested",
    "delete_ended",
    "list_jobs",
    "list_jobs_newest_first",
    "count_jobs",
    "responses_after",
    "migration_2",
    "gated_due",
    "claim_gate_lock",
    "gated_candidates",
    "lock_created",
    "save_bucket",
    "lock_unique",
    "find_unique",
    "set_paused",
    "list_queues",
    "held_back",
}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_dialect_defines_every_query_with_a_reason(dialect: str) -> None:
    queries = _sql.load_queries(dialect)
    assert set(queries) >= CORE_QUERIES
    text = (PACKAGE / "connectors" / "queries" / f"{dialect}.sql").read_text()
    for name in queries:
        # "-- name: x" is followed by one line saying why.
        assert re.search(rf"^-- name: {name}\n-- \S", text, re.MULTILINE), name


def test_no_sql_in_the_package_writes_a_state_as_a_number() -> None:
    offenders = []
    for path in [*PACKAGE.rglob("*.sql"), *PACKAGE.rglob("*.py")]:
        if "proto" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if STATE_LITERAL.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_queue_indexes_and_claims_follow_the_enum(dialect: str) -> None:
    queries = _sql.load_queries(dialect)
    schema = " ".join(" ".join(queries["migration_1"]).split())
    created, pending = int(RequestState.CREATED), int(RequestState.PENDING)
    finished = int(RequestState.FINISHED)
    # "Ended" is written "state >= FINISHED": the final states must be the highest ones.
    assert {s for s in RequestState if s.is_final} == {s for s in RequestState if s >= RequestState.FINISHED}
    assert f"jobs_ready ON jobs (priority DESC, position) WHERE state = {created}" in schema
    assert f"jobs_due ON jobs (due_time) WHERE state = {created}" in schema
    assert f"jobs_leases ON jobs (lease_expires) WHERE state = {pending}" in schema
    assert f"jobs_ended ON jobs (update_time) WHERE state >= {finished}" in schema
    assert f"state >= {finished} AND update_time" in " ".join(queries["delete_ended"])
    assert f"j.state = {created}" in " ".join(queries["claim_due"])
    assert f"j.state = {pending}" in " ".join(queries["expired_jobs"])
    assert f"state IN ({created}, {pending})" in " ".join(queries["cancel_tree"])


async def test_a_database_made_by_the_connector_has_the_enums_indexes(tmp_path: Path) -> None:
    connector = SqliteConnector(tmp_path / "q.db")
    await connector.open()
    await connector.close()
    with sqlite3.connect(tmp_path / "q.db") as connection:
        indexes = dict(connection.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'").fetchall())
    connection.close()
    created = int(RequestState.CREATED)
    # Schema 2 split the queue: jobs with flow policies (gated) are claimed apart.
    assert indexes["jobs_ready"].endswith(f"WHERE state = {created} AND gated = 0")
    assert indexes["jobs_gated"].endswith(f"WHERE state = {created} AND gated = 1")
    assert indexes["jobs_due"].endswith(f"WHERE state = {created} AND gated = 0")
    assert indexes["jobs_leases"].endswith(f"WHERE state = {int(RequestState.PENDING)}")


def test_an_unknown_substitution_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sql, "SUBSTITUTIONS", {**_sql.SUBSTITUTIONS, "CREATED": "7"})
    assert "j.state = 7" in " ".join(_sql.load_queries("sqlite")["claim_due"])  # the enum is the only source
    monkeypatch.setattr(_sql, "SUBSTITUTIONS", {})
    with pytest.raises(ValueError, match="unknown"):
        _sql.load_queries("sqlite")
