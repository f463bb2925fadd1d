"""The scheduler: submits a job for every occurrence of every stored schedule.

Each instance runs one :class:`Scheduler`. A round reads all schedules from the
connector; for each one that is not paused and has occurrences due, it asks
:func:`~ajs_grpc.core.schedules.plan` what to do (catch-up, overlap), cancels the
previous job if the plan says so, submits the occurrences' jobs, and records them
handled with :meth:`~ajs_grpc.connectors.base.Connector.advance_schedule`. Then it
sleeps until the earliest next occurrence of all schedules, at most ``poll`` seconds
(another instance may have created a schedule), or until :meth:`Scheduler.changed`.

Exactly once per occurrence, across instances and crashes:

- An occurrence's job id is derived from the schedule's id and the occurrence's time
  (:func:`~ajs_grpc.core.schedules.occurrence_id`), and its request from the schedule
  alone (:meth:`~ajs_grpc.core.schedules.Schedule.request_for`). Submit is idempotent
  on the id: a second submit of the same occurrence answers the stored job.
- The jobs are submitted *before* the schedule's ``last_time`` is moved on, by a
  compare-and-set on the ``last_time`` the round read. An instance that crashes
  between the two has left ``last_time`` where it was: the next round (its own after
  a restart, or another instance's) finds the same occurrences due and submits the
  same ids again, which store nothing new. Nothing is lost, since ``last_time`` never
  passes an occurrence whose job was not stored.
- Two instances racing over the same occurrences submit the same ids (one job each)
  and both try the compare-and-set: one wins, the other's fails and it moves on.

So "exactly once" holds as long as the schedule's definition is the same for both;
if its template is replaced between two submits of an occurrence, the second one is
refused (ALREADY_EXISTS: the id is taken by other content) and skipped with a log
line. Each occurrence gets at most one job; one that is skipped (catch-up, overlap,
paused) gets none.

Errors of the store (an :class:`~ajs_grpc.core.errors.AjsError`, e.g. Unavailable)
are logged; the round goes on with the next schedule and what failed is tried again
next round. Nothing ends the loop but :meth:`Scheduler.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime

from ajs_grpc.connectors.base import Connector
from ajs_grpc.core.errors import AjsError, AlreadyExists, FailedPrecondition, NotFound
from ajs_grpc.core.model import now
from ajs_grpc.core.schedules import LATE_GRACE, Schedule, plan
from ajs_grpc.engine.handlers.base import HandlerChain

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)

# Schedules read per list_schedules call.
PAGE = 1000


class Scheduler:
    """Submits the jobs of the stored schedules' occurrences (see the module's docstring).

    Args:
        connector: where schedules and jobs are stored.
        chain: what each occurrence's request is submitted with (its type's attempts and flow).
        clock: where the time is read; None for :func:`ajs_grpc.core.model.now`. Tests
            pass a clock they move forward.
        grace: seconds an occurrence may be found late and still count as on time
            (see :func:`~ajs_grpc.core.schedules.plan`).
        poll: seconds a round sleeps at most, so schedules created through another
            instance are seen.
    """

    def __init__(
        self,
        connector: Connector,
        chain: HandlerChain,
        *,
        clock: Callable[[], datetime] | None = None,
        grace: float = LATE_GRACE,
        poll: float = 1.0,
    ) -> None:
        self.connector = connector
        self.chain = chain
        self.grace = grace
        self.poll = poll
        self._clock = clock or now
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Schedules that failed with something other than a store's error, and how (logged once).
        self._broken: dict[str, str] = {}

    async def start(self) -> None:
        """Starts the loop (its first round at once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="ajs-scheduler")

    async def stop(self) -> None:
        """Stops the loop; a round in progress is cut short (what it did not record is redone by the next)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def changed(self) -> None:
        """Starts a round now: a schedule was created, replaced or resumed here."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()  # before the round: a change during it starts another
            delay = self.poll
            try:
                delay = await self.run_once()
            except AjsError as error:
                log.warning("schedules: a round failed, tried again in %.1fs: %s", self.poll, error)
            except Exception:
                log.exception("schedules: a round failed unexpectedly, tried again in %.1fs", self.poll)
            if delay > 0:
                with contextlib.suppress(TimeoutError):  # asyncio.timeout: see Dispatcher's loop
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    async def run_once(self) -> float:
        """One round over every schedule; returns the seconds until the next one is due (at most ``poll``).

        Raises:
            AjsError: the schedules could not be read (an error handling one schedule
                is logged, and the round goes on).
        """
        schedules = await self._schedules()
        wake = self.poll
        for schedule in schedules:
            if schedule.paused:
                continue
            try:
                next_time = await self._handle(schedule)
            except AjsError as error:
                log.warning("schedule %s: tried again next round: %s", schedule.id, error)
                continue
            except Exception as error:  # e.g. a zone this machine's tz database lacks: the others go on
                if self._broken.get(schedule.id) != str(error):
                    log.exception("schedule %s: cannot be handled (tried again each round)", schedule.id)
                self._broken[schedule.id] = str(error)
                continue
            self._broken.pop(schedule.id, None)
            if next_time is not None:
                wake = min(wake, max(0.0, (next_time - self._clock()).total_seconds()))
        return wake

    async def _schedules(self) -> list[Schedule]:
        found: list[Schedule] = []
        after = ""
        while True:
            page = await self.connector.list_schedules(after=after, limit=PAGE)
            found += page
            if len(page) < PAGE:
                return found
            after = page[-1].id

    async def _handle(self, schedule: Schedule) -> datetime | None:
        """Submits what is due of ``schedule``; returns when it is next due (None: never)."""
        at = self._clock()
        start = schedule.last_time or schedule.create_time or at
        due = schedule.next_time(start)
        if due is None or due > at:
            return due
        previous_running = await self._running(schedule.last_job_id)
        p = plan(schedule, at, previous_running=previous_running, grace=self.grace)
        if p.new_last_time is None:
            return schedule.next_time(at)
        if p.cancel_previous:
            with contextlib.suppress(FailedPrecondition, NotFound):  # it ended meanwhile, or was deleted
                await self.connector.cancel(schedule.last_job_id)
                log.info("schedule %s: cancelled its previous job %s", schedule.id, schedule.last_job_id)
        submitted = ""
        for occurrence in p.submit:
            request = schedule.request_for(occurrence)
            try:
                [(_, created)] = await self.connector.enqueue_many([self.chain.submit(request)])
            except AlreadyExists as error:
                log.warning("schedule %s: occurrence %s skipped: %s", schedule.id, request.id, error)
                continue
            submitted = request.id
            if created:
                log.info("schedule %s: submitted %s", schedule.id, request.id)
        if not await self.connector.advance_schedule(schedule.id, schedule.last_time, p.new_last_time, submitted):
            log.debug("schedule %s: moved on by another instance (or paused, or deleted)", schedule.id)
        elif not p.submit:
            log.info("schedule %s: occurrences up to %s skipped (catch-up or overlap)", schedule.id, p.new_last_time)
        if p.more:
            return at
        return schedule.next_time(at)

    async def _running(self, job_id: str) -> bool:
        """True when ``job_id`` names a job that has not ended."""
        if not job_id:
            return False
        try:
            job = await self.connector.get(job_id)
        except NotFound:
            return False
        return not job.is_final
