"""The server's configuration: a TOML file, environment variables and flags.

Every setting has a section and a key (``[server] address``); it comes from, in
order of precedence: a command-line flag, the environment variable
``AJS_<SECTION>_<KEY>`` (``AJS_SERVER_ADDRESS``), the file, then its default.
Three tables come from the file only: ``[[handlers]]`` (the chain, in order; the
``--handler`` flag replaces it), ``[jobs.<type>]`` (per-type retry and timeout
policy, and flow-control policies overriding the plugin's) and ``[[schedules]]``
(schedules stored at start-up, see :func:`_schedules`). ``examples/ajs.toml`` documents every key.

An unknown key, a value of the wrong type or a missing file is a
:class:`ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from ajs_grpc.connectors._pgnames import check_schema_name
from ajs_grpc.core.durations import format_duration, parse_duration
from ajs_grpc.core.errors import ConfigError, FieldViolation, InvalidArgument
from ajs_grpc.core.flow import POLICY_NAMES, FlowPolicy
from ajs_grpc.core.model import DEFAULT_QUEUE
from ajs_grpc.core.schedules import Catchup, Overlap, Schedule
from ajs_grpc.edge.validation import check_queue, validate_schedule
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb

__all__ = ["SETTINGS", "ConfigError", "Setting", "Settings", "format_duration", "load"]


def _optional_duration(value: object) -> float | None:
    if isinstance(value, str) and value.strip().lower() in ("forever", "none", ""):
        return None
    return parse_duration(value)


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected an integer")
    number = int(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _signed_integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected an integer")
    return int(value)


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError("expected true or false")


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _schema(value: object) -> str:
    return check_schema_name(_string(value))


def _paths(value: object) -> list[str]:
    if isinstance(value, str):
        return [part for part in value.split(",") if part]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ValueError("expected a list of paths")


def _queues(value: object) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError("expected a list of queue names")
    for name in names:
        problems: list[FieldViolation] = []
        check_queue(name, "queue", problems, required=True)
        if problems:
            raise ValueError(f"queue {name!r} {problems[0].description}")
    return list(dict.fromkeys(names))


def _flow_policy(name: str) -> Callable[[object], object]:
    """A ``[jobs.<type>]`` flow-control key: checked as FlowPolicy reads it, kept as written."""

    def parse(value: object) -> object:
        FlowPolicy.from_settings({name: value})
        return value

    return parse


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _string(value).lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text

    return parse


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration key: where it lives, how it parses, its default."""

    section: str
    key: str
    parse: Callable[[object], Any]
    default: Any
    help: str
    secret: bool = False

    @property
    def env(self) -> str:
        """Its environment variable."""
        return f"AJS_{self.section}_{self.key}".upper()

    @property
    def name(self) -> str:
        """``section.key``."""
        return f"{self.section}.{self.key}"

    @property
    def is_duration(self) -> bool:
        """True for settings given as durations (``30s``, ``7d``)."""
        return self.parse in (parse_duration, _optional_duration)

    def show(self, value: Any) -> str:
        """``value`` as a person would write it (durations with their unit)."""
        return format_duration(value) if self.is_duration else str(value)


SETTINGS = [
    Setting("server", "address", _string, "127.0.0.1:50051", "HOST:PORT to listen on"),
    Setting("server", "role", _choice("all", "frontend", "worker"), "all", "all, frontend or worker"),
    Setting("server", "max_jobs", _integer, 8, "jobs running at once"),
    Setting("server", "queues", _queues, [], "the queues this instance starts jobs from (empty: all)"),
    Setting("server", "lease", parse_duration, 30.0, "a claimed job's lease"),
    Setting("server", "retention", _optional_duration, 7 * 86400.0, "how long ended jobs are kept, or forever"),
    Setting("server", "cancel_grace", parse_duration, 10.0, "a cancelled job's time to stop"),
    Setting("server", "shutdown_grace", parse_duration, 30.0, "running jobs' time on SIGTERM"),
    Setting("server", "max_connection_age", parse_duration, 300.0, "clients reconnect after this"),
    Setting("server", "worker_heartbeat", parse_duration, 10.0, "remote workers' heartbeat interval"),
    Setting("server", "scheduler", _boolean, True, "submit the schedules' jobs where jobs run"),
    Setting("storage", "connector", _string, "sqlite", "sqlite, postgres, memory or a plugin's name"),
    Setting("storage", "database", _string, "ajs.db", "sqlite: the database file"),
    Setting("storage", "synchronous", _choice("full", "normal"), "full", "sqlite: full or normal"),
    Setting("storage", "dsn", _string, "", "postgres: the database", secret=True),
    Setting("storage", "schema", _schema, "ajs", "postgres: the schema of the queue"),
    Setting("storage", "migrate", _boolean, True, "postgres: migrate the schema at start-up"),
    Setting("plugins", "jobs_dirs", _paths, [], "directories of job plugins"),
    Setting("plugins", "handlers_dirs", _paths, [], "directories of handler plugins"),
    Setting("plugins", "connectors_dirs", _paths, [], "directories of connector plugins"),
    Setting("log", "level", _choice("debug", "info", "warning", "error"), "info", "log level"),
    Setting("log", "format", _choice("plain", "json"), "plain", "plain text or JSON lines"),
    Setting("log", "file", _string, "", "log to this file instead of stderr"),
    Setting("limits", "max_message_bytes", _integer, 4 * 1024 * 1024, "largest gRPC message received"),
    Setting("limits", "max_data_entries", _integer, 256, "entries in Request.data"),
    Setting("limits", "max_data_bytes", _integer, 64 * 1024, "bytes of keys and values in Request.data"),
    Setting("limits", "max_input_bytes", _integer, 1024 * 1024, "bytes of Request.input"),
    Setting("limits", "max_queue_depth", _integer, 0, "queued jobs at most (0: no limit)"),
    Setting("limits", "max_batch_requests", _integer, 1000, "requests in one BatchSubmitRequests call"),
    Setting("limits", "max_watches", _integer, 1000, "open WatchJob streams in all"),
    Setting("limits", "max_watches_per_principal", _integer, 100, "open WatchJob streams per principal"),
    Setting("limits", "watch_send_timeout", parse_duration, 30.0, "a watcher not reading this long is dropped"),
    Setting("limits", "max_queued_per_principal", _integer, 0, "queued jobs of one principal (0: no limit)"),
    Setting("limits", "max_schedules_per_principal", _integer, 100, "schedules of one principal (0: no limit)"),
    Setting("limits", "max_priority", _signed_integer, 100, "the highest priority a principal may give"),
    Setting("limits", "max_run_after", parse_duration, 90 * 86400.0, "how far ahead a principal may set run_after"),
    Setting("tls", "cert_file", _string, "", "the server's certificate (PEM); enables TLS"),
    Setting("tls", "key_file", _string, "", "the server's private key (PEM)"),
    Setting("tls", "client_ca_file", _string, "", "CA of client certificates; enables mutual TLS"),
    Setting("auth", "tokens_file", _string, "", "bearer tokens (TOML); enables authentication"),
    Setting("auth", "admin_role", _string, "admin", "the role that may see every job"),
    Setting("metrics", "address", _string, "", "HOST:PORT of the Prometheus endpoint (empty: off)"),
]
_BY_NAME = {s.name: s for s in SETTINGS}
# Older environment variables still read (after the AJS_<SECTION>_<KEY> one).
ALIASES = {"storage.dsn": "AJS_POSTGRES_DSN"}
_SECTIONS = {s.section for s in SETTINGS}
_JOB_POLICY_KEYS: dict[str, Callable[[Any], Any]] = {
    "max_attempts": _integer,
    "initial_backoff": parse_duration,
    "max_backoff": parse_duration,
    "multiplier": float,
    "jitter": float,
    "timeout": _optional_duration,
    "allow_failed_dependencies": _boolean,
    **{name: _flow_policy(name) for name in POLICY_NAMES},
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The effective configuration.

    Attributes:
        values: ``section.key`` -> value.
        sources: ``section.key`` -> where the value came from (flag, env, file, default).
        handlers: the ``[[handlers]]`` chain as (name, types), or None.
        job_policies: ``[jobs.<type>]`` overrides, per type (flow policies as written).
        schedules: the ``[[schedules]]``, checked (created by the admin, ``creator`` "").
    """

    values: dict[str, Any]
    sources: dict[str, str]
    handlers: list[tuple[str, tuple[str, ...]]] | None
    job_policies: dict[str, dict[str, Any]]
    schedules: tuple[Schedule, ...] = ()

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def summary(self) -> str:
        """One line: the settings that are not at their default, with where each came from."""
        changed = []
        for setting in SETTINGS:
            source = self.sources[setting.name]
            if source == "default":
                continue
            value = self.values[setting.name]
            shown = (
                _mask(str(value))
                if setting.secret and value
                else _toml(setting.show(value) if setting.is_duration else value)
            )
            changed.append(f"{setting.name} = {shown} ({source})")
        if self.handlers is not None:
            changed.append(f"{len(self.handlers)} [[handlers]]")
        if self.job_policies:
            changed.append(f"[jobs.*] for {', '.join(sorted(self.job_policies))}")
        if self.schedules:
            changed.append(f"{len(self.schedules)} [[schedules]]")
        body = "; ".join(changed) if changed else "all defaults"
        return f"configuration: {body} (ajs config check FILE, or --log-level debug, shows every value)"

    def render(self) -> str:
        """The effective configuration as TOML, secrets masked, each value's source noted."""
        lines: list[str] = []
        section = ""
        for setting in SETTINGS:
            if setting.section != section:
                section = setting.section
                lines.append(f"\n[{section}]")
            value = self.values[setting.name]
            if setting.secret and value:
                value = _mask(str(value))
            elif setting.is_duration:
                value = format_duration(value)
            lines.append(f"{setting.key} = {_toml(value)}  # {self.sources[setting.name]}")
        for name, types in self.handlers or []:
            lines += ["\n[[handlers]]", f"name = {_toml(name)}", f"types = {_toml(list(types))}"]
        for job_type, policy in sorted(self.job_policies.items()):
            lines.append(f"\n[jobs.{job_type}]")
            lines += [f"{key} = {_toml(value)}" for key, value in policy.items()]
        for schedule in self.schedules:
            lines.append("\n[[schedules]]")
            lines += [f"{key} = {_toml(value)}" for key, value in _schedule_table(schedule).items()]
        return "\n".join(lines).strip() + "\n"


def _mask(value: str) -> str:
    """A DSN with its password hidden (``user:***@`` / ``password=***``); anything else hidden whole."""
    # URL form: the password runs from the user's ':' to the last '@' of the authority.
    masked = re.sub(r"(://[^:/@]*:)[^/]*@", r"\1***@", value)
    # key=value form: a quoted value may hold spaces and escaped quotes.
    masked = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", masked)
    return masked if masked != value else "***"


def _toml(value: Any) -> str:
    if value is None:
        return '"forever"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parse(setting: Setting, value: object, where: str) -> Any:
    try:
        return setting.parse(value)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}: {setting.name}: {error}", reason="BAD_SETTING") from None


def load(
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """The effective configuration: flags over environment over file over defaults.

    Args:
        file: a TOML file, or None.
        environ: the environment (default ``os.environ``).
        flags: ``section.key`` -> value given on the command line.

    Raises:
        ConfigError: a missing file, an unknown key or a bad value (named).
    """
    environ = os.environ if environ is None else environ
    document: dict[str, Any] = {}
    if file is not None:
        try:
            document = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file {file} does not exist", reason="NO_CONFIG_FILE") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{file}: not valid TOML: {error}", reason="BAD_CONFIG_FILE") from None
    where = str(file) if file is not None else "configuration"
    from_file: dict[str, Any] = {}
    handlers = None
    policies: dict[str, dict[str, Any]] = {}
    schedules: tuple[Schedule, ...] = ()
    for section, table in document.items():
        if section == "handlers":
            handlers = _handlers(table, where)
        elif section == "jobs":
            policies = _policies(table, where)
        elif section == "schedules":
            schedules = _schedules(table, where)
        elif section in _SECTIONS and isinstance(table, dict):
            for key, value in table.items():
                setting = _BY_NAME.get(f"{section}.{key}")
                if setting is None:
                    raise ConfigError(f"{where}: unknown key {section}.{key}", reason="UNKNOWN_SETTING")
                from_file[setting.name] = _parse(setting, value, where)
        else:
            raise ConfigError(f"{where}: unknown section [{section}]", reason="UNKNOWN_SETTING")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        if flags and flags.get(setting.name) is not None:
            values[setting.name], sources[setting.name] = _parse(setting, flags[setting.name], "flag"), "flag"
        elif environ.get(setting.env):  # an empty variable counts as unset
            values[setting.name] = _parse(setting, environ[setting.env], f"${setting.env}")
            sources[setting.name] = f"${setting.env}"
        elif setting.name in ALIASES and environ.get(ALIASES[setting.name]):
            alias = ALIASES[setting.name]
            values[setting.name], sources[setting.name] = _parse(setting, environ[alias], f"${alias}"), f"${alias}"
        elif setting.name in from_file:
            values[setting.name], sources[setting.name] = from_file[setting.name], where
        else:
            values[setting.name], sources[setting.name] = setting.default, "default"
    return Settings(values, sources, handlers, policies, schedules)


def _handlers(table: object, where: str) -> list[tuple[str, tuple[str, ...]]]:
    if not isinstance(table, list):
        raise ConfigError(f"{where}: handlers must be an array of tables ([[handlers]])", reason="BAD_SETTING")
    chain = []
    for number, entry in enumerate(table, 1):
        if not isinstance(entry, dict) or set(entry) - {"name", "types"} or not isinstance(entry.get("name"), str):
            raise ConfigError(
                f"{where}: handlers #{number} needs name (a string) and types (a list)", reason="BAD_SETTING"
            )
        types = entry.get("types", [])
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise ConfigError(f"{where}: handlers #{number}.types must be a list of strings", reason="BAD_SETTING")
        chain.append((entry["name"], tuple(types)))
    return chain


def _policies(table: object, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: jobs must be a table of job types", reason="BAD_SETTING")
    policies: dict[str, dict[str, Any]] = {}
    for job_type, policy in table.items():
        if not isinstance(policy, dict):
            raise ConfigError(f"{where}: jobs.{job_type} must be a table", reason="BAD_SETTING")
        parsed = {}
        for key, value in policy.items():
            parse = _JOB_POLICY_KEYS.get(key)
            if parse is None:
                raise ConfigError(f"{where}: unknown key jobs.{job_type}.{key}", reason="UNKNOWN_SETTING")
            try:
                parsed[key] = parse(value)
            except (ValueError, TypeError) as error:
                raise ConfigError(f"{where}: jobs.{job_type}.{key}: {error}", reason="BAD_SETTING") from None
        policies[job_type] = parsed
    return policies


_OVERLAPS = {policy.name.lower(): policy for policy in Overlap}
_CATCHUPS = {policy.name.lower(): policy for policy in Catchup}
# A [[schedules]] table's keys: the schedule's, and its template's (type ... timeout) flat beside them.
_SCHEDULE_KEYS = (
    "id",
    "cron",
    "time_zone",
    "type",
    "data",
    "priority",
    "queue",
    "max_attempts",
    "timeout",
    "overlap",
    "catchup",
)
# The key of a table that a violation of the Schedule message names (its path after "schedule.").
_KEY_OF_FIELD = {"overlap_policy": "overlap", "catchup_policy": "catchup", "template": "type"}


def _schedules(table: object, where: str) -> tuple[Schedule, ...]:
    """The ``[[schedules]]`` tables, each checked as CreateSchedule checks a schedule.

    Each is stored at start-up (replacing a stored one of the same id), created by
    the admin: only admins see and manage them. Removing a table does not delete its
    stored schedule (``ajs schedules delete ID`` does).
    """
    if not isinstance(table, list):
        raise ConfigError(f"{where}: schedules must be an array of tables ([[schedules]])", reason="BAD_SETTING")
    schedules: list[Schedule] = []
    for number, entry in enumerate(table, 1):
        named = f"schedules #{number}"
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            named += f" ({entry['id']})"
        schedule = _schedule(entry, f"{where}: {named}")
        if any(other.id == schedule.id for other in schedules):
            raise ConfigError(f"{where}: {named}: id {schedule.id!r} is used by another schedule", reason="BAD_SETTING")
        schedules.append(schedule)
    return tuple(schedules)


def _schedule(entry: object, where: str) -> Schedule:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table", reason="BAD_SETTING")
    for key in entry:
        if key not in _SCHEDULE_KEYS:
            keys = ", ".join(_SCHEDULE_KEYS)
            raise ConfigError(f"{where}: unknown key {key} (the keys: {keys})", reason="UNKNOWN_SETTING")
    for key in ("id", "cron", "type"):
        if key not in entry:
            raise ConfigError(f"{where}: {key} is required", reason="BAD_SETTING")

    def value(key: str, parse: Callable[[object], Any], default: object) -> Any:
        try:
            return parse(entry.get(key, default))
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{where}: {key}: {error}", reason="BAD_SETTING") from None

    template = pb.Request(
        type=value("type", _string, ""),
        data=value("data", _string_table, {}),
        priority=value("priority", _signed_integer, 0),
        queue=value("queue", _string, ""),
        max_attempts=value("max_attempts", _integer, 0),
    )
    timeout = value("timeout", _optional_duration, "none")
    if timeout is not None:
        template.timeout.FromTimedelta(timedelta(seconds=timeout))
    message = pb.Schedule(
        id=value("id", _string, ""),
        cron=value("cron", _string, ""),
        time_zone=value("time_zone", _string, "UTC"),
        template=template,
        overlap_policy=int(_OVERLAPS[value("overlap", _choice(*_OVERLAPS), "skip")]),  # type: ignore[arg-type]
        catchup_policy=int(_CATCHUPS[value("catchup", _choice(*_CATCHUPS), "skip")]),  # type: ignore[arg-type]
    )
    try:
        schedule = validate_schedule(message)
    except InvalidArgument as error:  # named by the table's keys: schedule.template.type is "type"
        violation = error.violations[0] if error.violations else FieldViolation("", error.message)
        path = violation.field.removeprefix("schedule.").removeprefix("template.")
        key = _KEY_OF_FIELD.get(path, path.split("[")[0].split(".")[0])
        raise ConfigError(f"{where}: {key}: {violation.description}", reason="BAD_SETTING") from None
    return schedule


def _string_table(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise ValueError('expected a table of strings, e.g. {report = "daily"}')
    return dict(value)


def _schedule_table(schedule: Schedule) -> dict[str, Any]:
    """A schedule as its ``[[schedules]]`` table (keys at their defaults left out)."""
    template = schedule.template
    table: dict[str, Any] = {
        "id": schedule.id,
        "cron": schedule.cron,
        "time_zone": schedule.time_zone,
        "type": template.type,
    }
    if template.data:
        table["data"] = dict(template.data)
    if template.priority:
        table["priority"] = template.priority
    if template.queue != DEFAULT_QUEUE:
        table["queue"] = template.queue
    if template.max_attempts:
        table["max_attempts"] = template.max_attempts
    if template.timeout is not None:
        table["timeout"] = format_duration(template.timeout)
    table["overlap"] = schedule.overlap.name.lower()
    table["catchup"] = schedule.catchup.name.lower()
    return table
