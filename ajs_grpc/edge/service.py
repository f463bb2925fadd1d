"""The JobService servicer: what each rpc does, over the connector.

The concerns around it live beside it: input checks in :mod:`~ajs_grpc.edge.validation`,
sizes and quotas in :mod:`~ajs_grpc.edge.limits`, page tokens in
:mod:`~ajs_grpc.edge.paging`, who sees which job in :mod:`~ajs_grpc.edge.ownership`,
and authentication, decoding, error-to-status, metrics, request-id logging and
the stream watchdog in :mod:`~ajs_grpc.edge.pipeline`, which serves every rpc of
the contract's service descriptor with the method of the same name here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from collections.abc import Set as AbstractSet
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from ajs_grpc.connectors.base import Connector, JobFilter, dependency_not_found
from ajs_grpc.core.errors import (
    AjsError,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    NotFound,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    Unavailable,
)
from ajs_grpc.core.logs import current_request_id
from ajs_grpc.core.model import Job, Request, RequestState, now
from ajs_grpc.core.schedules import Schedule
from ajs_grpc.edge import convert, paging
from ajs_grpc.edge.auth import Authenticator, Principal
from ajs_grpc.edge.limits import COUNT_TTL, Admission, Limits, WatchSlots
from ajs_grpc.edge.ownership import Ownership
from ajs_grpc.edge.pipeline import Caller, NoObserver, Pipeline, ServiceObserver
from ajs_grpc.edge.validation import (
    MAX_SEQUENCE,
    MAX_TOKEN_LENGTH,
    at_index,
    check_filter_values,
    check_id,
    check_type,
    invalid,
    queue_name,
    required_id,
    validate_request,
    validate_schedule,
    view,
)
from ajs_grpc.engine.handlers.base import HandlerChain
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb

__all__ = ["SERVICE", "SERVICE_NAME", "Caller", "JobService", "Limits", "ServiceObserver"]

log = logging.getLogger(__name__)

_Item = TypeVar("_Item", bound=Message)

SERVICE = pb.DESCRIPTOR.services_by_name["JobService"]
SERVICE_NAME = SERVICE.full_name
# How many known types an unsupported-type error lists in its metadata.
KNOWN_TYPES_LISTED = 50


class JobService:
    """Implements ``ajs.v1.JobService`` over a connector.

    Args:
        connector: the queue.
        chain: the handler chain, which knows each type's plugin and its contract.
        limits: what a client may ask.
        authenticator: checks each call's credentials; None lets everyone do everything.
        observer: told of submits and calls (metrics).
        accept_unknown_types: queue types no handler here runs (a frontend, whose
            workers may run more types than it knows).
        max_reply_bytes: the largest reply (a page of ListJobs ends early before it).
        count_ttl: seconds a count of queued jobs (for the queue-depth limit and the
            quotas) is trusted before it is read again.
        schedules_changed: called after a schedule is created or resumed, so that this
            instance's scheduler looks at it now rather than at its next poll.
        max_stream_age: seconds after which WatchJob and WatchJobs streams end UNAVAILABLE
            (``STREAM_RENEWED``) for their clients to resume them; None: never.
    """

    def __init__(
        self,
        connector: Connector,
        chain: HandlerChain,
        limits: Limits | None = None,
        authenticator: Authenticator | None = None,
        observer: ServiceObserver | None = None,
        *,
        accept_unknown_types: bool = False,
        max_reply_bytes: int = 4 * 1024 * 1024,
        count_ttl: float = COUNT_TTL,
        schedules_changed: Callable[[], None] | None = None,
        max_stream_age: float | None = None,
    ) -> None:
        self.connector = connector
        self.chain = chain
        self.limits = limits or Limits()
        self.observer = observer or NoObserver()
        self.accept_unknown_types = accept_unknown_types
        self.max_reply_bytes = max_reply_bytes
        self.accepting = True
        """False once the server drains: submits are then UNAVAILABLE."""
        self.ownership = Ownership(connector)
        self.admission = Admission(connector, count_ttl)
        self.slots = WatchSlots()
        self.pipeline = Pipeline(
            authenticator, self.observer, lambda: self.limits.watch_send_timeout, lambda: max_stream_age
        )
        self.schedules_changed = schedules_changed

    @property
    def watches(self) -> dict[str, int]:
        """Open WatchJob streams per principal (without authentication: per client address)."""
        return self.slots.open

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """The generic handler that serves this service on a ``grpc.aio`` server."""
        return self.pipeline.handler(SERVICE, self)

    # -- the rpcs (named after the contract's: SubmitRequest -> submit_request) --------------

    async def submit_request(self, message: pb.SubmitRequestRequest, caller: Caller) -> pb.SubmitRequestResponse:
        """Validates and enqueues a request (idempotent on its id)."""
        principal = caller.principal
        self._check_accepting()
        request = await self._prepare(message, principal, frozenset(), frozenset(), set())
        await self.admission.admit(principal, self.limits)
        try:
            submit = self.chain.submit(request)
            job, created = await self.connector.enqueue(
                submit.request,
                submit.max_attempts,
                submit.flow,
                allow_failed_dependencies=submit.allow_failed_dependencies,
            )
        except AlreadyExists as error:
            raise await self._taken_or(error, principal, request) from None
        return await self._submitted(principal, request, job, created)

    async def batch_submit_requests(
        self, message: pb.BatchSubmitRequestsRequest, caller: Caller
    ) -> pb.BatchSubmitRequestsResponse:
        """Validates and enqueues several requests atomically (AIP-233): all or none."""
        principal = caller.principal
        self._check_accepting()
        limit = self.limits.max_batch_requests
        if len(message.requests) > limit:
            raise invalid([FieldViolation("requests", f"has {len(message.requests)} requests, more than {limit}")])
        requests: list[Request] = []
        named: set[str] = set()
        # Dependencies may name any request of the batch, before or after the one depending.
        everyone = frozenset(principal.qualify(item.request.id) for item in message.requests if item.request.id)
        visible: set[str] = set()
        for index, item in enumerate(message.requests):
            try:
                request = await self._prepare(item, principal, named, everyone, visible)
            except AjsError as error:
                raise at_index(index, error) from None
            named.add(request.id)
            requests.append(request)
        if not requests:
            return pb.BatchSubmitRequestsResponse()
        await self.admission.admit(principal, self.limits, len(requests))
        submits = [self.chain.submit(request) for request in requests]
        try:
            results = await self.connector.enqueue_many(submits)
        except AjsError as error:
            if "index" not in error.metadata:  # the store failed the batch as a whole
                raise
            index = int(error.metadata["index"])
            if isinstance(error, AlreadyExists):
                error = await self._taken_or(error, principal, requests[index])
            raise at_index(index, error) from None
        replies = []
        for index, (request, (job, created)) in enumerate(zip(requests, results, strict=True)):
            try:
                replies.append(await self._submitted(principal, request, job, created))
            except AjsError as error:
                raise at_index(index, error) from None
        return pb.BatchSubmitRequestsResponse(responses=replies)

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise _draining("submit to another instance")

    async def _prepare(
        self,
        message: pb.SubmitRequestRequest,
        principal: Principal,
        batch: AbstractSet[str],
        everyone: AbstractSet[str],
        visible: set[str],
    ) -> Request:
        """The request to store for a submit, checked: fields, namespace, type, input, quotas, parent, dependencies.

        Args:
            message: the submit.
            principal: the caller.
            batch: stored ids submitted earlier in the same batch (a parent may be one).
            everyone: the stored ids of the whole batch (a dependency may be any).
            visible: stored ids already found visible to the caller in this call (added to).
        """
        if not message.HasField("request"):
            raise invalid([FieldViolation("request", "is required")])
        request = validate_request(message.request, self.limits)
        stored_id = principal.qualify(request.id)
        if not principal.admin and not principal.owns_name(stored_id):
            raise invalid([FieldViolation("request.id", "names another principal's namespace ('~name/...')")])
        request = dataclasses.replace(
            request,
            id=stored_id,
            parent_id=principal.qualify(request.parent_id),
            depends_on=tuple(principal.qualify(dependency) for dependency in request.depends_on),
            creator=principal.name,
        )
        if stored_id in request.depends_on:  # "x" and "~alice/x" name the same request
            raise invalid([FieldViolation("request.depends_on", "a request cannot depend on itself")])
        current_request_id.set(request.id)
        self._check_submittable(principal, request)
        if request.parent_id and request.parent_id not in batch:  # children go only under one's own jobs
            try:
                await self.ownership.visible_job(principal, request.parent_id)
            except NotFound:
                raise NotFound(
                    f"parent request {message.request.parent_id!r} does not exist",
                    reason="PARENT_NOT_FOUND",
                    metadata={"parent_id": message.request.parent_id},
                ) from None
        for given, dependency in zip(message.request.depends_on, request.depends_on, strict=True):
            if dependency in everyone or dependency in visible:
                continue
            try:  # one waits only on one's own jobs (a job one may not see is answered as an unknown one)
                await self.ownership.visible_job(principal, dependency)
            except NotFound:
                raise dependency_not_found(given) from None
            visible.add(dependency)
        return request

    def _check_submittable(self, principal: Principal, request: Request) -> None:
        """Refuses a request (or a schedule's template) the caller may not submit, or this server not take.

        The type must be allowed to the caller and run here (unless this instance cannot
        know), the typed input must fit and decode, and the quotas per request must hold.
        """
        if principal.types is not None and request.type not in principal.types and not principal.admin:
            log.warning("denied %s a submit of type %s", principal.name, request.type)
            raise PermissionDenied(
                f"{principal.name} may not submit requests of type {request.type!r}",
                reason="TYPE_NOT_ALLOWED",
                metadata={"type": request.type},
            )
        self._check_type_supported(request.type)
        self.admission.check_input_size(request, self.limits)
        plugin = self.chain.plugin_for(request.type)
        if plugin is not None:  # a type only workers know is checked when it runs
            plugin.decode_input(request.input)
        self.admission.check_request_quotas(principal, request, self.limits)

    async def _taken_or(self, error: AlreadyExists, principal: Principal, request: Request) -> AlreadyExists:
        """``error`` for the owner of the stored job; the same answer whatever another's job holds."""
        if principal.admin or await self.ownership.owns(principal, await self.connector.get(request.id)):
            return error
        return self._taken(principal, request)

    @staticmethod
    def _taken(principal: Principal, request: Request) -> AlreadyExists:
        return AlreadyExists(f"request id {principal.unqualify(request.id)!r} is taken", reason="REQUEST_ID_TAKEN")

    async def _submitted(
        self, principal: Principal, request: Request, job: Job, created: bool
    ) -> pb.SubmitRequestResponse:
        """The reply to one submit, once stored (another's job with the same id is not shown)."""
        if not created and not await self.ownership.owns(principal, job):
            raise self._taken(principal, request)
        if created:
            self.observer.submitted_type(request.type)
            log.debug("queued request %s of type %s", job.request.id, job.request.type)
        return pb.SubmitRequestResponse(
            job=convert.job_to_proto(self.ownership.as_seen_by(principal, job)), created=created
        )

    def _check_type_supported(self, request_type: str) -> None:
        """Refuses a type no handler here runs, unless this instance cannot know (a frontend)."""
        if self.accept_unknown_types or self.chain.plugin_for(request_type) is not None:
            return
        known = sorted(name for name, _ in self.chain.types)
        listed = ",".join(known[:KNOWN_TYPES_LISTED]) + (",..." if len(known) > KNOWN_TYPES_LISTED else "")
        raise FailedPrecondition(
            f"no handler here runs requests of type {request_type!r}; the known types are listed in the "
            "error's metadata (ajs types)",
            reason="TYPE_NOT_SUPPORTED",
            metadata={"type": request_type, "known_types": listed},
        )

    async def list_job_types(self, message: pb.ListJobTypesRequest, caller: Caller) -> pb.ListJobTypesResponse:
        """Describes every runnable job type with its typed contract."""
        types = [
            convert.job_type_to_proto(convert.job_type_from_plugin(plugin, handler.name))
            for name, handler in sorted(self.chain.types, key=lambda pair: pair[0])
            if (plugin := handler.plugin(name)) is not None
        ]
        return pb.ListJobTypesResponse(job_types=types)

    async def watch_job(self, message: pb.WatchJobRequest, caller: Caller) -> AsyncIterator[pb.WatchJobResponse]:
        """Streams a request's Responses after ``after_sequence``, ending after the final one."""
        principal = caller.principal
        request_id = principal.qualify(required_id(message.request_id))
        if message.after_sequence > MAX_SEQUENCE:
            raise invalid([FieldViolation("after_sequence", f"must be at most {MAX_SEQUENCE}")])
        await self.ownership.visible_job(principal, request_id)
        with self.slots.hold(caller.watch_key, self.limits):
            async for response in self.connector.watch(request_id, message.after_sequence):
                response = self.ownership.response_as_seen_by(principal, response)
                yield pb.WatchJobResponse(response=convert.response_to_proto(response))

    async def watch_jobs(self, message: pb.WatchJobsRequest, caller: Caller) -> AsyncIterator[pb.WatchJobsResponse]:
        """Streams the Responses of the matching jobs as they are stored, after a bookmark (never ends)."""
        principal = caller.principal
        violations: list[FieldViolation] = []
        if len(message.after_token) > MAX_TOKEN_LENGTH:
            violations.append(FieldViolation("after_token", f"must be at most {MAX_TOKEN_LENGTH} characters"))
        job_filter = await self._job_filter(principal, message, violations)
        resume = "resume with your last resume_token on another instance"
        if not self.accepting:
            raise _draining(resume)
        with self.slots.hold(caller.watch_key, self.limits):
            async for event in self.connector.watch_jobs(job_filter, message.after_token):
                if isinstance(event, str):
                    yield pb.WatchJobsResponse(resume_token=event)
                else:
                    yield convert.feed_item_to_proto(
                        event, self.ownership.response_as_seen_by(principal, event.response)
                    )
        raise _draining(resume)  # the feeds end only when the server drains

    async def get_job(self, message: pb.GetJobRequest, caller: Caller) -> pb.GetJobResponse:
        """Returns one job (FULL unless asked for BASIC)."""
        principal = caller.principal
        job_view = view(message.view, pb.JOB_VIEW_FULL)
        job = await self.ownership.visible_job(principal, principal.qualify(required_id(message.request_id)))
        return pb.GetJobResponse(job=convert.job_to_proto(self.ownership.as_seen_by(principal, job), job_view))

    async def list_jobs(self, message: pb.ListJobsRequest, caller: Caller) -> pb.ListJobsResponse:
        """Returns a page of jobs in submit order (only the caller's own, unless an admin)."""
        jobs, next_page_token = await self.list_page(message, caller, lambda job: job)
        return pb.ListJobsResponse(jobs=jobs, next_page_token=next_page_token)

    async def list_page(
        self, message: pb.ListJobsRequest, caller: Caller, shown: Callable[[pb.Job], _Item]
    ) -> tuple[list[_Item], str]:
        """A page of ListJobs and the next page's token ("" on the last page).

        Each job is as ``shown`` makes it (an Operation, for the Operations facade), and the
        page is cut to fit a reply in that form.
        """
        principal = caller.principal
        violations: list[FieldViolation] = []
        if message.page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative"))
        job_filter = await self._job_filter(principal, message, violations)
        job_view = view(message.view, pb.JOB_VIEW_BASIC)
        newest_first = paging.newest_first(message.order_by)
        after = paging.decode_page_token(message.page_token, job_filter, newest_first) if message.page_token else 0
        size = paging.page_size(message.page_size)
        page = await self.connector.list_jobs(job_filter, size, after, newest_first=newest_first)
        items = [shown(convert.job_to_proto(self.ownership.as_seen_by(principal, job), job_view)) for job in page.jobs]
        kept, next_cursor = paging.fit_page(items, page.cursors, page.next_cursor, self.max_reply_bytes)
        if next_cursor is None:
            return kept, ""
        return kept, paging.encode_page_token(next_cursor, job_filter, newest_first)

    async def _job_filter(
        self, principal: Principal, message: pb.ListJobsRequest | pb.WatchJobsRequest, violations: list[FieldViolation]
    ) -> JobFilter:
        """The filter of a ListJobs or WatchJobs call, checked (with ``violations`` found before), as the caller sees.

        Raises:
            InvalidArgument: any violation.
        """
        queues = list(message.queues) if isinstance(message, pb.WatchJobsRequest) else []
        check_filter_values(message.states, "states", violations)
        check_filter_values(message.types, "types", violations, check_type)
        check_filter_values(queues, "queues", violations, check_type)  # (queue names are named as types are)
        check_id(message.parent_id, "parent_id", violations, required=False)
        if violations:
            raise invalid(violations)
        states = frozenset(convert.state_from_proto(value, "states") for value in message.states)
        if RequestState.UNSPECIFIED in states:
            raise invalid([FieldViolation("states", "REQUEST_STATE_UNSPECIFIED is no state a job can be in")])
        parent_id = principal.qualify(message.parent_id)
        return JobFilter(
            states=states,
            types=frozenset(message.types),
            queues=frozenset(queues),
            parent_id=parent_id,
            creator=await self._listed_creator(principal, parent_id),
        )

    async def _listed_creator(self, principal: Principal, parent_id: str) -> str:
        """Whose jobs a ListJobs call lists: the caller's own, all of an owned parent's, or (admins) all."""
        if principal.admin:
            return ""
        # Children of one's own job are one's own too, whoever submitted them. A parent
        # one may not see lists like an unknown one: only one's own jobs (none).
        if parent_id:
            try:
                parent = await self.connector.get(parent_id)
            except NotFound:
                return principal.name
            if await self.ownership.owns(principal, parent):
                return ""
        return principal.name

    async def cancel_job(self, message: pb.CancelJobRequest, caller: Caller) -> pb.CancelJobResponse:
        """Cancels a queued job, or signals a running one."""
        principal = caller.principal
        request_id = principal.qualify(required_id(message.request_id))
        await self.ownership.visible_job(principal, request_id)
        job = await self.connector.cancel(request_id)
        log.debug("cancel of request %s: now %s", job.request.id, job.state.name)
        return pb.CancelJobResponse(job=convert.job_to_proto(self.ownership.as_seen_by(principal, job)))

    async def retry_job(self, message: pb.RetryJobRequest, caller: Caller) -> pb.RetryJobResponse:
        """Queues an ended FAILED or CANCELLED job again, by hand (same id; its Responses go on)."""
        principal = caller.principal
        request_id = principal.qualify(required_id(message.request_id))
        await self.ownership.visible_job(principal, request_id)
        job = await self.connector.retry(request_id)
        log.info("%s retried request %s by hand", principal.name, request_id)
        return pb.RetryJobResponse(job=convert.job_to_proto(self.ownership.as_seen_by(principal, job)))

    async def delete_job(self, message: pb.DeleteJobRequest, caller: Caller) -> pb.DeleteJobResponse:
        """Deletes an ended job, its Responses and its descendants (all ended)."""
        principal = caller.principal
        request_id = principal.qualify(required_id(message.request_id))
        await self.ownership.visible_job(principal, request_id)
        deleted = await self.connector.delete(request_id)
        log.info("%s deleted request %s (%d job(s) with its descendants)", principal.name, request_id, deleted)
        return pb.DeleteJobResponse(deleted_count=deleted)

    # -- schedules (each principal's own, in its namespace; admins see all) -------------------

    async def create_schedule(self, message: pb.CreateScheduleRequest, caller: Caller) -> pb.CreateScheduleResponse:
        """Creates a schedule; the same definition again answers the stored one."""
        principal = caller.principal
        if not message.HasField("schedule"):
            raise invalid([FieldViolation("schedule", "is required")])
        schedule = validate_schedule(message.schedule, self.limits)
        stored_id = principal.qualify(schedule.id)
        if not principal.admin and not principal.owns_name(stored_id):
            raise invalid([FieldViolation("schedule.id", "names another principal's namespace ('~name/...')")])
        # Its jobs are submitted as its creator (Schedule.request_for); the template names nobody.
        schedule = dataclasses.replace(schedule, id=stored_id, creator=principal.name)
        self._check_submittable(principal, schedule.template)
        await self._check_schedules_quota(principal, stored_id)
        stored, created = await self.connector.create_schedule(schedule)
        if created:
            log.info("%s created schedule %s (%s in %s)", principal.name, stored.id, stored.cron, stored.time_zone)
            self._schedules_changed()
        return pb.CreateScheduleResponse(schedule=self._schedule_as_seen_by(principal, stored))

    async def _check_schedules_quota(self, principal: Principal, schedule_id: str) -> None:
        """Refuses a non-admin's new schedule beyond ``limits.max_schedules_per_principal``.

        Each schedule submits jobs on its own, past the queued-jobs quota's check at submit:
        the number of them is what bounds a principal's scheduled work.
        """
        limit = self.limits.max_schedules_per_principal
        if principal.admin or not limit:
            return
        owned = await self.connector.list_schedules(creator=principal.name, limit=limit)
        if len(owned) < limit or any(schedule.id == schedule_id for schedule in owned):
            return
        raise ResourceExhausted(
            f"{principal.name} has {len(owned)} schedules, its quota is {limit}; delete one first",
            [QuotaViolation(f"principal:{principal.name}", f"at most {limit} schedules")],
            reason="SCHEDULES_QUOTA",
            metadata={"limit": str(limit)},
        )

    async def get_schedule(self, message: pb.GetScheduleRequest, caller: Caller) -> pb.GetScheduleResponse:
        """Returns one of the caller's schedules (any, for an admin)."""
        principal = caller.principal
        schedule = await self.ownership.visible_schedule(principal, principal.qualify(required_id(message.id, "id")))
        return pb.GetScheduleResponse(schedule=self._schedule_as_seen_by(principal, schedule))

    async def list_schedules(self, message: pb.ListSchedulesRequest, caller: Caller) -> pb.ListSchedulesResponse:
        """Returns a page of the caller's schedules (all, for an admin), by id."""
        principal = caller.principal
        if message.page_size < 0:
            raise invalid([FieldViolation("page_size", "must not be negative")])
        creator = "" if principal.admin else principal.name
        after = paging.decode_key_token(message.page_token, creator) if message.page_token else ""
        size = paging.page_size(message.page_size)
        found = await self.connector.list_schedules(creator=creator, after=after, limit=size + 1)
        page = found[:size]
        reply = pb.ListSchedulesResponse(
            schedules=[self._schedule_as_seen_by(principal, schedule) for schedule in page]
        )
        if len(found) > size:
            reply.next_page_token = paging.encode_key_token(page[-1].id, creator)
        return reply

    async def delete_schedule(self, message: pb.DeleteScheduleRequest, caller: Caller) -> pb.DeleteScheduleResponse:
        """Deletes a schedule; the jobs it submitted stay."""
        principal = caller.principal
        schedule = await self.ownership.visible_schedule(principal, principal.qualify(required_id(message.id, "id")))
        await self.connector.delete_schedule(schedule.id)
        log.info("%s deleted schedule %s", principal.name, schedule.id)
        return pb.DeleteScheduleResponse()

    async def pause_schedule(self, message: pb.PauseScheduleRequest, caller: Caller) -> pb.PauseScheduleResponse:
        """Pauses a schedule: no occurrence is submitted until it is resumed."""
        principal = caller.principal
        schedule = await self.ownership.visible_schedule(principal, principal.qualify(required_id(message.id, "id")))
        paused = await self.connector.pause_schedule(schedule.id, True)
        log.info("%s paused schedule %s", principal.name, schedule.id)
        return pb.PauseScheduleResponse(schedule=self._schedule_as_seen_by(principal, paused))

    async def resume_schedule(self, message: pb.ResumeScheduleRequest, caller: Caller) -> pb.ResumeScheduleResponse:
        """Resumes a paused schedule from now (occurrences passed while paused are skipped)."""
        principal = caller.principal
        schedule = await self.ownership.visible_schedule(principal, principal.qualify(required_id(message.id, "id")))
        resumed = await self.connector.pause_schedule(schedule.id, False)
        log.info("%s resumed schedule %s", principal.name, schedule.id)
        self._schedules_changed()
        return pb.ResumeScheduleResponse(schedule=self._schedule_as_seen_by(principal, resumed))

    def _schedule_as_seen_by(self, principal: Principal, schedule: Schedule) -> pb.Schedule:
        """The wire form of ``schedule`` in the caller's names, with its next occurrence reckoned now."""
        next_run = None if schedule.paused else schedule.next_time(now())
        return convert.schedule_to_proto(self.ownership.schedule_as_seen_by(principal, schedule), next_run)

    def _schedules_changed(self) -> None:
        if self.schedules_changed is not None:
            self.schedules_changed()

    # -- queues (admins only: a queue's counts cover every principal's jobs) -------------------

    async def list_queues(self, message: pb.ListQueuesRequest, caller: Caller) -> pb.ListQueuesResponse:
        """Lists every queue with unfinished jobs or paused, with its counts."""
        self._check_admin(caller.principal, "list the queues")
        queues = await self.connector.list_queues()
        return pb.ListQueuesResponse(queues=[convert.queue_to_proto(queue) for queue in queues])

    async def pause_queue(self, message: pb.PauseQueueRequest, caller: Caller) -> pb.PauseQueueResponse:
        """Pauses a queue: its jobs are accepted but none starts until it is resumed."""
        self._check_admin(caller.principal, "pause a queue")
        name = queue_name(message.name)
        queue = await self.connector.set_paused(name, True)
        log.info("%s paused queue %s", caller.principal.name, name)
        return pb.PauseQueueResponse(queue=convert.queue_to_proto(queue))

    async def resume_queue(self, message: pb.ResumeQueueRequest, caller: Caller) -> pb.ResumeQueueResponse:
        """Resumes a paused queue: its jobs may start again."""
        self._check_admin(caller.principal, "resume a queue")
        name = queue_name(message.name)
        queue = await self.connector.set_paused(name, False)
        log.info("%s resumed queue %s", caller.principal.name, name)
        return pb.ResumeQueueResponse(queue=convert.queue_to_proto(queue))

    @staticmethod
    def _check_admin(principal: Principal, what: str) -> None:
        if not principal.admin:
            log.warning("denied %s: it may not %s", principal.name, what)
            raise PermissionDenied(f"{principal.name} may not {what}: that takes the admin role", reason="NOT_ADMIN")


def _draining(advice: str) -> Unavailable:
    """The error of a call the draining server no longer takes, with where to go instead."""
    return Unavailable(f"the server is shutting down; {advice}", reason="DRAINING")
