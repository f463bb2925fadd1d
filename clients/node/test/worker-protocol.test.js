'use strict';
// The Worker's side of ajs.v1.WorkerService/Work against a scripted in-process server
// (grpc-js): registration, credits, progress, outcomes, cancel, heartbeats, drain,
// reconnect with backoff, a refused registration, the descriptor set it declares.

const test = require('node:test');
const assert = require('node:assert');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs');
const { Worker, JobError, descriptorSet, status } = require('..');
const { loadContract, loadStatusRoot } = require('../lib/contract');
const { hashRoot, hashWorker, parseOptions } = require('../examples/hash-worker');
const { AJS, eventually, tempDir } = require('./helpers');

const root = hashRoot();
const HashRequest = root.lookupType('ajs.examples.v1.HashRequest');
const HashResponse = root.lookupType('ajs.examples.v1.HashResponse');

function hashInput(fields) {
  return { type_url: 'type.googleapis.com/ajs.examples.v1.HashRequest', value: Buffer.from(HashRequest.encode(HashRequest.fromObject(fields)).finish()) };
}

function assignment(id, fields, { attempt = 1, data = {}, type = 'node-hash' } = {}) {
  return { assignment: { request: { id, type, input: hashInput(fields), data }, attempt } };
}

/**
 * A WorkerService whose Work calls `script(call, session)`; `session` records what the
 * worker sent (`messages`, `kinds()`), and `next(kind)` waits for the next message of a kind.
 */
async function fakeServer(t, script) {
  const server = new grpc.Server();
  const sessions = [];
  server.addService(loadContract().WorkerService.service, {
    Work(call) {
      const session = { call, messages: [], halfClosed: false, waiters: [], kinds: () => session.messages.map((m) => m.kind) };
      session.next = (kind) => new Promise((resolve) => session.waiters.push({ kind, resolve, from: session.messages.length }));
      sessions.push(session);
      call.on('data', (message) => {
        session.messages.push(message);
        session.waiters = session.waiters.filter((waiter) => {
          if (waiter.kind !== message.kind) return true;
          waiter.resolve(message[message.kind]);
          return false;
        });
      });
      // This worker never half-closes (the server ends a drained call); record it if it does.
      call.on('end', () => { session.halfClosed = true; call.end(); });
      call.on('error', () => {});
      script(call, session, sessions.length);
    },
  });
  const port = await new Promise((resolve, reject) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (error, bound) => (error ? reject(error) : resolve(bound))));
  t.after(() => server.forceShutdown());
  return { target: `127.0.0.1:${port}`, sessions };
}

function registered(call, id = 'w-1', heartbeatMs = 10000) {
  call.write({ registered: { workerId: id, heartbeatInterval: { seconds: Math.floor(heartbeatMs / 1000), nanos: (heartbeatMs % 1000) * 1e6 } } });
}

test('register, run a typed job with progress, report its output and data, grant one credit', async (t) => {
  const { target, sessions } = await fakeServer(t, (call, session) => {
    session.next('register').then(() => {
      registered(call);
      call.write(assignment('r1', { data: Buffer.from('hello'), algorithm: 'ALGORITHM_SHA256', rounds: 3 }, { attempt: 2 }));
    });
  });
  const worker = hashWorker({ target, name: 'unit', maxConcurrent: 2 });
  const ids = [];
  worker.on('registered', ({ workerId }) => ids.push(workerId));
  worker.run();
  t.after(() => worker.stop());
  await eventually(() => sessions[0] && sessions[0].kinds().includes('credit'), { what: 'a credit' });
  const session = sessions[0];
  const [register] = session.messages;
  assert.strictEqual(register.kind, 'register');
  assert.strictEqual(register.register.workerName, 'unit');
  assert.strictEqual(register.register.maxConcurrent, 2);
  const [type] = register.register.jobTypes;
  assert.strictEqual(type.name, 'node-hash');
  assert.strictEqual(type.description, 'hashes data in a Node.js worker');
  assert.strictEqual(type.inputType, 'ajs.examples.v1.HashRequest');
  assert.strictEqual(type.outputType, 'ajs.examples.v1.HashResponse');
  assert.deepStrictEqual(type.retryPolicy, { maxAttempts: 3, initialBackoff: { seconds: 0, nanos: 200000000 }, maxBackoff: { seconds: 2, nanos: 0 }, multiplier: 2, jitter: 0 });
  assert.strictEqual(type.timeout, null);
  assert.deepStrictEqual(ids, ['w-1']);
  assert.deepStrictEqual(session.kinds(), ['register', 'progress', 'progress', 'progress', 'outcome', 'credit']);
  assert.deepStrictEqual(session.messages.filter((m) => m.kind === 'progress').map((m) => [m.progress.requestId, m.progress.attempt, m.progress.progress.message]),
    [['r1', 2, 'round 1/3'], ['r1', 2, 'round 2/3'], ['r1', 2, 'round 3/3']]);
  const { outcome } = session.messages[4];
  assert.strictEqual(outcome.error, null);
  assert.deepStrictEqual(outcome.data, { worker: 'unit', language: 'node', attempt: '2' });
  assert.strictEqual(outcome.output.type_url, 'type.googleapis.com/ajs.examples.v1.HashResponse');
  let digest = Buffer.from('hello');
  for (let i = 0; i < 3; i += 1) digest = require('node:crypto').createHash('sha256').update(digest).digest();
  assert.strictEqual(HashResponse.decode(outcome.output.value).hexDigest, digest.toString('hex'));
  assert.strictEqual(session.messages[5].credit.count, 1);
});

test('an unsupported algorithm fails INVALID_ARGUMENT with an ErrorInfo; a cancel stops a job with CANCELLED', async (t) => {
  const { target, sessions } = await fakeServer(t, (call, session) => {
    session.next('register').then(() => {
      registered(call);
      call.write(assignment('bad', { data: Buffer.from('x'), algorithm: 'ALGORITHM_BLAKE2B' }));
      call.write(assignment('slow', { data: Buffer.from('x'), algorithm: 'ALGORITHM_SHA512', rounds: 100 }, { data: { pause_ms: '1000' } }));
      session.next('progress').then(() => call.write({ cancel: { requestId: 'slow', attempt: 1, reason: 'CANCELLED_BY_CLIENT' } }));
    });
  });
  const worker = hashWorker({ target, name: 'unit', maxConcurrent: 2 });
  worker.run();
  t.after(() => worker.stop());
  const started = Date.now();
  await eventually(() => sessions[0] && sessions[0].messages.filter((m) => m.kind === 'outcome').length === 2, { what: 'two outcomes' });
  assert.ok(Date.now() - started < 900, 'the cancel stopped the pause at once');
  const outcomes = Object.fromEntries(sessions[0].messages.filter((m) => m.kind === 'outcome').map((m) => [m.outcome.requestId, m.outcome]));
  assert.strictEqual(outcomes.bad.error.code, status.INVALID_ARGUMENT);
  assert.strictEqual(outcomes.bad.error.message, 'algorithm ALGORITHM_BLAKE2B not supported here');
  const [info] = outcomes.bad.error.details;
  assert.strictEqual(info.type_url, 'type.googleapis.com/google.rpc.ErrorInfo');
  const ErrorInfo = loadStatusRoot().lookupType('google.rpc.ErrorInfo');
  const decoded = ErrorInfo.decode(info.value);
  assert.strictEqual(decoded.reason, 'ALGORITHM_NOT_SUPPORTED');
  assert.strictEqual(decoded.domain, 'ajs-grpc');
  assert.strictEqual(outcomes.slow.error.code, status.CANCELLED);
  assert.match(outcomes.slow.error.message, /CANCELLED_BY_CLIENT/);
});

test('drain: no credit after DrainWorker, the worker keeps reading and does not half-close; an assignment crossing DrainWorker runs; the server ends the call', async (t) => {
  let halfClosedAtEnd = null;
  const { target, sessions } = await fakeServer(t, (call, session) => {
    session.next('register').then(() => {
      registered(call);
      call.write(assignment('a', { data: Buffer.from('x'), algorithm: 'ALGORITHM_SHA256', rounds: 3 }, { data: { pause_ms: '150' } }));
    });
    // The server had sent b before it read DrainWorker: it crosses the drain.
    session.next('drain').then(() => call.write(assignment('b', { data: Buffer.from('y'), algorithm: 'ALGORITHM_SHA256', rounds: 1 }, { data: { pause_ms: '200' } })));
    eventually(() => session.messages.filter((m) => m.kind === 'outcome').length === 2, { what: 'both outcomes' }).then(async () => {
      await new Promise((resolve) => setTimeout(resolve, 300)); // a half-close would show by now
      halfClosedAtEnd = session.halfClosed;
      call.end(); // status OK: the drain is complete
    });
  });
  const worker = hashWorker({ target, name: 'unit', maxConcurrent: 1 });
  const events = [];
  worker.on('reconnecting', (error) => events.push(`reconnecting ${error && error.code}`));
  const running = worker.run();
  await eventually(() => sessions[0] && sessions[0].kinds().includes('progress'), { what: 'progress' });
  const started = Date.now();
  await worker.drain();
  await running;
  assert.ok(Date.now() - started < 5000, 'run() ended when the server ended the call, not after the grace');
  assert.strictEqual(halfClosedAtEnd, false, 'the worker did not close its side before the server ended the call');
  const kinds = sessions[0].kinds().filter((kind) => kind !== 'heartbeat' && kind !== 'progress');
  assert.deepStrictEqual(kinds, ['register', 'drain', 'outcome', 'outcome']);
  const outcomes = sessions[0].messages.filter((m) => m.kind === 'outcome').map((m) => m.outcome);
  assert.deepStrictEqual(outcomes.map((o) => o.requestId).sort(), ['a', 'b']);
  for (const outcome of outcomes) assert.strictEqual(outcome.error, null);
  assert.ok(sessions[0].messages.some((m) => m.kind === 'progress' && m.progress.requestId === 'b'), 'b ran');
  assert.deepStrictEqual(events, [], 'no reconnect: a drained session that the server ends OK is the end');
  assert.strictEqual(sessions.length, 1);
});

test('drain: a server that does not end the call is cancelled drainGraceMs after the worker holds nothing', async (t) => {
  const { target, sessions } = await fakeServer(t, (call, session) => {
    session.next('register').then(() => registered(call));
  });
  const worker = hashWorker({ target, name: 'unit' });
  worker.drainGraceMs = 300;
  const running = worker.run();
  await eventually(() => worker.workerId === 'w-1', { what: 'the registration' });
  const started = Date.now();
  await worker.drain();
  await running;
  const took = Date.now() - started;
  assert.ok(took >= 250 && took < 3000, `run() ended ${took} ms after drain()`);
  assert.deepStrictEqual(sessions[0].kinds().filter((kind) => kind !== 'heartbeat'), ['register', 'drain']);
  assert.strictEqual(sessions[0].halfClosed, false);
});

test('max_result_bytes: a result past the limit is reported as RESOURCE_EXHAUSTED RESULT_TOO_LARGE, non-retryable, without data or output', async (t) => {
  const limit = 100;
  const { target, sessions } = await fakeServer(t, (call, session) => {
    session.next('register').then(() => {
      call.write({ registered: { workerId: 'w-1', heartbeatInterval: { seconds: 10 }, maxResultBytes: limit } });
      const request = (id, type) => ({ assignment: { request: { id, type, data: {} }, attempt: 1 } });
      for (const [id, type] of [['fits', 'data'], ['over', 'data'], ['typed-fits', 'typed'], ['typed-over', 'typed']]) call.write(request(id, type));
    });
  });
  const Any = protobuf.Root.fromJSON({ nested: { google: { nested: { protobuf: protobuf.common.get('google/protobuf/any.proto') } } } }).lookupType('google.protobuf.Any');
  const output = HashResponse.create({ hexDigest: 'cd'.repeat(10) });
  const anyBytes = Any.encode({ type_url: 'type.googleapis.com/ajs.examples.v1.HashResponse', value: HashResponse.encode(output).finish() }).finish().length;
  const worker = new Worker({ target, maxConcurrent: 4 });
  // UTF-8: 'é' and 'ü' are two bytes each. 'fits': 2 + 49 * 2 = 100 bytes; 'over': 102.
  worker.register('data', async (job) => ({ data: { é: 'ü'.repeat(job.request.id === 'fits' ? 49 : 50) } }));
  // The output counts with its Any's serialized size.
  worker.register('typed', async (job) => ({ output, data: { k: 'v'.repeat(limit - anyBytes - 1 + (job.request.id === 'typed-over' ? 1 : 0)) } }));
  worker.run();
  t.after(() => worker.stop());
  await eventually(() => sessions[0] && sessions[0].kinds().filter((kind) => kind === 'outcome').length === 4, { what: 'four outcomes' });
  const outcomes = Object.fromEntries(sessions[0].messages.filter((m) => m.kind === 'outcome').map((m) => [m.outcome.requestId, m.outcome]));
  assert.strictEqual(outcomes.fits.error, null);
  assert.strictEqual(outcomes.fits.data['é'].length, 49);
  assert.strictEqual(outcomes['typed-fits'].error, null);
  assert.strictEqual(HashResponse.decode(outcomes['typed-fits'].output.value).hexDigest, 'cd'.repeat(10));
  const ErrorInfo = loadStatusRoot().lookupType('google.rpc.ErrorInfo');
  for (const [id, size] of [['over', 102], ['typed-over', 101]]) {
    const outcome = outcomes[id];
    assert.strictEqual(outcome.error.code, status.RESOURCE_EXHAUSTED, id);
    assert.strictEqual(outcome.error.message, `the job returned ${size} bytes, more than the server's limit of ${limit}`);
    assert.strictEqual(outcome.nonRetryable, true);
    assert.deepStrictEqual(outcome.data, {});
    assert.strictEqual(outcome.output, null);
    const info = ErrorInfo.decode(outcome.error.details.find((d) => d.type_url.endsWith('google.rpc.ErrorInfo')).value);
    assert.strictEqual(info.reason, 'RESULT_TOO_LARGE');
    assert.strictEqual(info.domain, 'ajs-grpc');
    assert.deepStrictEqual(info.metadata, { bytes: String(size), limit: String(limit) });
  }
  assert.strictEqual(sessions[0].kinds().filter((kind) => kind === 'credit').length, 4, 'a credit after each outcome');
});

test('max_result_bytes 0 (the server did not say): no check', async (t) => {
  const { target, sessions } = await fakeServer(t, (call, session) => {
    session.next('register').then(() => {
      registered(call);
      call.write({ assignment: { request: { id: 'big', type: 'data', data: {} }, attempt: 1 } });
    });
  });
  const worker = new Worker({ target });
  worker.register('data', async () => ({ data: { k: 'x'.repeat(100000) } }));
  worker.run();
  t.after(() => worker.stop());
  await eventually(() => sessions[0] && sessions[0].kinds().includes('outcome'), { what: 'an outcome' });
  const { outcome } = sessions[0].messages.find((m) => m.kind === 'outcome');
  assert.strictEqual(outcome.error, null);
  assert.strictEqual(outcome.data.k.length, 100000);
});

test('heartbeats at half the interval; a broken stream aborts its jobs and the worker registers again', async (t) => {
  const signals = [];
  const { target, sessions } = await fakeServer(t, (call, session, number) => {
    session.next('register').then(() => {
      registered(call, `w-${number}`, 200);
      if (number === 1) {
        call.write(assignment('long', { data: Buffer.from('x'), algorithm: 'ALGORITHM_SHA256', rounds: 50 }, { type: 'probe' }));
        setTimeout(() => call.emit('error', { code: status.UNAVAILABLE, details: 'going away' }), 400);
      }
    });
    session.next('drain').then(() => call.end()); // it holds nothing: the drain is complete
  });
  const worker = new Worker({ target, name: 'unit', backoff: { initialMs: 50, maxMs: 100 } });
  worker.register('probe', async (job) => {
    signals.push(job.signal);
    await new Promise((resolve, reject) => job.signal.addEventListener('abort', () => reject(job.signal.reason)));
  });
  const ids = [];
  const retries = [];
  worker.on('registered', ({ workerId }) => ids.push(workerId));
  worker.on('reconnecting', (error) => retries.push(error.code));
  worker.run();
  t.after(() => worker.stop());
  await eventually(() => ids.length === 2, { what: 'a second registration' });
  assert.deepStrictEqual(ids, ['w-1', 'w-2']);
  assert.deepStrictEqual(retries, [status.UNAVAILABLE]);
  assert.ok(sessions[0].kinds().filter((kind) => kind === 'heartbeat').length >= 2, sessions[0].kinds().join());
  assert.strictEqual(signals.length, 1);
  assert.ok(signals[0].aborted, 'the job of the broken stream was aborted');
  assert.ok(!sessions[0].kinds().includes('outcome'), 'no outcome for an abandoned job');
  await worker.drain();
});

test('a refused registration (PERMISSION_DENIED) ends run() with its error; UNAVAILABLE is tried again', async (t) => {
  const { target, sessions } = await fakeServer(t, (call, session, number) => {
    session.next('register').then(() => {
      call.emit('error', { code: number === 1 ? status.UNAVAILABLE : status.PERMISSION_DENIED, details: 'types not allowed: node-hash' });
    });
  });
  const worker = hashWorker({ target, name: 'unit' });
  worker.backoff.initialMs = 20;
  await assert.rejects(worker.run(), (error) => {
    assert.strictEqual(error.code, status.PERMISSION_DENIED);
    assert.match(error.message, /types not allowed/);
    return true;
  });
  assert.strictEqual(sessions.length, 2);
});

test('job errors: JobError with RetryInfo or nonRetryable, a missing type, a bad output, plain outputs and protobufjs messages', async (t) => {
  const { target, sessions } = await fakeServer(t, (call, session) => {
    session.next('register').then(() => {
      registered(call);
      const request = (id, type) => ({ assignment: { request: { id, type, data: {} }, attempt: 1 } });
      for (const [id, type] of [['j1', 'later'], ['j2', 'nope'], ['j3', 'bad-output'], ['j4', 'message'], ['j5', 'plain'], ['j6', 'never']]) call.write(request(id, type));
    });
  });
  const worker = new Worker({ target, maxConcurrent: 5 });
  worker.register('later', async () => { throw new JobError(status.UNAVAILABLE, 'try later', { reason: 'BUSY', retryDelayMs: 1500 }); });
  worker.register('bad-output', { outputType: 'ajs.examples.v1.HashResponse', root }, async () => ({ output: { hexDigest: 5 } }));
  worker.register('message', async () => ({ output: HashResponse.create({ hexDigest: 'ab' }), data: { n: 1 } }));
  worker.register('never', async () => { throw new JobError(status.UNAVAILABLE, 'gone for good', { nonRetryable: true }); });
  worker.register('plain', { outputType: 'ajs.examples.v1.HashResponse', root }, async () => ({ output: { hexDigest: 'cd' } }));
  worker.run();
  t.after(() => worker.stop());
  await eventually(() => sessions[0] && sessions[0].kinds().filter((kind) => kind === 'outcome').length === 6, { what: 'six outcomes' });
  const outcomes = Object.fromEntries(sessions[0].messages.filter((m) => m.kind === 'outcome').map((m) => [m.outcome.requestId, m.outcome]));
  assert.strictEqual(outcomes.j1.error.code, status.UNAVAILABLE);
  const retry = outcomes.j1.error.details.find((d) => d.type_url.endsWith('google.rpc.RetryInfo'));
  assert.deepStrictEqual(loadStatusRoot().lookupType('google.rpc.RetryInfo').toObject(loadStatusRoot().lookupType('google.rpc.RetryInfo').decode(retry.value), { longs: Number }).retryDelay, { seconds: 1, nanos: 500000000 });
  assert.strictEqual(outcomes.j1.nonRetryable, false);
  assert.strictEqual(outcomes.j6.nonRetryable, true);
  assert.strictEqual(outcomes.j6.error.code, status.UNAVAILABLE);
  assert.strictEqual(outcomes.j2.error.code, status.UNIMPLEMENTED);
  assert.strictEqual(outcomes.j3.error.code, status.INTERNAL);
  assert.match(outcomes.j3.error.message, /hexDigest: expected string/);
  assert.strictEqual(HashResponse.decode(outcomes.j4.output.value).hexDigest, 'ab');
  assert.deepStrictEqual(outcomes.j4.data, { n: '1' });
  assert.strictEqual(outcomes.j5.output.type_url, 'type.googleapis.com/ajs.examples.v1.HashResponse');
  assert.strictEqual(HashResponse.decode(outcomes.j5.output.value).hexDigest, 'cd');
});

test('descriptorSet: what protoc would write (qualified names, map entries, imports first), readable by Python protobuf', (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'ajs', 'test', 'v1', 'm.proto');
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, `syntax = "proto3"; package ajs.test.v1; import "google/protobuf/timestamp.proto";
    message A { google.protobuf.Timestamp at = 1; map<string, B> tag_counts = 2; message B { E e = 1; } enum E { E_X = 0; }
      optional int32 o = 3; oneof k { string s = 4; B b = 5; } }`);
  const types = new protobuf.Root();
  types.loadSync(file);
  const set = descriptorSet(types, ['ajs.test.v1.A']);
  const files = protobuf.Root.fromDescriptor(set);
  assert.ok(files.lookupType('ajs.test.v1.A').fields.tagCounts || files.lookupType('ajs.test.v1.A').fields.tag_counts);
  const python = path.join(path.dirname(AJS), 'python');
  if (!fs.existsSync(python)) {
    t.diagnostic('no Python next to ajs: only protobufjs read the set');
    return;
  }
  const script = [
    'import sys',
    'from google.protobuf import descriptor_pb2, descriptor_pool',
    's = descriptor_pb2.FileDescriptorSet.FromString(sys.stdin.buffer.read())',
    'pool = descriptor_pool.DescriptorPool()',
    '[pool.Add(f) for f in s.file]',
    'a = pool.FindMessageTypeByName("ajs.test.v1.A")',
    'print([f.name for f in s.file], [f.name for f in a.fields], [o.name for o in a.oneofs], a.fields_by_name["tag_counts"].message_type.name)',
  ].join('\n');
  const printed = execFileSync(python, ['-c', script], { input: set, encoding: 'utf8' }).trim();
  assert.strictEqual(printed, "['google/protobuf/timestamp.proto', 'ajs/test/v1/m.proto'] ['at', 'tag_counts', 'o', 's', 'b'] ['k', '_o'] TagCountsEntry");
});

test('hash-worker options: defaults, AJS_TOKEN, checks', () => {
  const options = parseOptions(['--target', 'h:1', '--name', 'n'], { AJS_TOKEN: 'tok' });
  assert.deepStrictEqual({ ...options, help: undefined }, { help: undefined, target: 'h:1', token: 'tok', name: 'n', type: 'node-hash', maxConcurrent: 1, tls: false });
  assert.strictEqual(parseOptions(['--token', 'x', '--type', 't', '--max-concurrent', '4', '--tls-ca', 'ca.pem'], { AJS_TOKEN: 'tok' }).token, 'x');
  assert.deepStrictEqual(parseOptions(['--tls-ca', 'ca.pem'], {}).tls, { caFile: 'ca.pem' });
  assert.throws(() => parseOptions(['--max-concurrent', '0'], {}), /--max-concurrent must be/);
  assert.throws(() => parseOptions(['--bogus'], {}), /Unknown option/);
});
