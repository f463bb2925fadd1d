"""The Python remote worker (public path): :class:`Worker` runs job plugins for a server over gRPC.

It lives in :mod:`ajs_grpc.faces.worker`; this module is the stable import path for users.
"""

from ajs_grpc.faces.worker import Worker

__all__ = ["Worker"]
