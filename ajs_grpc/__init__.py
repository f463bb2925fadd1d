"""ajs-grpc: a job server with a gRPC front.

Clients submit typed requests through ``ajs.v1.JobService``; the server queues
them in a connector, runs them through an ordered chain of request handlers,
and streams each job's Responses live to anyone who watches.
"""

from ajs_grpc.core.errors import (
    AjsError,
    AlreadyExists,
    Code,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from ajs_grpc.core.jobs import (
    NO_RETRY,
    JobCancelled,
    JobContext,
    JobPlugin,
    PermanentError,
    Result,
    Retry,
    RetryPolicy,
    SyncJobContext,
    job,
)
from ajs_grpc.core.model import ErrorStatus, Job, Progress, Request, RequestState, Response

__all__ = [
    "NO_RETRY",
    "AjsError",
    "AlreadyExists",
    "Code",
    "ErrorStatus",
    "FailedPrecondition",
    "InvalidArgument",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobPlugin",
    "NotFound",
    "PermanentError",
    "Progress",
    "Request",
    "RequestState",
    "ResourceExhausted",
    "Response",
    "Result",
    "Retry",
    "RetryPolicy",
    "SyncJobContext",
    "Unavailable",
    "__version__",
    "job",
]

__version__ = "0.1.0"
