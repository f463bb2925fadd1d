"""The in-memory connector: a complete connector whose queue lives in the process.

It keeps nothing across restarts, so it suits tests (plugin authors may use it in
theirs), benchmarks and throw-away servers. It passes the same contract suite as
every other connector.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import heapq
import uuid
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta

from typing_extensions import override

from ajs_grpc.connectors.base import (
    Claim,
    Clock,
    Connector,
    FeedItem,
    FeedPage,
    JobFilter,
    Page,
    Planned,
    QueueInfo,
    Renewal,
    Submit,
    not_ended,
    plan_submits,
    schedule_not_found,
    schedule_taken,
)
from ajs_grpc.core.flow import HELD_BACK_CAUSES, Bucket, Gate, next_token
from ajs_grpc.core.model import NO_FLOW, Flow, Job, Request, RequestState, Response, Update
from ajs_grpc.core.schedules import Schedule

_Item = tuple[int, int, int, str]

__all__ = ["MemoryConnector"]


@dataclasses.dataclass
class _Entry:
    job: Job
    position: int
    responses: list[Response]
    lease_token: str | None = None
    lease_expires: datetime | None = None
    # The ticket of the job's latest queueing (unique in the connector), so stale heap items
    # can be recognised, even those of a pruned job whose id was taken again.
    queued: int = 0


class MemoryConnector(Connector):
    """Holds the queue in dictionaries and heaps; no call awaits anything.

    Args:
        clock: what leases and due times are compared with; None for the process's clock.
    """

    name = "memory"

    def __init__(self, *, clock: Clock | None = None) -> None:
        super().__init__(clock=clock)
        self._entries: dict[str, _Entry] = {}
        # Submit order, for listing; positions start at 1 (0 is "before the first").
        self._order: list[str] = []
        self._children: dict[str, list[str]] = {}
        # Due jobs: (-priority, position, queued, id); not yet due: (due_time, ...).
        self._ready: list[tuple[int, int, int, str]] = []
        self._waiting: list[tuple[datetime, int, int, int, str]] = []
        # Numbers every queueing: a heap item names one queueing of one entry, never a later entry's.
        self._tickets = 0
        # Flow control: paused queues; running jobs per concurrency key; the unfinished
        # positions of each ordered key; token buckets; and due jobs a claim passed over,
        # parked until what holds them back changes ("q:queue", "c:key", "o:key").
        self._paused: set[str] = set()
        self._running_keys: collections.Counter[str] = collections.Counter()
        self._ordered: dict[str, set[int]] = {}
        self._ordered_heads: dict[str, list[int]] = {}  # the same positions as heaps (stale ones left in)
        self._buckets: dict[str, Bucket] = {}
        self._parked: dict[str, list[_Item]] = {}
        # Dependencies: the ids of the jobs that named each id in depends_on.
        self._dependents: dict[str, set[str]] = {}
        self._schedules: dict[str, Schedule] = {}
        # The feed (watch_jobs): every Response stored, numbered from 1 in the order stored.
        # Tokens name this connector's life ("<epoch>.<number>"): a restarted process has none.
        self._feed: list[tuple[int, _Entry, Response]] = []
        self._fed = 0
        self._epoch = uuid.uuid4().hex[:12]

    def _entry(self, request_id: str) -> _Entry:
        entry = self._entries.get(request_id)
        if entry is None:
            raise self._not_found(request_id)
        return entry

    def _store(self, entry: _Entry, job: Job, response: Response) -> None:
        was = entry.job.state
        entry.job = job
        entry.responses.append(response)
        self._fed += 1
        self._feed.append((self._fed, entry, response))
        if job.state is not RequestState.PENDING:
            entry.lease_token = entry.lease_expires = None
        self._count_flow(entry, was)
        if job.state is RequestState.CREATED:
            self._queue(entry)
        self._notify_response(job.request.id)
        if job.is_final:
            self._resolve_dependents(job.request.id)

    def _resolve_dependents(self, request_id: str) -> None:
        """Applies :meth:`Job.resolve` to the waiting jobs that depend on ``request_id`` (which ended)."""
        for dependent in sorted(self._dependents.get(request_id, ()), key=lambda i: self._entries[i].position):
            self._resolve(self._entries[dependent])

    def _resolve(self, entry: _Entry) -> None:
        if not entry.job.waiting:
            return
        deps = {i: e.job for i in entry.job.request.depends_on if (e := self._entries.get(i)) is not None}
        job, response = entry.job.resolve(deps, self._now())
        if response is not None:
            self._store(entry, job, response)  # cancelled: its own dependents follow
        elif not job.waiting:
            entry.job = job
            self._queue(entry)

    def _count_flow(self, entry: _Entry, was: RequestState | None) -> None:
        """Keeps the running count of its concurrency key and the order of its ordered key; unparks."""
        flow, state = entry.job.flow, entry.job.state
        if flow.concurrency_key is not None and (was is RequestState.PENDING) != (state is RequestState.PENDING):
            if state is RequestState.PENDING:
                self._running_keys[flow.concurrency_key] += 1
            else:
                self._running_keys[flow.concurrency_key] -= 1
                # All of them, not one per place: one that another policy holds back next
                # must not keep a place from the others (a key's backlog costs a pass per end).
                self._unpark(f"c:{flow.concurrency_key}")
        if flow.ordered_key is not None:
            key = flow.ordered_key
            positions = self._ordered.setdefault(key, set())
            if state.is_final:
                positions.discard(entry.position)
                if not positions:
                    del self._ordered[key]
                    self._ordered_heads.pop(key, None)
                self._unpark(f"o:{key}")
            elif entry.position not in positions:
                positions.add(entry.position)
                heapq.heappush(self._ordered_heads.setdefault(key, []), entry.position)

    def _ordered_head(self, key: str) -> int | None:
        """The position of the first unfinished job of an ordered key."""
        positions, heads = self._ordered.get(key), self._ordered_heads.get(key)
        if not positions or not heads:
            return None
        while heads[0] not in positions:
            heapq.heappop(heads)
        return heads[0]

    def _park(self, cause: str, item: _Item) -> None:
        self._parked.setdefault(cause, []).append(item)

    def _unpark(self, cause: str) -> None:
        """Puts the jobs parked for ``cause`` (those still queued) back on the ready heap."""
        moved = [item for item in self._parked.pop(cause, ()) if self._is_current(item[3], item[2])]
        for item in moved:
            heapq.heappush(self._ready, item)
        if moved:
            self._notify_work()

    def _queue(self, entry: _Entry) -> None:
        self._tickets += 1
        entry.queued = self._tickets
        job = entry.job
        item = (-job.request.priority, entry.position, entry.queued, job.request.id)
        if job.due_time is None:
            return  # waiting for its dependencies: resolved when one ends
        if job.due_time > self._now():
            heapq.heappush(self._waiting, (job.due_time, *item))
        else:
            heapq.heappush(self._ready, item)
        self._notify_work()

    def _is_current(self, request_id: str, queued: int) -> bool:
        entry = self._entries.get(request_id)
        return entry is not None and entry.queued == queued and entry.job.state is RequestState.CREATED

    @override
    async def enqueue(
        self, request: Request, max_attempts: int = 1, flow: Flow = NO_FLOW, *, allow_failed_dependencies: bool = False
    ) -> tuple[Job, bool]:
        [planned] = await self._plan([Submit(request, max_attempts, flow, allow_failed_dependencies)], indexed=False)
        self._add(planned)
        if planned.created and request.depends_on:
            self._resolve(self._entries[request.id])
        return self._entries[request.id].job if planned.created else planned.job, planned.created

    @override
    async def enqueue_many(self, submits: Sequence[Submit | tuple[Request, int]]) -> list[tuple[Job, bool]]:
        # Planned in full before anything is stored, with no await in between: all or none.
        plan = await self._plan([Submit.of(item) for item in submits], indexed=True)
        for planned in plan:
            self._add(planned)
        for planned in plan:  # after all are stored: a dependency may come later in the batch
            if planned.created and planned.job.request.depends_on:
                self._resolve(self._entries[planned.job.request.id])
        return [(self._entries[p.job.request.id].job if p.created else p.job, p.created) for p in plan]

    async def _plan(self, submits: list[Submit], *, indexed: bool) -> list[Planned]:
        return await plan_submits(submits, self._find, self._exists, self._find_unique, indexed=indexed, at=self._now())

    async def _find_unique(self, key: str, states: frozenset[RequestState], since: datetime | None) -> Job | None:
        for request_id in reversed(self._order):
            entry = self._entries.get(request_id) if request_id else None
            if entry is None or entry.job.flow.unique_key != key:
                continue
            job = entry.job
            if job.state in states or (since is not None and (job.request.create_time or job.update_time) >= since):
                return job
        return None

    async def _find(self, request_ids: list[str]) -> dict[str, Job]:
        return {i: entry.job for i in request_ids if (entry := self._entries.get(i)) is not None}

    async def _exists(self, request_id: str) -> bool:
        return request_id in self._entries

    def _add(self, planned: Planned) -> None:
        if not planned.created or planned.first is None:
            return
        job = planned.job
        self._order.append(job.request.id)
        entry = _Entry(job, len(self._order), [planned.first])
        self._entries[job.request.id] = entry
        self._fed += 1
        self._feed.append((self._fed, entry, planned.first))
        if job.request.parent_id:
            self._children.setdefault(job.request.parent_id, []).append(job.request.id)
        for dependency in job.request.depends_on:
            self._dependents.setdefault(dependency, set()).add(job.request.id)
        self._count_flow(entry, None)
        self._queue(entry)
        self._notify_feeds()

    @override
    async def claim(
        self,
        worker: str,
        *,
        limit: int = 1,
        lease: float = 30.0,
        types: Collection[str] | None = None,
        queues: Collection[str] | None = None,
    ) -> list[Claim]:
        at = self._now()
        self._ripen(at)
        claims: list[Claim] = []
        skipped: list[_Item] = []
        gate = Gate(at)
        while self._ready and len(claims) < limit:
            item = heapq.heappop(self._ready)
            request_id, queued = item[3], item[2]
            if not self._is_current(request_id, queued):
                continue  # cancelled, or queued again since
            entry = self._entries[request_id]
            request = entry.job.request
            if (types is not None and request.type not in types) or (
                queues is not None and request.queue not in queues
            ):
                skipped.append(item)
                continue
            if entry.job.expired(at):
                self._store(entry, *entry.job.lapse(at))
                continue
            if request.queue in self._paused:
                self._park(f"q:{request.queue}", item)
                continue
            flow = entry.job.flow
            if flow.gated and self._hold(gate, flow, entry, item):
                continue
            job, response = entry.job.advance(Update(RequestState.PENDING, data={"worker": worker}), at)
            self._store(entry, job, response)
            entry.lease_token = uuid.uuid4().hex
            entry.lease_expires = at + timedelta(seconds=lease)
            claims.append(Claim(job, entry.lease_token))
        for item in skipped:
            heapq.heappush(self._ready, item)
        self._buckets.update(gate.buckets)
        return claims

    def _ripen(self, at: datetime) -> None:
        """Moves the jobs that fell due to the ready heap."""
        while self._waiting and self._waiting[0][0] <= at:
            heapq.heappush(self._ready, heapq.heappop(self._waiting)[1:])

    def _hold(self, gate: Gate, flow: Flow, entry: _Entry, item: _Item) -> bool:
        """Asks the gate; a job it holds back is parked until that changes (True)."""
        c, r, o = flow.concurrency_key, flow.rate_key, flow.ordered_key
        heads = o is None or self._ordered_head(o) in (None, entry.position)
        bucket = self._buckets.get(r) if r is not None else None
        cause = gate.hold(flow, running=self._running_keys[c] if c else 0, bucket=bucket, heads_key=heads)
        if cause is None:
            return False
        if cause == "ordered" and o is not None:
            self._park(f"o:{o}", item)
        elif cause == "concurrency" and c is not None:
            self._park(f"c:{c}", item)
        elif r is not None:  # the rate: due again when its bucket holds a token
            empty = gate.buckets.get(r) or self._buckets.get(r) or Bucket(0.0, gate.at)
            heapq.heappush(self._waiting, (next_token(empty, flow.rate), *item))
        return True

    @override
    async def respond(self, request_id: str, update: Update, lease_token: str) -> Response:
        entry = self._entry(request_id)
        self._check_lease(request_id, entry.lease_token, lease_token)
        job, response = entry.job.advance(update)
        self._store(entry, job, response)
        return response

    @override
    async def renew(self, leases: Mapping[str, str], lease: float) -> Renewal:
        until = self._now() + timedelta(seconds=lease)
        lost: set[str] = set()
        cancelled: set[str] = set()
        for request_id, token in leases.items():
            entry = self._entries.get(request_id)
            if entry is None or entry.lease_token != token:
                lost.add(request_id)
                continue
            entry.lease_expires = until
            if entry.job.cancel_requested:
                cancelled.add(request_id)
        return Renewal(frozenset(lost), frozenset(cancelled))

    @override
    async def recover_expired(self) -> int:
        at = self._now()
        expired = [
            entry
            for entry in self._entries.values()
            if entry.job.state is RequestState.PENDING and entry.lease_expires is not None and entry.lease_expires <= at
        ]
        for entry in expired:
            job, response = entry.job.expire(at)
            self._store(entry, job, response)
        lapsed = 0
        for entry in [entry for entry in self._entries.values() if entry.job.expired(at)]:
            if entry.job.expired(at):  # (a cascade may have ended it meanwhile)
                self._store(entry, *entry.job.lapse(at))
                lapsed += 1
        return len(expired) + lapsed

    @override
    async def next_due_time(
        self, types: Collection[str] | None = None, queues: Collection[str] | None = None
    ) -> datetime | None:
        # Drop stale items (cancelled, or queued again since) from the heads.
        while self._ready and not self._is_current(self._ready[0][3], self._ready[0][2]):
            heapq.heappop(self._ready)
        while self._waiting and not self._is_current(self._waiting[0][4], self._waiting[0][3]):
            heapq.heappop(self._waiting)
        for item in self._ready:  # passed over only when not ours to claim (parked ones are elsewhere)
            if self._is_current(item[3], item[2]) and self._in_scope(item[3], types, queues):
                return self._now()
        return self._waiting[0][0] if self._waiting else None

    def _in_scope(self, request_id: str, types: Collection[str] | None, queues: Collection[str] | None) -> bool:
        request = self._entries[request_id].job.request
        return (types is None or request.type in types) and (queues is None or request.queue in queues)

    @override
    async def cancel(self, request_id: str) -> Job:
        root = self._entry(request_id)
        root.job.cancel()  # raises if it already ended, before anything changes
        pending = [request_id]
        while pending:
            entry = self._entries[pending.pop()]
            pending += self._children.get(entry.job.request.id, [])
            if entry.job.is_final:
                continue
            job, response = entry.job.cancel()
            if response is not None:
                self._store(entry, job, response)
            else:
                entry.job = job
                self._notify_cancel(job.request.id)
        return root.job

    @override
    async def prune(self, before: datetime) -> int:
        # Leaves first, again and again: a job with a child left keeps its id taken.
        doomed: set[str] = set()
        while True:
            leaves = {
                rid
                for rid, e in self._entries.items()
                if rid not in doomed
                and e.job.is_final
                and e.job.update_time < before
                and all(child in doomed for child in self._children.get(rid, ()))
            }
            if not leaves:
                break
            doomed |= leaves
        self._forget(doomed)
        return len(doomed)

    @override
    async def retry(self, request_id: str) -> Job:
        entry = self._entry(request_id)
        deps = {i: e.job for i in entry.job.request.depends_on if (e := self._entries.get(i)) is not None}
        job, response = entry.job.retry(deps, self._now())
        self._store(entry, job, response)
        return job

    @override
    async def delete(self, request_id: str) -> int:
        self._entry(request_id)
        tree = [request_id]
        for rid in tree:  # grows as it goes: every descendant
            tree += self._children.get(rid, [])
        for rid in tree:
            if not self._entries[rid].job.is_final:
                raise not_ended(self._entries[rid].job, "deleted (with its descendants)")
        doomed = set(tree)
        self._forget(doomed)
        return len(doomed)

    def _forget(self, doomed: set[str]) -> None:
        """Removes ended jobs (a whole subtree, or leaves) from every index."""
        for request_id in doomed:
            entry = self._entries.pop(request_id)
            siblings = self._children.get(entry.job.request.parent_id)
            if siblings is not None and request_id in siblings:
                siblings.remove(request_id)
            self._children.pop(request_id, None)
            for dependency in entry.job.request.depends_on:
                dependents = self._dependents.get(dependency)
                if dependents is not None:
                    dependents.discard(request_id)
                    if not dependents:
                        del self._dependents[dependency]
        self._feed = [fed for fed in self._feed if fed[1].job.request.id not in doomed]
        # Positions must stay stable for page cursors: deleted ones become "" holes.
        self._order = [rid if rid not in doomed else "" for rid in self._order]

    # -- schedules -------------------------------------------------------------------

    @override
    async def create_schedule(self, schedule: Schedule, *, replace: bool = False) -> tuple[Schedule, bool]:
        at = self._now()
        stored = self._schedules.get(schedule.id)
        if stored is not None:
            if stored.same_definition(schedule):
                return stored, False
            if not replace:
                raise schedule_taken(schedule.id)
            kept = dataclasses.replace(
                schedule,
                create_time=stored.create_time,
                update_time=at,
                paused=stored.paused,
                last_time=stored.last_time,
                last_job_id=stored.last_job_id,
            )
        else:
            kept = dataclasses.replace(schedule, create_time=at, update_time=at, last_time=None, last_job_id="")
        self._schedules[schedule.id] = kept
        return kept, True

    def _schedule(self, schedule_id: str) -> Schedule:
        found = self._schedules.get(schedule_id)
        if found is None:
            raise schedule_not_found(schedule_id)
        return found

    @override
    async def get_schedule(self, schedule_id: str) -> Schedule:
        return self._schedule(schedule_id)

    @override
    async def list_schedules(self, *, creator: str = "", after: str = "", limit: int = 1000) -> list[Schedule]:
        found = sorted(
            (s for s in self._schedules.values() if s.id > after and (not creator or s.creator == creator)),
            key=lambda s: s.id,
        )
        return found[:limit]

    @override
    async def delete_schedule(self, schedule_id: str) -> None:
        self._schedule(schedule_id)
        del self._schedules[schedule_id]

    @override
    async def pause_schedule(self, schedule_id: str, paused: bool) -> Schedule:
        stored = self._schedule(schedule_id)
        if stored.paused == paused:
            return stored
        at = self._now()
        changed = dataclasses.replace(stored, paused=paused, update_time=at)
        if not paused:  # goes on from now: what passed while paused is skipped
            changed = dataclasses.replace(changed, last_time=at)
        self._schedules[schedule_id] = changed
        return changed

    @override
    async def advance_schedule(
        self, schedule_id: str, last_time: datetime | None, new_last_time: datetime, last_job_id: str
    ) -> bool:
        stored = self._schedules.get(schedule_id)
        if stored is None or stored.paused or stored.last_time != last_time:
            return False
        self._schedules[schedule_id] = dataclasses.replace(
            stored, last_time=new_last_time, last_job_id=last_job_id or stored.last_job_id
        )
        return True

    @override
    async def set_paused(self, queue: str, paused: bool) -> QueueInfo:
        if paused:
            self._paused.add(queue)
        else:
            self._paused.discard(queue)
            self._unpark(f"q:{queue}")
        return next((info for info in await self.list_queues() if info.name == queue), QueueInfo(queue, paused=paused))

    @override
    async def list_queues(self) -> list[QueueInfo]:
        queued: collections.Counter[str] = collections.Counter()
        running: collections.Counter[str] = collections.Counter()
        oldest: dict[str, datetime] = {}
        for entry in self._entries.values():
            job = entry.job
            queue = job.request.queue
            if job.state is RequestState.CREATED:
                queued[queue] += 1
                created = job.request.create_time or job.update_time
                oldest[queue] = min(oldest.get(queue, created), created)
            elif job.state is RequestState.PENDING:
                running[queue] += 1
        names = sorted(set(queued) | set(running) | self._paused)
        return [QueueInfo(n, queued[n], running[n], n in self._paused, oldest.get(n)) for n in names]

    @override
    async def held_back(self) -> dict[str, int]:
        at = self._now()
        counts = dict.fromkeys(HELD_BACK_CAUSES, 0)
        for entry in self._entries.values():
            job = entry.job
            if job.state is not RequestState.CREATED or (job.due_time is not None and job.due_time > at):
                continue
            flow = job.flow
            c, r, o = flow.concurrency_key, flow.rate_key, flow.ordered_key
            if job.request.queue in self._paused:
                counts["paused"] += 1
            elif c is not None and self._running_keys[c] >= flow.concurrency_limit:
                counts["concurrency"] += 1
            elif o is not None and self._ordered_head(o) not in (None, entry.position):
                counts["ordered"] += 1
            elif r is not None and (b := self._buckets.get(r)) is not None and b.at(at, flow.rate, flow.burst) < 1:
                counts["rate_limit"] += 1
        return counts

    @override
    async def get(self, request_id: str) -> Job:
        return self._entry(request_id).job

    @override
    async def list_jobs(
        self, job_filter: JobFilter, page_size: int, after: int = 0, *, newest_first: bool = False
    ) -> Page:
        # A job at index i has the cursor (position) i + 1; "after" bounds it from below, or
        # newest first from above (0: no bound).
        if newest_first:
            indexes: range = range((after or len(self._order) + 1) - 2, -1, -1)
        else:
            indexes = range(max(after, 0), len(self._order))
        jobs: list[Job] = []
        cursors: list[int] = []
        for index in indexes:
            request_id = self._order[index]
            if not request_id:
                continue  # pruned
            job = self._entries[request_id].job
            if not job_filter.matches(job):
                continue
            if len(jobs) == page_size:
                return Page(jobs, cursors[-1], cursors)
            jobs.append(job)
            cursors.append(index + 1)
        return Page(jobs, None, cursors)

    @override
    async def feed(self, after: str, job_filter: JobFilter, limit: int) -> FeedPage:
        if not after:
            number = self._fed
        else:
            epoch, _, tail = after.partition(".")
            if epoch != self._epoch or not (tail.isascii() and tail.isdigit()) or int(tail) > self._fed:
                raise self._bad_token(after)
            number = int(tail)
        items: list[FeedItem] = []
        start = bisect.bisect_right(self._feed, number, key=lambda fed: fed[0])
        for fed, entry, response in self._feed[start:] if limit else ():
            number = fed
            request = entry.job.request
            item = FeedItem(response, self._token(fed), request.type, request.queue, request.creator, request.parent_id)
            if job_filter.matches_item(item):
                items.append(item)
                if len(items) == limit:
                    return FeedPage(items, item.token, more=number < self._fed)
        return FeedPage(items, self._token(number))

    def _token(self, number: int) -> str:
        """The feed token of place ``number`` of this connector's life."""
        return f"{self._epoch}.{number}"

    @override
    def _feed_order(self, token: str) -> tuple[int, ...]:
        return (int(token.partition(".")[2]),)

    @override
    async def count_jobs(self, state: RequestState, creator: str = "") -> int:
        return sum(
            1
            for entry in self._entries.values()
            if entry.job.state is state and (not creator or entry.job.request.creator == creator)
        )

    @override
    async def responses(self, request_id: str, after_sequence: int, limit: int) -> list[Response]:
        stored = self._entry(request_id).responses
        # Sequences are 1-based and gapless: sequence n sits at index n - 1.
        start = max(after_sequence, 0)
        return stored[start : start + limit]
