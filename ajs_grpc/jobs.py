"""The job plugin API (public path): ``@job``, JobContext, Retry, RetryPolicy, the flow policies ...

It lives in :mod:`ajs_grpc.core.jobs`; this module is the stable import path for plugins.
"""

from ajs_grpc.core.jobs import (
    NO_RETRY,
    CancelSignal,
    Concurrency,
    FlowPolicy,
    JobCancelled,
    JobContext,
    JobPlugin,
    JobReturn,
    JobStates,
    JobTimeout,
    PermanentError,
    RateLimit,
    Result,
    Retry,
    RetryPolicy,
    SyncJobContext,
    Unique,
    failure,
    job,
    to_update,
)

__all__ = [
    "NO_RETRY",
    "CancelSignal",
    "Concurrency",
    "FlowPolicy",
    "JobCancelled",
    "JobContext",
    "JobPlugin",
    "JobReturn",
    "JobStates",
    "JobTimeout",
    "PermanentError",
    "RateLimit",
    "Result",
    "Retry",
    "RetryPolicy",
    "SyncJobContext",
    "Unique",
    "failure",
    "job",
    "to_update",
]
