"""Request handlers: they run claimed requests as jobs, first match wins."""

from ajs_grpc.engine.handlers.base import HandlerChain, NotSupported, RequestHandler

__all__ = ["HandlerChain", "NotSupported", "RequestHandler"]
