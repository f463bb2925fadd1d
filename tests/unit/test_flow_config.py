"""Flow policies as a job declares them (``@job``) and as the configuration overrides them (``[jobs.TYPE]``)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from ajs_grpc.core.errors import ConfigError, PluginError
from ajs_grpc.core.flow import FlowPolicy
from ajs_grpc.core.model import Request, RequestState
from ajs_grpc.edge.config import load
from ajs_grpc.edge.server import ServerConfig
from ajs_grpc.engine.plugins import Plugins
from ajs_grpc.faces import cli
from ajs_grpc.jobs import Concurrency, JobContext, JobPlugin, JobStates, RateLimit, Unique, job

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ajs.toml"


async def _run(request: Request, ctx: JobContext) -> None:
    """Does nothing."""


def plugins(*declared: JobPlugin) -> Plugins:
    return Plugins({}, {}, {plugin.type: plugin for plugin in declared})


def configured(tmp_path: Path, text: str) -> dict[str, dict[str, object]]:
    file = tmp_path / "ajs.toml"
    file.write_text(text)
    return load(file, environ={}).job_policies


def test_the_decorator_builds_the_types_flow_policy() -> None:
    declared = job(
        "resize",
        concurrency=Concurrency(key="tenant", limit=2),
        rate_limit=RateLimit(key="endpoint", rate=10, per="1s", burst=5),
        ordered_by="account",
        unique=Unique(key="image", states=JobStates.QUEUED, ttl="1h"),
    )(_run)
    assert declared.flow == FlowPolicy(
        Concurrency("tenant", 2),
        RateLimit("endpoint", 10, 1.0, 5),
        "account",
        Unique("image", JobStates.QUEUED, 3600.0),
    )
    flow = declared.flow.flow(Request(id="r", type="resize", data={"tenant": "acme"}))
    assert (flow.concurrency_key, flow.concurrency_limit, flow.rate, flow.burst) == ('["resize", "acme"]', 2, 10.0, 5)
    assert flow.ordered_key == '["resize", ""]'  # no "account" entry: the empty key
    assert flow.unique_states == frozenset({RequestState.CREATED})


def test_a_job_without_policies_has_an_empty_flow_policy() -> None:
    assert job("plain")(_run).flow.empty
    assert JobPlugin("plain", _run).flow == FlowPolicy()


def test_a_malformed_policy_fails_at_the_decorator() -> None:
    with pytest.raises(ValueError, match="ordered_by"):
        job("x", ordered_by="")(_run)
    with pytest.raises(ValueError, match="limit"):
        job("x", concurrency=Concurrency(key="tenant", limit=0))(_run)
    with pytest.raises(TypeError, match="FlowPolicy"):
        JobPlugin("x", _run, flow="tenant")  # type: ignore[arg-type]


def test_the_toml_table_overrides_the_codes_policies_one_by_one(tmp_path: Path) -> None:
    declared = job("resize", concurrency=Concurrency("tenant", 2), ordered_by="account")(_run)
    policies = configured(
        tmp_path,
        """
[jobs.resize]
max_attempts = 4
concurrency = {key = "region", limit = 5}
rate_limit = {key = "endpoint", rate = 20, per = "1m", burst = 3}
unique = {key = "image", states = ["queued", "running"], ttl = "30m"}
""",
    )
    plugin = plugins(declared).with_policies(policies).jobs["resize"]
    assert plugin.retry.max_attempts == 4
    assert plugin.flow == FlowPolicy(
        concurrency=Concurrency("region", 5),
        rate_limit=RateLimit("endpoint", 20, 60.0, 3),
        ordered_by="account",  # not in the table: the code's stands
        unique=Unique("image", JobStates.QUEUED | JobStates.RUNNING, 1800.0),
    )


def test_an_empty_ordered_by_in_the_table_turns_the_codes_order_off(tmp_path: Path) -> None:
    declared = job("ledger", ordered_by="account")(_run)
    policies = configured(tmp_path, '[jobs.ledger]\nordered_by = ""\n')
    assert plugins(declared).with_policies(policies).jobs["ledger"].flow.ordered_by is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('concurrency = {key = "tenant", limit = 0}', "jobs.t.concurrency: concurrency: limit must be a whole number"),
        ('concurrency = {key = "tenant", limt = 2}', "jobs.t.concurrency: concurrency: .*limt"),
        ('concurrency = "tenant"', "jobs.t.concurrency: concurrency must be a table"),
        (
            'rate_limit = {key = "e", rate = 10, per = "soon"}',
            "jobs.t.rate_limit: rate_limit: per: expected a duration",
        ),
        ('rate_limit = {key = "", rate = 10}', "jobs.t.rate_limit: rate_limit: key must name a Request.data entry"),
        ("ordered_by = 3", "jobs.t.ordered_by: ordered_by must name a data entry"),
        ('unique = {key = "r", states = ["done"]}', "jobs.t.unique: unique: unknown state 'done'"),
        ('unique = {key = "r", states = "queued"}', "jobs.t.unique: unique: states must be a list"),
        ('unique = {key = "r", states = []}', "jobs.t.unique: unique: give states, a ttl, or both"),
    ],
)
def test_a_bad_flow_policy_in_the_file_is_a_config_error_naming_the_key(
    tmp_path: Path, line: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        configured(tmp_path, f"[jobs.t]\n{line}\n")


def test_ajs_config_check_names_a_bad_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "ajs.toml"
    file.write_text('[jobs.resize]\nconcurrency = {key = "tenant", limit = -1}\n')
    assert cli.main(["config", "check", str(file)]) == cli.EXIT_CONFIG
    assert "jobs.resize.concurrency: concurrency: limit must be a whole number" in capsys.readouterr().err


def test_the_rendered_configuration_keeps_the_policies_as_toml(tmp_path: Path) -> None:
    file = tmp_path / "ajs.toml"
    file.write_text(
        '[jobs.t]\nconcurrency = {key = "tenant", limit = 2}\nunique = {key = "r", states = ["queued"], ttl = "1h"}\n'
    )
    rendered = load(file, environ={}).render()
    again = tmp_path / "again.toml"
    again.write_text(re.sub(r"  # .*", "", rendered))
    assert load(again, environ={}).job_policies == load(file, environ={}).job_policies


def test_the_examples_commented_flow_keys_are_valid() -> None:
    lines = EXAMPLE.read_text().splitlines()
    flow_lines = [line[2:] for line in lines if re.match(r"# (concurrency|rate_limit|ordered_by|unique) = ", line)]
    assert len(flow_lines) == 4
    table = tomllib.loads("\n".join(flow_lines))
    policy = FlowPolicy.from_settings(table)
    assert None not in (policy.concurrency, policy.rate_limit, policy.ordered_by, policy.unique)


# -- the queues an instance runs ----------------------------------------------------------------


def test_queues_come_from_the_flag_the_environment_or_the_file(tmp_path: Path) -> None:
    file = tmp_path / "ajs.toml"
    file.write_text('[server]\nqueues = ["images", "default"]\n')
    assert load(file, environ={})["server.queues"] == ["images", "default"]
    assert load(file, environ={"AJS_SERVER_QUEUES": "a, b,a"})["server.queues"] == ["a", "b"]
    assert load(file, environ={}, flags={"server.queues": "c"})["server.queues"] == ["c"]
    assert ServerConfig.from_settings(load(None, environ={})).queues is None  # all queues
    assert ServerConfig.from_settings(load(file, environ={})).queues == ("images", "default")


@pytest.mark.parametrize("value", ["bad name", "-x", "x" * 129])
def test_a_bad_queue_name_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.queues: queue"):
        load(None, environ={"AJS_SERVER_QUEUES": value})


def test_a_policy_for_a_type_nobody_provides_is_refused(tmp_path: Path) -> None:
    policies = configured(tmp_path, '[jobs.ghost]\nordered_by = "account"\n')
    with pytest.raises(PluginError, match="ghost"):
        plugins().with_policies(policies)
