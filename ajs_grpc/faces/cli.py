"""The ``ajs`` command: run a server, submit and follow jobs.

Exit codes: 0 success (a watched job FINISHED); 1 the job FAILED; 2 usage
error; 3 the job was CANCELLED; 4 the server is unreachable or not serving;
5 the server refused the call (bad input, no such job, ...); 6 ``ajs serve``
could not start (address taken, unusable database); 7 the configuration is
invalid; 8, 9, 10 a connector, handler or job plugin is missing or broken.

Each command is one function; :func:`_commands` is the table the parser is built
from, and :func:`_local` and :func:`_remote` turn a command's failures into these codes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from google.protobuf import any_pb2, json_format
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ajs_grpc import __version__
from ajs_grpc.core.durations import format_duration
from ajs_grpc.core.errors import AjsError, Code, ConfigError, InvalidArgument, PluginError, UsageError
from ajs_grpc.core.flow import FlowPolicy, JobStates
from ajs_grpc.core.jobs import JobPlugin
from ajs_grpc.core.logs import setup_logging
from ajs_grpc.core.model import JobType, Request, RequestState, Response
from ajs_grpc.core.schedules import Catchup, Overlap
from ajs_grpc.edge import convert, dynamic
from ajs_grpc.edge.auth import new_token
from ajs_grpc.edge.config import SETTINGS, Settings
from ajs_grpc.edge.config import load as load_settings
from ajs_grpc.engine.plugins import HandlerSpec, PluginDirs, discover
from ajs_grpc.faces.client import DEFAULT_TARGET, AsyncClient, ScheduleInfo, TlsOptions
from ajs_grpc.faces.worker import Worker
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3
EXIT_UNREACHABLE = 4
EXIT_REFUSED = 5
EXIT_STARTUP = 6
EXIT_CONFIG = 7
EXIT_PLUGIN = {"config": EXIT_CONFIG, "connector": 8, "handler": 9, "job": 10}

_EXIT_FOR_STATE = {
    RequestState.FINISHED: EXIT_OK,
    RequestState.FAILED: EXIT_FAILED,
    RequestState.CANCELLED: EXIT_CANCELLED,
}

# Everything printed is plain text: server data may hold [brackets], :colons: or links,
# which rich would otherwise read as markup or emoji codes.
out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, pointing at the command's help (as git and kubectl do)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message}; see '{self.prog} --help'\n")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(text: str) -> float:
    """Seconds in ``text``: a number of seconds, or one with a unit (ms, s, m, h, d)."""
    number, unit = text.strip(), "s"
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if number.endswith(suffix):
            number, unit = number[: -len(suffix)], suffix
            break
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 30s, 5m or 7d, got {text!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive, got {text!r}")
    return seconds


def _time(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time, got {text!r}") from None
    return at if at.tzinfo is not None else at.astimezone()  # a naive time is local time


def _handler_spec(text: str) -> HandlerSpec:
    name, _, types = text.partition("=")
    return HandlerSpec(name, tuple(t for t in types.split(",") if t))


def _state(text: str) -> RequestState:
    try:
        return RequestState[text.upper()]
    except KeyError:
        names = ", ".join(s.name.lower() for s in RequestState if s is not RequestState.UNSPECIFIED)
        raise argparse.ArgumentTypeError(f"unknown state {text!r}; one of {names}") from None


# Flags of `ajs serve`: flag, setting, type, metavar (bool: a flag that sets False).
SERVE_FLAGS: list[tuple[str, str, Any, str | None]] = [
    ("--address", "server.address", str, "HOST:PORT"),
    ("--role", "server.role", str, "ROLE"),
    ("--max-jobs", "server.max_jobs", int, "N"),
    ("--queues", "server.queues", str, "NAME,..."),
    ("--lease", "server.lease", str, "DURATION"),
    ("--retention", "server.retention", str, "DURATION"),
    ("--cancel-grace", "server.cancel_grace", str, "DURATION"),
    ("--shutdown-grace", "server.shutdown_grace", str, "DURATION"),
    ("--max-connection-age", "server.max_connection_age", str, "DURATION"),
    ("--no-scheduler", "server.scheduler", bool, None),
    ("--connector", "storage.connector", str, "NAME"),
    ("--database", "storage.database", str, "PATH"),
    ("--synchronous", "storage.synchronous", str, "full|normal"),
    ("--no-migrate", "storage.migrate", bool, None),
    ("--log-level", "log.level", str, "LEVEL"),
    ("--log-format", "log.format", str, "plain|json"),
    ("--log-file", "log.file", str, "PATH"),
    ("--max-input-size", "limits.max_input_bytes", int, "BYTES"),
    ("--max-queue-depth", "limits.max_queue_depth", int, "N"),
    ("--tls-cert", "tls.cert_file", str, "PEM"),
    ("--tls-key", "tls.key_file", str, "PEM"),
    ("--tls-client-ca", "tls.client_ca_file", str, "PEM"),
    ("--tokens-file", "auth.tokens_file", str, "TOML"),
    ("--metrics-address", "metrics.address", str, "HOST:PORT"),
]
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}
# A flag that turns a setting off says what it does, not what the setting does.
BOOL_FLAG_HELP = {
    "--no-migrate": "postgres: refuse a schema not at this version instead of migrating it",
    "--no-scheduler": "submit no schedule's jobs here (other instances do)",
}


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


# The arguments of a command, as add_argument takes them: names or flags, then options.
_Arg = tuple[tuple[str, ...], dict[str, Any]]
_Run = Callable[[argparse.Namespace], int]


def _arg(*names: str, **options: Any) -> _Arg:
    return names, options


POSTGRES_OPTIONS = (
    _arg(
        "--dsn",
        dest="storage.dsn",
        help="postgres: the database, e.g. postgresql://user@host/db ($AJS_STORAGE_DSN or $AJS_POSTGRES_DSN)",
    ),
    _arg("--schema", dest="storage.schema", help="postgres: the schema of the queue (ajs)"),
)
PLUGIN_OPTIONS = (
    _arg(
        "--handler",
        dest="handlers",
        action="append",
        type=_handler_spec,
        metavar="NAME=TYPE,...",
        help="a handler and the job types it runs, in chain order (repeat; default: each job on its own handler)",
    ),
    *(
        _arg(
            f"--{kind}-dir",
            dest=f"plugins.{kind}_dirs",
            action="append",
            metavar="DIR",
            help=f"a directory of {kind[:-1]} plugin modules (repeat)",
        )
        for kind in ("jobs", "handlers", "connectors")
    ),
)


# A request's own attempts and timeout (ajs submit, ajs schedules create). Not --timeout:
# that is every remote command's per-call timeout.
_ATTEMPT_OPTIONS = (
    _arg(
        "--max-attempts",
        type=int,
        default=0,
        metavar="N",
        help="claims allowed in all, at most the type's (default 0: the type's)",
    ),
    _arg(
        "--attempt-timeout",
        type=_duration,
        metavar="DURATION",
        help="how long one attempt may run, at most the type's (default: the type's)",
    ),
)


def _serve_options() -> list[_Arg]:
    """--config and a flag per setting of SERVE_FLAGS (read now: --config defaults to $AJS_CONFIG)."""
    options = [_arg("--config", type=Path, default=_env_path("AJS_CONFIG"), help="a TOML file ($AJS_CONFIG)")]
    for flag, setting, kind, metavar in SERVE_FLAGS:
        if kind is bool:
            options.append(_arg(flag, dest=setting, action="store_const", const=False, help=BOOL_FLAG_HELP[flag]))
            continue
        described = SETTINGS_BY_NAME[setting]
        shown = described.show(described.default)
        default_text = f" (default {shown})" if described.default not in ("", [], None) else ""
        options.append(_arg(flag, dest=setting, type=kind, metavar=metavar, help=described.help + default_text))
    options.append(
        _arg("--dashboard", default="", metavar="HOST:PORT", help="also serve the web dashboard here (port 0: any)")
    )
    return options


def _client_options() -> list[_Arg]:
    """The options of every command that calls a server (read now: --token defaults to $AJS_TOKEN)."""
    return [
        _arg("--target", default=DEFAULT_TARGET, help="server address (default %(default)s)"),
        _arg("--timeout", type=float, default=30.0, help="seconds per call (default %(default)s)"),
        _arg("--token", default=os.environ.get("AJS_TOKEN"), help="bearer token ($AJS_TOKEN)"),
        _arg("--tls", action="store_true", help="connect with TLS (implied by the --tls-* options)"),
        _arg("--tls-ca", default="", metavar="PEM", help="CA to verify the server with"),
        _arg("--tls-cert", default="", metavar="PEM", help="client certificate, for mutual TLS"),
        _arg("--tls-key", default="", metavar="PEM", help="client key, for mutual TLS"),
        _arg("--tls-server-name", default="", metavar="NAME", help="the name the server's certificate must prove"),
        _arg(
            "--insecure",
            action="store_true",
            help="allow sending the token without TLS to another machine (only on a trusted network)",
        ),
    ]


def _inherited(options: Sequence[_Arg]) -> list[_Arg]:
    """``options`` for the subcommands of a group that takes them too (``ajs schedules --target X list``).

    Unset in the subcommand, an option keeps the group's value: argparse would otherwise
    write the subcommand's default over it.
    """
    inherited = []
    for names, kwargs in options:
        changed = dict(kwargs, default=argparse.SUPPRESS)
        if "help" in kwargs and "default" in kwargs:
            changed["help"] = kwargs["help"].replace("%(default)s", str(kwargs["default"]))
        inherited.append((names, changed))
    return inherited


# Commands that start something here (a server, a schema, plugins) or call a server:
# each kind turns its failures into the exit codes of the module's docstring.


def _local(run: _Run) -> _Run:
    """``run``, its start-up failures printed in one line and answered with exit codes 6 to 10."""

    @functools.wraps(run)
    def command(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except PluginError as error:
            err.print(f"ajs {args.command}: {error.message}")
            return EXIT_PLUGIN[error.kind]
        except ConfigError as error:
            err.print(f"ajs {args.command}: {error.message}")
            return EXIT_CONFIG
        except (AjsError, OSError) as error:
            err.print(f"ajs {args.command}: {error.message if isinstance(error, AjsError) else error}")
            return EXIT_STARTUP
        except KeyboardInterrupt:
            return 130

    return command


def _remote(call: Callable[[AsyncClient, argparse.Namespace], Awaitable[int]]) -> _Run:
    """``call``, run with a client of the server the options name; a refusal exits 5, no server 4."""

    async def with_client(args: argparse.Namespace) -> int:
        async with _client(args) as client:
            return await call(client, args)

    @functools.wraps(call)
    def command(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(with_client(args))
        except UsageError as error:
            err.print(f"ajs: {error.message}")
            return EXIT_USAGE
        except AjsError as error:
            err.print(f"ajs: {error.code.name}: {error.message}")
            unreachable = error.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)
            return EXIT_UNREACHABLE if unreachable else EXIT_REFUSED
        except (OSError, ValueError) as error:
            err.print(f"ajs: {error}")
            return EXIT_USAGE
        except KeyboardInterrupt:
            return 130

    return command


def _token_new(args: argparse.Namespace) -> int:
    try:
        secret, entry = new_token(args.principal, args.roles)
    except InvalidArgument as error:
        err.print(f"ajs token new: {error.message}")
        return EXIT_USAGE
    err.print("# add this entry to the tokens file; give the token (shown once) to the client:")
    print(entry)
    print(f"# token: {secret}")
    return EXIT_OK


def _config_check(args: argparse.Namespace) -> int:
    out.print(load_settings(args.file).render(), end="")
    return EXIT_OK


def _db_upgrade(args: argparse.Namespace) -> int:
    return asyncio.run(_upgrade_schema(args))


async def _upgrade_schema(args: argparse.Namespace) -> int:
    settings = load_settings(None, flags={k: v for k, v in vars(args).items() if "." in k and v is not None})
    if not settings["storage.dsn"]:
        raise PluginError("config", "ajs db upgrade needs --dsn (or $AJS_STORAGE_DSN)")
    from ajs_grpc.connectors.postgres import PostgresConnector

    connector = PostgresConnector(settings["storage.dsn"], settings["storage.schema"], migrate=True)
    await connector.open()
    try:
        version = await connector.schema_version()
    finally:
        await connector.close()
    schema, found = settings["storage.schema"], connector.found_version
    if not found:
        out.print(f"created schema {schema} at version {version}")
    elif found < version:
        out.print(f"migrated schema {schema} from version {found} to {version}")
    else:
        out.print(f"schema {schema} is already at version {version}; nothing to do")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from ajs_grpc.edge.server import ServerConfig, serve

    settings = _settings(args)
    setup_logging(settings["log.level"], settings["log.format"], settings["log.file"])
    config = ServerConfig.from_settings(settings, handlers=args.handlers)
    logging.getLogger(__name__).debug("effective configuration:\n%s", settings.render())
    loop = asyncio.new_event_loop()
    try:
        if args.dashboard:
            from ajs_grpc.faces.dashboard.serve import serve_with_dashboard

            running = serve_with_dashboard(config, args.dashboard, announce=settings.summary())
        else:
            running = serve(config, announce=settings.summary())
        abandoned = loop.run_until_complete(running)
    finally:
        # Jobs that ignored cancellation were abandoned (their final Response is
        # written); give them one more chance to end, but never wait forever.
        stragglers = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in stragglers:
            task.cancel()
        if stragglers:
            loop.run_until_complete(asyncio.wait(stragglers, timeout=1.0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    if abandoned:
        # Their threads cannot be stopped, and the interpreter would wait for them.
        logging.getLogger(__name__).warning("%d abandoned job thread(s) still running; exiting without them", abandoned)
        logging.shutdown()
        os._exit(EXIT_OK)
    return EXIT_OK


def _settings(args: argparse.Namespace) -> Settings:
    flags = {name: value for name, value in vars(args).items() if "." in name and value is not None}
    return load_settings(args.config, flags=flags)


async def _submit(client: AsyncClient, args: argparse.Namespace) -> int:
    if args.jsonl is not None or args.count != 1:
        return await _submit_many(client, args)
    request = await _request_of(client, args)
    submitted = await client.submit(
        request.type,
        request.data,
        id=request.id,
        parent_id=request.parent_id,
        input=request.input,
        priority=request.priority,
        run_after=request.run_after,
        queue=request.queue,
        depends_on=request.depends_on,
        expire_time=request.expire_time,
        max_attempts=request.max_attempts,
        attempt_timeout=request.timeout,
    )
    request_id = submitted.job.request.id
    note = "" if submitted.created else " (already submitted)"
    err.print(f"submitted {request_id}{note}")
    if not args.watch:
        out.print(request_id)
        return EXIT_OK
    return await _follow(client, request_id, 0)


async def _request_of(client: AsyncClient, args: argparse.Namespace) -> Request:
    """The request ``ajs submit``'s options describe (its typed input built from the server's descriptors)."""
    run_after = args.run_after
    if args.delay is not None:
        run_after = datetime.now(UTC) + timedelta(seconds=args.delay)
    return Request(
        id=args.id,
        type=args.type,
        data=dict(args.data),
        input=await _typed_input(client, args.type, args.input_json) if args.input_json else None,
        parent_id=args.parent,
        priority=args.priority,
        run_after=run_after,
        queue=args.queue,
        depends_on=tuple(args.depends_on),
        expire_time=datetime.now(UTC) + timedelta(seconds=args.expire_in) if args.expire_in is not None else None,
        max_attempts=args.max_attempts,
        timeout=args.attempt_timeout,
    )


async def _submit_many(client: AsyncClient, args: argparse.Namespace) -> int:
    """``--count N`` copies of one request, or one request per JSON line: in atomic batches."""
    if args.watch:
        raise UsageError("--watch follows one job; it does not go with --count or --jsonl")
    if args.count < 1 or args.batch_size < 1:
        raise UsageError("--count and --batch-size must be at least 1")
    if args.jsonl is not None:
        requests = await asyncio.to_thread(_read_jsonl, args.jsonl, args.type)
    else:
        common = await _request_of(client, args)
        requests = [
            dataclasses.replace(common, id=f"{args.id}-{number}" if args.id else str(uuid.uuid4()))
            for number in range(1, args.count + 1)
        ]
    new = 0
    for start in range(0, len(requests), args.batch_size):
        try:
            submitted = await client.submit_many(requests[start : start + args.batch_size])
        except AjsError as error:
            if start:
                err.print(f"ajs: the first {start} requests were queued; the batch from request {start + 1} was not")
            raise _numbered(error, start) from None
        for answer in submitted:
            new += answer.created
            out.print(answer.job.request.id)
    err.print(f"submitted {len(requests)} requests ({new} new, {len(requests) - new} already submitted)")
    return EXIT_OK


def _read_jsonl(path: str, default_type: str) -> list[Request]:
    """Requests from JSON lines (``-``: standard input), each the protobuf JSON of an ``ajs.v1.Request``."""
    lines = sys.stdin.read().splitlines() if path == "-" else Path(path).read_text().splitlines()
    requests: list[Request] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        message = pb.Request()
        try:
            json_format.Parse(line, message)
        except json_format.ParseError as error:
            raise UsageError(f"line {number} of {path} is not an ajs.v1.Request in JSON: {error}") from None
        request = convert.request_from_proto(message)
        requests.append(
            dataclasses.replace(request, id=request.id or str(uuid.uuid4()), type=request.type or default_type)
        )
    return requests


def _numbered(error: AjsError, start: int) -> AjsError:
    """``error`` of a batch starting at request ``start``, naming the request by its number in the whole run."""
    index = error.metadata.get("index")
    if index is None or not index.isdigit():
        return error
    return error.restated(f"request {start + int(index) + 1}: {error.message.removeprefix(f'requests[{index}]: ')}")


async def _watch(client: AsyncClient, args: argparse.Namespace) -> int:
    if args.request_id:
        return await _follow(client, args.request_id, args.after)
    # Every matching job (WatchJobs): one JSON line per Response, each with the token to resume after it.
    async for item in client.watch_jobs(
        states=args.states, types=args.types, queues=args.queues, parent_id=args.parent, after_token=args.after_token
    ):
        if item.response is not None:
            record = {"request_id": item.response.request_id, "type": item.type, "queue": item.queue}
            record |= item.response.as_dict() | {"resume_token": item.token}
            out.print(json.dumps(record), highlight=False)
    return EXIT_OK


async def _get(client: AsyncClient, args: argparse.Namespace) -> int:
    job = await client.get(args.request_id)
    out.print_json(json.dumps(job.as_dict()))
    return EXIT_OK


async def _list(client: AsyncClient, args: argparse.Namespace) -> int:
    header = ("ID", "TYPE", "STATE", "ATTEMPT", "UPDATED")
    rows: list[tuple[str, ...]] = []
    jobs = client.list(
        states=args.states,
        types=args.types,
        parent_id=args.parent,
        page_size=min(args.limit, 1000),
        newest_first=not args.oldest_first,
    )
    async for job in jobs:
        rows.append((job.request.id, job.request.type, job.state.name, str(job.attempt), job.update_time.isoformat()))
        if len(rows) >= args.limit:
            break
    _print_rows(header, rows)
    return EXIT_OK


async def _queues(client: AsyncClient, args: argparse.Namespace) -> int:
    header = ("QUEUE", "QUEUED", "RUNNING", "PAUSED", "OLDEST")
    at = datetime.now(UTC)
    rows = [
        (
            queue.name,
            str(queue.queued),
            str(queue.running),
            "yes" if queue.paused else "no",
            _age(at - queue.oldest_queued_time) if queue.oldest_queued_time is not None else "-",
        )
        for queue in await client.list_queues()
    ]
    _print_rows(header, rows)
    return EXIT_OK


def _age(age: timedelta) -> str:
    """A waiting time as people say it: ``45s``, ``12m``, ``3h``, ``2d`` (whole units, rounded down)."""
    seconds = max(int(age.total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


async def _pause(client: AsyncClient, args: argparse.Namespace) -> int:
    queue = await client.pause_queue(args.name)
    out.print(f"queue {queue.name} paused ({queue.queued} queued wait; {queue.running} running go on)")
    return EXIT_OK


async def _resume(client: AsyncClient, args: argparse.Namespace) -> int:
    queue = await client.resume_queue(args.name)
    out.print(f"queue {queue.name} resumed ({queue.queued} queued, {queue.running} running)")
    return EXIT_OK


async def _cancel(client: AsyncClient, args: argparse.Namespace) -> int:
    job = await client.cancel(args.request_id)
    pending = " (cancellation requested; the job is stopping)" if job.cancel_requested else ""
    out.print(f"{job.request.id} {job.state.name}{pending}")
    return EXIT_OK


async def _retry(client: AsyncClient, args: argparse.Namespace) -> int:
    job = await client.retry(args.request_id)
    err.print(f"{job.request.id} queued again ({job.state.name}, Response {job.last_response.sequence})")
    if not args.watch:
        out.print(job.request.id)
        return EXIT_OK
    # The new run only: from its CREATED Response on.
    return await _follow(client, job.request.id, job.last_response.sequence - 1)


async def _delete(client: AsyncClient, args: argparse.Namespace) -> int:
    deleted = await client.delete(args.request_id)
    others = deleted - 1
    note = f" and {others} descendant{'s' if others != 1 else ''}" if others else ""
    out.print(f"deleted {args.request_id}{note}")
    return EXIT_OK


_OVERLAPS = {policy.name.lower(): policy for policy in Overlap}
_CATCHUPS = {policy.name.lower(): policy for policy in Catchup}


def _schedule_row(info: ScheduleInfo) -> tuple[str, ...]:
    schedule = info.schedule
    return (
        schedule.id,
        schedule.cron,
        schedule.time_zone,
        schedule.template.type,
        schedule.overlap.name.lower(),
        schedule.catchup.name.lower(),
        "yes" if schedule.paused else "no",
        info.next_run_time.isoformat() if info.next_run_time is not None else "-",
        schedule.last_job_id or "-",
    )


def _schedule_json(info: ScheduleInfo) -> dict[str, Any]:
    """A schedule as ``ajs schedules get`` prints it: times in ISO 8601, policies by name."""
    schedule, template = info.schedule, info.schedule.template

    def iso(at: datetime | None) -> str | None:
        return at.isoformat() if at is not None else None

    return {
        "id": schedule.id,
        "cron": schedule.cron,
        "time_zone": schedule.time_zone,
        "template": {
            "type": template.type,
            "data": dict(template.data),
            "input_type": template.input.TypeName() if template.input is not None else None,
            "priority": template.priority,
            "queue": template.queue,
            "max_attempts": template.max_attempts,
            "timeout": template.timeout,
        },
        "overlap": schedule.overlap.name.lower(),
        "catchup": schedule.catchup.name.lower(),
        "paused": schedule.paused,
        "creator": schedule.creator,
        "create_time": iso(schedule.create_time),
        "update_time": iso(schedule.update_time),
        "last_run_time": iso(schedule.last_time),
        "last_job_id": schedule.last_job_id,
        "next_run_time": iso(info.next_run_time),
    }


def _next_run(info: ScheduleInfo) -> str:
    return f"next run {info.next_run_time.isoformat()}" if info.next_run_time is not None else "paused"


async def _schedules(client: AsyncClient, args: argparse.Namespace) -> int:
    header = ("ID", "CRON", "ZONE", "TYPE", "OVERLAP", "CATCHUP", "PAUSED", "NEXT RUN", "LAST JOB")
    _print_rows(header, [_schedule_row(info) for info in await client.list_schedules()])
    return EXIT_OK


async def _schedule_create(client: AsyncClient, args: argparse.Namespace) -> int:
    info = await client.create_schedule(
        args.schedule_id,
        args.cron,
        args.type,
        dict(args.data),
        time_zone=args.tz,
        input=await _typed_input(client, args.type, args.input_json) if args.input_json else None,
        priority=args.priority,
        queue=args.queue,
        max_attempts=args.max_attempts,
        attempt_timeout=args.attempt_timeout,
        overlap=_OVERLAPS[args.overlap],
        catchup=_CATCHUPS[args.catchup],
    )
    out.print(f"schedule {info.schedule.id}: {info.schedule.cron} in {info.schedule.time_zone}, {_next_run(info)}")
    return EXIT_OK


async def _schedule_get(client: AsyncClient, args: argparse.Namespace) -> int:
    out.print_json(json.dumps(_schedule_json(await client.get_schedule(args.schedule_id))))
    return EXIT_OK


async def _schedule_delete(client: AsyncClient, args: argparse.Namespace) -> int:
    await client.delete_schedule(args.schedule_id)
    out.print(f"deleted schedule {args.schedule_id} (the jobs it submitted stay)")
    return EXIT_OK


async def _schedule_pause(client: AsyncClient, args: argparse.Namespace) -> int:
    info = await client.pause_schedule(args.schedule_id)
    out.print(f"schedule {info.schedule.id} paused")
    return EXIT_OK


async def _schedule_resume(client: AsyncClient, args: argparse.Namespace) -> int:
    info = await client.resume_schedule(args.schedule_id)
    out.print(f"schedule {info.schedule.id} resumed, {_next_run(info)}")
    return EXIT_OK


async def _health(client: AsyncClient, args: argparse.Namespace) -> int:
    try:
        status = await client.health(args.service)
        role = await _role(client) if not args.service and status == "SERVING" else None
    except AjsError as error:  # a probe is yes or no: every failure is "not serving"
        what = f"service {args.service!r} is unknown to the server" if error.code is Code.NOT_FOUND else error.message
        err.print(f"ajs: {error.code.name}: {what}")
        return EXIT_UNREACHABLE
    out.print(status)
    if role:
        out.print(f"role: {role}")
    return EXIT_OK if status == "SERVING" else EXIT_UNREACHABLE


def _types(args: argparse.Namespace) -> int:
    """``ajs types``: asks the server, or with --local loads the plugins here (a start-up of sorts)."""
    return _local(_local_types)(args) if args.local else _remote(_server_types)(args)


async def _server_types(client: AsyncClient, args: argparse.Namespace) -> int:
    _print_types(await client.job_types())
    return EXIT_OK


def _local_types(args: argparse.Namespace) -> int:
    plugins = discover(_plugin_dirs(args))
    chain = plugins.chain(args.handlers)
    _print_types(
        [
            convert.job_type_from_plugin(plugin, handler.name)
            for name, handler in chain.types
            if (plugin := handler.plugin(name)) is not None
        ]
    )
    out.print(f"connectors: {', '.join(sorted(plugins.connectors))}")
    out.print(f"handlers: {', '.join(h.name for h in chain.handlers)} (in chain order)")
    return EXIT_OK


def _tls(args: argparse.Namespace) -> TlsOptions | None:
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
        return TlsOptions(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    return None


def _client(args: argparse.Namespace) -> AsyncClient:
    return AsyncClient(args.target, timeout=args.timeout, token=args.token, tls=_tls(args), insecure=args.insecure)


def _job_plugins(spec: str) -> list[JobPlugin]:
    """The job plugins ``module:name`` names: a JobPlugin, a list of them, or a job function (its name is its type).

    Raises:
        UsageError: it names nothing of the kind.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{spec!r}: name a job as MODULE:NAME (a JobPlugin, a list of them, or a function)")
    sys.path.insert(0, os.getcwd())  # a module beside the caller, as python -m finds it
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"{spec!r}: {error}") from None
    if isinstance(found, JobPlugin):
        return [found]
    if isinstance(found, list | tuple) and found and all(isinstance(item, JobPlugin) for item in found):
        return list(found)
    if callable(found):
        try:
            return [JobPlugin(getattr(found, "__name__", attribute), found)]
        except (TypeError, ValueError) as error:
            raise UsageError(f"{spec!r}: {error}") from None
    raise UsageError(f"{spec!r} is not a JobPlugin, a list of them, or a job function")


def _worker(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        plugins = [plugin for spec in args.jobs for plugin in _job_plugins(spec)]
        worker = Worker(
            plugins,
            args.target,
            name=args.name,
            max_concurrent=args.max_concurrent,
            token=args.token,
            tls=_tls(args),
            insecure=args.insecure,
        )
    except UsageError as error:
        err.print(f"ajs: {error.message}")
        return EXIT_USAGE
    except ValueError as error:
        err.print(f"ajs: {error}")
        return EXIT_USAGE

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for stop in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(stop, worker.drain)
        await worker.run()

    try:
        asyncio.run(run())
    except AjsError as error:
        err.print(f"ajs: {error.code.name}: {error.message}")
        return EXIT_REFUSED
    return EXIT_OK


def _describe_end(response: Response) -> str:
    text = response.state.name
    if response.error is not None:
        text += f": {response.error.message}"
    if response.data:
        text += " " + json.dumps(dict(response.data), sort_keys=True)
    return text


async def _follow(client: AsyncClient, request_id: str, after: int) -> int:
    last: Response | None = None
    responses = client.watch(request_id, after)
    # The first Response (or the error: no such job) comes before anything is drawn.
    first = await anext(responses, None)
    if first is not None:
        columns = (
            TextColumn("{task.fields[state]:<8}", style="bold", markup=False),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}", markup=False),
        )
        with Progress(*columns, console=err, transient=False) as bar:
            task = bar.add_task("", total=1.0, state=first.state.name)
            response: Response | None = first
            while response is not None:
                last = response
                bar.update(task, state=response.state.name)
                if response.progress is not None:  # other Responses keep the last progress shown
                    bar.update(task, completed=response.progress.fraction, description=response.progress.message)
                elif response.state is RequestState.CREATED and response.sequence > 1:
                    bar.update(task, completed=0, description="queued again")
                if response.state is RequestState.FINISHED:
                    bar.update(task, completed=1.0)
                response = await anext(responses, None)
    if last is None:  # already seen up to the end
        job = await client.get(request_id)
        last = job.last_response
    out.print(f"{request_id} {_describe_end(last)}")
    if last.output is not None:
        out.print(await _output_json(client, last.output))
    return _EXIT_FOR_STATE.get(last.state, EXIT_FAILED)


async def _typed_input(client: AsyncClient, job_type: str, text: str) -> any_pb2.Any:
    """The --input-json of a job type, built from the descriptors the server publishes."""
    if text.startswith("@"):
        text = await asyncio.to_thread(Path(text[1:]).read_text)
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--input-json is not JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    found = {t.name: t for t in await client.job_types()}
    if job_type not in found:
        raise InvalidArgument(f"the server runs no job type {job_type!r}; it runs: {', '.join(sorted(found))}")
    if not found[job_type].input_type:
        raise InvalidArgument(f"job type {job_type!r} takes no typed input; use --data")
    described = found[job_type]
    try:
        return dynamic.from_json(described.file_descriptor_set, described.input_type, text)
    except json_format.ParseError as error:
        raise UsageError(f"--input-json is not a valid {described.input_type}: {error}") from None


async def _output_json(client: AsyncClient, output: any_pb2.Any) -> str:
    for described in await client.job_types():
        if described.output_type == output.TypeName():
            return dynamic.to_json(described.file_descriptor_set, output)
    return f"(output of type {output.TypeName()}, {len(output.value)} bytes)"


def _print_types(described: Sequence[JobType]) -> None:
    header = ("TYPE", "HANDLER", "INPUT", "OUTPUT", "ATTEMPTS", "TIMEOUT", "FLOW", "DESCRIPTION")
    rows = [
        (
            t.name,
            t.handler,
            t.input_type or "-",
            t.output_type or "-",
            str(t.retry_policy.max_attempts),
            f"{t.timeout:g}s" if t.timeout is not None else "-",
            _describe_flow(t.flow) if t.flow is not None else "-",
            t.description,
        )
        for t in described
    ]
    _print_rows(header, rows)


def _describe_flow(flow: FlowPolicy) -> str:
    """A type's flow policies in one cell, as the TOML would set them (``-`` for none)."""
    parts = []
    if (c := flow.concurrency) is not None:
        parts.append(f"concurrency {c.key}<={c.limit}")
    if (r := flow.rate_limit) is not None:
        per = format_duration(r.per) if isinstance(r.per, float) else str(r.per)
        parts.append(f"rate_limit {r.key} {r.rate:g}/{per} burst {r.burst}")
    if flow.ordered_by:
        parts.append(f"ordered_by {flow.ordered_by}")
    if (u := flow.unique) is not None:
        states = ",".join(name.lower() for name in _STATE_NAMES if JobStates[name] in u.states)
        ttl = f" ttl {format_duration(float(u.ttl))}" if u.ttl is not None else ""
        parts.append(f"unique {u.key} [{states}]{ttl}")
    return "; ".join(parts) or "-"


# The states a unique policy may name, as [jobs.<type>] unique.states writes them.
_STATE_NAMES = ("QUEUED", "RUNNING", "FINISHED", "FAILED", "CANCELLED")


def _print_rows(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    if out.is_terminal:
        table = Table(box=None)
        for name in header:  # long names wrap within their column rather than being cut
            table.add_column(name, overflow="fold")
        for row in rows:
            table.add_row(*row)
        out.print(table)
    else:  # piped: whole values, tab-separated, for grep and cut
        for row in (header, *rows):
            print("\t".join(row))


def _plugin_dirs(args: argparse.Namespace) -> PluginDirs:
    def paths(kind: str) -> tuple[Path, ...]:
        return tuple(Path(p) for p in getattr(args, f"plugins.{kind}_dirs") or ())

    return PluginDirs(connectors=paths("connectors"), handlers=paths("handlers"), jobs=paths("jobs"))


# What an instance does, from the health of JobService and of its dispatcher.
_ROLES = {
    (True, True): "all (serves JobService and runs jobs)",
    (True, False): "frontend (serves JobService; runs no jobs)",
    (False, True): "worker (runs jobs; submit, watch and list through an instance with role all or frontend)",
}


async def _role(client: AsyncClient) -> str | None:
    from ajs_grpc.edge.server import DISPATCHER_HEALTH
    from ajs_grpc.edge.service import SERVICE_NAME

    try:
        serves = await client.health(SERVICE_NAME) == "SERVING"
        runs = await client.health(DISPATCHER_HEALTH) == "SERVING"
    except AjsError:  # a server of an older version does not say
        return None
    return _ROLES.get((serves, runs))


@dataclasses.dataclass(frozen=True)
class _Command:
    """A command of ``ajs``: its help, its arguments in help order, and what runs it or its subcommands."""

    name: str
    help: str
    run: _Run | None = None
    arguments: Sequence[_Arg] = ()
    subcommands: Sequence[_Command] = ()
    description: str | None = None
    check: Callable[[argparse.Namespace], str | None] | None = None
    """What the arguments must satisfy beyond their own parsing: a usage error, or None."""


def _schedule_commands(client: Sequence[_Arg]) -> list[_Command]:
    """The subcommands of ``ajs schedules``."""
    return [
        _Command("list", "list the schedules", _remote(_schedules), client),
        _Command(
            "create",
            "create a schedule: a request submitted at every occurrence of a cron expression",
            _remote(_schedule_create),
            [
                *client,
                _arg("schedule_id", metavar="ID", help="the schedule's id (its jobs' ids derive from it)"),
                _arg(
                    "--cron",
                    required=True,
                    metavar="EXPR",
                    help="5 fields (minute hour day month weekday), or 6 with seconds first",
                ),
                _arg("--type", required=True, help="the job type each occurrence submits"),
                _arg("--tz", default="UTC", metavar="ZONE", help="the IANA time zone (default UTC)"),
                _arg(
                    "--data",
                    action="append",
                    type=_key_value,
                    default=[],
                    metavar="KEY=VALUE",
                    help="a data entry (repeat)",
                ),
                _arg("--input-json", metavar="JSON", help="the typed input as protobuf JSON (or @FILE)"),
                _arg("--priority", type=int, default=0, help="higher runs first (default 0)"),
                _arg("--queue", default="", metavar="NAME", help="the queue its jobs wait in"),
                *_ATTEMPT_OPTIONS,
                _arg(
                    "--overlap",
                    choices=list(_OVERLAPS),
                    default="skip",
                    help="while the previous job runs: skip the occurrence (default), allow it, "
                    "or cancel the previous job",
                ),
                _arg(
                    "--catchup",
                    choices=list(_CATCHUPS),
                    default="skip",
                    help="occurrences missed while no server ran: skip them (default) or run one",
                ),
            ],
        ),
        *(
            _Command(name, text, _remote(run), [*client, _arg("schedule_id", metavar="ID")])
            for name, text, run in (
                ("get", "show a schedule as JSON", _schedule_get),
                ("delete", "delete a schedule (the jobs it submitted stay)", _schedule_delete),
                ("pause", "pause a schedule: no occurrence runs until resumed", _schedule_pause),
                (
                    "resume",
                    "resume a schedule from now (occurrences passed meanwhile are skipped)",
                    _schedule_resume,
                ),
            )
        ),
    ]


def _commands() -> list[_Command]:
    """Every command, in the order ``ajs --help`` lists them (built per parser: defaults read the environment)."""
    client = _client_options()
    return [
        _Command(
            "token",
            "make bearer tokens",
            subcommands=[
                _Command(
                    "new",
                    "print a new token and its tokens-file entry",
                    _token_new,
                    [
                        _arg("principal"),
                        _arg("--role", dest="roles", action="append", default=[], help="a role (repeat)"),
                    ],
                )
            ],
        ),
        _Command(
            "config",
            "check a configuration file",
            subcommands=[
                _Command(
                    "check",
                    "validate FILE and print the effective configuration",
                    _local(_config_check),
                    [_arg("file", type=Path)],
                )
            ],
        ),
        _Command(
            "db",
            "manage the PostgreSQL schema",
            subcommands=[
                _Command(
                    "upgrade",
                    "create or migrate the queue's schema to this version",
                    _local(_db_upgrade),
                    POSTGRES_OPTIONS,
                )
            ],
        ),
        _Command(
            "serve",
            "run a server until SIGTERM or Ctrl+C",
            _local(_serve),
            [*PLUGIN_OPTIONS, *_serve_options(), *POSTGRES_OPTIONS],
            description="Flags override $AJS_<SECTION>_<KEY>, which override the --config file, "
            "which overrides the defaults (see examples/ajs.toml).",
        ),
        _Command(
            "submit",
            "submit a request",
            _remote(_submit),
            [
                *client,
                _arg("type", nargs="?", default="", help="the job type (with --jsonl: of lines that name none)"),
                _arg(
                    "--data",
                    action="append",
                    type=_key_value,
                    default=[],
                    metavar="KEY=VALUE",
                    help="a data entry (repeat)",
                ),
                _arg("--id", default="", help="request id (default: assigned by the server)"),
                _arg("--parent", default="", help="id of the parent request"),
                _arg("--priority", type=int, default=0, help="higher runs first; may be negative (default 0)"),
                _arg("--queue", default="", metavar="NAME", help="the queue it waits in (default: default)"),
                _arg(
                    "--run-after",
                    type=_time,
                    metavar="TIME",
                    help="not before this ISO 8601 time (2026-12-01T08:00:00+00:00)",
                ),
                _arg("--delay", type=_duration, metavar="DURATION", help="not before this long from now (e.g. 5m)"),
                _arg(
                    "--depends-on",
                    action="append",
                    default=[],
                    metavar="ID",
                    help="a request that must end first; one that fails cancels this one (repeat)",
                ),
                _arg(
                    "--expire-in",
                    type=_duration,
                    metavar="DURATION",
                    help="cancelled (EXPIRED) if not started this long from now (e.g. 1h)",
                ),
                *_ATTEMPT_OPTIONS,
                _arg("--watch", action="store_true", help="follow the job until it ends"),
                _arg(
                    "--input-json",
                    metavar="JSON",
                    help="the typed input as protobuf JSON (or @FILE); its message type is asked of the server",
                ),
                _arg(
                    "--count",
                    type=int,
                    default=1,
                    metavar="N",
                    help="submit N such requests in atomic batches (ids ID-1 ... ID-N with --id); prints their ids",
                ),
                _arg(
                    "--jsonl",
                    metavar="FILE",
                    help="submit one request per line of FILE (- for stdin), each an ajs.v1.Request in JSON",
                ),
                _arg(
                    "--batch-size",
                    type=int,
                    default=1000,
                    metavar="N",
                    help="requests per BatchSubmitRequests call, each all or nothing (default 1000)",
                ),
            ],
            check=lambda args: None if args.type or args.jsonl else "the following arguments are required: type",
        ),
        _Command(
            "watch",
            "follow a job until it ends (without an id: every matching job's Responses as JSON lines)",
            _remote(_watch),
            [
                *client,
                _arg("request_id", nargs="?", default="", help="the job (leave out to follow every matching job)"),
                _arg("--after", type=int, default=0, help="skip Responses up to this sequence"),
                _arg("--state", dest="states", action="append", type=_state, default=[], help="without an id"),
                _arg("--type", dest="types", action="append", default=[], help="without an id"),
                _arg("--queue", dest="queues", action="append", default=[], help="without an id"),
                _arg("--parent", default="", help="without an id: only this job's children"),
                _arg("--after-token", default="", help="without an id: resume after this resume_token"),
            ],
            check=lambda args: (
                "--state, --type, --queue, --parent and --after-token follow every matching job: leave out the id"
                if args.request_id and (args.states or args.types or args.queues or args.parent or args.after_token)
                else None
            ),
        ),
        _Command("get", "show a job as JSON", _remote(_get), [*client, _arg("request_id")]),
        _Command(
            "list",
            "list jobs",
            _remote(_list),
            [
                *client,
                _arg("--state", dest="states", action="append", type=_state, default=[]),
                _arg("--type", dest="types", action="append", default=[]),
                _arg("--parent", default=""),
                _arg("--limit", type=int, default=100, help="at most this many jobs (default %(default)s)"),
                _arg("--oldest-first", action="store_true", help="in submit order (default: newest first)"),
            ],
        ),
        _Command("cancel", "cancel a job", _remote(_cancel), [*client, _arg("request_id")]),
        _Command(
            "retry",
            "run a FAILED or CANCELLED job again (same id; its Responses go on)",
            _remote(_retry),
            [*client, _arg("request_id"), _arg("--watch", action="store_true", help="follow the new run")],
        ),
        _Command(
            "delete",
            "delete an ended job, its Responses and its descendants",
            _remote(_delete),
            [*client, _arg("request_id")],
        ),
        _Command(
            "schedules",
            "list the schedules (or create, get, delete, pause, resume one)",
            _remote(_schedules),
            client,
            subcommands=_schedule_commands(_inherited(client)),
        ),
        _Command(
            "queues",
            "list the queues: jobs queued and running, paused or not, the oldest job's wait (admins)",
            _remote(_queues),
            client,
        ),
        _Command(
            "pause",
            "pause a queue: its jobs are accepted but none starts until resumed (admins)",
            _remote(_pause),
            [*client, _arg("name", help="the queue")],
        ),
        _Command(
            "resume",
            "resume a paused queue: its jobs start again (admins)",
            _remote(_resume),
            [*client, _arg("name", help="the queue")],
        ),
        _Command(
            "health",
            "exit 0 if the server is SERVING (a container health probe)",
            _remote(_health),
            [
                *client,
                _arg(
                    "--service",
                    default="",
                    help="a service's status, e.g. ajs.v1.JobService (default: the server's)",
                ),
            ],
        ),
        _Command(
            "worker",
            "run jobs for a server as a remote worker (drains on SIGTERM)",
            _worker,
            [
                *client,
                _arg(
                    "jobs",
                    nargs="+",
                    metavar="MODULE:NAME",
                    help="job plugins to run: a JobPlugin, a list of them, or a job function (its name is its type)",
                ),
                _arg("--name", default=None, help="the worker's name in the server's logs (default host:pid)"),
                _arg("--max-concurrent", type=int, default=8, metavar="N", help="jobs run at once (default 8)"),
                _arg("--log-level", default="info", choices=["debug", "info", "warning", "error"]),
            ],
        ),
        _Command(
            "types",
            "list the job types a server runs (or, with --local, the plugins found here)",
            _types,
            [
                *client,
                _arg("--local", action="store_true", help="load the plugins here, as ajs serve would, and list them"),
                *PLUGIN_OPTIONS,
            ],
        ),
    ]


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ajs", description="ajs-grpc: a job server with a gRPC front.")
    parser.add_argument("--version", action="version", version=f"ajs {__version__}")
    _add_commands(parser, "command", _commands())
    return parser


def _add_commands(
    parser: argparse.ArgumentParser, dest: str, commands: Sequence[_Command], *, required: bool = True
) -> None:
    """Adds ``commands`` to ``parser`` (one is ``required``); each sets ``func`` to what runs it."""
    subparsers = parser.add_subparsers(dest=dest, required=required, metavar=dest.upper())
    for command in commands:
        subparser = subparsers.add_parser(command.name, help=command.help, description=command.description)
        for names, options in command.arguments:
            subparser.add_argument(*names, **options)
        if command.run is not None:  # a group with its own run works without a subcommand too
            subparser.set_defaults(func=command.run, check=command.check, parser=subparser)
        if command.subcommands:
            _add_commands(subparser, f"{command.name}_command", command.subcommands, required=command.run is None)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``ajs`` command; returns its exit code."""
    args = _parser().parse_args(argv)
    if args.check is not None and (problem := args.check(args)) is not None:
        args.parser.error(problem)
    run: _Run = args.func
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
