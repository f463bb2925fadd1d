// Types of ajs-grpc-client (hand-written; index.js is the implementation): the client
// (AjsClient) and the worker (Worker).
// Messages are ajs.v1's (protos/ajs/v1/job_service.proto) as @grpc/grpc-js gives them:
// fields in lowerCamelCase, enums as their names, 64-bit integers as numbers, unset
// message fields null, bytes as Buffers; google.protobuf.Any keeps `type_url`.

import type { ChannelCredentials, ChannelOptions, GrpcObject, Metadata } from '@grpc/grpc-js';
import type { Root, Type } from 'protobufjs';

export { status } from '@grpc/grpc-js';

export type RequestState =
  | 'REQUEST_STATE_UNSPECIFIED'
  | 'REQUEST_STATE_CREATED'
  | 'REQUEST_STATE_PENDING'
  | 'REQUEST_STATE_FINISHED'
  | 'REQUEST_STATE_FAILED'
  | 'REQUEST_STATE_CANCELLED';

/** A state in a filter: its full name or without the prefix ("FAILED"). */
export type StateName = RequestState | 'CREATED' | 'PENDING' | 'FINISHED' | 'FAILED' | 'CANCELLED';

export type JobView = 'BASIC' | 'FULL' | 'JOB_VIEW_BASIC' | 'JOB_VIEW_FULL';

export interface Timestamp { seconds: number; nanos: number }
export interface Duration { seconds: number; nanos: number }
export interface Any { type_url: string; value: Buffer }
export interface Status { code: number; message: string; details: Any[] }
export interface Progress { fraction: number; message: string }

export interface Request {
  id: string;
  parentId: string;
  creator: string;
  createTime: Timestamp | null;
  type: string;
  data: Record<string, string>;
  input: Any | null;
  priority: number;
  runAfter: Timestamp | null;
  queue: string;
  dependsOn: string[];
  expireTime: Timestamp | null;
  maxAttempts: number;
  timeout: Duration | null;
}

export interface Response {
  requestId: string;
  sequence: number;
  createTime: Timestamp | null;
  state: RequestState;
  isFinal: boolean;
  data: Record<string, string>;
  output: Any | null;
  progress: Progress | null;
  error: Status | null;
}

export interface Job {
  request: Request;
  state: RequestState;
  attempt: number;
  lastResponse: Response | null;
  updateTime: Timestamp | null;
  cancelRequested: boolean;
  maxAttempts: number;
  dueTime: Timestamp | null;
}

export interface RetryPolicy {
  maxAttempts: number;
  initialBackoff: Duration | null;
  maxBackoff: Duration | null;
  multiplier: number;
  jitter: number;
}
export interface ConcurrencyPolicy { key: string; limit: number }
export interface RateLimitPolicy { key: string; rate: number; period: Duration | null; burst: number }
export interface UniquePolicy { key: string; states: RequestState[]; ttl: Duration | null }

export interface JobType {
  name: string;
  description: string;
  handler: string;
  /** Full name of the input message; "" for a type that takes only data. */
  inputType: string;
  outputType: string;
  retryPolicy: RetryPolicy | null;
  timeout: Duration | null;
  fileDescriptorSet: Buffer;
  concurrency: ConcurrencyPolicy | null;
  rateLimit: RateLimitPolicy | null;
  orderedBy: string;
  unique: UniquePolicy | null;
  allowFailedDependencies: boolean;
  /** The type's messages (from fileDescriptorSet); null for an untyped type. */
  root: Root | null;
}

export interface Queue {
  name: string;
  queuedCount: number;
  runningCount: number;
  paused: boolean;
  oldestQueuedTime: Timestamp | null;
}

/** A time: a Date, milliseconds since the epoch, or a Timestamp. */
export type TimeLike = Date | number | Timestamp;

/** A plain object in the ProtoJSON form of a job type's input message. */
export type JsonObject = { [field: string]: unknown };

export interface SubmitOptions<I extends JsonObject = JsonObject> {
  /** Empty or missing: the server assigns a UUID (batchSubmit: the client does). */
  id?: string;
  /** Encoded by the type's input message (ProtoJSON: enums by name, bytes as Buffer or base64), or an Any as is. */
  input?: I | Any;
  data?: Record<string, string>;
  priority?: number;
  queue?: string;
  runAfter?: TimeLike;
  expireTime?: TimeLike;
  dependsOn?: string[];
  parentId?: string;
  maxAttempts?: number;
  /** Seconds, or a Duration. */
  timeout?: number | Duration;
}

export interface BatchItem<I extends JsonObject = JsonObject> extends SubmitOptions<I> {
  type: string;
}

export interface SubmitResult {
  job: Job;
  created: boolean;
}

export interface ListFilter {
  states?: StateName[];
  types?: string[];
  parentId?: string;
  view?: JobView;
  orderBy?: 'create_time' | 'create_time desc' | '';
  pageSize?: number;
  /** listPages and list: start from this page. */
  pageToken?: string;
}

export interface ListPage {
  jobs: Job[];
  nextPageToken: string;
}

export interface BackoffOptions {
  /** First wait after a dropped stream (100). */
  initialMs?: number;
  /** Longest wait (5000). */
  maxMs?: number;
  multiplier?: number;
  /** Random spread of each wait, a fraction of it (0.2). */
  jitter?: number;
  /** Failed calls in a row before the error is thrown (20). */
  maxRetries?: number;
}

export interface StreamOptions {
  /** Aborting ends the stream with an AbortError. */
  signal?: AbortSignal;
  backoff?: BackoffOptions;
  /** Called before each new call after a drop. */
  onRetry?: (error: AjsError, attempt: number, delayMs: number) => void;
}

export interface WatchOptions extends StreamOptions {
  /** Only Responses with a greater sequence (0: all). */
  afterSequence?: number;
}

export interface WaitOptions extends WatchOptions {
  onResponse?: (response: Response) => void;
}

export interface WatchJobsFilter {
  states?: StateName[];
  types?: string[];
  queues?: string[];
  parentId?: string;
}

export interface WatchJobsOptions extends StreamOptions {
  /** A resumeToken kept from before: go on after it ("" : from now). */
  afterToken?: string;
  /** Also yield bookmarks (response null), whose tokens are worth keeping. */
  bookmarks?: boolean;
}

export interface WatchJobsEvent {
  /** null on a bookmark. */
  response: Response | null;
  resumeToken: string;
  type: string;
  queue: string;
}

export interface TlsOptions {
  /** PEM of the CA(s) to trust; with neither ca nor caFile, the system's roots. */
  ca?: string | Buffer;
  caFile?: string;
  /** A client certificate and key, for mutual TLS. */
  cert?: string | Buffer;
  certFile?: string;
  key?: string | Buffer;
  keyFile?: string;
}

export interface ClientOptions {
  /** true: TLS verified by the system's roots; an object: see TlsOptions. */
  tls?: boolean | TlsOptions;
  /** A bearer token, or a function giving one (called for every call). */
  token?: string | (() => string | Promise<string>);
  /** Channel credentials of your own (instead of tls). */
  credentials?: ChannelCredentials;
  channelOptions?: ChannelOptions;
  /** A deadline for each unary call, in ms (0: none). */
  deadlineMs?: number;
  /** How watch and watchJobs call again after a dropped stream. */
  backoff?: BackoffOptions;
}

export class AjsClient {
  constructor(target?: string, options?: ClientOptions);
  readonly target: string;
  close(): void;
  /** A unary JobService method by name, with lowerCamelCase fields. */
  call<T = any>(method: string, request?: object): Promise<T>;

  jobTypes(options?: { refresh?: boolean }): Promise<JobType[]>;
  jobType(name: string): Promise<JobType | null>;
  messageType(fullName: string): Promise<Type>;
  encodeInput(type: string, input: JsonObject | Any): Promise<Any>;
  decodeAny<O extends JsonObject = JsonObject>(any: Any | null | undefined): Promise<O | null>;
  decodeOutput<O extends JsonObject = JsonObject>(response: Response | null | undefined): Promise<O | null>;

  buildRequest<I extends JsonObject = JsonObject>(type: string, options?: SubmitOptions<I>): Promise<Partial<Request>>;
  submit<I extends JsonObject = JsonObject>(type: string, options?: SubmitOptions<I>): Promise<SubmitResult>;
  batchSubmit(items: BatchItem[]): Promise<SubmitResult[]>;

  get(id: string, options?: { view?: JobView }): Promise<Job>;
  listPage(filter?: ListFilter, pageToken?: string): Promise<ListPage>;
  listPages(filter?: ListFilter): AsyncGenerator<ListPage, void, undefined>;
  list(filter?: ListFilter): AsyncGenerator<Job, void, undefined>;
  cancel(id: string): Promise<Job>;
  retry(id: string): Promise<Job>;
  delete(id: string): Promise<number>;
  listQueues(): Promise<Queue[]>;
  pauseQueue(name: string): Promise<Queue>;
  resumeQueue(name: string): Promise<Queue>;

  watch(id: string, options?: WatchOptions): AsyncGenerator<Response, void, undefined>;
  wait(id: string, options?: WaitOptions): Promise<Response>;
  watchJobs(filter?: WatchJobsFilter, options?: WatchJobsOptions): AsyncGenerator<WatchJobsEvent, void, undefined>;
}

export interface ErrorInfo { reason: string; domain: string; metadata: Record<string, string> }
export interface FieldViolation { field: string; description: string }
export interface QuotaViolation { subject: string; description: string }
export interface StatusDetail {
  typeUrl: string;
  /** "google.rpc.ErrorInfo", ... */
  type: string;
  /** Decoded for google/rpc/error_details.proto's messages, else the raw bytes. */
  value: Record<string, any> | Buffer;
}

export class AjsError extends Error {
  constructor(init: { code: number; message: string; details?: Any[]; metadata?: Metadata | null; cause?: unknown });
  /** As grpc.status (3 = INVALID_ARGUMENT ...). */
  code: number;
  codeName: string;
  errorInfo: ErrorInfo | null;
  /** ErrorInfo.reason ("" without one). */
  reason: string;
  domain: string;
  errorMetadata: Record<string, string>;
  fieldViolations: FieldViolation[];
  quotaViolations: QuotaViolation[];
  statusDetails: StatusDetail[];
  /** The call's trailing metadata (null for a job's status). */
  metadata: Metadata | null;
  static fromServiceError(error: unknown): AjsError;
  static fromStatus(status: Status): AjsError;
}

export function decodeDetails(details?: Any[]): StatusDetail[];
export function toDate(timestamp: Timestamp | null | undefined): Date | null;
export function stateName(state: StateName): RequestState;
/** The ajs.v1 package of the loaded contract (JobService and its messages). */
export function loadContract(): GrpcObject;

// ---- the worker (ajs.v1.WorkerService/Work)

/** A google.protobuf.Duration given as seconds, or as a Duration. */
export type DurationLike = number | Duration;

export interface WorkerRetryPolicy {
  maxAttempts?: number;
  /** Seconds, or a Duration. */
  initialBackoff?: DurationLike;
  maxBackoff?: DurationLike;
  multiplier?: number;
  jitter?: number;
}

export interface JobTypeSpec {
  description?: string;
  /** Full name of the input message ("ajs.examples.v1.HashRequest"); needs root or fileDescriptorSet. */
  inputType?: string;
  outputType?: string;
  /** A protobufjs Root defining inputType and outputType: their files and imports are declared. */
  root?: Root;
  /** A serialized google.protobuf.FileDescriptorSet instead of root (e.g. protoc --include_imports). */
  fileDescriptorSet?: Uint8Array;
  retryPolicy?: WorkerRetryPolicy;
  /** How long one attempt may run, in seconds; none: no limit. */
  timeout?: DurationLike;
  concurrency?: { key: string; limit: number } | null;
  rateLimit?: { key: string; rate: number; period: Duration | null; burst: number } | null;
  orderedBy?: string;
  unique?: { key: string; states: RequestState[]; ttl: Duration | null } | null;
  allowFailedDependencies?: boolean;
}

/** One attempt of a job, handed to a handler. */
export interface WorkerJob<I = JsonObject | null> {
  request: Request;
  /** 1 on the first run. */
  attempt: number;
  /** When the attempt must have ended; null for no limit. */
  deadline: Date | null;
  /** The final Responses of the request's dependencies. */
  dependencies: Response[];
  /** Request.input decoded by the type's inputType (protobufjs toObject: lowerCamelCase, enums by name, bytes as Buffers); null for an untyped type. */
  input: I;
  /** Aborted when the server cancels the job or the session is lost; its reason is a JobError (code CANCELLED). */
  signal: AbortSignal;
  workerId: string;
  /** Reports progress (a PENDING Response watchers see); false when it could not be sent. */
  progress(fraction: number, message?: string, data?: Record<string, string | number | boolean>): boolean;
}

export interface JobResult {
  /** A plain object of the type's outputType (ProtoJSON), a protobufjs message, or an Any. */
  output?: JsonObject | Any | null;
  data?: Record<string, string | number | boolean>;
}

export type JobHandler<I = any> = (job: WorkerJob<I>) => Promise<JobResult | void> | JobResult | void;

export interface WorkerOptions {
  /** The server (default 127.0.0.1:50051). */
  target?: string;
  tls?: boolean | TlsOptions;
  token?: string | (() => string | Promise<string>);
  credentials?: ChannelCredentials;
  channelOptions?: ChannelOptions;
  /** For humans and logs (default: the host name). */
  name?: string;
  /** How many jobs run at once (default 1). */
  maxConcurrent?: number;
  /** Heartbeat period in ms (default: half the server's heartbeat_interval). */
  heartbeatMs?: number;
  /** How the worker connects again after the stream breaks (100 ms doubling to 5 s, 20% jitter). */
  backoff?: { initialMs?: number; maxMs?: number; multiplier?: number; jitter?: number };
  /**
   * Draining and holding no job, how long to wait for the server to end the call before
   * cancelling it (10000 ms).
   */
  drainGraceMs?: number;
}

export interface WorkerEvents {
  registered: [info: { workerId: string; heartbeatIntervalMs: number }];
  reconnecting: [error: AjsError | null, attempt: number, delayMs: number];
  assignment: [info: { requestId: string; type: string; attempt: number }];
  cancel: [info: { requestId: string; attempt: number; reason: string }];
  outcome: [info: { requestId: string; attempt: number; error: Status | null }];
  draining: [];
}

export class Worker {
  constructor(options?: WorkerOptions);
  readonly target: string;
  readonly name: string;
  readonly maxConcurrent: number;
  /** The id of the current (or last) session; "" before the first registration. */
  readonly workerId: string;
  /** How many jobs run now. */
  readonly running: number;
  register<I = any>(name: string, spec: JobTypeSpec, handler: JobHandler<I>): this;
  register<I = any>(name: string, handler: JobHandler<I>): this;
  /** Runs until drained or stopped; rejects with an AjsError on a registration refused for good. */
  run(options?: { signal?: AbortSignal }): Promise<void>;
  /** Takes no more jobs, finishes the running ones, closes the stream; resolves when run() has ended. */
  drain(): Promise<void>;
  /** Ends the stream at once; running jobs are aborted (the server runs them again). */
  stop(): Promise<void>;
  on<E extends keyof WorkerEvents>(event: E, listener: (...args: WorkerEvents[E]) => void): this;
  once<E extends keyof WorkerEvents>(event: E, listener: (...args: WorkerEvents[E]) => void): this;
  off<E extends keyof WorkerEvents>(event: E, listener: (...args: WorkerEvents[E]) => void): this;
}

/** An error a handler throws to end the attempt with a gRPC status (and ErrorInfo / RetryInfo details). */
export class JobError extends Error {
  constructor(code: number, message: string, options?: { reason?: string; domain?: string; metadata?: Record<string, string>; retryDelayMs?: number; nonRetryable?: boolean; cause?: unknown });
  code: number;
  /** The job ends FAILED whatever its retry policy (ReportOutcome.non_retryable). */
  nonRetryable: boolean;
  reason: string;
  domain: string;
  errorMetadata: Record<string, string>;
  retryDelayMs?: number;
}

/** The serialized FileDescriptorSet of the files of `root` defining `fullNames`, dependencies first. */
export function descriptorSet(root: Root, fullNames: string[]): Buffer;
