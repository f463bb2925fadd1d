"""Flow control: the per-key policies of a job type, and the one rule that admits a claim.

A job type may declare, per key (the value of a named ``Request.data`` entry, so any
client language can set it; a request without the entry has the empty key):

* :class:`Concurrency` -- at most ``limit`` jobs of the type and key run (PENDING) at once;
* :class:`RateLimit` -- starts of the type and key follow a token bucket;
* ``ordered_by`` -- jobs of the type and key start one at a time, in submit order; a job
  being retried holds its place;
* :class:`Unique` -- a submit matching a job of the type and key in some states (or
  created within a ttl) answers that job instead of queueing another.

A submit resolves its type's policies into a :class:`~ajs_grpc.core.model.Flow` (the keys and limits of that
one job), which the connector stores with the job. A job held back by a policy stays
CREATED: a claim passes over it, and it starts as soon as the policy allows. Each
connector finds the candidates and the facts about them (running jobs per key, the
token buckets, whether a job heads its ordered key); :class:`Gate` decides, in one
place for every connector, which of them a claim may start.

Nothing here knows of gRPC or of a store.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from datetime import datetime, timedelta

from ajs_grpc.core.durations import parse_duration
from ajs_grpc.core.model import NO_FLOW, Flow, Request, RequestState

__all__ = [
    "HELD_BACK_CAUSES",
    "NO_FLOW",
    "POLICY_NAMES",
    "Bucket",
    "Concurrency",
    "Flow",
    "FlowPolicy",
    "Gate",
    "JobStates",
    "RateLimit",
    "Unique",
    "flow_key",
    "next_token",
]


class JobStates(enum.Flag):
    """Job states as a set, for :class:`Unique` (``JobStates.QUEUED | JobStates.RUNNING``)."""

    QUEUED = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()
    FAILED = enum.auto()
    CANCELLED = enum.auto()
    ENDED = FINISHED | FAILED | CANCELLED
    ANY = QUEUED | RUNNING | ENDED

    @property
    def request_states(self) -> frozenset[RequestState]:
        """The :class:`RequestState` values these stand for."""
        return frozenset(state for flag, state in _STATES.items() if flag in self)

    @classmethod
    def of(cls, states: frozenset[RequestState] | set[RequestState]) -> JobStates:
        """The flags of some request states."""
        flags = cls(0)
        for flag, state in _STATES.items():
            if state in states:
                flags |= flag
        return flags


_STATES = {
    JobStates.QUEUED: RequestState.CREATED,
    JobStates.RUNNING: RequestState.PENDING,
    JobStates.FINISHED: RequestState.FINISHED,
    JobStates.FAILED: RequestState.FAILED,
    JobStates.CANCELLED: RequestState.CANCELLED,
}


def _seconds(value: float | str | None, what: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


def _check_key(key: str, what: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what}: key must name a Request.data entry")


@dataclasses.dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` jobs of the type with the same ``key`` run at once, across all instances."""

    key: str
    limit: int = 1

    def __post_init__(self) -> None:
        _check_key(self.key, "concurrency")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError("concurrency: limit must be a whole number of at least 1")


@dataclasses.dataclass(frozen=True)
class RateLimit:
    """Starts of the type with the same ``key``: ``rate`` per ``per``, at most ``burst`` at once (a token bucket).

    ``per`` is seconds or a duration (``"1s"``, ``"1m"``); ``burst`` defaults to ``rate``
    (at least 1). The bucket is full when first used.
    """

    key: str
    rate: float
    per: float | str = 1.0
    burst: int | None = None

    def __post_init__(self) -> None:
        _check_key(self.key, "rate_limit")
        if isinstance(self.rate, bool) or not isinstance(self.rate, int | float) or self.rate <= 0:
            raise ValueError("rate_limit: rate must be a positive number")
        object.__setattr__(self, "per", _seconds(self.per, "rate_limit: per"))
        burst = self.burst if self.burst is not None else max(1, int(self.rate))
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError("rate_limit: burst must be a whole number of at least 1")
        object.__setattr__(self, "burst", burst)

    @property
    def per_second(self) -> float:
        """Tokens added per second."""
        assert isinstance(self.per, float)
        return self.rate / self.per


@dataclasses.dataclass(frozen=True)
class Unique:
    """A submit whose type and ``key`` match a job in ``states`` (or created within ``ttl``) answers that job.

    The answer has ``created = false``, as a resubmit of the same id has. Only the same
    principal's jobs match (each principal has its own ids, and its own unique keys).
    """

    key: str
    states: JobStates = JobStates.QUEUED | JobStates.RUNNING
    ttl: float | str | None = None

    def __post_init__(self) -> None:
        _check_key(self.key, "unique")
        if not isinstance(self.states, JobStates):
            raise ValueError("unique: states must be JobStates flags (JobStates.QUEUED | JobStates.RUNNING)")
        object.__setattr__(self, "ttl", _seconds(self.ttl, "unique: ttl"))
        if not self.states and self.ttl is None:
            raise ValueError("unique: give states, a ttl, or both")


def flow_key(request: Request, entry: str, *scope: str) -> str:
    """A policy key for ``request``: its type, ``scope``, and the value of data entry ``entry`` ("" if absent)."""
    return json.dumps([request.type, *scope, request.data.get(entry, "")], ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class FlowPolicy:
    """A job type's policies, as declared with ``@job(...)`` or in ``[jobs.TYPE]``."""

    concurrency: Concurrency | None = None
    rate_limit: RateLimit | None = None
    ordered_by: str | None = None
    unique: Unique | None = None

    def __post_init__(self) -> None:
        if self.ordered_by is not None:
            _check_key(self.ordered_by, "ordered_by")

    @property
    def empty(self) -> bool:
        """True when the type declares no policy."""
        return self == FlowPolicy()

    def flow(self, request: Request) -> Flow:
        """The policies of one request of the type, with its keys."""
        if self.empty:
            return NO_FLOW
        c, r, u = self.concurrency, self.rate_limit, self.unique
        return Flow(
            concurrency_key=flow_key(request, c.key) if c else None,
            concurrency_limit=c.limit if c else 0,
            rate_key=flow_key(request, r.key) if r else None,
            rate=r.per_second if r else 0.0,
            burst=int(r.burst or 1) if r else 0,
            ordered_key=flow_key(request, self.ordered_by) if self.ordered_by else None,
            # Per submitter: another principal's job neither answers nor blocks one's submit.
            unique_key=flow_key(request, u.key, request.creator) if u else None,
            unique_states=u.states.request_states if u else frozenset(),
            unique_ttl=float(u.ttl) if u and u.ttl is not None else None,
        )

    @classmethod
    def from_settings(cls, settings: Mapping[str, object], base: FlowPolicy | None = None) -> FlowPolicy:
        """``base`` with the policies a ``[jobs.TYPE]`` table sets replaced.

        The table may hold ``concurrency = {key, limit}``, ``rate_limit = {key, rate, per,
        burst}``, ``ordered_by = "key"`` and ``unique = {key, states, ttl}``, ``states`` a
        list of ``queued``, ``running``, ``finished``, ``failed``, ``cancelled``.

        Raises:
            ValueError: a setting is malformed.
        """
        policy = base or cls()
        changes: dict[str, object] = {}
        for name, value in settings.items():
            if name == "ordered_by":
                if not isinstance(value, str):
                    raise ValueError("ordered_by must name a data entry")
                changes[name] = value or None
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"{name} must be a table")
            fields = dict(value)
            try:
                if name == "concurrency":
                    changes[name] = Concurrency(**fields)
                elif name == "rate_limit":
                    changes[name] = RateLimit(**fields)
                elif name == "unique":
                    if "states" in fields:
                        fields["states"] = _parse_states(fields["states"])
                    changes[name] = Unique(**fields)
                else:
                    raise ValueError(f"unknown policy {name!r}")
            except TypeError as error:
                raise ValueError(f"{name}: {error}") from None
        return dataclasses.replace(policy, **changes)  # type: ignore[arg-type]


POLICY_NAMES = tuple(field.name for field in dataclasses.fields(FlowPolicy))
"""The policies of a type, as ``@job`` and a ``[jobs.TYPE]`` table name them."""

HELD_BACK_CAUSES = ("paused", "concurrency", "ordered", "rate_limit")
"""What holds a due queued job back (a paused queue, then what :meth:`Gate.hold` answers)."""


def _parse_states(value: object) -> JobStates:
    if not isinstance(value, list | tuple):
        raise ValueError('unique: states must be a list such as ["queued", "running"]')
    flags = JobStates(0)
    for name in value:
        try:
            flags |= JobStates[str(name).upper()]
        except KeyError:
            raise ValueError(f"unique: unknown state {name!r}") from None
    return flags


# -- admitting a claim ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A token bucket as stored: its tokens at ``update_time``."""

    tokens: float
    update_time: datetime

    def at(self, at: datetime, rate: float, burst: int) -> float:
        """Its tokens at ``at``: refilled at ``rate`` per second, never above ``burst``."""
        elapsed = max((at - self.update_time).total_seconds(), 0.0)
        return min(float(burst), self.tokens + elapsed * rate)


class Gate:
    """Decides, within one claim, which gated candidates start.

    A connector offers its candidates in claim order (priority, then submit order),
    each with what the store says of it now; the gate admits a candidate when every
    policy allows, counting what it already admitted in this claim. A connector asks
    the store again for candidates whose keys are not in :attr:`full_concurrency` /
    :attr:`full_rate` until it has enough or no candidate is left.

    Args:
        at: the store's time now (token buckets are measured on it).
    """

    def __init__(self, at: datetime) -> None:
        self.at = at
        self._running: dict[str, int] = {}
        self._tokens: dict[str, float] = {}
        self._ordered: set[str] = set()
        self.full_concurrency: set[str] = set()
        """Concurrency keys at their limit (the store need not offer them again)."""
        self.full_rate: set[str] = set()
        """Rate keys whose bucket is empty now."""
        self.buckets: dict[str, Bucket] = {}
        """The buckets this claim took tokens from, as they are to be stored."""

    def hold(self, flow: Flow, *, running: int = 0, bucket: Bucket | None = None, heads_key: bool = True) -> str | None:
        """What holds a job with ``flow`` back now (``ordered``, ``concurrency``, ``rate_limit``), or None.

        None admits the job: it is counted as started.

        Args:
            flow: the job's policies.
            running: jobs of its concurrency key running now (PENDING in the store).
            bucket: its rate key's stored bucket (None: never used, so full).
            heads_key: no earlier job of its ordered key is unfinished.
        """
        o, c, r = flow.ordered_key, flow.concurrency_key, flow.rate_key
        if o is not None and (not heads_key or o in self._ordered):
            return "ordered"  # one at a time, in submit order
        if c is not None and self._running.setdefault(c, running) >= flow.concurrency_limit:
            self.full_concurrency.add(c)
            return "concurrency"
        if r is not None:
            if r not in self._tokens:
                self._tokens[r] = bucket.at(self.at, flow.rate, flow.burst) if bucket else float(flow.burst)
            if self._tokens[r] < 1.0:
                self.full_rate.add(r)
                return "rate_limit"
            self._tokens[r] -= 1.0
            self.buckets[r] = Bucket(self._tokens[r], self.at)
            if self._tokens[r] < 1.0:
                self.full_rate.add(r)
        if c is not None:
            self._running[c] += 1
            if self._running[c] >= flow.concurrency_limit:
                self.full_concurrency.add(c)
        if o is not None:
            self._ordered.add(o)
        return None


def next_token(bucket: Bucket, rate: float) -> datetime:
    """When an empty ``bucket`` (fewer than one token) holds one token again."""
    return bucket.update_time + timedelta(seconds=max(1.0 - bucket.tokens, 0.0) / rate)
