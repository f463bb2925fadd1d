'use strict';
// AjsClient: the Node.js client of ajs-grpc's ajs.v1.JobService.

const crypto = require('node:crypto');
const { setTimeout: sleep } = require('node:timers/promises');
const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs');
require('protobufjs/ext/descriptor'); // adds Root.fromDescriptor
const protojson = require('protobufjs/ext/protojson');
const { loadContract } = require('./contract');
const { AjsError } = require('./errors');
const { channelSetup } = require('./channel');

const STATE_PREFIX = 'REQUEST_STATE_';
const FINAL_STATES = new Set(['REQUEST_STATE_FINISHED', 'REQUEST_STATE_FAILED', 'REQUEST_STATE_CANCELLED']);
const VIEW_PREFIX = 'JOB_VIEW_';

// Stream errors after which a watch calls again: the connection or the server went away.
const RETRYABLE = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.INTERNAL, // a stream reset without a status
  grpc.status.ABORTED,
  grpc.status.CANCELLED, // only when the server (not this client) cancelled the stream
  grpc.status.DEADLINE_EXCEEDED, // a proxy's timeout: this client sets no deadline on streams
]);

const DEFAULT_BACKOFF = { initialMs: 100, maxMs: 5000, multiplier: 2, jitter: 0.2, maxRetries: 20 };

/** "FINISHED" or "REQUEST_STATE_FINISHED" -> "REQUEST_STATE_FINISHED". */
function stateName(state) {
  const name = String(state).toUpperCase();
  return name.startsWith(STATE_PREFIX) ? name : STATE_PREFIX + name;
}

function viewName(view) {
  if (!view) return 'JOB_VIEW_UNSPECIFIED';
  const name = String(view).toUpperCase();
  return name.startsWith(VIEW_PREFIX) ? name : VIEW_PREFIX + name;
}

/** A google.protobuf.Timestamp of a Date, milliseconds since the epoch, or a Timestamp. */
function timestamp(value) {
  if (value === undefined || value === null) return null;
  if (typeof value === 'object' && !(value instanceof Date) && 'seconds' in value) return value;
  const ms = value instanceof Date ? value.getTime() : Number(value);
  if (!Number.isFinite(ms)) throw new TypeError(`not a time: ${value}`);
  const seconds = Math.floor(ms / 1000);
  return { seconds, nanos: Math.round((ms - seconds * 1000) * 1e6) };
}

/** A google.protobuf.Duration of seconds (a number) or a Duration. */
function duration(value) {
  if (value === undefined || value === null) return null;
  if (typeof value === 'object' && 'seconds' in value) return value;
  const secs = Number(value);
  if (!Number.isFinite(secs) || secs < 0) throw new TypeError(`not a duration in seconds: ${value}`);
  const seconds = Math.floor(secs);
  return { seconds, nanos: Math.round((secs - seconds) * 1e9) };
}

/** The Date of a google.protobuf.Timestamp (null when unset). */
function toDate(ts) {
  if (!ts) return null;
  return new Date(Number(ts.seconds) * 1000 + Math.floor(Number(ts.nanos || 0) / 1e6));
}

/** ProtoJSON wants bytes as base64: Buffers and Uint8Arrays in an input are turned into it. */
function jsonBytes(value) {
  if (value instanceof Uint8Array) return Buffer.from(value).toString('base64');
  if (Array.isArray(value)) return value.map(jsonBytes);
  if (value && typeof value === 'object' && !(value instanceof Date)) {
    return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, jsonBytes(item)]));
  }
  return value;
}

// google.protobuf.Any keeps its proto field name `type_url` in grpc-js messages (protobufjs
// maps Any by hand); `typeUrl` is accepted too.
function anyTypeUrl(value) {
  if (!value || typeof value !== 'object') return '';
  return value.type_url || value.typeUrl || '';
}

function isAny(value) {
  return Boolean(anyTypeUrl(value)) && value.value instanceof Uint8Array;
}

/**
 * A client of one ajs-grpc server (or a load balancer in front of several).
 *
 * `new AjsClient('127.0.0.1:50051', { tls, token, credentials, channelOptions, deadlineMs, backoff })`
 */
class AjsClient {
  constructor(target = '127.0.0.1:50051', options = {}) {
    const { tls = false, token, credentials, channelOptions = {}, deadlineMs = 0, backoff = {} } = options;
    const ajs = loadContract();
    const channel = channelSetup({ tls, token, credentials, channelOptions });
    this.target = target;
    this.stub = new ajs.JobService(target, channel.credentials, channel.options);
    this.deadlineMs = deadlineMs;
    this.backoff = { ...DEFAULT_BACKOFF, ...backoff };
    this._types = null;
  }

  /** Closes the channel; calls in flight fail. */
  close() {
    this.stub.close();
  }

  /** Calls a unary method of JobService by name ("GetJob"), with camelCase fields; rejects with an AjsError. */
  call(method, request = {}) {
    if (typeof this.stub[method] !== 'function') return Promise.reject(new TypeError(`JobService has no method ${method}`));
    const callOptions = this.deadlineMs ? { deadline: Date.now() + this.deadlineMs } : {};
    return new Promise((resolve, reject) => {
      this.stub[method](request, callOptions, (error, reply) => (error ? reject(AjsError.fromServiceError(error)) : resolve(reply)));
    });
  }

  // ---- job types and typed payloads

  /**
   * The job types the server runs (ListJobTypes), each with `root`, a protobufjs Root of
   * its descriptor set (null for an untyped type). Cached; `{ refresh: true }` asks again.
   */
  jobTypes({ refresh = false } = {}) {
    if (!this._types || refresh) {
      const asked = this.call('ListJobTypes', {}).then((reply) => reply.jobTypes.map((type) => ({
        ...type,
        root: type.fileDescriptorSet && type.fileDescriptorSet.length ? protobuf.Root.fromDescriptor(type.fileDescriptorSet) : null,
      })));
      asked.catch(() => { if (this._types === asked) this._types = null; });
      this._types = asked;
    }
    return this._types;
  }

  /** One job type by name, asking the server again once if it is not known yet; null if none. */
  async jobType(name) {
    let found = (await this.jobTypes()).find((type) => type.name === name);
    if (!found) found = (await this.jobTypes({ refresh: true })).find((type) => type.name === name);
    return found || null;
  }

  /** The protobufjs Type of a message named in a job type's descriptors (full name). */
  async messageType(fullName) {
    for (let attempt = 0; attempt < 2; attempt += 1) {
      for (const type of await this.jobTypes({ refresh: attempt > 0 })) {
        if (!type.root) continue;
        try {
          return type.root.lookupType(fullName);
        } catch {
          // not in this type's descriptors
        }
      }
    }
    throw new AjsError({ code: grpc.status.NOT_FOUND, message: `no job type of the server describes ${fullName}` });
  }

  /**
   * The google.protobuf.Any of a job type's typed input, from a plain object in the
   * message's ProtoJSON form (field names as in the .proto or lowerCamelCase, enums by
   * name, bytes as base64 or a Buffer, Timestamps as RFC 3339 text). Unknown fields and
   * wrong values are refused (INVALID_ARGUMENT, with the field in the message).
   */
  async encodeInput(typeName, input) {
    if (isAny(input)) return { type_url: anyTypeUrl(input), value: input.value };
    const type = await this.jobType(typeName);
    if (!type) throw new AjsError({ code: grpc.status.INVALID_ARGUMENT, message: `the server runs no job type ${typeName}` });
    if (!type.inputType) throw new AjsError({ code: grpc.status.INVALID_ARGUMENT, message: `job type ${typeName} takes no typed input (use data)` });
    const message = type.root.lookupType(type.inputType);
    let built;
    try {
      built = protojson.fromJson(message, jsonBytes(input));
    } catch (error) {
      throw new AjsError({ code: grpc.status.INVALID_ARGUMENT, message: `input of ${typeName}: ${error.message}`, cause: error });
    }
    return { type_url: `type.googleapis.com/${type.inputType}`, value: Buffer.from(message.encode(built).finish()) };
  }

  /** A google.protobuf.Any (a job's input or output) as ProtoJSON, by the server's descriptors; null when unset. */
  async decodeAny(any) {
    const url = anyTypeUrl(any);
    if (!url) return null;
    const message = await this.messageType(url.slice(url.lastIndexOf('/') + 1));
    return protojson.toJson(message, message.decode(any.value));
  }

  /** The typed output of a (final) Response as ProtoJSON; null when it has none. */
  decodeOutput(response) {
    return this.decodeAny(response && response.output);
  }

  // ---- submitting

  /** The ajs.v1.Request of a submit (see submit for the options). */
  async buildRequest(type, options = {}) {
    const {
      id = '', input, data = {}, priority = 0, queue = '', runAfter, dependsOn = [], parentId = '',
      expireTime, maxAttempts = 0, timeout,
    } = options;
    const request = {
      id, type, data, priority, queue, dependsOn, parentId, maxAttempts,
      runAfter: timestamp(runAfter), expireTime: timestamp(expireTime), timeout: duration(timeout),
    };
    if (input !== undefined && input !== null) request.input = await this.encodeInput(type, input);
    return request;
  }

  /**
   * Queues a request of `type`. Options: id (empty: the server assigns one), input (a
   * plain object, encoded by the type's input message), data (string map), priority,
   * queue, runAfter and expireTime (Date or ms), dependsOn (ids), parentId,
   * maxAttempts, timeout (seconds). Resolves with `{ job, created }`.
   */
  async submit(type, options = {}) {
    const request = await this.buildRequest(type, options);
    return this.call('SubmitRequest', { request });
  }

  /**
   * Queues several requests atomically (all or none). Each item is `{ type, ...options }`
   * as for submit(); an item without an id gets a fresh UUID here, so that a retried call
   * is recognised. Resolves with one `{ job, created }` per item, in order.
   */
  async batchSubmit(items) {
    const requests = await Promise.all(items.map(async ({ type, ...options }) => ({
      request: await this.buildRequest(type, { ...options, id: options.id || crypto.randomUUID() }),
    })));
    const reply = await this.call('BatchSubmitRequests', { requests });
    return reply.responses;
  }

  // ---- reading and changing jobs

  /** One job; `view` "FULL" (default) or "BASIC". */
  async get(id, { view } = {}) {
    return (await this.call('GetJob', { requestId: id, view: viewName(view) })).job;
  }

  /** One page of ListJobs: `{ jobs, nextPageToken }`. */
  listPage(filter = {}, pageToken = '') {
    const { states = [], types = [], parentId = '', view, orderBy = '', pageSize = 0 } = filter;
    return this.call('ListJobs', {
      states: states.map(stateName), types, parentId, view: viewName(view), orderBy, pageSize, pageToken,
    });
  }

  /** Every page of ListJobs with the filter, one after the other. */
  async *listPages(filter = {}) {
    let token = filter.pageToken || '';
    do {
      const page = await this.listPage(filter, token);
      yield page;
      token = page.nextPageToken;
    } while (token);
  }

  /**
   * Every job matching the filter, across all pages: `for await (const job of client.list({...}))`.
   * Filter: states ("FAILED" or "REQUEST_STATE_FAILED"), types, parentId, view ("BASIC" |
   * "FULL"), orderBy ("create_time" | "create_time desc"), pageSize.
   */
  async *list(filter = {}) {
    for await (const page of this.listPages(filter)) yield* page.jobs;
  }

  /** Cancels a job; resolves with the job after it. */
  async cancel(id) {
    return (await this.call('CancelJob', { requestId: id })).job;
  }

  /** Runs an ended FAILED or CANCELLED job again; resolves with the job, queued again. */
  async retry(id) {
    return (await this.call('RetryJob', { requestId: id })).job;
  }

  /** Deletes an ended job and its descendants; resolves with how many jobs were deleted. */
  async delete(id) {
    return (await this.call('DeleteJob', { requestId: id })).deletedCount;
  }

  /** The queues with unfinished jobs or paused (admins only). */
  async listQueues() {
    return (await this.call('ListQueues', {})).queues;
  }

  /** Pauses a queue (admins only). */
  async pauseQueue(name) {
    return (await this.call('PauseQueue', { name })).queue;
  }

  /** Resumes a queue (admins only). */
  async resumeQueue(name) {
    return (await this.call('ResumeQueue', { name })).queue;
  }

  // ---- streams

  /**
   * The Responses of a job after `afterSequence`, live, ending after the final one:
   * `for await (const response of client.watch(id))`. A dropped stream (a server restart,
   * a lost connection) is called again with backoff, after the last sequence seen, so no
   * Response is missed or repeated. Options: afterSequence, signal (an AbortSignal),
   * backoff ({ initialMs, maxMs, multiplier, jitter, maxRetries }), onRetry(error, attempt, delayMs).
   */
  async *watch(id, { afterSequence = 0, signal, backoff, onRetry } = {}) {
    let last = Number(afterSequence);
    // The server ends a stream by itself only after the final Response, at once when
    // afterSequence is at or past it: a quiet end is the end if the job has ended.
    const ended = async () => {
      const job = await this.get(id, { view: 'BASIC' });
      return FINAL_STATES.has(job.state) && (job.lastResponse ? job.lastResponse.sequence : 0) <= last;
    };
    const messages = this._resumable(
      () => this.stub.WatchJob({ requestId: id, afterSequence: last }),
      { signal, backoff, onRetry, ended },
    );
    for await (const { response } of messages) {
      if (!response || response.sequence <= last) continue; // never twice, whatever the server does
      last = response.sequence;
      yield response;
      if (response.isFinal) return;
    }
  }

  /** Watches a job to its end; resolves with the final Response (onResponse sees each one). */
  async wait(id, { onResponse = () => {}, ...options } = {}) {
    let last = null;
    for await (const response of this.watch(id, options)) {
      onResponse(response);
      last = response;
    }
    return last;
  }

  /**
   * The Responses of every job matching the filter, as they are stored, each as
   * `{ response, resumeToken, type, queue }`; the stream does not end by itself (break
   * out of the loop, or abort `signal`). Filter: states, types, queues, parentId. A
   * dropped stream is called again with after_token = the last token seen (bookmarks
   * included), so nothing is missed or repeated. `afterToken` starts after a token kept
   * from before; `bookmarks: true` also yields the bookmarks (response null), whose tokens
   * are worth keeping while nothing matches.
   */
  async *watchJobs(filter = {}, { afterToken = '', bookmarks = false, signal, backoff, onRetry } = {}) {
    const { states = [], types = [], queues = [], parentId = '' } = filter;
    let token = afterToken;
    const messages = this._resumable(
      () => this.stub.WatchJobs({ states: states.map(stateName), types, queues, parentId, afterToken: token }),
      { signal, backoff, onRetry },
    );
    for await (const message of messages) {
      if (message.resumeToken) token = message.resumeToken;
      if (!message.response && !bookmarks) continue;
      yield { response: message.response || null, resumeToken: message.resumeToken, type: message.type, queue: message.queue };
    }
  }

  /**
   * The messages of a server stream, calling `open` again after a retryable error or an
   * end that `ended()` does not confirm, with backoff. `open` reads the caller's resume position.
   */
  async *_resumable(open, { signal, backoff = {}, onRetry = () => {}, ended = async () => false }) {
    const policy = { ...this.backoff, ...backoff };
    let failures = 0;
    for (;;) {
      signal?.throwIfAborted();
      const call = open();
      const abort = () => call.cancel();
      signal?.addEventListener('abort', abort, { once: true });
      call.on('metadata', () => { failures = 0; }); // the server answered: a healthy stream
      let error;
      try {
        for await (const message of call) {
          failures = 0;
          yield message;
        }
        if (await ended()) return;
        error = new AjsError({ code: grpc.status.UNAVAILABLE, message: 'the stream ended before its end' });
      } catch (caught) {
        signal?.throwIfAborted();
        error = AjsError.fromServiceError(caught);
        if (!RETRYABLE.has(error.code)) throw error;
      } finally {
        signal?.removeEventListener('abort', abort);
        call.cancel();
      }
      failures += 1;
      if (failures > policy.maxRetries) throw error;
      const base = Math.min(policy.maxMs, policy.initialMs * policy.multiplier ** (failures - 1));
      const delay = Math.round(base * (1 + policy.jitter * (2 * Math.random() - 1)));
      onRetry(error, failures, delay);
      await sleep(delay, undefined, { signal });
    }
  }
}

module.exports = { AjsClient, AjsError, toDate, stateName };
