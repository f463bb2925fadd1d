"""Plugin discovery: connectors, handlers and jobs found through entry points.

Groups: ``ajs_grpc.connectors`` (Connector classes), ``ajs_grpc.handlers``
(RequestHandler classes) and ``ajs_grpc.jobs`` (JobPlugin objects). The
built-ins register the same way as third-party plugins. A plugin that fails to
load is logged and skipped; naming a missing one in the configuration is a
:class:`PluginError`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from ajs_grpc.connectors.base import Connector
from ajs_grpc.errors import AjsError
from ajs_grpc.handlers.base import HandlerChain, RequestHandler
from ajs_grpc.jobs import JobPlugin

__all__ = [
    "HandlerSpec",
    "PluginError",
    "build_chain",
    "load_connector",
    "load_handlers",
    "load_jobs",
]

log = logging.getLogger(__name__)

CONNECTORS = "ajs_grpc.connectors"
HANDLERS = "ajs_grpc.handlers"
JOBS = "ajs_grpc.jobs"
# The handler that answers every type nobody runs; always last in the chain.
REJECT = "reject"
# The handler that runs every job when the configuration lists none.
INTERNAL = "internal"


class PluginError(AjsError):
    """A plugin named in the configuration is missing or unusable."""


@dataclasses.dataclass(frozen=True)
class HandlerSpec:
    """One link of the configured chain: a handler and the job types it runs."""

    name: str
    types: tuple[str, ...] = ()


def _load(group: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for entry in entry_points(group=group):
        try:
            found[entry.name] = entry.load()
        except Exception:
            log.exception("skipping plugin %r of %s: it failed to load", entry.name, group)
    return found


def load_connector(name: str) -> type[Connector]:
    """The connector class registered as ``name``.

    Raises:
        PluginError: no such connector.
    """
    connectors = _load(CONNECTORS)
    if name not in connectors:
        raise PluginError(f"no connector named {name!r}; installed: {', '.join(sorted(connectors)) or 'none'}")
    connector: type[Connector] = connectors[name]
    return connector


def load_handlers() -> dict[str, type[RequestHandler]]:
    """Every installed handler class, by name."""
    return _load(HANDLERS)


def load_jobs() -> dict[str, JobPlugin]:
    """Every installed job plugin, by type."""
    jobs: dict[str, JobPlugin] = {}
    for name, plugin in _load(JOBS).items():
        if not isinstance(plugin, JobPlugin):
            log.error("skipping job plugin %r: it is a %s, not a JobPlugin", name, type(plugin).__name__)
            continue
        if plugin.type in jobs:
            log.error("skipping job plugin %r: type %r is taken", name, plugin.type)
            continue
        jobs[plugin.type] = plugin
    return jobs


def build_chain(
    specs: Sequence[HandlerSpec] | None,
    jobs: dict[str, JobPlugin] | None = None,
    handlers: dict[str, type[RequestHandler]] | None = None,
) -> HandlerChain:
    """Builds the handler chain the configuration describes.

    Args:
        specs: handlers in order with their job types; None puts every job on
            one internal handler.
        jobs: the job plugins by type; defaults to the installed ones.
        handlers: the handler classes by name; defaults to the installed ones.

    Raises:
        PluginError: a named handler or job type is not installed.
    """
    jobs = load_jobs() if jobs is None else jobs
    handlers = load_handlers() if handlers is None else handlers
    if specs is None:
        specs = [HandlerSpec(INTERNAL, tuple(sorted(jobs)))]
    links: list[RequestHandler] = []
    for spec in specs:
        if spec.name == REJECT:
            raise PluginError(f"the {REJECT!r} handler is always last and takes no job types; do not list it")
        if spec.name not in handlers:
            raise PluginError(f"no handler named {spec.name!r}; installed: {', '.join(sorted(handlers)) or 'none'}")
        handler = handlers[spec.name]()
        for job_type in spec.types:
            if job_type not in jobs:
                raise PluginError(f"handler {spec.name!r} lists job type {job_type!r}, which no plugin provides")
            handler.register(jobs[job_type])
        links.append(handler)
    if REJECT not in handlers:
        raise PluginError(f"the {REJECT!r} handler is not installed")
    return HandlerChain(links, handlers[REJECT]())
