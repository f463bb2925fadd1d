"""The job plugin API (public path): ``@job``, JobContext, Retry, RetryPolicy ...

It lives in :mod:`ajs_grpc.core.jobs`; this module is the stable import path for plugins.
"""

from ajs_grpc.core.jobs import (
    NO_RETRY,
    CancelSignal,
    JobCancelled,
    JobContext,
    JobPlugin,
    JobReturn,
    JobTimeout,
    PermanentError,
    Result,
    Retry,
    RetryPolicy,
    SyncJobContext,
    failure,
    job,
    to_update,
)

__all__ = [
    "NO_RETRY",
    "CancelSignal",
    "JobCancelled",
    "JobContext",
    "JobPlugin",
    "JobReturn",
    "JobTimeout",
    "PermanentError",
    "Result",
    "Retry",
    "RetryPolicy",
    "SyncJobContext",
    "failure",
    "job",
    "to_update",
]
