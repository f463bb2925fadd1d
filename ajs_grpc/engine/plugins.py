"""Plugin discovery: connectors, handlers and jobs, from entry points and plugin directories.

Entry-point groups: ``ajs_grpc.connectors`` (Connector classes), ``ajs_grpc.handlers``
(RequestHandler classes) and ``ajs_grpc.jobs`` (JobPlugin objects); the built-ins
register the same way as third-party plugins. As in the seed, plugins may also
live in directories, one per kind: every module (``name.py``) or package
(``name/__init__.py``) in a jobs directory contributes its module-level
JobPlugin objects, and in a handlers or connectors directory its
RequestHandler or Connector subclasses (named by their ``name``).

Anything wrong is a :class:`PluginError` naming the culprit, raised at start-up
before the server listens: a plugin that fails to import, a missing directory,
a connector, handler or job type named in the configuration that no plugin
provides, or two plugins providing one job type. Its ``kind`` tells which class
of failure it is (the CLI exits with a code per kind, as the seed did).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from ajs_grpc.connectors.base import Connector
from ajs_grpc.core.errors import PluginError, PluginKind
from ajs_grpc.core.flow import POLICY_NAMES, FlowPolicy
from ajs_grpc.core.jobs import JobPlugin
from ajs_grpc.engine.handlers.base import HandlerChain, RequestHandler
from ajs_grpc.engine.handlers.remote import RemoteRequestHandler

__all__ = [
    "HandlerSpec",
    "PluginDirs",
    "PluginError",
    "Plugins",
    "build_chain",
    "discover",
    "load_connector",
]

log = logging.getLogger(__name__)

Kind = PluginKind

GROUPS: dict[Kind, str] = {
    "connector": "ajs_grpc.connectors",
    "handler": "ajs_grpc.handlers",
    "job": "ajs_grpc.jobs",
}
# The keys of a [jobs.<type>] table that set flow-control policies (the others: retry, timeout
# and the plugin's own fields below).
FLOW_KEYS = frozenset(POLICY_NAMES)
# The keys of a [jobs.<type>] table that set a JobPlugin field of the same name.
PLUGIN_KEYS = frozenset({"timeout", "allow_failed_dependencies"})
# The handler that answers every type nobody runs; always last in the chain.
REJECT = "reject"
# The handler that runs jobs asking for no other handler when the configuration lists none.
INTERNAL = "internal"
# The handler of remote workers' types; before the last one when the configuration lists it nowhere.
REMOTE = "remote"


@dataclasses.dataclass(frozen=True)
class HandlerSpec:
    """One link of the configured chain: a handler and the job types it runs."""

    name: str
    types: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PluginDirs:
    """Directories to load plugins from, besides the installed entry points."""

    connectors: tuple[Path, ...] = ()
    handlers: tuple[Path, ...] = ()
    jobs: tuple[Path, ...] = ()


@dataclasses.dataclass(frozen=True)
class Plugins:
    """Everything discovered: classes by name and job plugins by type.

    Connectors are imported only when asked for by name: an installed connector
    whose driver is missing (postgres without its extra) harms nobody who uses
    another one.
    """

    connectors: dict[str, type[Connector] | EntryPoint]
    handlers: dict[str, type[RequestHandler]]
    jobs: dict[str, JobPlugin]

    def with_policies(self, policies: Mapping[str, Mapping[str, Any]]) -> Plugins:
        """These plugins with per-type overrides (``[jobs.<type>]`` of the configuration).

        A table may override the retry policy's fields, ``timeout``,
        ``allow_failed_dependencies`` (a bool), and the flow policies (``concurrency``,
        ``rate_limit``, ``ordered_by``, ``unique``; each replaces the plugin's whole, see
        :meth:`FlowPolicy.from_settings`).

        Raises:
            PluginError: a policy names a job type no plugin provides, or is malformed.
        """
        jobs = dict(self.jobs)
        for job_type, policy in policies.items():
            if job_type not in jobs:
                raise PluginError("config", f"jobs.{job_type}: no plugin provides job type {job_type!r}")
            plugin = jobs[job_type]
            flow = {k: v for k, v in policy.items() if k in FLOW_KEYS}
            retry = {k: v for k, v in policy.items() if k not in PLUGIN_KEYS and k not in FLOW_KEYS}
            try:
                jobs[job_type] = dataclasses.replace(
                    plugin,
                    retry=dataclasses.replace(plugin.retry, **retry),
                    timeout=policy.get("timeout", plugin.timeout),
                    flow=FlowPolicy.from_settings(flow, plugin.flow),
                    allow_failed_dependencies=policy.get("allow_failed_dependencies", plugin.allow_failed_dependencies),
                )
            except (ValueError, TypeError) as error:
                raise PluginError("config", f"jobs.{job_type}: {error}") from None
        return Plugins(self.connectors, self.handlers, jobs)

    def connector(self, name: str) -> type[Connector]:
        """The connector class registered as ``name``."""
        if name not in self.connectors:
            raise PluginError("connector", f"no connector named {name!r}; found: {_names(self.connectors)}")
        found = self.connectors[name]
        if isinstance(found, EntryPoint):
            origin = f"entry point {found.name!r} ({found.value})"
            try:
                loaded = found.load()
            except Exception as error:
                raise PluginError("connector", f"{origin} failed to import: {type(error).__name__}: {error}") from error
            found = _subclass(loaded, Connector, "connector", origin)
        return found

    def chain(self, specs: Sequence[HandlerSpec] | None) -> HandlerChain:
        """Builds the handler chain the configuration describes.

        Args:
            specs: handlers in order with their job types; None puts every job on
                the handler it asks for (``JobPlugin.handler``), internal first. The remote
                handler (types of remote workers) comes just before the last one unless
                listed; it may list types no plugin provides (a worker declares them).
        """
        if specs is None:
            wanted: dict[str, list[str]] = {INTERNAL: []}
            for job_type, plugin in sorted(self.jobs.items()):
                wanted.setdefault(plugin.handler, []).append(job_type)
            specs = [HandlerSpec(name, tuple(types)) for name, types in wanted.items() if types or name == INTERNAL]
        links: list[RequestHandler] = []
        for spec in specs:
            if spec.name == REJECT:
                raise PluginError("config", f"the {REJECT!r} handler is always last and takes no job types")
            if spec.name not in self.handlers:
                raise PluginError("handler", f"no handler named {spec.name!r}; found: {_names(self.handlers)}")
            handler = self.handlers[spec.name]()
            for job_type in spec.types:
                if job_type not in self.jobs and isinstance(handler, RemoteRequestHandler):
                    handler.expect(job_type)
                    continue
                if job_type not in self.jobs:
                    raise PluginError(
                        "job", f"handler {spec.name!r} lists job type {job_type!r}, which no plugin provides"
                    )
                try:
                    handler.register(self.jobs[job_type])
                except TypeError as error:
                    raise PluginError("config", f"handler {spec.name!r} cannot run {job_type!r}: {error}") from None
            links.append(handler)
        if REMOTE in self.handlers and not any(isinstance(link, RemoteRequestHandler) for link in links):
            links.append(self.handlers[REMOTE]())
        if REJECT not in self.handlers:
            raise PluginError("handler", f"the {REJECT!r} handler is not installed")
        return HandlerChain(links, self.handlers[REJECT]())


def _names(found: Iterable[str]) -> str:
    return ", ".join(sorted(found)) or "none"


def discover(dirs: PluginDirs = PluginDirs()) -> Plugins:
    """Loads every plugin from the entry points and ``dirs``.

    Raises:
        PluginError: a plugin failed to import, a directory is missing, or two
            plugins provide the same name or job type.
    """
    connectors: dict[str, type[Connector] | EntryPoint] = {}
    handlers: dict[str, type[RequestHandler]] = {}
    jobs: dict[str, JobPlugin] = {}
    origins: dict[str, str] = {}

    def add_job(plugin: object, origin: str) -> None:
        if not isinstance(plugin, JobPlugin):
            raise PluginError("job", f"{origin} is a {type(plugin).__name__}, not a JobPlugin (use @job)")
        if plugin.type in jobs:
            raise PluginError(
                "job", f"job type {plugin.type!r} is provided twice: by {origins[plugin.type]} and by {origin}"
            )
        jobs[plugin.type] = plugin
        origins[plugin.type] = origin

    for entry in entry_points(group=GROUPS["connector"]):
        connectors[entry.name] = entry  # imported when chosen
    for kind, group in GROUPS.items():
        if kind == "connector":
            continue
        for entry in entry_points(group=group):
            origin = f"entry point {entry.name!r} ({entry.value})"
            try:
                loaded = entry.load()
            except Exception as error:
                raise PluginError(kind, f"{origin} failed to import: {type(error).__name__}: {error}") from error
            if kind == "job":
                add_job(loaded, origin)
            else:
                handlers[entry.name] = _subclass(loaded, RequestHandler, kind, origin)

    for directory in dirs.jobs:
        for module in _import_directory("job", directory):
            for value in vars(module).values():
                if isinstance(value, JobPlugin):
                    add_job(value, f"{module.__file__}")
    for directory in dirs.handlers:
        for module in _import_directory("handler", directory):
            for cls in _defined_subclasses(module, RequestHandler):
                handlers[cls.name] = cls
    for directory in dirs.connectors:
        for module in _import_directory("connector", directory):
            for cls in _defined_subclasses(module, Connector):
                connectors[cls.name] = cls
    return Plugins(connectors, handlers, jobs)


def _subclass(value: Any, base: type[Any], kind: Kind, origin: str) -> Any:
    if not (inspect.isclass(value) and issubclass(value, base)):
        raise PluginError(kind, f"{origin} is not a {base.__name__} class")
    return value


def _defined_subclasses(module: ModuleType, base: type[Any]) -> list[Any]:
    return [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, base)
        and value.__module__ == module.__name__
        and not inspect.isabstract(value)
        and isinstance(getattr(value, "name", None), str)
    ]


def _import_directory(kind: Kind, directory: Path) -> list[ModuleType]:
    """Imports every module and package in ``directory`` (the seed's plugin folders)."""
    if not directory.is_dir():
        raise PluginError("config", f"the {kind} plugin directory {directory} does not exist")
    modules = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(("_", ".")):
            continue
        if entry.is_file() and entry.suffix == ".py":
            file, search = entry, None
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            file, search = entry / "__init__.py", [str(entry)]
        else:
            continue
        # A flat, unique name: worker processes import the same file under it.
        name = f"ajs_plugin_{kind}s_{entry.stem}"
        spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=search)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[name]
            raise PluginError(kind, f"{file} failed to import: {type(error).__name__}: {error}") from error
        modules.append(module)
    return modules


def load_connector(name: str) -> type[Connector]:
    """The installed connector class registered as ``name``."""
    return discover().connector(name)


def build_chain(specs: Sequence[HandlerSpec] | None) -> HandlerChain:
    """The chain of the installed plugins that ``specs`` describe (see :meth:`Plugins.chain`)."""
    return discover().chain(specs)
