"""The web dashboard: an aiohttp application over the server's own JobService.

Every page's data comes from JobService calls made over loopback with the signed-in
user's bearer token, so authentication and ownership are exactly the gRPC API's:
the dashboard adds no rule of its own and sees nothing its user could not.

Sign-in: the user pastes a bearer token; the dashboard checks it with a cheap
authenticated call (ListJobs of one job) and keeps it in a server-side session
whose random id is an HttpOnly, SameSite=Strict cookie. Without a session nothing
is served but the sign-in page and its stylesheet: pages redirect to it, the
JSON and event-stream endpoints answer 401. Without a tokens file the dashboard
is as open as the gRPC API.

Writes (sign-in, sign-out, cancel, retry) are POSTs checked against CSRF twice:
the cookie is SameSite=Strict, and the request's Origin (when the browser sends
one) must be the dashboard's own; API writes must also carry the session's
CSRF token in an ``X-CSRF-Token`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import quote, urlsplit

import grpc
from aiohttp import web

from ajs_grpc.core.errors import AjsError, Code, InvalidArgument
from ajs_grpc.core.model import RequestState
from ajs_grpc.edge.server import is_loopback_host
from ajs_grpc.faces.client import AsyncClient
from ajs_grpc.faces.dashboard.views import Payloads, count_jobs, job_json, response_json

__all__ = ["SESSION_COOKIE", "Dashboard"]

log = logging.getLogger(__name__)

SESSION_COOKIE = "ajs_session"
# A session unused this long is forgotten (the user signs in again).
SESSION_IDLE = 12 * 3600.0
# At most this many sessions are kept; the least recently used goes first.
MAX_SESSIONS = 10_000
# Seconds between two overview events on its event stream.
OVERVIEW_EVERY = 1.0
# Seconds after which the overview recounts even though nothing it watches changed.
RECOUNT_EVERY = 10.0
# After a change, the overview waits this many times as long as its last count took before counting again.
COUNT_SHARE = 4
# Seconds between comments that keep an idle event stream open through proxies.
KEEPALIVE_EVERY = 15.0

_STATIC = resources.files("ajs_grpc.faces.dashboard") / "static"
# Served without a session: the sign-in page needs them.
_PUBLIC_ASSETS = frozenset({"dashboard.css", "favicon.svg"})
_CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".html": "text/html"}
_PAGES = {"/": "overview.html", "/jobs": "jobs.html", "/job": "job.html"}
# HTTP status of each gRPC status code an API call can end with.
_HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 409,
    Code.OUT_OF_RANGE: 400,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.UNAUTHENTICATED: 401,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}
_SECURITY_HEADERS = {
    # Scripts and styles come only from the dashboard itself; nothing may frame it.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


@dataclasses.dataclass
class Session:
    """A signed-in user: the bearer token its calls carry (None without authentication)."""

    token: str | None
    principal: str
    admin: bool
    csrf: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(24))
    last_seen: float = dataclasses.field(default_factory=time.monotonic)


# Who a token belongs to, for display only (JobService decides what it may do): name and admin flag.
WhoIs = Callable[[str], tuple[str, bool] | None]


class Dashboard:
    """The dashboard of one server.

    Args:
        target: the gRPC address of the server's JobService (over loopback).
        address: HOST:PORT the dashboard listens on; port 0 picks a free one.
        authenticated: the server needs bearer tokens (a tokens file is configured).
        who_is: names a token's principal for the page header (optional).
        channel: use this gRPC channel instead of opening one (it is not closed).
    """

    def __init__(
        self,
        target: str,
        address: str,
        *,
        authenticated: bool,
        who_is: WhoIs | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.target = target
        self.address = address
        self.authenticated = authenticated
        self.port = 0
        self._who_is = who_is
        self._own_channel = channel is None
        self._channel = channel or grpc.aio.insecure_channel(target)
        self._sessions: dict[str, Session] = {}
        # Without authentication everyone shares one session (it holds the CSRF token).
        self._open_session = Session(token=None, principal="", admin=True)
        self._streams: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._loopback_only = False
        self.app = self._make_app()

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> int:
        """Listens; returns the bound port."""
        host, _, port = self.address.rpartition(":")
        if not port.isdigit():
            raise InvalidArgument(f"dashboard address {self.address!r} is not HOST:PORT")
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]") or None, int(port), reuse_address=True)
        await site.start()
        bound = self._runner.addresses  # (host, port, ...) of each listening socket
        self.port = int(bound[0][1]) if bound else int(port)
        self._loopback_only = is_loopback_host(host)
        log.info("dashboard on http://%s:%d/", host or "0.0.0.0", self.port)
        return self.port

    async def stop(self) -> None:
        """Ends open event streams and stops listening."""
        for task in list(self._streams):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._own_channel:
            await self._channel.close()

    # -- the application -------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._headers, self._signed_in, self._csrf], client_max_size=64 * 1024)
        app.router.add_get("/signin", self._signin_page)
        app.router.add_post("/signin", self._signin)
        app.router.add_post("/signout", self._signout)
        for path in _PAGES:
            app.router.add_get(path, self._page)
        app.router.add_get("/static/{name:[A-Za-z0-9._-]+}", self._asset)
        app.router.add_get("/static/vendor/{name:[A-Za-z0-9._-]+}", self._vendor_asset)
        app.router.add_get("/api/session", self._session_info)
        app.router.add_get("/api/types", self._types)
        app.router.add_get("/api/jobs", self._jobs)
        app.router.add_get("/api/job", self._job)
        app.router.add_post("/api/job/cancel", self._cancel)
        app.router.add_post("/api/job/retry", self._retry)
        app.router.add_get("/api/events/overview", self._overview_events)
        app.router.add_get("/api/events/job", self._job_events)
        return app

    @staticmethod
    def _is_public(request: web.Request) -> bool:
        path = request.path
        return path == "/signin" or (path.startswith("/static/") and path[len("/static/") :] in _PUBLIC_ASSETS)

    @web.middleware
    async def _headers(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as error:
            response = error
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if not request.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        if isinstance(response, web.HTTPException):
            raise response
        return response

    @web.middleware
    async def _signed_in(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not self.authenticated and self._loopback_only and not is_loopback_host(request.url.host or ""):
            # An open dashboard on loopback answers only to loopback names: a page of another
            # site whose name was rebound to 127.0.0.1 (DNS rebinding) must not read or act.
            return _json_error(421, "MISDIRECTED", "this dashboard answers only to localhost")
        session = self._session_of(request)
        if session is None and not self._is_public(request):
            if request.path.startswith("/api/"):
                return _json_error(401, "UNAUTHENTICATED", "sign in first")
            target = request.path_qs
            raise web.HTTPSeeOther(f"/signin?next={quote(target, safe='')}")
        request["session"] = session
        return await handler(request)

    @web.middleware
    async def _csrf(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc != request.host:
                return _json_error(403, "CROSS_ORIGIN", "a request from another site is refused")
            if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
                return _json_error(403, "CROSS_ORIGIN", "a request from another site is refused")
            session: Session | None = request.get("session")
            if request.path.startswith("/api/"):
                sent = request.headers.get("X-CSRF-Token", "")
                if session is None or not secrets.compare_digest(sent, session.csrf):
                    return _json_error(403, "CSRF_TOKEN", "missing or wrong X-CSRF-Token")
        return await handler(request)

    def _session_of(self, request: web.Request) -> Session | None:
        if not self.authenticated:
            return self._open_session
        key = request.cookies.get(SESSION_COOKIE, "")
        session = self._sessions.get(key)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.last_seen > SESSION_IDLE:
            del self._sessions[key]
            return None
        session.last_seen = now
        return session

    def _client(self, request: web.Request) -> AsyncClient:
        session: Session = request["session"]
        return AsyncClient(self.target, channel=self._channel, token=session.token, timeout=15.0)

    # -- sign-in ---------------------------------------------------------------------------

    async def _signin_page(self, request: web.Request) -> web.StreamResponse:
        if not self.authenticated:
            raise web.HTTPSeeOther("/")
        return self._signin_form(request.query.get("next", "/"), "")

    def _signin_form(self, next_page: str, message: str, status: int = 200) -> web.Response:
        text = (_STATIC / "signin.html").read_text()
        text = text.replace("{{next}}", html.escape(_local_path(next_page), quote=True))
        shown = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
        text = text.replace("{{message}}", shown)
        return web.Response(text=text, content_type="text/html", status=status)

    async def _signin(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        token = str(form.get("token", "")).strip()
        next_page = _local_path(str(form.get("next", "/")))
        if not self.authenticated:
            raise web.HTTPSeeOther(next_page)
        if not token:
            return self._signin_form(next_page, "Paste a bearer token.", 401)
        client = AsyncClient(self.target, channel=self._channel, token=token, timeout=15.0)
        try:
            await client.list_page(page_size=1)
            admin = await _is_admin(client)
        except AjsError as error:
            if error.code is Code.UNAUTHENTICATED:
                return self._signin_form(next_page, f"The server refused this token: {error.message}", 401)
            return self._signin_form(next_page, f"The server could not check the token: {error.message}", 503)
        described = self._who_is(token) if self._who_is is not None else None
        principal = described[0] if described else ""
        session = Session(token=token, principal=principal, admin=admin)
        key = secrets.token_urlsafe(32)
        self._forget_old_sessions()
        self._sessions[key] = session
        log.info("dashboard: %s signed in", principal or "a user")
        response = web.HTTPSeeOther(next_page)
        response.set_cookie(
            SESSION_COOKIE,
            key,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            path="/",
            max_age=int(SESSION_IDLE),
        )
        raise response

    def _forget_old_sessions(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._sessions.items() if now - s.last_seen > SESSION_IDLE]:
            del self._sessions[key]
        while len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].last_seen)
            del self._sessions[oldest]

    async def _signout(self, request: web.Request) -> web.StreamResponse:
        self._sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        response = web.HTTPSeeOther("/signin" if self.authenticated else "/")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    # -- pages and assets ------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=(_STATIC / _PAGES[request.path]).read_text(), content_type="text/html")

    async def _asset(self, request: web.Request) -> web.StreamResponse:
        return _file(_STATIC, request.match_info["name"])

    async def _vendor_asset(self, request: web.Request) -> web.StreamResponse:
        return _file(_STATIC / "vendor", request.match_info["name"])

    # -- JSON ------------------------------------------------------------------------------

    async def _session_info(self, request: web.Request) -> web.StreamResponse:
        session: Session = request["session"]
        return web.json_response(
            {
                "authenticated": self.authenticated,
                "principal": session.principal,
                "admin": session.admin,
                "csrf": session.csrf,
            }
        )

    async def _types(self, request: web.Request) -> web.StreamResponse:
        async def call(client: AsyncClient) -> Any:
            return [
                {"name": t.name, "description": t.description, "handler": t.handler} for t in await client.job_types()
            ]

        return await self._api(request, call)

    async def _jobs(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        try:
            states = [RequestState[name.upper()] for name in query.getall("state", []) if name]
            page_size = int(query.get("page_size", "25"))
        except (KeyError, ValueError):
            return _json_error(400, "INVALID_ARGUMENT", "unknown state or a page_size that is not a number")

        async def call(client: AsyncClient) -> Any:
            jobs, token = await client.list_page(
                states=states,
                types=[name for name in query.getall("type", []) if name],
                parent_id=query.get("parent", ""),
                page_size=page_size,
                page_token=query.get("page_token", ""),
                newest_first=query.get("order", "desc") == "desc",
            )
            return {"jobs": [job_json(job) for job in jobs], "next_page_token": token}

        return await self._api(request, call)

    async def _job(self, request: web.Request) -> web.StreamResponse:
        request_id = request.query.get("id", "")

        async def call(client: AsyncClient) -> Any:
            return job_json(await client.get(request_id), await Payloads.of(client))

        return await self._api(request, call)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        request_id = request.query.get("id", "")

        async def call(client: AsyncClient) -> Any:
            return job_json(await client.cancel(request_id), await Payloads.of(client))

        return await self._api(request, call)

    async def _retry(self, request: web.Request) -> web.StreamResponse:
        request_id = request.query.get("id", "")

        async def call(client: AsyncClient) -> Any:
            return job_json(await client.retry(request_id), await Payloads.of(client))

        return await self._api(request, call)

    async def _api(self, request: web.Request, call: Callable[[AsyncClient], Awaitable[Any]]) -> web.StreamResponse:
        try:
            return web.json_response(await call(self._client(request)))
        except AjsError as error:
            if error.code is Code.UNAUTHENTICATED:  # e.g. the token expired: sign in again
                self._sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
            return _call_error(error)

    # -- event streams ---------------------------------------------------------------------

    async def _overview_events(self, request: web.Request) -> web.StreamResponse:
        """Every second (event ``overview``): the counts, and the jobs that ended per second since the last event.

        Ended jobs are the final Responses of a WatchJobs stream (the viewer's own jobs;
        an admin's: all), as ``ended: [[unix second, count], ...]`` (null until the stream
        is open); the counts are recounted through ListJobs after a change, and every
        ``RECOUNT_EVERY`` seconds whatever happened.
        """
        client = self._client(request)
        try:
            types = [t.name for t in await client.job_types()]
        except AjsError as error:
            return _call_error(error)
        activity = _Activity()
        async with self._event_stream(request) as stream:
            follower = asyncio.create_task(activity.follow(client, stream))
            loop = asyncio.get_running_loop()
            counted_at, took = -RECOUNT_EVERY, 0.0
            counts: dict[str, Any] = {}
            try:
                while True:
                    since = loop.time() - counted_at
                    # A large backlog takes long to count: then it is counted less often.
                    if (activity.changed and since >= COUNT_SHARE * took) or since >= RECOUNT_EVERY:
                        activity.changed = False
                        counted_at = loop.time()
                        try:
                            counts = await count_jobs(client, types, admin=request["session"].admin)
                            took = loop.time() - counted_at
                        except AjsError as error:
                            await stream.send("problem", {"code": error.code.name, "message": error.message})
                            if error.code in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED):
                                break
                    ended = activity.take_ended() if activity.live else None
                    await stream.send("overview", {**counts, "time": datetime.now(UTC).isoformat(), "ended": ended})
                    await asyncio.sleep(OVERVIEW_EVERY)
            finally:
                follower.cancel()
        return stream.response

    async def _job_events(self, request: web.Request) -> web.StreamResponse:
        """A job (event ``job``), then its Responses (``response``, id = sequence) live until the final one (``end``).

        A reconnecting EventSource sends Last-Event-ID: the stream resumes after that sequence.
        """
        request_id = request.query.get("id", "")
        try:
            after = int(request.headers.get("Last-Event-ID") or request.query.get("after") or 0)
        except ValueError:
            return _json_error(400, "INVALID_ARGUMENT", "Last-Event-ID must be a sequence number")
        client = self._client(request)
        try:
            job = await client.get(request_id)
            payloads = await Payloads.of(client)
        except AjsError as error:
            return _call_error(error)
        async with self._event_stream(request) as stream:
            await stream.send("job", job_json(job, payloads))
            try:
                async for response in client.watch(request_id, after_sequence=after):
                    await stream.send("response", response_json(response, payloads), event_id=str(response.sequence))
                    if response.is_final:
                        break
                await stream.send("job", job_json(await client.get(request_id), payloads))
                await stream.send("end", {})
            except AjsError as error:
                await stream.send("problem", {"code": error.code.name, "message": error.message})
        return stream.response

    @contextlib.asynccontextmanager
    async def _event_stream(self, request: web.Request) -> AsyncIterator[_EventStream]:
        """A server-sent event stream, ended quietly when the browser leaves."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        response.headers.update(_SECURITY_HEADERS)
        await response.prepare(request)
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        stream = _EventStream(response)
        pinger = asyncio.create_task(stream.keep_alive())
        try:
            yield stream
        except ConnectionResetError:
            pass  # the browser left
        finally:
            pinger.cancel()
            if task is not None:
                self._streams.discard(task)


class _EventStream:
    """Writes server-sent events to one response, one at a time."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
        self._lock = asyncio.Lock()

    async def send(self, event: str, data: Any, event_id: str | None = None) -> None:
        """Writes one event: its name, its id (if any) and its data as JSON."""
        lines = [f"event: {event}"]
        if event_id is not None:
            lines.append(f"id: {event_id}")
        lines.append(f"data: {json.dumps(data, separators=(',', ':'))}")
        async with self._lock:
            await self.response.write(("\n".join(lines) + "\n\n").encode())

    async def keep_alive(self) -> None:
        """Writes a comment now and then, so that proxies keep an idle stream open."""
        with contextlib.suppress(ConnectionResetError):
            while True:
                await asyncio.sleep(KEEPALIVE_EVERY)
                async with self._lock:
                    await self.response.write(b": keep-alive\n\n")


class _Activity:
    """What a WatchJobs stream of the viewer's jobs has shown since the overview last looked.

    Ended jobs are counted per second of their final Response's time (not of its arrival),
    so the chart shows when jobs ended even when a stream delivers them in bursts.
    """

    def __init__(self) -> None:
        self.ended: Counter[int] = Counter()
        self.changed = True
        self.live = False

    def take_ended(self) -> list[list[int]]:
        """[[second, jobs ended in it], ...] counted since the last call."""
        taken = sorted([second, count] for second, count in self.ended.items())
        self.ended.clear()
        return taken

    async def follow(self, client: AsyncClient, stream: _EventStream) -> None:
        """Counts final Responses until cancelled; a refused stream is reported once."""
        try:
            async for watched in client.watch_jobs():
                self.live = True
                response = watched.response
                if response is not None:
                    self.changed = True
                    if response.is_final:
                        self.ended[int(response.create_time.timestamp())] += 1
        except AjsError as error:
            self.live = False
            with contextlib.suppress(ConnectionResetError):
                await stream.send("problem", {"code": error.code.name, "message": f"live updates: {error.message}"})


async def _is_admin(client: AsyncClient) -> bool:
    """True if the token may list queues (an admin-only call)."""
    try:
        await client.list_queues()
    except AjsError as error:
        if error.code is Code.PERMISSION_DENIED:
            return False
        raise
    return True


def _local_path(target: str) -> str:
    """``target`` if it is a path on this site, else "/" (no open redirect to another site)."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _file(folder: Any, name: str) -> web.StreamResponse:
    suffix = name[name.rfind(".") :] if "." in name else ""
    resource = folder / name
    if suffix not in _CONTENT_TYPES or not resource.is_file():
        raise web.HTTPNotFound()
    return web.Response(
        body=resource.read_bytes(),
        content_type=_CONTENT_TYPES[suffix],
        headers={"Cache-Control": "no-cache"},
    )


def _json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _call_error(error: AjsError) -> web.Response:
    """The JSON reply of an API call that JobService refused: the HTTP status of its code."""
    return _json_error(_HTTP_STATUS.get(error.code, 500), error.code.name, error.message)
