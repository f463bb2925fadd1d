"""The total-queue check every process-level fault test ends with.

A :class:`Ledger` is told which ids clients meant to submit (and how each may
end), which ids the server acknowledged, what live watchers saw, and, after the
run, every job present in the store with its stored Responses. :meth:`Ledger.tally`
then counts what broke a promise:

* **lost**: acknowledged, but never ended in a final state (or missing from the store);
* **duplicated**: more than one final Response, or a Response a resuming watcher saw twice;
* **unexpected**: a gap or disorder in sequences, a final Response that is not the last,
  a state or ending the job does not allow, a watcher that missed a Response or stopped
  early, a job present that nobody submitted, an error answer no fault explains.

:meth:`Ledger.check` reports the counts with :func:`tests.faults.report` and fails the
test, naming the first problems, unless all three are 0.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from ajs_grpc.client import AsyncClient
from ajs_grpc.core.errors import AjsError, Code
from ajs_grpc.core.model import RequestState, Response
from tests.faults import report

__all__ = ["Expectation", "Ledger", "Tally", "Workload", "countdown_expectation", "read_back"]

S = RequestState

# Which state may follow which, written down here independently of the code under test.
# PENDING -> PENDING is progress; PENDING -> CREATED is a retry, a lease expiry or a hand-back.
ALLOWED_NEXT: Mapping[RequestState, frozenset[RequestState]] = {
    S.CREATED: frozenset({S.PENDING, S.CANCELLED}),
    S.PENDING: frozenset({S.PENDING, S.CREATED, S.FINISHED, S.FAILED, S.CANCELLED}),
}

# How many problems a failing check names in its message.
SHOWN = 12


@dataclasses.dataclass(frozen=True)
class Expectation:
    """How one submitted job may end.

    Attributes:
        final_states: the final states it may end in.
        check: looks at all its stored Responses and returns a problem ("" if none):
            e.g. "the attempt that finished reported every step".
    """

    final_states: frozenset[RequestState] = frozenset({S.FINISHED})
    check: Callable[[Sequence[Response]], str] | None = None


def countdown_expectation(steps: int) -> Expectation:
    """A ``countdown`` job of ``steps`` steps: it ends FINISHED, and its last attempt ran every step."""

    def check(responses: Sequence[Response]) -> str:
        final = responses[-1]
        if dict(final.data) != {"steps": str(steps)}:
            return f"final data {dict(final.data)} is not {{'steps': '{steps}'}}"
        claims = [i for i, r in enumerate(responses) if r.state is S.PENDING and r.progress is None]
        if not claims:
            return "it ended without ever being claimed"
        last_attempt = responses[claims[-1] + 1 : -1]
        done = [r for r in last_attempt if r.progress is not None]
        if len(done) != steps or [r.data.get("remaining") for r in done] != [
            str(steps - i) for i in range(1, steps + 1)
        ]:
            return f"the attempt that finished reported {len(done)} of {steps} steps"
        return ""

    return Expectation(frozenset({S.FINISHED}), check)


@dataclasses.dataclass
class Tally:
    """The counts of one check and the problems behind them."""

    acknowledged: int
    lost: int
    duplicated: int
    unexpected: int
    problems: list[str]


class Ledger:
    """What was submitted, acknowledged and seen in one fault run; see the module's docstring."""

    def __init__(self) -> None:
        self.expected: dict[str, Expectation] = {}
        self.acknowledged: set[str] = set()
        self.watched: dict[str, list[Response]] = {}
        self.stored: dict[str, list[Response]] = {}
        self.present: set[str] | None = None
        self.events: list[str] = []
        """Problems the test saw itself (an INTERNAL answer, a watcher that gave up, ...)."""

    # -- what the clients did ---------------------------------------------------------

    def expect(self, request_id: str, expectation: Expectation | None = None) -> None:
        """Records that a client is about to submit ``request_id`` (before the first attempt)."""
        self.expected[request_id] = expectation or Expectation()

    def acknowledge(self, request_id: str) -> None:
        """Records that the server acknowledged the submit of ``request_id``."""
        self.acknowledged.add(request_id)

    def watched_all(self, request_id: str, responses: Iterable[Response]) -> None:
        """Records every Response a live (resuming) watcher of ``request_id`` saw, in order."""
        self.watched[request_id] = list(responses)

    def unexpected(self, problem: str) -> None:
        """Records a problem the test saw itself; each counts as one unexpected."""
        self.events.append(problem)

    # -- what the store holds after the run ------------------------------------------

    def stored_all(self, request_id: str, responses: Iterable[Response]) -> None:
        """Records every stored Response of ``request_id``, read after the run."""
        self.stored[request_id] = list(responses)

    def present_ids(self, ids: Iterable[str]) -> None:
        """Records the ids of every job in the store (to find jobs nobody submitted)."""
        self.present = set(ids)

    # -- the verdict -----------------------------------------------------------------

    def tally(self) -> Tally:
        """Counts lost, duplicated and unexpected requests (each request counted once per kind)."""
        lost: set[str] = set()
        duplicated: set[str] = set()
        unexpected: set[str] = set()
        problems: list[str] = []

        def note(kind: set[str], request_id: str, problem: str) -> None:
            kind.add(request_id)
            problems.append(f"{request_id}: {problem}")

        for request_id in sorted(self.acknowledged - set(self.expected)):
            note(unexpected, request_id, "acknowledged but never submitted by this test")
        for request_id in sorted(self.acknowledged):
            stored = self.stored.get(request_id)
            if not stored:
                note(lost, request_id, "acknowledged, but not in the store")
                continue
            finals = [r for r in stored if r.is_final]
            if not finals:
                note(lost, request_id, f"never ended: last Response #{stored[-1].sequence} is {stored[-1].state.name}")
            if len(finals) > 1:
                note(duplicated, request_id, f"{len(finals)} final Responses")
            for problem in self._sequence_problems(stored, self.expected.get(request_id, Expectation())):
                note(unexpected, request_id, problem)
            seen = self.watched.get(request_id)
            if seen is not None:
                numbers = [r.sequence for r in seen]
                twice = len(numbers) - len(set(numbers))
                if twice:
                    note(duplicated, request_id, f"a resuming watcher saw {twice} Response(s) twice: {numbers}")
                elif numbers != [r.sequence for r in stored]:
                    note(unexpected, request_id, f"the watcher saw {numbers}, the store holds {len(stored)}")
        if self.present is not None:
            for request_id in sorted(self.present - set(self.expected)):
                note(unexpected, request_id, "in the store, but nobody submitted it")
            for request_id in sorted(self.acknowledged - self.present):
                if request_id in self.stored:  # read by id but not listed
                    note(unexpected, request_id, "readable by id but missing from ListJobs")
        for event in self.events:
            problems.append(event)
        return Tally(
            acknowledged=len(self.acknowledged),
            lost=len(lost),
            duplicated=len(duplicated),
            unexpected=len(unexpected) + len(self.events),
            problems=problems,
        )

    @staticmethod
    def _sequence_problems(stored: Sequence[Response], expectation: Expectation) -> list[str]:
        problems = []
        numbers = [r.sequence for r in stored]
        if numbers != list(range(1, len(stored) + 1)):
            problems.append(f"sequences are not 1..{len(stored)} without gaps: {numbers}")
        if stored[0].state is not S.CREATED:
            problems.append(f"Response #1 is {stored[0].state.name}, not CREATED")
        for before, after in itertools.pairwise(stored):
            if after.state not in ALLOWED_NEXT.get(before.state, frozenset()):
                problems.append(f"#{after.sequence} {after.state.name} may not follow {before.state.name}")
            if after.progress is not None and after.state is not S.PENDING:
                problems.append(f"#{after.sequence} carries progress in state {after.state.name}")
        for response in stored:
            if response.is_final != response.state.is_final:
                problems.append(f"#{response.sequence} is_final={response.is_final} in state {response.state.name}")
        finals = [r for r in stored if r.is_final]
        if finals and not stored[-1].is_final:
            problems.append(f"the final Response #{finals[0].sequence} is not the last ({len(stored)})")
        if finals and stored[-1].is_final:
            final = stored[-1]
            if final.state not in expectation.final_states:
                why = f" ({final.error.reason}: {final.error.message})" if final.error else ""
                problems.append(f"ended {final.state.name}{why}, expected one of {_names(expectation.final_states)}")
            elif expectation.check is not None and (problem := expectation.check(stored)):
                problems.append(problem)
        return problems

    def check(self, fault: str, **extra: object) -> Tally:
        """Reports the tally as ``fault`` (with ``extra`` figures) and asserts lost, duplicated, unexpected are 0."""
        tally = self.tally()
        report(
            fault,
            acknowledged=tally.acknowledged,
            lost=tally.lost,
            duplicated=tally.duplicated,
            unexpected=tally.unexpected,
            **extra,
        )
        shown = "\n".join(tally.problems[:SHOWN])
        more = f"\n... and {len(tally.problems) - SHOWN} more" if len(tally.problems) > SHOWN else ""
        assert (tally.lost, tally.duplicated, tally.unexpected) == (0, 0, 0), (
            f"{fault}: lost {tally.lost}, duplicated {tally.duplicated}, unexpected {tally.unexpected} "
            f"of {tally.acknowledged} acknowledged:\n{shown}{more}"
        )
        return tally


def _names(states: Collection[RequestState]) -> str:
    return ", ".join(sorted(state.name for state in states))


async def read_back(
    client: AsyncClient, ledger: Ledger, *, settle: float = 30.0, poll: float = 0.2, concurrency: int = 16
) -> None:
    """After a run: waits up to ``settle`` seconds for every acknowledged job to end, then reads the store.

    Records each acknowledged job's stored Responses (those stored so far, for a job
    that never ended) and the ids of every job ListJobs returns. WatchJob ends at the
    first final Response, so a Response stored after it is found through GetJob's
    last Response and recorded as a problem of its own.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle
    calls = asyncio.Semaphore(concurrency)

    async def ended(request_id: str) -> bool:
        async with calls:
            try:
                return (await client.get(request_id)).is_final
            except AjsError as error:
                if error.code is not Code.NOT_FOUND:
                    raise
                return True  # lost: nothing is recorded for it

    waiting = sorted(ledger.acknowledged)
    while waiting and loop.time() < deadline:
        done = await asyncio.gather(*(ended(request_id) for request_id in waiting))
        waiting = [request_id for request_id, final in zip(waiting, done, strict=True) if not final]
        if waiting:
            await asyncio.sleep(poll)

    async def read(request_id: str) -> None:
        async with calls:
            try:
                last = (await client.get(request_id)).last_response
            except AjsError as error:
                if error.code is not Code.NOT_FOUND:
                    raise
                return
            responses: list[Response] = []
            # Not past the last stored Response: a job that never ended must not hang the read.
            async for response in client.watch(request_id):
                responses.append(response)
                if response.is_final or response.sequence >= last.sequence:
                    break
            if responses and responses[-1].is_final and last.sequence > responses[-1].sequence:
                # Stored after the final one: the watch cannot show it, the job's last Response is it.
                responses.append(last)
            ledger.stored_all(request_id, responses)

    await asyncio.gather(*(read(request_id) for request_id in sorted(ledger.acknowledged)))
    ledger.present_ids([job.request.id async for job in client.list(page_size=500)])


# Answers a fault explains (the server is down, draining or restarting): a keyed submit is sent again.
RETRIED = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.CANCELLED})


class Workload:
    """The client side of a fault run: clients submitting keyed jobs, and a live watcher per job.

    Each client submits jobs with ids of its own (``{prefix}-{client}-{n}``) until told to
    stop (and at least ``minimum`` each), sending a submit again until it is acknowledged:
    submit is idempotent on the id. Every acknowledged job gets a watcher that resumes
    after the last sequence it saw whenever its stream breaks (at most ``watchers`` open
    at once). Everything is recorded in ``ledger``; answers no fault explains are
    recorded there as unexpected.

    Args:
        target: the server(s), e.g. ``127.0.0.1:p1,127.0.0.1:p2`` for round_robin.
        ledger: where ids, acknowledgements and watched Responses go.
        clients: how many clients (each with its own channel).
        job: the job type and data every submit carries.
        expectation: how each job may end.
        interval: seconds a client waits between acknowledged submits.
        minimum: submits each client makes at least, stopped or not.
        watchers: watch streams open at once, over all clients.
        give_up: seconds one submit is retried before it counts as never acknowledged.
    """

    def __init__(
        self,
        target: str,
        ledger: Ledger,
        *,
        clients: int = 8,
        job: tuple[str, Mapping[str, str]] = ("countdown", {"steps": "3", "interval": "0.05"}),
        expectation: Expectation | None = None,
        prefix: str = "job",
        interval: float = 0.2,
        minimum: int = 3,
        watchers: int = 48,
        give_up: float = 60.0,
    ) -> None:
        self.target = target
        self.ledger = ledger
        self.clients = clients
        self.job = job
        self.expectation = expectation
        self.prefix = prefix
        self.interval = interval
        self.minimum = minimum
        self.give_up = give_up
        self.stop = asyncio.Event()
        """Set it to let the clients finish (after ``minimum`` submits each)."""
        self.acknowledged_at: list[tuple[float, str]] = []
        """(loop time, id) of each acknowledgement, in order."""
        self.retried: collections.Counter[str] = collections.Counter()
        """Submit and watch answers that were retried, by status code name."""
        self.found_stored = 0
        """Acknowledgements that said the job already existed (an earlier attempt was stored)."""
        self._open_watches = asyncio.Semaphore(watchers)

    async def acknowledgements(self, more: int, seconds: float = 30.0) -> None:
        """Returns once ``more`` submits were acknowledged from now on; fails after ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        wanted = len(self.acknowledged_at) + more
        while len(self.acknowledged_at) < wanted:
            if loop.time() > deadline:
                raise AssertionError(f"waited {seconds:.0f}s for {more} acknowledged submits")
            await asyncio.sleep(0.02)

    async def run(self, *, watch_for: float = 60.0) -> None:
        """Runs the clients until :attr:`stop` is set, then waits up to ``watch_for`` seconds for the watchers."""
        await asyncio.gather(*(self._client(number, watch_for) for number in range(self.clients)))

    async def _client(self, number: int, watch_for: float) -> None:
        loop = asyncio.get_running_loop()
        kind, data = self.job
        watchers: list[asyncio.Task[None]] = []
        async with AsyncClient(self.target, timeout=5, resume_for=60) as client:
            sent = 0
            while sent < self.minimum or not self.stop.is_set():
                request_id = f"{self.prefix}-{number}-{sent}"
                sent += 1
                self.ledger.expect(request_id, self.expectation)
                if await self._submit(client, request_id, kind, data):
                    self.acknowledged_at.append((loop.time(), request_id))
                    watchers.append(asyncio.create_task(self._watch(client, request_id)))
                await asyncio.sleep(self.interval)
            if not watchers:
                return
            # The watchers use this client's channel: it stays open until they end.
            done, pending = await asyncio.wait(watchers, timeout=watch_for)
            for task in pending:
                task.cancel()
            await asyncio.wait(watchers)
            for task in done:
                if task.exception() is not None:
                    self.ledger.unexpected(f"a watcher failed: {task.exception()!r}")
            if pending:
                self.ledger.unexpected(
                    f"client {number}: {len(pending)} watcher(s) had no final Response {watch_for:.0f}s after the run"
                )

    async def _submit(self, client: AsyncClient, request_id: str, kind: str, data: Mapping[str, str]) -> bool:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.give_up
        while True:
            try:
                submitted = await client.submit(kind, data, id=request_id)
            except AjsError as error:
                if error.code not in RETRIED:
                    self.ledger.unexpected(f"{request_id}: submit answered {error.code.name}: {error.message}")
                self.retried[f"submit {error.code.name}"] += 1
                if loop.time() >= give_up:
                    self.ledger.unexpected(f"{request_id}: never acknowledged in {self.give_up:.0f}s")
                    return False
                await asyncio.sleep(0.05)
                continue
            self.found_stored += not submitted.created
            self.ledger.acknowledge(request_id)
            return True

    async def _watch(self, client: AsyncClient, request_id: str) -> None:
        seen: list[Response] = []
        async with self._open_watches:
            while not (seen and seen[-1].is_final):
                try:
                    async for response in client.watch(request_id, seen[-1].sequence if seen else 0):
                        seen.append(response)
                    if not (seen and seen[-1].is_final):
                        self.ledger.unexpected(f"{request_id}: a watch ended without the final Response")
                        break
                except AjsError as error:
                    # Broken for longer than the client resumes by itself, or too many streams.
                    if error.code not in RETRIED | {Code.RESOURCE_EXHAUSTED}:
                        self.ledger.unexpected(f"{request_id}: watch answered {error.code.name}: {error.message}")
                        break
                    self.retried[f"watch {error.code.name}"] += 1
                    await asyncio.sleep(0.2)
        self.ledger.watched_all(request_id, seen)
