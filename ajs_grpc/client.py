"""The Python client (public path): Client, AsyncClient, TlsOptions ...

It lives in :mod:`ajs_grpc.faces.client`; this module is the stable import path for users.
``JobType``, what ``job_types()`` returns, is the core model's, and ``QueueInfo``, what
``list_queues()`` returns, the connector contract's (both re-exported here).
"""

from ajs_grpc.connectors.base import QueueInfo
from ajs_grpc.core.model import JobType
from ajs_grpc.faces.client import (
    DEFAULT_TARGET,
    AsyncClient,
    Client,
    Submitted,
    TlsOptions,
    channel_options,
    channel_target,
    is_local,
)

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "Client",
    "JobType",
    "QueueInfo",
    "Submitted",
    "TlsOptions",
    "channel_options",
    "channel_target",
    "is_local",
]
