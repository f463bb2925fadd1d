"""The request-handler API (public path) for third-party handlers.

It lives in :mod:`ajs_grpc.engine.handlers`; this module is the stable import path for plugins.
"""

from ajs_grpc.engine.handlers import (
    HandlerChain,
    NotSupported,
    RequestHandler,
)

__all__ = [
    "HandlerChain",
    "NotSupported",
    "RequestHandler",
]
