"""The reject handler (the seed's Dummy): always last, answers what nobody runs."""

from __future__ import annotations

from typing_extensions import override

from ajs_grpc.core.jobs import JobContext, JobReturn
from ajs_grpc.engine.handlers.base import NotSupported, RequestHandler

__all__ = ["RejectRequestHandler"]


class RejectRequestHandler(RequestHandler):
    """Ends every request it gets FAILED: "requests of type X are not supported"."""

    name = "reject"

    @override
    def can_handle(self, request_type: str) -> bool:
        return True

    @override
    async def handle(self, ctx: JobContext) -> JobReturn:
        request_type = ctx.request.type
        raise NotSupported(
            f"requests of type {request_type!r} are not supported",
            reason="TYPE_NOT_SUPPORTED",
            metadata={"type": request_type},
        )
