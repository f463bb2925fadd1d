"""The configuration: file, environment and flags, in that order of strength; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ajs_grpc.core.schedules import Catchup, Overlap
from ajs_grpc.edge.auth import Authenticator, PeerCertificate
from ajs_grpc.edge.config import SETTINGS, ConfigError, load
from ajs_grpc.edge.server import ServerConfig
from ajs_grpc.engine.plugins import discover

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ajs.toml"


def test_the_example_file_sets_every_key_to_its_default() -> None:
    settings = load(EXAMPLE, environ={})
    for setting in SETTINGS:
        assert settings[setting.name] == setting.default, setting.name
        assert settings.sources[setting.name] == str(EXAMPLE)
    assert settings.handlers == [("internal", ("echo", "countdown", "fail")), ("process", ("hash",))]
    assert settings.job_policies["countdown"]["max_attempts"] == 10
    assert settings.job_policies["countdown"]["timeout"] == 3600.0


def test_the_example_file_builds_a_server_configuration_and_chain() -> None:
    config = ServerConfig.from_settings(load(EXAMPLE, environ={}))
    chain = discover().with_policies(config.job_policies).chain(config.handlers)
    assert [h.name for h in chain.handlers] == ["internal", "process", "remote", "reject"]
    countdown = chain.plugin_for("countdown")
    assert countdown is not None
    assert countdown.retry.max_attempts == 10
    assert countdown.timeout == 3600.0


def test_the_example_tokens_file_reads() -> None:
    authenticator = Authenticator.from_file(ROOT / "examples" / "tokens.toml")
    alice = authenticator.authenticate({"authorization": "Bearer alice-token"}, None)
    root = authenticator.authenticate({"authorization": "Bearer root-token"}, None)
    assert (alice.name, alice.admin, alice.types) == ("alice", False, frozenset({"echo", "countdown", "hash"}))
    assert (root.name, root.admin) == ("root", True)
    mapped = Authenticator.from_file(ROOT / "examples" / "tokens.toml", client_certificates=True)
    bot = mapped.authenticate({}, PeerCertificate("CN=build-bot,O=Acme"))
    ops = mapped.authenticate({}, PeerCertificate("CN=anyone", ("ops.clients.example.com",)))
    assert (bot.name, bot.types, ops.name, ops.admin) == ("build-bot", frozenset({"hash"}), "ops", True)


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    file = tmp_path / "ajs.toml"
    file.write_text('[server]\naddress = "127.0.0.1:1111"\nmax_jobs = 3\nlease = "1m"\n[log]\nlevel = "debug"\n')
    environ = {"AJS_SERVER_ADDRESS": "127.0.0.1:2222", "AJS_SERVER_MAX_JOBS": "4"}
    settings = load(file, environ=environ, flags={"server.address": "127.0.0.1:3333"})
    assert settings["server.address"] == "127.0.0.1:3333"
    assert settings.sources["server.address"] == "flag"
    assert settings["server.max_jobs"] == 4
    assert settings.sources["server.max_jobs"] == "$AJS_SERVER_MAX_JOBS"
    assert settings["server.lease"] == 60.0
    assert settings["log.level"] == "debug"
    assert settings["server.shutdown_grace"] == 30.0
    assert settings.sources["server.shutdown_grace"] == "default"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[server]\nadress = 'x'\n", "unknown key server.adress"),
        ("[sever]\naddress = 'x'\n", "unknown section [sever]"),
        ("[server]\nmax_jobs = 'many'\n", "server.max_jobs"),
        ("[server]\nlease = -5\n", "server.lease: a duration must be positive"),
        ("[storage]\nmigrate = 'perhaps'\n", "storage.migrate: expected true or false"),
        ("[log]\nformat = 'xml'\n", "log.format: expected one of plain, json"),
        ("[jobs.echo]\nretries = 3\n", "unknown key jobs.echo.retries"),
        ("[[handlers]]\ntypes = ['echo']\n", "handlers #1 needs name"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, says: str) -> None:
    file = tmp_path / "ajs.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("(", r"\(")):
        load(file, environ={})


def test_bad_environment_values_name_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"\$AJS_LIMITS_MAX_WATCHES: limits.max_watches"):
        load(None, environ={"AJS_LIMITS_MAX_WATCHES": "lots"})


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nowhere.toml", environ={})


def test_secrets_are_masked_when_printed() -> None:
    settings = load(None, environ={"AJS_STORAGE_DSN": "postgresql://ajs:hunter2@db/ajs"})
    text = settings.render()
    assert "hunter2" not in text
    assert 'dsn = "postgresql://ajs:***@db/ajs"  # $AJS_STORAGE_DSN' in text


def test_an_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    file = tmp_path / "ajs.toml"
    file.write_text('[auth]\ntokens_file = "tokens.toml"\n')
    settings = load(file, environ={"AJS_AUTH_TOKENS_FILE": ""})
    assert settings["auth.tokens_file"] == "tokens.toml"


def test_the_old_dsn_variable_is_still_read() -> None:
    settings = load(None, environ={"AJS_POSTGRES_DSN": "postgresql://db/ajs"})
    assert settings["storage.dsn"] == "postgresql://db/ajs"
    assert settings.sources["storage.dsn"] == "$AJS_POSTGRES_DSN"


@pytest.mark.parametrize(
    ("dsn", "hidden"),
    [
        ("postgresql://u:p@ss@host/db", "p@ss"),
        ("host=db user=u password='a b c' dbname=ajs", "a b c"),
        ("host=db password=plain dbname=ajs", "plain"),
    ],
)
def test_every_form_of_dsn_password_is_masked(dsn: str, hidden: str) -> None:
    text = load(None, environ={"AJS_STORAGE_DSN": dsn}).render()
    dsn_line = next(line for line in text.splitlines() if line.startswith("dsn = "))
    assert hidden not in dsn_line
    assert "***" in dsn_line


# -- [[schedules]] ----------------------------------------------------------------------------

SCHEDULES = """
[server]
scheduler = false

[[schedules]]
id = "nightly"
cron = "0 3 * * *"
time_zone = "Europe/Berlin"
type = "echo"
data = {report = "daily"}
priority = -1
queue = "reports"
max_attempts = 2
timeout = "10m"
overlap = "cancel_previous"
catchup = "one"

[[schedules]]
id = "often"
cron = "*/5 * * * * *"
type = "echo"
"""


def test_schedules_load_with_their_template_and_policies(tmp_path: Path) -> None:
    file = tmp_path / "ajs.toml"
    file.write_text(SCHEDULES)
    settings = load(file, environ={})
    nightly, often = settings.schedules
    assert (nightly.id, nightly.cron, nightly.time_zone, nightly.creator) == (
        "nightly",
        "0 3 * * *",
        "Europe/Berlin",
        "",
    )
    assert (nightly.overlap, nightly.catchup) == (Overlap.CANCEL_PREVIOUS, Catchup.ONE)
    template = nightly.template
    assert (template.id, template.type, dict(template.data)) == ("", "echo", {"report": "daily"})
    assert (template.priority, template.queue, template.max_attempts, template.timeout) == (-1, "reports", 2, 600.0)
    assert (often.time_zone, often.overlap, often.catchup, often.template.timeout) == (
        "UTC",
        Overlap.SKIP,
        Catchup.SKIP,
        None,
    )
    config = ServerConfig.from_settings(settings)
    assert (config.scheduler, config.schedules) == (False, settings.schedules)
    assert "2 [[schedules]]" in settings.summary()


def test_rendered_schedules_load_back_the_same(tmp_path: Path) -> None:
    file = tmp_path / "ajs.toml"
    file.write_text(SCHEDULES)
    rendered = tmp_path / "rendered.toml"
    rendered.write_text(load(file, environ={}).render())
    again = load(rendered, environ={}).schedules
    assert [s.id for s in again] == ["nightly", "often"]
    assert all(a.same_definition(b) for a, b in zip(again, load(file, environ={}).schedules, strict=True))


def test_the_scheduler_runs_unless_turned_off() -> None:
    assert load(None, environ={})["server.scheduler"] is True
    assert load(None, environ={"AJS_SERVER_SCHEDULER": "false"})["server.scheduler"] is False
    assert load(None, environ={}, flags={"server.scheduler": False})["server.scheduler"] is False


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ('cron = "61 * * * *"\ntype = "echo"', "schedules #1 (s): cron: '61 * * * *' is not a cron expression"),
        ('cron = "* * *"\ntype = "echo"', "schedules #1 (s): cron: '* * *' has 3 fields"),
        ('cron = "* * * * *"\ntype = "echo"\ntime_zone = "Mars/Base"', "schedules #1 (s): time_zone: 'Mars/Base'"),
        ('cron = "* * * * *"\ntype = "echo"\noverlap = "never"', "schedules #1 (s): overlap: expected one of skip"),
        ('cron = "* * * * *"\ntype = "echo"\ncatchup = "all"', "schedules #1 (s): catchup: expected one of skip, one"),
        ('cron = "* * * * *"\ntype = "echo"\ndata = {n = 3}', "schedules #1 (s): data: expected a table of strings"),
        ('cron = "* * * * *"\ntype = "a b"', "schedules #1 (s): type: must start with a letter"),
        ('cron = "* * * * *"\ntype = "echo"\nqueue = "-q"', "schedules #1 (s): queue: must start with a letter"),
        (
            'cron = "* * * * *"\ntype = "echo"\nmax_attempts = -1',
            "schedules #1 (s): max_attempts: must not be negative",
        ),
        ('cron = "* * * * *"\ntype = "echo"\ntimeout = "0s"', "schedules #1 (s): timeout: a duration must be positive"),
        ('cron = "* * * * *"\ntype = "echo"\ncolour = "red"', "schedules #1 (s): unknown key colour"),
        ('type = "echo"', "schedules #1 (s): cron is required"),
    ],
)
def test_a_bad_schedule_names_its_table_and_key(tmp_path: Path, table: str, says: str) -> None:
    file = tmp_path / "ajs.toml"
    file.write_text(f'[[schedules]]\nid = "s"\n{table}\n')
    with pytest.raises(ConfigError) as refused:
        load(file, environ={})
    assert f"{file}: {says}" in refused.value.message


def test_schedule_ids_are_checked_and_unique(tmp_path: Path) -> None:
    file = tmp_path / "ajs.toml"
    file.write_text('[[schedules]]\nid = "a b"\ncron = "* * * * *"\ntype = "echo"\n')
    with pytest.raises(ConfigError, match=r"schedules #1 \(a b\): id: must be printable ASCII"):
        load(file, environ={})
    file.write_text('[[schedules]]\nid = "x"\ncron = "* * * * *"\ntype = "echo"\n' * 2)
    with pytest.raises(ConfigError, match=r"schedules #2 \(x\): id 'x' is used by another schedule"):
        load(file, environ={})
    file.write_text("[schedules]\nid = 'x'\n")
    with pytest.raises(ConfigError, match=r"schedules must be an array of tables"):
        load(file, environ={})
