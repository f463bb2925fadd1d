"""The transport adapter of the gRPC edge: every call passes the same links, in this order.

1. **outcome** (outermost): the call's end is counted by method and status code
   (metrics), and any exception becomes a ``google.rpc.Status`` with details
   (:func:`abort`); one that is not the project's is logged and answered INTERNAL.
   Ids in the error are written as the caller names them.
2. **authentication**: the caller (principal, and the key its watches count under),
   from the call's metadata and TLS peer, before the request's bytes are looked at,
   so an unauthenticated caller learns nothing of the parser.
3. **decoding**: the request's bytes are parsed here, so that undecodable input is
   answered INVALID_ARGUMENT (grpc.aio answers UNKNOWN when it parses them).
4. **request id**: the call's log lines carry the request id it names.
5. **watchdog** (streams): a client that reads nothing for ``watch_send_timeout``
   is dropped instead of holding its stream forever.
6. the servicer's method, ``snake_case`` of the rpc's name, taking the decoded
   message and the :class:`Caller`.

The method table is generated from the service descriptor: an rpc of the contract
without its method fails when the handler is built (at server start), not at call time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Protocol

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_status import rpc_status

from ajs_grpc.core.errors import AjsError, Internal, Unauthenticated, Unavailable
from ajs_grpc.core.logs import current_request_id
from ajs_grpc.edge import convert
from ajs_grpc.edge.auth import ANONYMOUS, Authenticator, PeerCertificate, Principal
from ajs_grpc.edge.ownership import in_names_of
from ajs_grpc.edge.validation import parse

__all__ = ["Caller", "Context", "Pipeline", "ServiceObserver", "abort", "method_name"]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[bytes, Message]


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who makes a call: the authenticated principal and the key its watches count under."""

    principal: Principal
    watch_key: str


class ServiceObserver(Protocol):
    """What the service reports (metrics)."""

    def submitted_type(self, request_type: str) -> None:
        """A new request was queued."""

    def call_ended(self, method: str, code: str) -> None:
        """A call ended with status ``code`` (a name such as OK or NOT_FOUND)."""


class NoObserver:
    """Reports nothing."""

    def submitted_type(self, request_type: str) -> None:
        """Nothing."""

    def call_ended(self, method: str, code: str) -> None:
        """Nothing."""


async def abort(context: Context, error: AjsError) -> None:
    """Ends the call with ``error`` as a ``google.rpc.Status`` with details."""
    await context.abort_with_status(rpc_status.to_status(convert.error_to_status(error)))


def method_name(rpc: str) -> str:
    """The servicer method of an rpc: ``SubmitRequest`` -> ``submit_request``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", rpc).lower()


class Pipeline:
    """Builds the ``grpc.aio`` handler of a servicer, each call passing the links above.

    Args:
        authenticator: checks each call's credentials; None lets everyone do everything.
        observer: told of each call's end (metrics).
        watch_send_timeout: seconds a stream's client may leave a message unread.
        max_stream_age: seconds after which a server stream ends UNAVAILABLE (``STREAM_RENEWED``)
            for its client to resume it, perhaps elsewhere (connections outlive their age for
            worker sessions, so long streams are renewed here); None: never.
    """

    def __init__(
        self,
        authenticator: Authenticator | None,
        observer: ServiceObserver,
        watch_send_timeout: Callable[[], float],
        max_stream_age: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.authenticator = authenticator
        self.observer = observer
        self._watch_send_timeout = watch_send_timeout
        self._max_stream_age = max_stream_age

    def handler(self, service: ServiceDescriptor, servicer: object) -> grpc.GenericRpcHandler:
        """The generic handler serving every rpc of ``service`` with ``servicer``'s methods.

        Raises:
            TypeError: an rpc of the service has no method on ``servicer``.
        """
        handlers: dict[str, grpc.RpcMethodHandler[bytes, Message]] = {}
        for method in service.methods:
            implementation = getattr(servicer, method_name(method.name), None)
            if implementation is None or (method.client_streaming and not method.server_streaming):
                raise TypeError(f"{type(servicer).__name__} does not serve {service.full_name}.{method.name}")
            if method.client_streaming:
                handlers[method.name] = self._bidi(method, implementation)
            elif method.server_streaming:
                handlers[method.name] = self._stream(method, implementation)
            else:
                handlers[method.name] = self._unary(method, implementation)
        return grpc.method_handlers_generic_handler(service.full_name, handlers)

    # -- the links ----------------------------------------------------------------

    @contextlib.contextmanager
    def _outcome(self, rpc: str, caller: list[Caller]) -> Iterator[list[AjsError]]:
        """Counts the call's end; turns an exception into the error to answer with."""
        failed: list[AjsError] = []
        try:
            yield failed
        except Exception as error:  # every failure gets a status with details
            principal = caller[0].principal if caller else None
            failed.append(in_names_of(principal, _as_ajs_error(error)))
        self.observer.call_ended(rpc, failed[0].code.name if failed else "OK")

    def authenticate(self, context: Context) -> Caller:
        """The authenticated caller of ``context``."""
        principal = self._principal(context)
        if principal is ANONYMOUS:
            # Without authentication everyone is one principal: one client address is
            # then what may hold only its share of the watch slots.
            host = (context.peer() or "").rpartition(":")[0]
            return Caller(principal, f"{principal.name}@{host}")
        return Caller(principal, principal.name)

    def _principal(self, context: Context) -> Principal:
        if self.authenticator is None:
            return ANONYMOUS
        pairs = [(key, value) for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)]
        if sum(key == "authorization" for key, _ in pairs) > 1:
            raise Unauthenticated("a call may carry one authorization header", reason="MALFORMED_TOKEN")
        auth = context.auth_context()
        subjects = list(auth.get("x509_subject") or [])
        certificate = None
        if subjects:
            names = tuple(name.decode(errors="replace") for name in auth.get("x509_subject_alternative_name") or [])
            certificate = PeerCertificate(subjects[0].decode(errors="replace"), names)
        return self.authenticator.authenticate(dict(pairs), certificate)

    @staticmethod
    def _name_request(message: Message, caller: Caller) -> None:
        """The call's log lines carry the (stored) id of the request it names."""
        request_id = getattr(message, "request_id", "")
        if isinstance(request_id, str) and request_id:
            current_request_id.set(caller.principal.qualify(request_id))

    # -- unary and server-streaming calls ----------------------------------------------

    def _unary(
        self, method: MethodDescriptor, implementation: Callable[[Message, Caller], Awaitable[Message]]
    ) -> grpc.RpcMethodHandler[bytes, Message]:
        message_type = message_factory.GetMessageClass(method.input_type)
        rpc = method.name

        async def handle(raw: bytes, context: Context) -> Message | None:
            caller: list[Caller] = []
            reply: Message | None = None
            with self._outcome(rpc, caller) as failed:
                caller.append(self.authenticate(context))
                message = parse(message_type, raw)
                self._name_request(message, caller[0])
                reply = await implementation(message, caller[0])
            if failed:
                await abort(context, failed[0])
            return reply

        return grpc.unary_unary_rpc_method_handler(handle, response_serializer=_serialize)

    def _stream(
        self, method: MethodDescriptor, implementation: Callable[[Message, Caller], AsyncIterator[Message]]
    ) -> grpc.RpcMethodHandler[bytes, Message]:
        message_type = message_factory.GetMessageClass(method.input_type)
        rpc = method.name

        async def handle(raw: bytes, context: Context) -> AsyncIterator[Message]:
            # A client gone cancels this task; let it propagate (catching it leaks: grpc #43360).
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None
            slow = aged = waiting = False
            timeout = self._watch_send_timeout()

            def drop() -> None:
                nonlocal slow
                slow = True
                task.cancel()

            def age_out() -> None:  # cancels only a wait for the next reply, never a write
                nonlocal aged
                aged = True
                if waiting:
                    task.cancel()

            caller: list[Caller] = []
            age = self._max_stream_age()
            ager = loop.call_later(age * random.uniform(0.9, 1.0), age_out) if age else None
            try:
                with self._outcome(rpc, caller) as failed:
                    caller.append(self.authenticate(context))
                    message = parse(message_type, raw)
                    self._name_request(message, caller[0])
                    replies = aiter(implementation(message, caller[0]))
                    try:
                        while not aged:
                            waiting = True
                            try:
                                reply = await anext(replies)
                            except StopAsyncIteration:
                                break
                            except asyncio.CancelledError:
                                if not aged or slow:
                                    raise
                                task.uncancel()  # our own renewal, not the client's going away
                            finally:
                                waiting = False
                            if aged:
                                break
                            watchdog = loop.call_later(timeout, drop)
                            try:
                                yield reply
                            finally:
                                watchdog.cancel()
                    finally:
                        if isinstance(replies, AsyncGenerator):
                            await replies.aclose()
                    if aged:
                        raise Unavailable(
                            f"the stream is renewed after {age:g}s, as connections are, so that clients spread "
                            "over the instances: resume it (the clients do so by themselves)",
                            reason="STREAM_RENEWED",
                        )
            except asyncio.CancelledError:
                if slow:
                    # The stream ends at once; its status cannot reach a client that reads nothing anyway.
                    log.warning("dropped a %s stream whose client read nothing for %gs", rpc, timeout)
                    self.observer.call_ended(rpc, "RESOURCE_EXHAUSTED")
                raise
            finally:
                if ager is not None:
                    ager.cancel()
            if failed:
                await abort(context, failed[0])

        return grpc.unary_stream_rpc_method_handler(handle, response_serializer=_serialize)

    # -- bidirectional calls ---------------------------------------------------------------

    def _bidi(
        self,
        method: MethodDescriptor,
        implementation: Callable[[AsyncIterator[Message], Caller], AsyncIterator[Message]],
    ) -> grpc.RpcMethodHandler[bytes, Message]:
        """Each incoming message is decoded as it comes (undecodable: INVALID_ARGUMENT)."""
        message_type = message_factory.GetMessageClass(method.input_type)
        rpc = method.name

        async def messages(raw_messages: AsyncIterator[bytes]) -> AsyncIterator[Message]:
            async for raw in raw_messages:
                yield parse(message_type, raw)

        async def handle(raw_messages: AsyncIterator[bytes], context: Context) -> AsyncIterator[Message]:
            caller: list[Caller] = []
            with self._outcome(rpc, caller) as failed:
                caller.append(self.authenticate(context))
                async for reply in implementation(messages(raw_messages), caller[0]):
                    yield reply
            if failed:
                await abort(context, failed[0])

        return grpc.stream_stream_rpc_method_handler(handle, response_serializer=_serialize)


def _as_ajs_error(error: Exception) -> AjsError:
    """``error`` itself if it is the project's; else logged and reported as INTERNAL."""
    if isinstance(error, AjsError):
        return error
    log.exception("unexpected error in a JobService call")
    return Internal("internal error; the server logged the details", reason="INTERNAL_ERROR")


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
