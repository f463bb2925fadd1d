"""The one place that maps the contract's messages to the core model and back.

Nothing else in the project reads or builds ``ajs.v1`` messages field by field.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.longrunning import operations_proto_pb2
from google.protobuf import any_pb2, descriptor_pb2, duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from ajs_grpc.connectors.base import FeedItem, QueueInfo
from ajs_grpc.core.errors import (
    AjsError,
    Code,
    FieldViolation,
    InvalidArgument,
    JobSignal,
    PermanentError,
    QuotaViolation,
    ResourceExhausted,
    Retry,
    from_status,
)
from ajs_grpc.core.flow import Concurrency, FlowPolicy, JobStates, RateLimit, Unique
from ajs_grpc.core.jobs import JobPlugin, RetryPolicy, error_status
from ajs_grpc.core.model import ErrorStatus, Job, JobType, Progress, Request, RequestState, Response, RetrySchedule
from ajs_grpc.core.schedules import Catchup, Overlap, Schedule
from ajs_grpc.edge import dynamic
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb

__all__ = [
    "ERROR_DOMAIN",
    "OPERATION_PREFIX",
    "catchup_from_proto",
    "descriptor_set",
    "error_to_status",
    "field_violations",
    "job_from_proto",
    "job_to_proto",
    "job_type_from_plugin",
    "job_type_from_proto",
    "job_type_to_proto",
    "operation_from_job",
    "operation_name",
    "overlap_from_proto",
    "queue_from_proto",
    "queue_to_proto",
    "quota_violations",
    "request_from_proto",
    "request_to_proto",
    "response_from_proto",
    "response_to_proto",
    "schedule_from_proto",
    "schedule_to_proto",
    "state_from_proto",
    "status_from_proto",
    "status_to_proto",
]

# google.rpc.ErrorInfo.domain of every error the service returns.
ERROR_DOMAIN = "ajs.v1"


def _timestamp(at: datetime | None) -> timestamp_pb2.Timestamp | None:
    if at is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


timestamp = _timestamp
"""The wire form of a time (None stays None)."""


def _datetime(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def state_from_proto(value: int, field: str = "state") -> RequestState:
    """The model state for a wire value.

    Raises:
        InvalidArgument: ``value`` is no known state (proto3 enums are open).
    """
    try:
        return RequestState(value)
    except ValueError:
        raise InvalidArgument(
            f"unknown request state {value}",
            [FieldViolation(field, f"unknown request state {value}")],
            reason="INVALID_FIELDS",
        ) from None


def request_from_proto(message: pb.Request) -> Request:
    """A model Request from the wire; server-set fields are kept as sent."""
    return Request(
        id=message.id,
        type=message.type,
        data=dict(message.data),
        input=_copy_any(message.input) if message.HasField("input") else None,
        parent_id=message.parent_id,
        creator=message.creator,
        create_time=_datetime(message.create_time) if message.HasField("create_time") else None,
        priority=message.priority,
        run_after=_datetime(message.run_after) if message.HasField("run_after") else None,
        queue=message.queue,
        depends_on=tuple(message.depends_on),
        expire_time=_datetime(message.expire_time) if message.HasField("expire_time") else None,
        max_attempts=message.max_attempts,
        timeout=_seconds(message.timeout) if message.HasField("timeout") else None,
    )


def request_to_proto(request: Request, *, basic: bool = False) -> pb.Request:
    """The wire form of a Request; ``basic`` leaves its payloads (data, input) out."""
    return pb.Request(
        id=request.id,
        parent_id=request.parent_id,
        creator=request.creator,
        create_time=_timestamp(request.create_time),
        type=request.type,
        data=None if basic else request.data,
        input=None if basic else request.input,
        priority=request.priority,
        run_after=_timestamp(request.run_after),
        queue=request.queue,
        depends_on=request.depends_on,
        expire_time=_timestamp(request.expire_time),
        max_attempts=request.max_attempts,
        timeout=_duration(request.timeout) if request.timeout is not None else None,
    )


def _copy_any(message: any_pb2.Any) -> any_pb2.Any:
    copy = any_pb2.Any()
    copy.CopyFrom(message)
    return copy


def status_to_proto(error: ErrorStatus) -> status_pb2.Status:
    """A ``google.rpc.Status`` with an ``ErrorInfo`` detail for a model error."""
    status = status_pb2.Status(code=int(error.code), message=error.message)
    if error.reason:
        status.details.add().Pack(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
        )
    return status


def status_from_proto(status: status_pb2.Status) -> ErrorStatus:
    """The model error of a ``google.rpc.Status`` (its ErrorInfo, if any, included)."""
    reason, metadata = "", {}
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
            break
    try:
        code = Code(status.code)
    except ValueError:
        code = Code.UNKNOWN
    return ErrorStatus(code, status.message, reason=reason, metadata=metadata)


def attempt_error_to_proto(error: BaseException) -> status_pb2.Status:
    """The Status of a failed attempt (a remote worker's outcome): a Retry's delay as a RetryInfo detail."""
    status = status_to_proto(error_status(error))
    if isinstance(error, Retry) and error.delay is not None:
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=_duration(error.delay)))
    return status


def attempt_error_from_proto(status: status_pb2.Status, *, non_retryable: bool = False) -> AjsError:
    """Why a remote worker's attempt failed, as the retry policy judges it.

    ``non_retryable`` makes it a :class:`PermanentError`; a RetryInfo detail makes a
    retryable code a :class:`Retry` with that delay (a code no retry can fix stays as it is).

    Raises:
        ValueError: the status is OK, or a detail cannot be read.
    """
    model = status_from_proto(status)
    if model.code is Code.OK:
        raise ValueError("code: must not be OK (leave error unset for success)")
    message, reason = model.message or "the remote job failed", model.reason or "JOB_FAILED"
    error: AjsError = from_status(model.code, message, reason=reason, metadata=model.metadata)
    signal: JobSignal | None = None
    if non_retryable:
        signal = PermanentError(message, reason=reason, metadata=model.metadata)
    elif RetryPolicy().retries(error):
        for detail in status.details:
            retry_info = error_details_pb2.RetryInfo()
            if detail.Unpack(retry_info):  # the worker says when to run it again
                signal = Retry(message, delay=max(_seconds(retry_info.retry_delay), 0.0))
                signal.reason, signal.metadata = reason, dict(model.metadata)
    if signal is None:
        return error
    signal.code = model.code  # the worker's code, whatever the signal's class says
    return signal


def field_violations(status: status_pb2.Status) -> list[FieldViolation]:
    """The field violations in a status's ``BadRequest`` detail, if any."""
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            return [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    return []


def feed_item_to_proto(item: FeedItem, response: Response) -> pb.WatchJobsResponse:
    """A WatchJobs message: ``response`` (the item's, as its reader sees it) with its place and job."""
    return pb.WatchJobsResponse(
        response=response_to_proto(response), resume_token=item.token, type=item.type, queue=item.queue
    )


def response_to_proto(response: Response, *, basic: bool = False) -> pb.Response:
    """The wire form of a Response; ``basic`` leaves its payloads (data, output) out."""
    message = pb.Response(
        request_id=response.request_id,
        sequence=response.sequence,
        create_time=_timestamp(response.create_time),
        state=int(response.state),  # type: ignore[arg-type]
        is_final=response.is_final,
        data=None if basic else response.data,
        output=None if basic else response.output,
    )
    if response.progress is not None:
        message.progress.fraction = response.progress.fraction
        message.progress.message = response.progress.message
    if response.error is not None:
        message.error.CopyFrom(status_to_proto(response.error))
    return message


def response_from_proto(message: pb.Response) -> Response:
    """A model Response from the wire."""
    return Response(
        request_id=message.request_id,
        sequence=message.sequence,
        create_time=_datetime(message.create_time),
        state=RequestState(message.state),
        is_final=message.is_final,
        data=dict(message.data),
        output=_copy_any(message.output) if message.HasField("output") else None,
        progress=Progress(message.progress.fraction, message.progress.message)
        if message.HasField("progress")
        else None,
        error=status_from_proto(message.error) if message.HasField("error") else None,
    )


def job_to_proto(job: Job, view: int = pb.JOB_VIEW_FULL) -> pb.Job:
    """The wire form of a Job in ``view`` (an ``ajs.v1.JobView``; BASIC leaves the payloads out)."""
    basic = view == pb.JOB_VIEW_BASIC
    return pb.Job(
        request=request_to_proto(job.request, basic=basic),
        state=int(job.state),  # type: ignore[arg-type]
        attempt=job.attempt,
        last_response=response_to_proto(job.last_response, basic=basic),
        update_time=_timestamp(job.update_time),
        cancel_requested=job.cancel_requested,
        max_attempts=job.max_attempts,
        due_time=_timestamp(job.due_time),
    )


def job_from_proto(message: pb.Job) -> Job:
    """A model Job from the wire."""
    return Job(
        request=request_from_proto(message.request),
        state=RequestState(message.state),
        attempt=message.attempt,
        last_response=response_from_proto(message.last_response),
        update_time=_datetime(message.update_time),
        cancel_requested=message.cancel_requested,
        max_attempts=message.max_attempts,
        due_time=_datetime(message.due_time) if message.HasField("due_time") else None,
    )


# A status travels in trailers, and clients accept little there (gRPC's default: 8 KiB, 16 KiB at
# most): one that quotes a client's input whole reaches the client as RESOURCE_EXHAUSTED "Stream
# removed", its code and details lost. Each part is clipped (in UTF-8 bytes) to stay well below.
MAX_STATUS_MESSAGE_BYTES = 512
MAX_DETAIL_BYTES = 160
MAX_METADATA_BYTES = 1024
MAX_FIELD_VIOLATIONS = 10


def clip(text: str, limit: int) -> str:
    """``text``, cut to at most ``limit`` UTF-8 bytes (an ellipsis marks the cut)."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "\u2026"


def error_to_status(error: AjsError) -> status_pb2.Status:
    """The ``google.rpc.Status`` the service answers ``error`` with.

    It always carries an ``ErrorInfo`` (reason, domain, metadata; the reason is the
    code's name when the error has none), and a ``BadRequest`` listing the field
    violations of an :class:`~ajs_grpc.core.errors.InvalidArgument`. Every text is
    clipped, so that the status fits the trailers a client accepts.
    """
    metadata = {key: clip(value, MAX_METADATA_BYTES) for key, value in error.metadata.items()}
    message = clip(error.message, MAX_STATUS_MESSAGE_BYTES)
    status = status_to_proto(ErrorStatus(error.code, message, error.reason or error.code.name, metadata))
    if isinstance(error, InvalidArgument) and error.violations:
        bad_request = error_details_pb2.BadRequest()
        for violation in error.violations[:MAX_FIELD_VIOLATIONS]:
            bad_request.field_violations.add(
                field=clip(violation.field, MAX_DETAIL_BYTES), description=clip(violation.description, MAX_DETAIL_BYTES)
            )
        status.details.add().Pack(bad_request)
    if isinstance(error, ResourceExhausted) and error.violations:
        quota_failure = error_details_pb2.QuotaFailure()
        for quota in error.violations:
            quota_failure.violations.add(subject=quota.subject, description=quota.description)
        status.details.add().Pack(quota_failure)
    return status


def quota_violations(status: status_pb2.Status) -> list[QuotaViolation]:
    """The violations in a status's ``QuotaFailure`` detail, if any."""
    for detail in status.details:
        quota_failure = error_details_pb2.QuotaFailure()
        if detail.Unpack(quota_failure):
            return [QuotaViolation(v.subject, v.description) for v in quota_failure.violations]
    return []


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromTimedelta(timedelta(seconds=seconds))
    return value


duration = _duration
"""The wire form of seconds."""


def _seconds(value: duration_pb2.Duration) -> float:
    return value.ToTimedelta().total_seconds()


seconds = _seconds
"""Seconds of a wire duration."""


def descriptor_set(*messages: type[Message]) -> bytes:
    """A serialized FileDescriptorSet of the files defining ``messages`` and all their dependencies.

    Dependencies come before the files that import them, as protoc orders them.
    """
    files = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(file: Any) -> None:  # a FileDescriptor (upb's or the pure-Python one)
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            add(dependency)
        file.CopyToProto(files.file.add())

    for message in messages:
        add(message.DESCRIPTOR.file)
    return files.SerializeToString()


def job_type_from_plugin(plugin: JobPlugin, handler: str) -> JobType:
    """The model description of a job plugin, run by ``handler``."""
    policy = plugin.retry
    declared = [t for t in (plugin.input_type, plugin.output_type) if t is not None]
    return JobType(
        name=plugin.type,
        description=plugin.description,
        handler=handler,
        input_type=plugin.input_type.DESCRIPTOR.full_name if plugin.input_type else "",
        output_type=plugin.output_type.DESCRIPTOR.full_name if plugin.output_type else "",
        retry_policy=RetrySchedule(
            max_attempts=policy.max_attempts,
            initial_backoff=policy.initial_backoff,
            max_backoff=policy.max_backoff,
            multiplier=policy.multiplier,
            jitter=policy.jitter,
        ),
        timeout=plugin.timeout,
        file_descriptor_set=descriptor_set(*declared) if declared else b"",
        flow=plugin.flow,
        allow_failed_dependencies=bool(getattr(plugin, "allow_failed_dependencies", False)),
    )


def job_type_to_proto(job_type: JobType) -> pb.JobType:
    """The wire form of a JobType."""
    policy = job_type.retry_policy
    return pb.JobType(
        name=job_type.name,
        description=job_type.description,
        handler=job_type.handler,
        input_type=job_type.input_type,
        output_type=job_type.output_type,
        retry_policy=pb.RetryPolicy(
            max_attempts=policy.max_attempts,
            initial_backoff=_duration(policy.initial_backoff),
            max_backoff=_duration(policy.max_backoff),
            multiplier=policy.multiplier,
            jitter=policy.jitter,
        ),
        timeout=_duration(job_type.timeout) if job_type.timeout is not None else None,
        file_descriptor_set=job_type.file_descriptor_set,
        allow_failed_dependencies=job_type.allow_failed_dependencies,
        **_flow_to_proto(job_type.flow or FlowPolicy()),
    )


def _flow_to_proto(flow: FlowPolicy) -> dict[str, Any]:
    """The JobType fields of a type's flow policies (those it declares)."""
    fields: dict[str, Any] = {}
    if (c := flow.concurrency) is not None:
        fields["concurrency"] = pb.ConcurrencyPolicy(key=c.key, limit=c.limit)
    if (r := flow.rate_limit) is not None:
        assert isinstance(r.per, float)  # RateLimit keeps its period in seconds
        fields["rate_limit"] = pb.RateLimitPolicy(
            key=r.key, rate=r.rate, period=_duration(r.per), burst=int(r.burst or 1)
        )
    if flow.ordered_by:
        fields["ordered_by"] = flow.ordered_by
    if (u := flow.unique) is not None:
        assert not isinstance(u.ttl, str)  # Unique keeps its ttl in seconds
        fields["unique"] = pb.UniquePolicy(
            key=u.key,
            states=sorted(int(state) for state in u.states.request_states),  # type: ignore[misc]
            ttl=_duration(u.ttl) if u.ttl is not None else None,
        )
    return fields


_STATE_VALUES = frozenset(int(state) for state in RequestState)


def _flow_from_proto(message: pb.JobType) -> FlowPolicy:
    """The flow policies a wire JobType declares."""
    c, r, u = message.concurrency, message.rate_limit, message.unique
    return FlowPolicy(
        concurrency=Concurrency(c.key, c.limit) if message.HasField("concurrency") else None,
        rate_limit=RateLimit(r.key, r.rate, _seconds(r.period), r.burst or None)
        if message.HasField("rate_limit")
        else None,
        ordered_by=message.ordered_by or None,
        unique=Unique(
            u.key,
            JobStates.of({RequestState(state) for state in u.states if state in _STATE_VALUES}),
            _seconds(u.ttl) if u.HasField("ttl") else None,
        )
        if message.HasField("unique")
        else None,
    )


def job_type_from_proto(message: pb.JobType) -> JobType:
    """A model JobType from the wire."""
    policy = message.retry_policy
    return JobType(
        name=message.name,
        description=message.description,
        handler=message.handler,
        input_type=message.input_type,
        output_type=message.output_type,
        retry_policy=RetrySchedule(
            max_attempts=policy.max_attempts,
            initial_backoff=_seconds(policy.initial_backoff),
            max_backoff=_seconds(policy.max_backoff),
            multiplier=policy.multiplier,
            jitter=policy.jitter,
        ),
        timeout=_seconds(message.timeout) if message.HasField("timeout") else None,
        file_descriptor_set=message.file_descriptor_set,
        flow=_flow_from_proto(message),
        allow_failed_dependencies=message.allow_failed_dependencies,
    )


def plugin_from_job_type(message: pb.JobType, function: Callable[..., Any], handler: str) -> JobPlugin:
    """The job plugin of a type a remote worker declares: its contract and policies, run by ``handler``.

    An unset retry policy is the plugins' default (:class:`RetryPolicy`).

    Raises:
        ValueError: the declaration is not usable, with the field at fault first (``input_type: ...``).
    """
    try:
        declared = job_type_from_proto(message)
    except (TypeError, ValueError) as error:  # a flow policy out of range
        raise ValueError(f"flow policies: {error}") from None
    classes: dict[str, type[Message] | None] = {}
    for field in ("input_type", "output_type"):
        name = getattr(declared, field)
        if not name:
            classes[field] = None
            continue
        try:
            classes[field] = dynamic.message_class(declared.file_descriptor_set, name)
        except Exception as error:  # a set protobuf cannot load, or one without the message
            raise ValueError(f"{field}: {name!r} is not defined by file_descriptor_set ({error})") from None
    retry = RetryPolicy()
    if message.HasField("retry_policy"):
        schedule = declared.retry_policy
        try:
            retry = RetryPolicy(
                max_attempts=schedule.max_attempts or retry.max_attempts,
                initial_backoff=schedule.initial_backoff,
                max_backoff=schedule.max_backoff,
                multiplier=schedule.multiplier or 1.0,
                jitter=schedule.jitter,
            )
        except ValueError as error:
            raise ValueError(f"retry_policy: {error}") from None
    if declared.timeout is not None and declared.timeout <= 0:
        raise ValueError("timeout: must be positive")
    try:
        return JobPlugin(
            declared.name,
            function,
            declared.description,
            retry=retry,
            timeout=declared.timeout,
            input_type=classes["input_type"],
            output_type=classes["output_type"],
            handler=handler,
            flow=declared.flow or FlowPolicy(),
            allow_failed_dependencies=declared.allow_failed_dependencies,
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"flow policies: {error}") from None


def queue_to_proto(queue: QueueInfo) -> pb.Queue:
    """The wire form of a queue."""
    return pb.Queue(
        name=queue.name,
        queued_count=queue.queued,
        running_count=queue.running,
        paused=queue.paused,
        oldest_queued_time=_timestamp(queue.oldest_queued_time),
    )


def queue_from_proto(message: pb.Queue) -> QueueInfo:
    """A queue from the wire."""
    return QueueInfo(
        name=message.name,
        queued=message.queued_count,
        running=message.running_count,
        paused=message.paused,
        oldest_queued_time=_datetime(message.oldest_queued_time) if message.HasField("oldest_queued_time") else None,
    )


def overlap_from_proto(value: int, field: str = "schedule.overlap_policy") -> Overlap:
    """The model overlap policy of a wire value (unspecified: SKIP).

    Raises:
        InvalidArgument: ``value`` is no known policy.
    """
    return _policy_from_proto(Overlap, Overlap.SKIP, value, field, "overlap policy")


def catchup_from_proto(value: int, field: str = "schedule.catchup_policy") -> Catchup:
    """The model catch-up policy of a wire value (unspecified: SKIP).

    Raises:
        InvalidArgument: ``value`` is no known policy.
    """
    return _policy_from_proto(Catchup, Catchup.SKIP, value, field, "catch-up policy")


_Policy = TypeVar("_Policy", Overlap, Catchup)


def _policy_from_proto(policy: type[_Policy], unspecified: _Policy, value: int, field: str, what: str) -> _Policy:
    """A schedule policy of a wire value; the wire's 0 (UNSPECIFIED) is ``unspecified``, the rest the same numbers."""
    if value == 0:
        return unspecified
    try:
        return policy(value)
    except ValueError:
        raise InvalidArgument(
            f"unknown {what} {value}", [FieldViolation(field, f"unknown {what} {value}")], reason="INVALID_FIELDS"
        ) from None


def schedule_to_proto(schedule: Schedule, next_run_time: datetime | None = None) -> pb.Schedule:
    """The wire form of a schedule; ``next_run_time`` is the server's reckoning of its next occurrence."""
    return pb.Schedule(
        id=schedule.id,
        cron=schedule.cron,
        time_zone=schedule.time_zone,
        template=request_to_proto(schedule.template),
        overlap_policy=int(schedule.overlap),  # type: ignore[arg-type]
        catchup_policy=int(schedule.catchup),  # type: ignore[arg-type]
        paused=schedule.paused,
        creator=schedule.creator,
        create_time=_timestamp(schedule.create_time),
        update_time=_timestamp(schedule.update_time),
        last_run_time=_timestamp(schedule.last_time),
        last_job_id=schedule.last_job_id,
        next_run_time=_timestamp(next_run_time),
    )


def schedule_from_proto(message: pb.Schedule) -> tuple[Schedule, datetime | None]:
    """A model schedule from the wire, and its ``next_run_time`` (None when unset).

    Raises:
        InvalidArgument: an unknown overlap or catch-up policy.
    """

    def time(name: str) -> datetime | None:
        return _datetime(getattr(message, name)) if message.HasField(name) else None  # type: ignore[arg-type]

    template = request_from_proto(message.template)
    schedule = Schedule(
        id=message.id,
        cron=message.cron,
        template=template,
        time_zone=message.time_zone or "UTC",
        overlap=overlap_from_proto(message.overlap_policy),
        catchup=catchup_from_proto(message.catchup_policy),
        paused=message.paused,
        creator=message.creator,
        create_time=time("create_time"),
        update_time=time("update_time"),
        last_time=time("last_run_time"),
        last_job_id=message.last_job_id,
    )
    return schedule, time("next_run_time")


# -- google.longrunning: a job as an Operation ------------------------------------------------

# Operation.name of a job: this prefix, then the request id (as the caller names it).
OPERATION_PREFIX = "operations/"


def operation_name(request_id: str) -> str:
    """The ``google.longrunning.Operation.name`` of a request id."""
    return OPERATION_PREFIX + request_id


def operation_from_job(job: pb.Job) -> operations_proto_pb2.Operation:
    """The ``google.longrunning.Operation`` of a wire Job (its ids as the caller names them).

    ``metadata`` is the Job; ``done`` is true once it ended. A FINISHED job's ``response``
    is its typed output when it has one, else its final Response; a FAILED or CANCELLED
    job's ``error`` is the final Response's status. The payloads ``response`` carries are
    left out of ``metadata.last_response``, so that an Operation is no larger than its Job.
    """
    operation = operations_proto_pb2.Operation(name=operation_name(job.request.id))
    state = RequestState(job.state) if job.state in _STATE_VALUES else RequestState.UNSPECIFIED
    operation.done = state.is_final
    shown = pb.Job()
    shown.CopyFrom(job)
    final = shown.last_response
    if state is RequestState.FINISHED:
        if final.HasField("output"):
            operation.response.CopyFrom(final.output)
            final.ClearField("output")
        else:
            operation.response.Pack(job.last_response)
            final.ClearField("output")
            final.ClearField("data")
    elif state.is_final:
        if final.HasField("error"):
            operation.error.CopyFrom(final.error)
        else:  # every stored FAILED or CANCELLED Response has an error; this is a safety net
            code = Code.CANCELLED if state is RequestState.CANCELLED else Code.UNKNOWN
            operation.error.CopyFrom(status_pb2.Status(code=int(code), message=f"the job ended {state.name}"))
    operation.metadata.Pack(shown)
    return operation
