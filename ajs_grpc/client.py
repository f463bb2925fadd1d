"""The Python client (public path): Client, AsyncClient, TlsOptions ...

It lives in :mod:`ajs_grpc.faces.client`; this module is the stable import path for users.
``JobType``, what ``job_types()`` returns, is the core model's, ``QueueInfo``, what
``list_queues()`` returns, the connector contract's, and ``Schedule``, ``Overlap`` and
``Catchup``, what a ``ScheduleInfo`` holds, the core's (all re-exported here).
"""

from ajs_grpc.connectors.base import QueueInfo
from ajs_grpc.core.model import JobType
from ajs_grpc.core.schedules import Catchup, Overlap, Schedule
from ajs_grpc.faces.client import (
    DEFAULT_TARGET,
    AsyncClient,
    Client,
    ScheduleInfo,
    Submitted,
    TlsOptions,
    Watched,
    channel_options,
    channel_target,
    is_local,
)

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "Catchup",
    "Client",
    "JobType",
    "Overlap",
    "QueueInfo",
    "Schedule",
    "ScheduleInfo",
    "Submitted",
    "TlsOptions",
    "Watched",
    "channel_options",
    "channel_target",
    "is_local",
]
