"""The Connector contract: the queue of requests and the store of their Responses.

The seed's connector had two calls, GetNextRequest and Respond. Grown up, a
connector enqueues requests (idempotently), lets a dispatcher claim the next one
under a lease, stores every Response the job produces, and answers get, list,
cancel and watch. Every connector passes the same contract test suite
(``tests/contract``); the in-memory connector is a full connector, not a mock.

State rules are not a connector's business: it stores what
:meth:`ajs_grpc.core.model.Job.advance` returns, atomically with its checks.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import ClassVar, Protocol, TypeAlias

from ajs_grpc.core.errors import (
    AjsError,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from ajs_grpc.core.model import NO_FLOW, Flow, Job, Request, RequestState, Response, Update, now
from ajs_grpc.core.schedules import Schedule

__all__ = [
    "Claim",
    "Clock",
    "Connector",
    "ConnectorListener",
    "FeedItem",
    "FeedPage",
    "JobFilter",
    "Page",
    "Planned",
    "QueueInfo",
    "Renewal",
    "Submit",
    "dependency_cycle",
    "dependency_not_found",
    "not_ended",
    "parent_not_found",
    "plan_submits",
    "request_not_found",
    "resubmitted",
    "schedule_not_found",
    "schedule_taken",
]

Clock: TypeAlias = Callable[[], datetime]
"""Where a connector reads the time: a callable returning the current aware datetime."""

# Responses read from storage per round trip of a watch. It bounds what one watcher
# holds at once: on SQLite and PostgreSQL watchers that are not at the same place of a
# job read their own copies, so a few hundred streams opened on a long job may hold
# watchers x WATCH_BATCH Responses together (those at the same place share one read).
# At 256 that peak grew with the job's length and RSS kept its high-water mark
# (issue 9, defect 14: +2.4 MiB per 300 streams on a running job); 32 keeps it
# small, at one more read per 32 Responses replayed.
WATCH_BATCH = 32
# Responses a feed (WatchJobs) reads per round trip.
FEED_BATCH = 64
# A feed whose store holds Responses it may not read yet (PostgreSQL: committed after an
# older transaction still open) reads again after this many seconds, woken or not.
FEED_PENDING_POLL = 0.1
# A feed that sent nothing for this many seconds sends a bookmark (its place, a keep-alive).
FEED_BOOKMARK_EVERY = 10.0
# Feed items kept in memory for the open streams to filter (see _FeedTail).
FEED_TAIL_KEEP = 4096


def resubmitted(existing: Job, request: Request) -> tuple[Job, bool]:
    """The answer to a submit whose id is taken: the existing job, if it asks for the same work.

    Raises:
        AlreadyExists: the id is taken by a request with other content.
    """
    if existing.request.same_content(request):
        return existing, False
    raise AlreadyExists(
        f"request {request.id!r} exists with different content",
        reason="REQUEST_ID_TAKEN",
        metadata={"request_id": request.id},
    )


@dataclasses.dataclass(frozen=True)
class Submit:
    """One request to enqueue, with what its type says of it.

    That is its attempts, its flow policies, and whether it runs after dependencies
    that failed (see :meth:`~ajs_grpc.core.model.Job.resolve`).
    """

    request: Request
    max_attempts: int = 1
    flow: Flow = NO_FLOW
    allow_failed_dependencies: bool = False

    @classmethod
    def of(cls, item: Submit | tuple[Request, int]) -> Submit:
        """``item`` as a Submit (a ``(request, max_attempts)`` pair has no flow policies)."""
        return item if isinstance(item, Submit) else cls(item[0], item[1])


FindUnique: TypeAlias = Callable[[str, frozenset[RequestState], datetime | None], Awaitable[Job | None]]
"""Finds the newest stored job of a unique key in some states or created since a time (None: none)."""


@dataclasses.dataclass(frozen=True)
class Planned:
    """What one submit of a batch comes to: its job, and the first Response to store if new."""

    job: Job
    created: bool
    first: Response | None = None


async def plan_submits(
    submits: Sequence[Submit],
    find: Callable[[list[str]], Awaitable[dict[str, Job]]],
    exists: Callable[[str], Awaitable[bool]],
    find_unique: FindUnique,
    *,
    indexed: bool,
    at: datetime | None = None,
) -> list[Planned]:
    """The rules of enqueueing, for one submit or an atomic batch, before anything is stored.

    A stored id with the same content answers its job (``created`` False), with other
    content ALREADY_EXISTS; an id repeated in the batch answers as if the earlier one
    were stored; a parent must be stored or come earlier in the batch. A submit whose
    flow has a unique key matching a stored job (or one earlier in the batch) in the
    unique states, or created within the unique ttl, answers that job (``created`` False).
    Each of ``depends_on`` must be stored or anywhere in the batch, and the new jobs'
    dependencies must not form a cycle.

    Args:
        submits: each request (server-set fields filled in) with its attempts and flow.
        find: the stored jobs of some ids, by id (those not stored left out); asked once.
        exists: whether a request id is stored.
        find_unique: the stored job a unique key matches. A store shared by several
            instances must hold a lock on the key from this call until the commit.
        indexed: name the refused submit's position in its error's ``metadata["index"]``.
        at: the time new jobs are created at (and the unique ttl measured from).

    Raises:
        AlreadyExists, NotFound: the first refused submit's error; nothing is to be stored.
        InvalidArgument: the new jobs' dependencies form a cycle (``DEPENDENCY_CYCLE``).
    """
    at = at or now()
    in_batch = {s.request.id for s in submits}
    planned: list[Planned] = []
    new: dict[str, Job] = {}
    new_unique: dict[str, Job] = {}
    stored = await find(list(dict.fromkeys(s.request.id for s in submits))) if submits else {}
    for index, submit in enumerate(submits):
        request, flow = submit.request, submit.flow
        try:
            earlier = new.get(request.id)
            existing = earlier if earlier is not None else stored.get(request.id)
            if existing is not None:
                job, _ = resubmitted(existing, request)
                planned.append(Planned(job, False))
                continue
            if flow.unique_key is not None:
                since = flow.unique_since(at)
                match = new_unique.get(flow.unique_key)
                if match is None or not (RequestState.CREATED in flow.unique_states or since is not None):
                    match = await find_unique(flow.unique_key, flow.unique_states, since)
                if match is not None:
                    planned.append(Planned(match, False))
                    continue
            parent = request.parent_id
            if parent and parent not in new and not await exists(parent):
                raise parent_not_found(parent)
            for dependency in request.depends_on:
                if dependency not in in_batch and not await exists(dependency):
                    raise dependency_not_found(dependency)
            job, first = Job.create(
                request, submit.max_attempts, at, flow, allow_failed_dependencies=submit.allow_failed_dependencies
            )
            new[request.id] = job
            if flow.unique_key is not None:
                new_unique[flow.unique_key] = job
            planned.append(Planned(job, True, first))
        except AjsError as error:
            if indexed:
                error.metadata = {**error.metadata, "index": str(index)}
            raise
    _check_dependencies(submits, planned, indexed=indexed)
    _check_acyclic([p.job.request for p in planned if p.created], indexed=indexed)
    return planned


def _check_dependencies(submits: Sequence[Submit], planned: Sequence[Planned], *, indexed: bool) -> None:
    """Refuses dependencies on batch items that were not stored under their id, and order deadlocks.

    An item answered with another job (its unique key matched) is not stored under its id:
    naming it would name nothing. A job waiting for a later job of its own ordered key would
    hold that job back (the first unfinished job of a key goes first) and wait forever.
    """
    stored = {p.job.request.id: index for index, p in enumerate(planned)}
    for index, (submit, plan) in enumerate(zip(submits, planned, strict=True)):
        if not plan.created:
            continue
        for dependency in submit.request.depends_on:
            if dependency not in stored and any(s.request.id == dependency for s in submits):
                raise NotFound(
                    f"dependency {dependency!r} is not stored: its submit in this batch was answered with "
                    "another job (its unique key matched)",
                    reason="DEPENDENCY_NOT_FOUND",
                    metadata={"dependency_id": dependency, **({"index": str(index)} if indexed else {})},
                )
            later = stored.get(dependency, -1)
            key = plan.job.flow.ordered_key
            if later > index and key is not None and planned[later].job.flow.ordered_key == key:
                raise InvalidArgument(
                    f"{submit.request.id!r} depends on {dependency!r}, a later job of its ordered key {key!r}: "
                    "the first unfinished job of a key goes first, so it would wait forever",
                    [FieldViolation("request.depends_on", f"names a later job of ordered key {key!r}")],
                    reason="DEPENDENCY_ORDER",
                    metadata={"dependency_id": dependency, **({"index": str(index)} if indexed else {})},
                )


def _check_acyclic(requests: Sequence[Request], *, indexed: bool) -> None:
    """Raises if the dependencies among ``requests`` (new jobs) form a cycle (stored jobs cannot close one)."""
    index = {request.id: i for i, request in enumerate(requests)}
    done: set[str] = set()
    for request in requests:
        if request.id in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, int]] = [(request.id, 0)]
        while stack:
            node, next_edge = stack.pop()
            if next_edge == 0:
                path.append(node)
                on_path.add(node)
            edges = [d for d in requests[index[node]].depends_on if d in index]
            if next_edge < len(edges):
                stack.append((node, next_edge + 1))
                target = edges[next_edge]
                if target in on_path:
                    cycle = [*path[path.index(target) :], target]
                    raise dependency_cycle(cycle, index[node] if indexed else None)
                if target not in done:
                    stack.append((target, 0))
            else:
                path.pop()
                on_path.discard(node)
                done.add(node)


def dependency_cycle(cycle: Sequence[str], index: int | None) -> InvalidArgument:
    """The error of a submit whose dependencies form ``cycle`` (ids, the first repeated last)."""
    metadata = {"cycle": " -> ".join(cycle)}
    if index is not None:
        metadata["index"] = str(index)
    return InvalidArgument(
        f"the dependencies form a cycle: {' -> '.join(cycle)}",
        [FieldViolation("request.depends_on", f"forms a cycle: {' -> '.join(cycle)}")],
        reason="DEPENDENCY_CYCLE",
        metadata=metadata,
    )


def dependency_not_found(dependency_id: str) -> NotFound:
    """The error of a submit that depends on a request that does not exist."""
    return NotFound(
        f"dependency {dependency_id!r} does not exist",
        reason="DEPENDENCY_NOT_FOUND",
        metadata={"dependency_id": dependency_id},
    )


def not_ended(job: Job, what: str) -> FailedPrecondition:
    """The error of ``what`` (an action) asked of a job that has not ended."""
    return FailedPrecondition(
        f"request {job.request.id!r} is {job.state.name}: only an ended job can be {what}",
        reason="REQUEST_NOT_ENDED",
        metadata={"request_id": job.request.id, "state": job.state.name},
    )


def schedule_taken(schedule_id: str) -> AlreadyExists:
    """The error of a create whose schedule id is taken by another definition."""
    return AlreadyExists(
        f"schedule {schedule_id!r} exists with another definition",
        reason="SCHEDULE_ID_TAKEN",
        metadata={"schedule_id": schedule_id},
    )


def schedule_not_found(schedule_id: str) -> NotFound:
    """The error for an unknown schedule id."""
    return NotFound(
        f"no schedule with id {schedule_id!r}", reason="SCHEDULE_NOT_FOUND", metadata={"schedule_id": schedule_id}
    )


def request_not_found(request_id: str) -> NotFound:
    """The error for an unknown request id (and, at the edge, for one the caller may not see)."""
    return NotFound(
        f"no request with id {request_id!r}", reason="REQUEST_NOT_FOUND", metadata={"request_id": request_id}
    )


def parent_not_found(parent_id: str) -> NotFound:
    """The error of a submit whose parent does not exist."""
    return NotFound(
        f"parent request {parent_id!r} does not exist", reason="PARENT_NOT_FOUND", metadata={"parent_id": parent_id}
    )


@dataclasses.dataclass(frozen=True)
class Claim:
    """A job claimed to run: the job (now PENDING) and the lease that proves it.

    Only the holder of the current lease may report Responses for the job.
    """

    job: Job
    lease_token: str


@dataclasses.dataclass(frozen=True)
class Renewal:
    """What :meth:`Connector.renew` found.

    Attributes:
        lost: ids whose lease is no longer held: the job must stop and write nothing.
        cancel_requested: ids still held whose cancellation a client asked for.
    """

    lost: frozenset[str] = frozenset()
    cancel_requested: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class JobFilter:
    """Which jobs :meth:`Connector.list_jobs` returns, or whose Responses a feed yields.

    An empty field matches anything. A feed matches ``states`` against each
    Response's state (the job's state after it), the other fields against its job.
    """

    states: frozenset[RequestState] = frozenset()
    types: frozenset[str] = frozenset()
    parent_id: str = ""
    creator: str = ""
    queues: frozenset[str] = frozenset()

    def matches(self, job: Job) -> bool:
        """True when ``job`` passes the filter."""
        request = job.request
        return self._admits(job.state, request.type, request.queue, request.parent_id, request.creator)

    def matches_item(self, item: FeedItem) -> bool:
        """True when a feed item (its Response's state, its job's fields) passes the filter."""
        return self._admits(item.response.state, item.type, item.queue, item.parent_id, item.creator)

    def _admits(self, state: RequestState, request_type: str, queue: str, parent_id: str, creator: str) -> bool:
        return (
            (not self.states or state in self.states)
            and (not self.types or request_type in self.types)
            and (not self.queues or queue in self.queues)
            and (not self.parent_id or parent_id == self.parent_id)
            and (not self.creator or creator == self.creator)
        )


@dataclasses.dataclass(frozen=True)
class FeedItem:
    """A stored Response in the feed of every job's Responses (WatchJobs).

    Attributes:
        response: the Response.
        token: the feed's place just after it (resume with it as ``after``).
        type: its job's type.
        queue: its job's queue.
        creator: its job's creator (for filtering; not shown).
        parent_id: its job's parent (for filtering; not shown).
    """

    response: Response
    token: str
    type: str
    queue: str
    creator: str = ""
    parent_id: str = ""


@dataclasses.dataclass(frozen=True)
class FeedPage:
    """What one read of the feed found (:meth:`Connector.feed`).

    Attributes:
        items: the matching Responses, in feed order.
        token: the place after everything this read looked at (matching or not).
        more: the read stopped at its limit: read again at once.
        pending: Responses are stored that the feed may not yield yet (on PostgreSQL,
            committed after a transaction that is still open): read again soon.
    """

    items: list[FeedItem]
    token: str
    more: bool = False
    pending: bool = False


@dataclasses.dataclass(frozen=True)
class Page:
    """One page of :meth:`Connector.list_jobs`.

    Attributes:
        jobs: the jobs, in submit order.
        next_cursor: pass as ``after`` for the next page; None on the last page.
        cursors: for each job, the cursor of the page that starts after it (so a
            caller may end a page early).
    """

    jobs: list[Job]
    next_cursor: int | None
    cursors: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.cursors) != len(self.jobs):
            raise ValueError("a Page needs one cursor per job")


@dataclasses.dataclass(frozen=True)
class QueueInfo:
    """A queue as :meth:`Connector.list_queues` reports it.

    Attributes:
        name: the queue's name.
        queued: its jobs waiting to start (CREATED).
        running: its jobs running (PENDING).
        paused: no instance starts its jobs (submits are still accepted).
        oldest_queued_time: when its oldest waiting job was submitted; None if none waits.
    """

    name: str
    queued: int = 0
    running: int = 0
    paused: bool = False
    oldest_queued_time: datetime | None = None


class ConnectorListener(Protocol):
    """What a dispatcher hears from its connector. Called on the event loop.

    A listener may be told the same thing more than once (a shared queue echoes
    its own notifications); both calls are idempotent.
    """

    def work_available(self) -> None:
        """A request may be ready to claim."""

    def cancel_requested(self, request_id: str) -> None:
        """A client asked to cancel a running request."""


class Connector(abc.ABC):
    """The queue and Response store. Methods are called on one event loop.

    Subclasses implement storage; this base class implements :meth:`watch` and
    the wake-ups on top of it, so every connector streams the same way.

    Args:
        clock: what leases and due times are compared with (see :meth:`_now`);
            None for the process's clock (:func:`ajs_grpc.core.model.now`), or the
            store's own where it has one. Tests pass a clock they move forward, so
            a lease runs out without waiting for it.
    """

    name: ClassVar[str]

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._listeners: list[ConnectorListener] = []
        self._watchers: dict[str, set[asyncio.Event]] = {}
        # Per watched request: how many Responses were announced, and the reads in flight
        # (by the sequence they read after, with that count when they started).
        self._announced: dict[str, int] = {}
        self._reads: dict[tuple[str, int], tuple[int, asyncio.Future[list[Response]]]] = {}
        self._clock = clock
        # Wake-ups of the open feeds (watch_jobs): any Response stored may be theirs.
        self._feed_watchers: set[asyncio.Event] = set()
        self._feeds_ended = False
        self._feed_tail: _FeedTail | None = None
        # How many times the feeds were woken, and their reads in flight (see _shared_feed).
        self._feed_announced = 0
        self._feed_reads: dict[tuple[str, JobFilter], tuple[int, asyncio.Future[FeedPage]]] = {}

    def _now(self) -> datetime:
        """The time a claim, a renewal or an expiry is measured from: the given clock's, else the process's."""
        return now() if self._clock is None else self._clock()

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Prepares storage. Called once before anything else."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Releases storage. Nothing is called after it."""

    # -- the queue -----------------------------------------------------------

    @abc.abstractmethod
    async def enqueue(
        self, request: Request, max_attempts: int = 1, flow: Flow = NO_FLOW, *, allow_failed_dependencies: bool = False
    ) -> tuple[Job, bool]:
        """Stores a new request (state CREATED, Response #1) unless it exists.

        Args:
            request: the request, with server-set fields filled in.
            max_attempts: how many times the job may be claimed in all.
            flow: its type's flow-control policies, resolved for it.
            allow_failed_dependencies: its type runs it after dependencies that failed.

        Returns:
            The job, and True if it was created; ``(existing job, False)`` when a
            request with the same id and content is already stored, or when its
            unique key matches a stored job (see :func:`plan_submits`).

        Raises:
            AlreadyExists: the id is taken by a request with different content.
            NotFound: ``request.parent_id`` names no stored request.
        """

    @abc.abstractmethod
    async def enqueue_many(self, submits: Sequence[Submit | tuple[Request, int]]) -> list[tuple[Job, bool]]:
        """Stores several requests atomically: all of them, or none (AIP-233).

        Each is as :meth:`enqueue`'s (an id already stored, or earlier in the batch,
        with the same content answers that job with False); a parent may come earlier
        in the batch.

        Args:
            submits: each request (server-set fields filled in) with its attempts and flow.

        Returns:
            One ``(job, created)`` per request, in order.

        Raises:
            AlreadyExists, NotFound: as :meth:`enqueue`, for the first refused request,
                with its position in ``metadata["index"]``; nothing was stored.
        """

    @abc.abstractmethod
    async def claim(
        self,
        worker: str,
        *,
        limit: int = 1,
        lease: float = 30.0,
        types: Collection[str] | None = None,
        queues: Collection[str] | None = None,
    ) -> list[Claim]:
        """Claims up to ``limit`` due requests (CREATED -> PENDING) under a lease.

        Order: higher priority first, then submit order. Requests whose
        ``due_time`` is in the future are not claimed, nor those waiting for their
        dependencies, nor those of a paused queue, nor those their flow policies hold
        back (:class:`~ajs_grpc.core.flow.Gate` decides, counting every instance's
        running jobs). A request found past its ``expire_time`` ends CANCELLED
        (:meth:`~ajs_grpc.core.model.Job.lapse`) instead of being claimed.

        Args:
            worker: who claims, recorded in the PENDING Response.
            limit: how many requests at most.
            lease: seconds the lease lasts unless renewed.
            types: only requests of these types; None for any type.
            queues: only requests in these queues; None for any queue.
        """

    @abc.abstractmethod
    async def respond(self, request_id: str, update: Update, lease_token: str) -> Response:
        """Appends the Response ``update`` makes for a claimed request.

        A CREATED update hands the job back to the queue (a retry, a shutdown),
        due at ``update.run_after``; a final one releases the lease.

        Raises:
            NotFound: no such request.
            FailedPrecondition: the lease is not the current one, the request
                already ended, or the state may not follow.
        """

    @abc.abstractmethod
    async def renew(self, leases: Mapping[str, str], lease: float) -> Renewal:
        """Extends the leases ``{request_id: lease_token}`` by ``lease`` seconds from now.

        Returns:
            Which leases are no longer held, and which of the held jobs a client
            asked to cancel (so a cancellation whose notification was missed
            still reaches the job).
        """

    @abc.abstractmethod
    async def recover_expired(self) -> int:
        """Ends or requeues jobs whose time ran out.

        That is :meth:`~ajs_grpc.core.model.Job.expire` for running jobs whose lease expired,
        and :meth:`~ajs_grpc.core.model.Job.lapse` for queued jobs past their ``expire_time``.

        Returns:
            How many jobs were recovered (requeued or ended).
        """

    @abc.abstractmethod
    async def next_due_time(
        self, types: Collection[str] | None = None, queues: Collection[str] | None = None
    ) -> datetime | None:
        """When a claim (of ``types`` in ``queues``) may next find work without being told; None: only when told.

        That is the earliest ``due_time`` of the queued requests a claim would look at,
        leaving out paused queues and requests held back by a concurrency or order
        policy (the end of the job holding them back wakes listeners), and putting a
        rate-limited request at the time its bucket holds a token again.
        """

    @abc.abstractmethod
    async def cancel(self, request_id: str) -> Job:
        """Cancels a request and its unfinished descendants (``parent_id`` links).

        A CREATED request ends CANCELLED at once; a PENDING one is marked
        ``cancel_requested`` and its dispatcher is told (again, if asked again).

        Raises:
            NotFound: no such request.
            FailedPrecondition: the request already ended.
        """

    @abc.abstractmethod
    async def prune(self, before: datetime) -> int:
        """Deletes ended jobs (and their Responses) last updated before ``before``.

        A job that still has a child (one not deleted with it) is kept, so its id
        cannot be taken by someone else while the child refers to it.

        Returns:
            How many jobs were deleted.
        """

    @abc.abstractmethod
    async def retry(self, request_id: str) -> Job:
        """Queues an ended FAILED or CANCELLED job again (:meth:`~ajs_grpc.core.model.Job.retry`); wakes listeners.

        Raises:
            NotFound: no such request.
            FailedPrecondition: see :meth:`~ajs_grpc.core.model.Job.retry`.
        """

    @abc.abstractmethod
    async def delete(self, request_id: str) -> int:
        """Deletes an ended job, its Responses, and its descendants (``parent_id`` links), all ended.

        Returns:
            How many jobs were deleted.

        Raises:
            NotFound: no such request.
            FailedPrecondition: it or a descendant has not ended (``REQUEST_NOT_ENDED``); nothing is deleted.
        """

    # -- schedules -----------------------------------------------------------------

    @abc.abstractmethod
    async def create_schedule(self, schedule: Schedule, *, replace: bool = False) -> tuple[Schedule, bool]:
        """Stores a new schedule (``create_time`` and ``update_time`` set by the store).

        Args:
            schedule: the schedule; its ``last_time`` and ``last_job_id`` are ignored.
            replace: a stored schedule with this id and another definition takes this
                one's (keeping its ``last_time``, ``last_job_id`` and ``paused``).

        Returns:
            The stored schedule, and True if it was created or replaced; ``(stored, False)``
            when one with this id and the same definition is stored.

        Raises:
            AlreadyExists: without ``replace``, the id is taken by another definition
                (``SCHEDULE_ID_TAKEN``).
        """

    @abc.abstractmethod
    async def get_schedule(self, schedule_id: str) -> Schedule:
        """The schedule of ``schedule_id``.

        Raises:
            NotFound: no such schedule.
        """

    @abc.abstractmethod
    async def list_schedules(self, *, creator: str = "", after: str = "", limit: int = 1000) -> list[Schedule]:
        """Up to ``limit`` schedules by id, those with ids after ``after``; only ``creator``'s if given."""

    @abc.abstractmethod
    async def delete_schedule(self, schedule_id: str) -> None:
        """Deletes a schedule (the jobs it submitted stay).

        Raises:
            NotFound: no such schedule.
        """

    @abc.abstractmethod
    async def pause_schedule(self, schedule_id: str, paused: bool) -> Schedule:
        """Pauses or resumes a schedule.

        A resumed schedule goes on from now: occurrences passed while it was paused
        are skipped (``last_time`` is set to now on resume).

        Raises:
            NotFound: no such schedule.
        """

    @abc.abstractmethod
    async def advance_schedule(
        self, schedule_id: str, last_time: datetime | None, new_last_time: datetime, last_job_id: str
    ) -> bool:
        """Records occurrences up to ``new_last_time`` as handled, if ``last_time`` is still the stored one.

        Instances race for a schedule's occurrences: the one whose compare-and-set
        succeeds moves it on; the others submitted the same job ids (one job each).

        Args:
            schedule_id: the schedule.
            last_time: the ``last_time`` read before the occurrences were handled.
            new_last_time: the latest occurrence handled.
            last_job_id: the job of the latest occurrence submitted ("" keeps the stored one).

        Returns:
            True if it was recorded; False if another instance moved it on first, or
            the schedule was deleted or paused meanwhile.
        """

    # -- queues ----------------------------------------------------------------

    @abc.abstractmethod
    async def set_paused(self, queue: str, paused: bool) -> QueueInfo:
        """Pauses or resumes ``queue`` (durably, for every instance); resuming wakes listeners.

        A paused queue accepts submits, but no claim starts its jobs; running jobs go on.
        """

    @abc.abstractmethod
    async def list_queues(self) -> list[QueueInfo]:
        """Every queue with unfinished jobs or paused, by name."""

    @abc.abstractmethod
    async def held_back(self) -> dict[str, int]:
        """Due queued jobs held back now, by cause: ``paused``, ``concurrency``, ``ordered``, ``rate_limit``.

        A job held back by several causes counts once, under the first of these.
        """

    # -- reading -------------------------------------------------------------

    @abc.abstractmethod
    async def get(self, request_id: str) -> Job:
        """Returns the job of ``request_id``.

        Raises:
            NotFound: no such request.
        """

    @abc.abstractmethod
    async def list_jobs(
        self, job_filter: JobFilter, page_size: int, after: int = 0, *, newest_first: bool = False
    ) -> Page:
        """Returns up to ``page_size`` matching jobs in submit order, from cursor ``after`` on.

        ``after`` is 0 or a cursor of an earlier page (of the same order). With
        ``newest_first`` the order is reversed: the newest jobs come first.
        """

    @abc.abstractmethod
    async def count_jobs(self, state: RequestState, creator: str = "") -> int:
        """How many jobs are in ``state`` now (the queue depth for CREATED); only ``creator``'s if given."""

    @abc.abstractmethod
    async def responses(self, request_id: str, after_sequence: int, limit: int) -> list[Response]:
        """Returns up to ``limit`` stored Responses with ``sequence > after_sequence``.

        Raises:
            NotFound: no such request.
        """

    async def feed(self, after: str, job_filter: JobFilter, limit: int) -> FeedPage:
        """Reads the feed of every job's Responses after place ``after``, up to ``limit`` matching ones.

        With ``limit`` 0 nothing is read: the page holds no items and the place
        ``after`` (checked), or "now" if ``after`` is empty.

        The feed holds each stored Response once, in an order that never changes once
        read: a Response stored later never comes before one already yielded, on any
        instance sharing the store, and across restarts of persistent stores. Its places
        are opaque tokens. ``after`` empty is "now": nothing stored before the call.

        A token from ahead of the store (another store's, or one restored from a
        backup since) is refused rather than read past.

        Raises:
            InvalidArgument: ``after`` is no token of this store (reason BAD_RESUME_TOKEN).
            Unimplemented: the connector keeps no feed (a plugin's written before it).
        """
        raise Unimplemented(f"the {self.name} connector keeps no feed of Responses", reason="FEED_NOT_SUPPORTED")

    def _bad_token(self, token: str) -> InvalidArgument:
        """The error for a resume token this store did not make."""
        return InvalidArgument(
            f"{token[:64]!r} is not a resume token of this {self.name} store",
            reason="BAD_RESUME_TOKEN",
            violations=[FieldViolation("after_token", "is not a resume token this server made")],
        )

    def _feed_order(self, token: str) -> tuple[int, ...]:
        """Where a (checked) token of :meth:`feed` lies in the feed: tuples compare as places do."""
        raise Unimplemented(f"the {self.name} connector keeps no feed of Responses", reason="FEED_NOT_SUPPORTED")

    async def watch_jobs(self, job_filter: JobFilter, after: str = "") -> AsyncIterator[FeedItem | str]:
        """Yields the feed's matching Responses after ``after`` (empty: now), then the live ones.

        Bookmarks (a ``str``, the feed's place) come first, and again after
        :data:`FEED_BOOKMARK_EVERY` seconds without anything to yield, so a caller
        always holds a recent place. Ends only after :meth:`end_feeds`.

        Live Responses come from one unfiltered reader of the feed that every open
        stream shares (:class:`_FeedTail`), filtered here; a stream behind what it
        keeps (one resuming from an old token) reads the store with its filter until
        it is within it.

        Raises:
            InvalidArgument: ``after`` is no token of this store.
        """
        token = (await self.feed(after, job_filter, 0)).token  # checks ``after``; "now" if empty
        tail = self._feed_tail
        if tail is None or tail.closed:
            tail = self._feed_tail = _FeedTail(self)
        tail.users += 1
        try:
            yield token
            place = self._feed_order(token)
            quiet = 0.0
            while not self._feeds_ended:
                seen = tail.generation
                if tail.error is not None:
                    raise tail.error
                if tail.holds(place):
                    items, token, place = tail.after(place, token)
                    items = [item for item in items if job_filter.matches_item(item)]
                    more = False
                else:  # behind the tail: catch up from the store
                    page = await self._shared_feed(token, job_filter)
                    items, token, place, more = page.items, page.token, self._feed_order(page.token), page.more
                for item in items:
                    yield item
                if items:
                    quiet = 0.0
                if more or (not tail.holds(place) and tail.started):
                    continue
                started = asyncio.get_running_loop().time()
                await tail.advanced(seen, FEED_BOOKMARK_EVERY - quiet)
                quiet += asyncio.get_running_loop().time() - started
                if quiet >= FEED_BOOKMARK_EVERY:
                    yield token
                    quiet = 0.0
        finally:
            tail.users -= 1
            if not tail.users:
                tail.close()

    async def _shared_feed(self, after: str, job_filter: JobFilter) -> FeedPage:
        """:meth:`feed` after ``after``, one read for every stream at that place with that filter.

        As :meth:`_shared_read` for watches: the streams of one dashboard or one worker
        fleet wake together at each Response and share a read, unless a Response was
        announced after it started.
        """
        key = (after, job_filter)
        found = self._feed_reads.get(key)
        read: asyncio.Future[FeedPage]
        if found is None or found[0] != self._feed_announced:
            read = asyncio.ensure_future(self.feed(after, job_filter, FEED_BATCH))
            self._feed_reads[key] = (self._feed_announced, read)

            def forget(done: asyncio.Future[FeedPage]) -> None:
                if (kept := self._feed_reads.get(key)) is not None and kept[1] is done:
                    del self._feed_reads[key]
                if not done.cancelled():
                    done.exception()  # retrieved: a failed read nobody awaits any more is not logged as lost

            read.add_done_callback(forget)
        else:
            read = found[1]
        return await asyncio.shield(read)

    async def watch(self, request_id: str, after_sequence: int = 0) -> AsyncIterator[Response]:
        """Yields the stored Responses after ``after_sequence``, then the live ones.

        Ends after the final Response (at once if the job already ended and the
        caller has seen it); a job retried by hand has a final Response per run, and
        the watch goes on past those followed by more. Each Response is yielded once,
        in sequence order.

        Raises:
            NotFound: no such request.
        """
        changed = asyncio.Event()
        self._watchers.setdefault(request_id, set()).add(changed)
        try:
            seen = after_sequence
            while True:
                # Cleared before reading: a Response stored while we read or while
                # the caller holds a yielded one sets it again, so none is missed.
                changed.clear()
                batch = await self._shared_read(request_id, seen)
                for index, response in enumerate(batch):
                    yield response
                    seen = response.sequence
                    # The end, unless a retry by hand went on after it: Responses stored after
                    # it came in this read, or a full read may have left them for the next one.
                    if response.is_final and index == len(batch) - 1 and len(batch) < WATCH_BATCH:
                        return
                if not batch:
                    last = (await self.get(request_id)).last_response
                    if last.is_final and last.sequence <= seen:
                        return
                    await changed.wait()
        finally:
            waiting = self._watchers.get(request_id)
            if waiting is not None:
                waiting.discard(changed)
                if not waiting:
                    del self._watchers[request_id]
                    self._announced.pop(request_id, None)

    async def _shared_read(self, request_id: str, after: int) -> list[Response]:
        """:meth:`responses` after ``after``, one read for every watcher at that place.

        A thousand streams on one job wake together at each new Response: they share
        one read of the store instead of making a thousand. A watcher joins a read in
        flight only if no Response was announced since it started (so the read sees
        every Response announced before the watcher cleared its wake-up); otherwise it
        starts a newer one.
        """
        key = (request_id, after)
        announced = self._announced.get(request_id, 0)
        found = self._reads.get(key)
        read: asyncio.Future[list[Response]]
        if found is None or found[0] != announced:
            read = asyncio.ensure_future(self.responses(request_id, after, WATCH_BATCH))
            self._reads[key] = (announced, read)
            read.add_done_callback(lambda done: self._forget_read(key, done))
        else:
            read = found[1]
        # Shielded: a watcher that goes away does not cancel the others' read.
        return list(await asyncio.shield(read))

    def _forget_read(self, key: tuple[str, int], read: asyncio.Future[list[Response]]) -> None:
        found = self._reads.get(key)
        if found is not None and found[1] is read:
            del self._reads[key]
        if not read.cancelled():
            read.exception()  # retrieved: a failed read nobody awaits any more is not logged as lost

    @property
    def watcher_count(self) -> int:
        """How many watches are open (for tests and metrics)."""
        return sum(len(events) for events in self._watchers.values())

    # -- notifications -------------------------------------------------------

    def add_listener(self, listener: ConnectorListener) -> None:
        """Registers a dispatcher to be told of new work and cancellations."""
        self._listeners.append(listener)

    def remove_listener(self, listener: ConnectorListener) -> None:
        """Unregisters a listener added with :meth:`add_listener`."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify_response(self, request_id: str) -> None:
        """Wakes the watchers of ``request_id`` and the feeds; call after a Response is stored."""
        self._notify_feeds()
        waiting = self._watchers.get(request_id)
        if waiting:
            self._announced[request_id] = self._announced.get(request_id, 0) + 1
            for event in waiting:
                event.set()

    def end_feeds(self) -> None:
        """Ends every open :meth:`watch_jobs` at its next wake-up, now (a server draining)."""
        self._feeds_ended = True
        self._notify_feeds()
        if self._feed_tail is not None:
            self._feed_tail.wake()

    def _notify_feeds(self) -> None:
        """Wakes the open feeds (:meth:`watch_jobs`) to read what was stored."""
        self._feed_announced += 1
        for feed in self._feed_watchers:
            feed.set()

    def _notify_work(self) -> None:
        """Tells listeners a request may be ready; call after one is queued."""
        for listener in list(self._listeners):
            listener.work_available()

    def _notify_cancel(self, request_id: str) -> None:
        """Tells listeners a running request is to be cancelled."""
        for listener in list(self._listeners):
            listener.cancel_requested(request_id)

    @staticmethod
    def _not_found(request_id: str) -> NotFound:
        """The error for an unknown request id."""
        return request_not_found(request_id)

    @staticmethod
    def _check_lease(request_id: str, held: str | None, given: str) -> None:
        """Raises unless ``given`` is the lease currently held on ``request_id``."""
        if held is None or held != given:
            raise FailedPrecondition(
                f"the lease on request {request_id!r} is not held by the caller",
                reason="LEASE_NOT_HELD",
                metadata={"request_id": request_id},
            )


class _FeedTail:
    """The newest part of a connector's feed, read once for every open stream.

    One task reads the whole feed (no filter) from where it started, as Responses are
    stored, and keeps the last :data:`FEED_TAIL_KEEP` items; streams filter them in
    memory. So a Response stored wakes one read of the store, not one per stream.
    It starts with the first stream and stops with the last.
    """

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.users = 0
        self.closed = False
        self.started = False
        self.error: BaseException | None = None
        self.generation = 0
        self._items: list[FeedItem] = []
        self._places: list[tuple[int, ...]] = []
        self._base: tuple[int, ...] = ()
        self._end: tuple[int, ...] = ()
        self._end_token = ""
        self._advanced = asyncio.Event()
        self._changed = asyncio.Event()
        connector._feed_watchers.add(self._changed)
        self._task = asyncio.create_task(self._read(), name="ajs-feed-tail")

    def holds(self, place: tuple[int, ...]) -> bool:
        """True when everything after ``place`` up to the tail's end is kept here."""
        return self.started and place >= self._base

    def after(self, place: tuple[int, ...], token: str) -> tuple[list[FeedItem], str, tuple[int, ...]]:
        """The kept items after ``place`` (whose token is ``token``), and the token and place after them.

        A stream that read the store beyond the tail's end stays where it is until the tail passes it.
        """
        if self._end <= place:
            return [], token, place
        return self._items[bisect.bisect_right(self._places, place) :], self._end_token, self._end

    async def advanced(self, seen: int, within: float) -> None:
        """Returns when the tail moved on since ``generation`` was ``seen``, or after ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(within, 0.0)):
                while self.generation == seen and not self.connector._feeds_ended:
                    self._advanced.clear()
                    await self._advanced.wait()

    def close(self) -> None:
        """Stops the reader (the last stream left)."""
        self.closed = True
        self._task.cancel()
        self.connector._feed_watchers.discard(self._changed)

    def wake(self) -> None:
        """Wakes the streams waiting for the tail (to see that the feeds ended)."""
        self._advanced.set()

    def _moved(self) -> None:
        self.generation += 1
        self._advanced.set()

    async def _read(self) -> None:
        connector = self.connector
        try:
            self._end_token = (await connector.feed("", JobFilter(), 0)).token
            self._base = self._end = connector._feed_order(self._end_token)
            self.started = True
            self._moved()
            while True:
                self._changed.clear()
                page = await connector.feed(self._end_token, JobFilter(), FEED_BATCH)
                if page.items or page.token != self._end_token:
                    self._items += page.items
                    self._places += [connector._feed_order(item.token) for item in page.items]
                    self._end_token, self._end = page.token, connector._feed_order(page.token)
                    if len(self._items) > FEED_TAIL_KEEP:  # forget the older half
                        cut = len(self._items) // 2
                        self._base = self._places[cut - 1]
                        del self._items[:cut], self._places[:cut]
                    self._moved()
                if page.more:
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FEED_PENDING_POLL if page.pending else None):
                        await self._changed.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # the streams raise it, and their clients resume
            self.error = error
            self.closed = True
            self._moved()
