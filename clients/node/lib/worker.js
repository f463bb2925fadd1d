'use strict';
// Worker: runs jobs of an ajs-grpc server in this process, over ajs.v1.WorkerService/Work
// (protos/ajs/v1/worker_service.proto). One bidirectional stream per session: register
// the job types, take assignments within the credits granted, report progress and
// outcomes, heartbeat, stop a job on CancelAssignment; reconnect with backoff when the
// stream breaks; drain gracefully.

const { EventEmitter } = require('node:events');
const os = require('node:os');
const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs');
require('protobufjs/ext/descriptor'); // adds Root.fromDescriptor
const protojson = require('protobufjs/ext/protojson');
const { loadContract, loadStatusRoot } = require('./contract');
const { AjsError } = require('./errors');
const { channelSetup } = require('./channel');
const { descriptorSet } = require('./descriptors');

const TYPE_URL_PREFIX = 'type.googleapis.com/';

// A registration refused with one of these will be refused again: the worker stops
// (UNIMPLEMENTED: a server without WorkerService).
const PERMANENT = new Set([
  grpc.status.INVALID_ARGUMENT,
  grpc.status.PERMISSION_DENIED,
  grpc.status.FAILED_PRECONDITION,
  grpc.status.UNAUTHENTICATED,
  grpc.status.UNIMPLEMENTED,
]);

const DEFAULT_BACKOFF = { initialMs: 100, maxMs: 5000, multiplier: 2, jitter: 0.2 };
const DEFAULT_HEARTBEAT_INTERVAL_MS = 10000;

/**
 * An error a job handler throws to end its attempt with a given gRPC status:
 * `throw new JobError(status.INVALID_ARGUMENT, 'no such algorithm', { reason: 'BAD_ALGORITHM' })`.
 * `reason`, `domain` (default "ajs-grpc") and `metadata` make a google.rpc.ErrorInfo
 * detail; `retryDelayMs` a google.rpc.RetryInfo (the delay before the next attempt);
 * `nonRetryable: true` ends the job FAILED whatever its retry policy
 * (ReportOutcome.non_retryable). Any Error with a numeric `code` (and optional `reason`,
 * `domain`, `errorMetadata`, `retryDelayMs`, `nonRetryable`) is read the same way; other
 * errors end the attempt UNKNOWN.
 */
class JobError extends Error {
  constructor(code, message, { reason = '', domain = '', metadata = {}, retryDelayMs, nonRetryable = false, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'JobError';
    this.code = code;
    this.reason = reason;
    this.domain = domain;
    this.errorMetadata = metadata;
    if (retryDelayMs !== undefined) this.retryDelayMs = retryDelayMs;
    this.nonRetryable = Boolean(nonRetryable);
  }
}

/** A google.protobuf.Duration of seconds (a number) or a Duration; null for none. */
function duration(value) {
  if (value === undefined || value === null) return null;
  if (typeof value === 'object' && 'seconds' in value) return value;
  const secs = Number(value);
  if (!Number.isFinite(secs) || secs < 0) throw new TypeError(`not a duration in seconds: ${value}`);
  const seconds = Math.floor(secs);
  return { seconds, nanos: Math.round((secs - seconds) * 1e9) };
}

function durationMs(value) {
  if (!value) return 0;
  return Number(value.seconds || 0) * 1000 + Number(value.nanos || 0) / 1e6;
}

function toDate(ts) {
  if (!ts) return null;
  return new Date(Number(ts.seconds) * 1000 + Math.floor(Number(ts.nanos || 0) / 1e6));
}

function anyTypeUrl(value) {
  if (!value || typeof value !== 'object') return '';
  return value.type_url || value.typeUrl || '';
}

function typeNameOf(url) {
  return url.slice(url.lastIndexOf('/') + 1);
}

/** A RetryPolicy message from `{ maxAttempts, initialBackoff, maxBackoff, multiplier, jitter }` (backoffs in seconds or Durations). */
function retryPolicy(policy) {
  if (!policy) return null;
  const { maxAttempts = 0, initialBackoff, maxBackoff, multiplier = 0, jitter = 0 } = policy;
  return { maxAttempts, initialBackoff: duration(initialBackoff), maxBackoff: duration(maxBackoff), multiplier, jitter };
}

/** Encodes one google/rpc/error_details.proto message as an Any. */
function detail(typeName, fields) {
  const type = loadStatusRoot().lookupType(typeName);
  return { type_url: TYPE_URL_PREFIX + typeName, value: Buffer.from(type.encode(type.fromObject(fields)).finish()) };
}

/** The google.rpc.Status of a failed attempt: from the error thrown, CANCELLED if the job was stopped. */
function statusOf(error, signal) {
  const code = signal.aborted
    ? grpc.status.CANCELLED
    : (error && Number.isInteger(error.code) && error.code > 0 && error.code <= 16 ? error.code : grpc.status.UNKNOWN);
  let message = error instanceof Error ? error.message : String(error);
  if (signal.aborted && signal.reason instanceof Error && (error === signal.reason || (error && error.name === 'AbortError'))) {
    message = signal.reason.message; // the job stopped as told: say why
  }
  const details = [];
  if (error && typeof error === 'object') {
    if (error.reason) {
      const metadata = Object.fromEntries(Object.entries(error.errorMetadata || {}).map(([key, value]) => [key, String(value)]));
      details.push(detail('google.rpc.ErrorInfo', { reason: String(error.reason), domain: error.domain || 'ajs-grpc', metadata }));
    }
    if (Number.isFinite(error.retryDelayMs) && error.retryDelayMs >= 0) {
      details.push(detail('google.rpc.RetryInfo', { retryDelay: duration(error.retryDelayMs / 1000) }));
    }
  }
  return { code, message, details };
}

/** ProtoJSON wants bytes as base64: Buffers and Uint8Arrays in an output are turned into it. */
function jsonBytes(value) {
  if (value instanceof Uint8Array) return Buffer.from(value).toString('base64');
  if (Array.isArray(value)) return value.map(jsonBytes);
  if (value && typeof value === 'object' && !(value instanceof Date)) {
    return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, jsonBytes(item)]));
  }
  return value;
}

function stringMap(data) {
  return Object.fromEntries(Object.entries(data || {}).map(([key, value]) => [key, String(value)]));
}

function varintLength(n) {
  let length = 1;
  for (let rest = n; rest >= 128; rest = Math.floor(rest / 128)) length += 1;
  return length;
}

/** The serialized size of a google.protobuf.Any ({ type_url, value }), as the server counts it. */
function anySize(any) {
  if (!any) return 0;
  const url = Buffer.byteLength(anyTypeUrl(any));
  const value = any.value ? any.value.length : 0;
  return (url ? 1 + varintLength(url) + url : 0) + (value ? 1 + varintLength(value) + value : 0);
}

/**
 * The size of a job's result as WorkerRegistered.max_result_bytes counts it: the UTF-8
 * bytes of its data's keys and values plus the serialized size of its output.
 */
function resultSize({ data, output }) {
  let size = 0;
  for (const [key, value] of Object.entries(data || {})) size += Buffer.byteLength(key) + Buffer.byteLength(value);
  return size + anySize(output);
}

/**
 * A worker of one ajs-grpc server (or a load balancer in front of several).
 *
 * ```js
 * const worker = new Worker({ target: '127.0.0.1:50051', token, name: 'hasher-1', maxConcurrent: 4 });
 * worker.register('resize', { description: 'resizes images' }, async (job) => ({ data: { done: 'yes' } }));
 * process.on('SIGTERM', () => worker.drain());
 * await worker.run();
 * ```
 *
 * Events: 'registered' ({ workerId, heartbeatIntervalMs }), 'reconnecting' (error,
 * attempt, delayMs), 'assignment' ({ requestId, type, attempt }), 'cancel' ({ requestId,
 * attempt, reason }), 'outcome' ({ requestId, attempt, error }), 'draining' ().
 */
class Worker extends EventEmitter {
  constructor(options = {}) {
    super();
    const {
      target = '127.0.0.1:50051', tls = false, token, credentials, channelOptions = {},
      name = os.hostname(), maxConcurrent = 1, heartbeatMs = 0, backoff = {}, drainGraceMs = 10000,
    } = options;
    if (!Number.isInteger(maxConcurrent) || maxConcurrent < 1) throw new TypeError(`maxConcurrent must be a whole number of at least 1, not ${maxConcurrent}`);
    this.target = target;
    this.name = name;
    this.maxConcurrent = maxConcurrent;
    this.heartbeatMs = heartbeatMs;
    this.backoff = { ...DEFAULT_BACKOFF, ...backoff };
    this.drainGraceMs = drainGraceMs;
    this._channel = channelSetup({ tls, token, credentials, channelOptions });
    this._types = new Map();
    this._session = null;
    this._draining = false;
    this._stopped = false;
    this._runs = null; // the Promise of run()
    this._wake = new AbortController(); // interrupts the wait between sessions
    this.workerId = '';
  }

  /**
   * Declares a job type this worker runs, and its handler:
   * `register(name, { description, inputType, outputType, root | fileDescriptorSet,
   * retryPolicy, timeout, concurrency, rateLimit, orderedBy, unique,
   * allowFailedDependencies }, async (job) => ({ output, data }))`, or `register(name, handler)`
   * for an untyped type. `root` is a protobufjs Root that defines inputType and outputType
   * (their files and imports go into the declaration); `fileDescriptorSet` a serialized
   * FileDescriptorSet instead. `timeout` and the backoffs of `retryPolicy` are in seconds.
   */
  register(name, spec, handler) {
    if (typeof spec === 'function') [spec, handler] = [{}, spec];
    if (!name || typeof name !== 'string') throw new TypeError('a job type needs a name');
    if (typeof handler !== 'function') throw new TypeError(`job type ${name}: the handler must be a function`);
    if (this._runs) throw new Error('register job types before run()');
    const {
      description = '', inputType = '', outputType = '', root, fileDescriptorSet, retryPolicy: retry, timeout,
      concurrency = null, rateLimit = null, orderedBy = '', unique = null, allowFailedDependencies = false,
    } = spec || {};
    let types = root || null;
    let set = Buffer.alloc(0);
    if (inputType || outputType) {
      if (fileDescriptorSet && fileDescriptorSet.length) {
        set = Buffer.from(fileDescriptorSet);
        if (!types) types = protobuf.Root.fromDescriptor(set);
      } else if (types) {
        set = descriptorSet(types, [inputType, outputType]);
      } else {
        throw new TypeError(`job type ${name}: inputType/outputType need a root (a protobufjs Root) or a fileDescriptorSet`);
      }
    }
    const lookup = (fullName) => (fullName ? types.lookupType(fullName) : null);
    this._types.set(name, {
      handler,
      input: lookup(inputType),
      output: lookup(outputType),
      jobType: {
        name, description, handler: '', inputType, outputType, fileDescriptorSet: set,
        retryPolicy: retryPolicy(retry), timeout: duration(timeout),
        concurrency, rateLimit, orderedBy, unique, allowFailedDependencies,
      },
    });
    return this;
  }

  /** How many jobs this worker runs now. */
  get running() {
    return this._session ? this._session.jobs.size : 0;
  }

  /**
   * Connects, registers and runs jobs until drained (drain(), or `signal` aborted) or
   * stopped (stop()); reconnects with backoff when the stream breaks. Resolves after the
   * drain; rejects with an AjsError when the server refuses the registration for good
   * (INVALID_ARGUMENT, PERMISSION_DENIED, FAILED_PRECONDITION, UNAUTHENTICATED, UNIMPLEMENTED).
   */
  run({ signal } = {}) {
    if (this._runs) return this._runs;
    if (!this._types.size) return Promise.reject(new TypeError('register at least one job type before run()'));
    if (signal) {
      if (signal.aborted) this.drain();
      else signal.addEventListener('abort', () => this.drain(), { once: true });
    }
    this._runs = this._loop();
    return this._runs;
  }

  async _loop() {
    const ajs = loadContract();
    const stub = new ajs.WorkerService(this.target, this._channel.credentials, this._channel.options);
    const policy = this.backoff;
    let failures = 0;
    try {
      while (!this._draining && !this._stopped) {
        const { registered, error } = await this._work(stub);
        if (this._draining || this._stopped) break;
        if (error && PERMANENT.has(error.code)) throw error;
        failures = registered ? 1 : failures + 1;
        const base = Math.min(policy.maxMs, policy.initialMs * policy.multiplier ** (failures - 1));
        const delay = Math.max(0, Math.round(base * (1 + policy.jitter * (2 * Math.random() - 1))));
        this.emit('reconnecting', error, failures, delay);
        await new Promise((resolve) => {
          const timer = setTimeout(resolve, delay);
          this._wake.signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
        });
      }
    } finally {
      stub.close();
    }
  }

  /**
   * Stops taking jobs: sends DrainWorker, lets the running jobs (and any assignment that
   * crossed the DrainWorker) end and report; the server then ends the call. Resolves when
   * run() has ended.
   */
  drain() {
    if (!this._draining) {
      this._draining = true;
      this.emit('draining');
      this._wake.abort();
      const session = this._session;
      if (session && session.registered) this._sendDrain(session);
    }
    return this._runs ? this._runs.catch(() => {}) : Promise.resolve();
  }

  /** Stops at once: the stream is cancelled and running jobs are aborted (the server runs them again). */
  stop() {
    this._stopped = true;
    this._wake.abort();
    if (this._session) this._session.call.cancel();
    return this._runs ? this._runs.catch(() => {}) : Promise.resolve();
  }

  // ---- one session: one Work stream

  _work(stub) {
    return new Promise((resolve) => {
      const call = stub.Work();
      const session = {
        call, open: true, registered: false, jobs: new Map(), heartbeat: null, grace: null,
        drainSent: false, maxResultBytes: 0, error: null,
      };
      this._session = session;
      const finish = (error) => {
        if (!session.open) return;
        session.open = false;
        clearInterval(session.heartbeat);
        clearTimeout(session.grace);
        if (this._session === session) this._session = null;
        // The server has handed these jobs back to the queue: stop them.
        for (const job of session.jobs.values()) {
          job.controller.abort(new JobError(grpc.status.CANCELLED, 'the worker session ended', { reason: 'SESSION_ENDED' }));
        }
        session.jobs.clear();
        resolve({ registered: session.registered, error });
      };
      call.on('data', (message) => {
        try {
          this._receive(session, message);
        } catch (error) {
          session.error = AjsError.fromServiceError({ code: grpc.status.INTERNAL, message: `worker: ${error.message}` });
          call.cancel();
        }
      });
      call.on('error', (error) => { session.error = session.error || AjsError.fromServiceError(error); });
      call.on('status', (status) => {
        let error = session.error;
        if (!error && status.code !== grpc.status.OK) error = AjsError.fromServiceError({ ...status, message: status.details });
        // Ended OK after DrainWorker: the drain is complete. Ended OK otherwise: a broken session.
        if (!error && !session.drainSent) error = new AjsError({ code: grpc.status.UNAVAILABLE, message: 'the server ended the worker session' });
        finish(error);
      });
      this._write(session, {
        register: {
          workerName: this.name,
          jobTypes: [...this._types.values()].map((type) => type.jobType),
          maxConcurrent: this.maxConcurrent,
        },
      });
    });
  }

  _write(session, message) {
    if (!session.open) return false;
    session.call.write(message);
    return true;
  }

  _receive(session, message) {
    switch (message.kind) {
      case 'registered': {
        session.registered = true;
        const { workerId, heartbeatInterval, maxResultBytes } = message.registered;
        this.workerId = workerId;
        session.maxResultBytes = Number(maxResultBytes) || 0; // 0: the server sets no limit
        const intervalMs = durationMs(heartbeatInterval) || DEFAULT_HEARTBEAT_INTERVAL_MS;
        const every = this.heartbeatMs > 0 ? this.heartbeatMs : Math.max(50, Math.floor(intervalMs / 2));
        session.heartbeat = setInterval(() => this._write(session, { heartbeat: {} }), every);
        this.emit('registered', { workerId, heartbeatIntervalMs: intervalMs });
        if (this._draining) this._sendDrain(session);
        break;
      }
      case 'assignment':
        this._start(session, message.assignment);
        break;
      case 'cancel': {
        const { requestId, attempt, reason } = message.cancel;
        const job = session.jobs.get(`${requestId}\u0000${attempt}`);
        this.emit('cancel', { requestId, attempt, reason });
        if (job) job.controller.abort(new JobError(grpc.status.CANCELLED, `cancelled: ${reason || 'by the server'}`, { reason: reason || 'CANCELLED' }));
        break;
      }
      default:
        break; // a newer server's message: nothing to do
    }
  }

  /**
   * Sends DrainWorker. The worker keeps reading (an assignment may cross it: it runs) and
   * does not close its side: the server ends the call once the worker holds no job.
   */
  _sendDrain(session) {
    if (session.drainSent) return;
    session.drainSent = true;
    this._write(session, { drain: {} });
    if (session.jobs.size === 0) this._awaitEnd(session);
  }

  /** Draining and holding no job: the server ends the call; if it has not after drainGraceMs, cancel it. */
  _awaitEnd(session) {
    if (session.grace || !session.open) return;
    session.grace = setTimeout(() => {
      session.error = session.error || new AjsError({ code: grpc.status.DEADLINE_EXCEEDED, message: `the server did not end the drained session within ${this.drainGraceMs} ms` });
      session.call.cancel();
    }, this.drainGraceMs);
  }

  _start(session, assignment) {
    const { request, attempt } = assignment;
    const key = `${request.id}\u0000${attempt}`;
    if (session.jobs.has(key)) return; // the same attempt twice: it is running already
    const controller = new AbortController();
    const entry = { controller, ended: false };
    session.jobs.set(key, entry);
    if (session.grace) { // an assignment that crossed DrainWorker: it runs, the server waits for it
      clearTimeout(session.grace);
      session.grace = null;
    }
    this.emit('assignment', { requestId: request.id, type: request.type, attempt });
    const registered = this._types.get(request.type);
    const job = {
      request,
      attempt,
      deadline: toDate(assignment.deadline),
      dependencies: assignment.dependencies || [],
      input: null,
      signal: controller.signal,
      workerId: this.workerId,
      progress: (fraction, message = '', data = {}) => {
        if (entry.ended) return false;
        return this._write(session, {
          progress: { requestId: request.id, attempt, progress: { fraction: Number(fraction) || 0, message: String(message) }, data: stringMap(data) },
        });
      },
    };
    const run = async () => {
      if (!registered) throw new JobError(grpc.status.UNIMPLEMENTED, `this worker runs no job type ${request.type}`);
      job.input = this._decodeInput(registered, request);
      const result = await registered.handler(job);
      return this._encodeResult(registered, result);
    };
    run().then(
      (result) => this._end(session, key, entry, { requestId: request.id, attempt, ...result }),
      (error) => this._end(session, key, entry, {
        requestId: request.id, attempt, data: {}, error: statusOf(error, controller.signal),
        nonRetryable: Boolean(error && error.nonRetryable === true && !controller.signal.aborted),
      }),
    );
  }

  _decodeInput(registered, request) {
    const type = registered.input;
    const any = request.input;
    if (!type) return null;
    const url = anyTypeUrl(any);
    if (url && typeNameOf(url) !== registered.jobType.inputType) {
      throw new JobError(grpc.status.INVALID_ARGUMENT, `input is a ${typeNameOf(url)}, not a ${registered.jobType.inputType}`);
    }
    try {
      const message = type.decode(url ? any.value : Buffer.alloc(0));
      return type.toObject(message, { enums: String, longs: Number, defaults: true, arrays: true, objects: true, oneofs: true });
    } catch (error) {
      throw new JobError(grpc.status.INVALID_ARGUMENT, `input of ${request.type}: ${error.message}`, { cause: error });
    }
  }

  _encodeResult(registered, result) {
    const { output = null, data = {} } = result || {};
    const encoded = { data: stringMap(data), output: null };
    if (output) {
      try {
        if (anyTypeUrl(output) && output.value instanceof Uint8Array) {
          encoded.output = { type_url: anyTypeUrl(output), value: Buffer.from(output.value) };
        } else if (output.$type && typeof output.$type.encode === 'function') {
          encoded.output = { type_url: TYPE_URL_PREFIX + output.$type.fullName.replace(/^\./, ''), value: Buffer.from(output.$type.encode(output).finish()) };
        } else if (registered.output) {
          const type = registered.output;
          const message = protojson.fromJson(type, jsonBytes(output));
          encoded.output = { type_url: TYPE_URL_PREFIX + registered.jobType.outputType, value: Buffer.from(type.encode(message).finish()) };
        } else {
          throw new Error('a plain object as output needs the type\'s outputType');
        }
      } catch (error) {
        throw new JobError(grpc.status.INTERNAL, `output of ${registered.jobType.name}: ${error.message}`, { cause: error });
      }
    }
    return encoded;
  }

  _end(session, key, entry, outcome) {
    entry.ended = true;
    if (session.jobs.get(key) !== entry) return; // abandoned with its session
    session.jobs.delete(key);
    const limit = session.maxResultBytes;
    const size = limit > 0 ? resultSize(outcome) : 0;
    if (size > limit) {
      // A message past the server's limit would end the whole session: report the job's failure instead.
      const error = new JobError(grpc.status.RESOURCE_EXHAUSTED, `the job returned ${size} bytes, more than the server's limit of ${limit}`, {
        reason: 'RESULT_TOO_LARGE', metadata: { bytes: size, limit },
      });
      outcome = { requestId: outcome.requestId, attempt: outcome.attempt, data: {}, error: statusOf(error, { aborted: false }), nonRetryable: true };
    }
    this._write(session, { outcome });
    this.emit('outcome', { requestId: outcome.requestId, attempt: outcome.attempt, error: outcome.error || null });
    if (session.drainSent) {
      if (session.jobs.size === 0) this._awaitEnd(session); // no credit after DrainWorker
    } else {
      this._write(session, { credit: { count: 1 } });
    }
  }
}

module.exports = { Worker, JobError, descriptorSet };
