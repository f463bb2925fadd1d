'use strict';
// The Node worker against a live `ajs serve` (in-memory queue, 1 s heartbeats): the
// hash-worker example runs typed jobs submitted with the Node client, its progress
// reaches WatchJob, a cancel reaches a running job, a SIGKILLed worker's job runs again
// in another worker and ends once, credits hold jobs to maxConcurrent, SIGTERM drains,
// a result past the server's max_result_bytes fails its job alone.

const test = require('node:test');
const assert = require('node:assert');
const crypto = require('node:crypto');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { AjsClient, Worker, status } = require('..');
const { loadStatusRoot } = require('../lib/contract');
const { startServer, eventually, tokensFile, tempDir, makeCertificates } = require('./helpers');

process.env.AJS_SERVER_WORKER_HEARTBEAT = '1s';
const SERVE = ['--connector', 'memory', '--cancel-grace', '2'];
const HASH_WORKER = path.resolve(__dirname, '..', 'examples', 'hash-worker.js');

function expectedDigest(data, rounds, algorithm = 'sha256') {
  let value = Buffer.from(data);
  for (let i = 0; i < rounds; i += 1) value = crypto.createHash(algorithm).update(value).digest();
  return value.toString('hex');
}

/** Starts examples/hash-worker.js; `registered` resolves with its first worker id. */
function startHashWorker(t, target, args = [], env = {}) {
  const child = spawn(process.execPath, [HASH_WORKER, '--target', target, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let stdout = '';
  let stderr = '';
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  const registered = new Promise((resolve, reject) => {
    child.stdout.on('data', (chunk) => {
      stdout += chunk;
      const found = /^registered (\S+)$/m.exec(stdout);
      if (found) resolve(found[1]);
    });
    exited.then(({ code, signal }) => reject(new Error(`hash-worker exited ${code ?? signal}:\n${stderr}`)));
  });
  registered.catch(() => {});
  child.stderr.on('data', (chunk) => { stderr += chunk; });
  t.after(() => { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL'); return exited; });
  return { child, registered, exited, stdout: () => stdout, stderr: () => stderr };
}

/** Every Response of a job, from the first (the job has ended). */
async function responses(client, id) {
  const all = [];
  for await (const response of client.watch(id)) all.push(response);
  return all;
}

test('the hash worker runs typed jobs from the Node client; progress reaches WatchJob; a bad algorithm fails', async (t) => {
  const { target } = await startServer(t, SERVE);
  const worker = startHashWorker(t, target, ['--name', 'hasher', '--max-concurrent', '2']);
  const workerId = await worker.registered;
  assert.match(workerId, /\S/);
  const client = new AjsClient(target);
  t.after(() => client.close());
  const [type] = (await client.jobTypes()).filter((candidate) => candidate.name === 'node-hash');
  assert.strictEqual(type.inputType, 'ajs.examples.v1.HashRequest');
  assert.strictEqual(type.outputType, 'ajs.examples.v1.HashResponse');
  assert.strictEqual(type.description, 'hashes data in a Node.js worker');
  assert.strictEqual(type.retryPolicy.maxAttempts, 3);

  const { job } = await client.submit('node-hash', { input: { data: Buffer.from('hello'), algorithm: 'ALGORITHM_SHA512', rounds: 3 }, data: { pause_ms: '50' } });
  const seen = [];
  const final = await client.wait(job.request.id, { onResponse: (response) => seen.push(response) });
  assert.strictEqual(final.state, 'REQUEST_STATE_FINISHED', JSON.stringify(final.error));
  assert.deepStrictEqual(final.data, { worker: 'hasher', language: 'node', attempt: '1' });
  assert.deepStrictEqual(await client.decodeOutput(final), { hexDigest: expectedDigest('hello', 3, 'sha512') });
  const progress = seen.filter((response) => response.progress).map((response) => response.progress.message);
  assert.deepStrictEqual(progress, ['round 1/3', 'round 2/3', 'round 3/3']);

  const { job: bad } = await client.submit('node-hash', { input: { data: Buffer.from('x'), algorithm: 'ALGORITHM_BLAKE2B' } });
  const failed = await client.wait(bad.request.id);
  assert.strictEqual(failed.state, 'REQUEST_STATE_FAILED');
  assert.strictEqual(failed.error.code, status.INVALID_ARGUMENT);
  assert.match(failed.error.message, /algorithm ALGORITHM_BLAKE2B not supported here/);
  const full = await client.get(bad.request.id);
  assert.strictEqual(full.attempt, 1, 'INVALID_ARGUMENT is not retried');
  assert.strictEqual(worker.stdout(), `registered ${workerId}\n`, 'stdout holds only the registered line');
});

test('a cancel reaches the running job: its signal fires and it ends CANCELLED quickly', async (t) => {
  const { target } = await startServer(t, SERVE);
  const worker = new Worker({ target, name: 'canceller' });
  let started = null;
  let aborted = null;
  worker.register('node-wait', async (job) => {
    started = job.request.id;
    job.progress(0, 'waiting');
    await new Promise((resolve, reject) => job.signal.addEventListener('abort', () => {
      aborted = job.signal.reason;
      reject(job.signal.reason);
    }));
  });
  const registered = new Promise((resolve) => worker.once('registered', resolve));
  const running = worker.run();
  t.after(() => worker.stop());
  await registered;
  const client = new AjsClient(target);
  t.after(() => client.close());
  const { job } = await client.submit('node-wait', { data: { n: '1' } });
  await eventually(() => started === job.request.id, { what: 'the job to start' });
  const before = Date.now();
  await client.cancel(job.request.id);
  const final = await client.wait(job.request.id);
  assert.strictEqual(final.state, 'REQUEST_STATE_CANCELLED');
  assert.ok(Date.now() - before < 1500, `cancelled in ${Date.now() - before} ms`);
  assert.ok(aborted, 'the handler\'s signal fired');
  assert.strictEqual(aborted.code, status.CANCELLED);
  assert.match(aborted.message, /CANCELLED_BY_CLIENT/);
  await worker.drain();
  await running;
});

test('a worker SIGKILLed mid-job: another worker runs it again, one final Response', async (t) => {
  const { target } = await startServer(t, SERVE);
  const first = startHashWorker(t, target, ['--name', 'first']);
  await first.registered;
  const client = new AjsClient(target);
  t.after(() => client.close());
  const { job } = await client.submit('node-hash', { input: { data: Buffer.from('abc'), algorithm: 'ALGORITHM_SHA256', rounds: 10 }, data: { pause_ms: '100' } });
  const id = job.request.id;
  for await (const response of client.watch(id)) {
    if (response.progress && response.progress.fraction >= 0.2) break;
  }
  first.child.kill('SIGKILL');
  await first.exited;
  const second = startHashWorker(t, target, ['--name', 'second']);
  await second.registered;
  const all = await responses(client, id);
  const final = all[all.length - 1];
  assert.strictEqual(final.state, 'REQUEST_STATE_FINISHED', JSON.stringify(final.error));
  assert.strictEqual(all.filter((response) => response.isFinal).length, 1);
  assert.deepStrictEqual(final.data, { worker: 'second', language: 'node', attempt: '2' });
  assert.deepStrictEqual(await client.decodeOutput(final), { hexDigest: expectedDigest('abc', 10) });
  assert.deepStrictEqual(all.map((response) => response.sequence), all.map((_, index) => index + 1), 'gapless');
});

test('credits: with maxConcurrent 1 a worker never runs two jobs at once', async (t) => {
  const { target } = await startServer(t, SERVE);
  const worker = new Worker({ target, name: 'one-at-a-time', maxConcurrent: 1 });
  let now = 0;
  let most = 0;
  worker.register('node-one', async (job) => {
    now += 1;
    most = Math.max(most, now);
    await new Promise((resolve) => setTimeout(resolve, 60));
    now -= 1;
    return { data: { n: job.request.data.n } };
  });
  const registered = new Promise((resolve) => worker.once('registered', resolve));
  const running = worker.run();
  t.after(() => worker.stop());
  await registered;
  const client = new AjsClient(target);
  t.after(() => client.close());
  const answers = await client.batchSubmit([1, 2, 3, 4, 5].map((n) => ({ type: 'node-one', data: { n: String(n) } })));
  const finals = await Promise.all(answers.map((answer) => client.wait(answer.job.request.id)));
  assert.deepStrictEqual(finals.map((final) => final.state), Array(5).fill('REQUEST_STATE_FINISHED'));
  assert.deepStrictEqual(finals.map((final) => final.data.n), ['1', '2', '3', '4', '5']);
  assert.strictEqual(most, 1);
  await worker.drain();
  await running;
});

test('SIGTERM drains: the running job finishes and reports, the worker exits 0', async (t) => {
  const { target } = await startServer(t, SERVE);
  const worker = startHashWorker(t, target, ['--name', 'drainer']);
  await worker.registered;
  const client = new AjsClient(target);
  t.after(() => client.close());
  const { job } = await client.submit('node-hash', { input: { data: Buffer.from('d'), algorithm: 'ALGORITHM_SHA256', rounds: 8 }, data: { pause_ms: '100' } });
  for await (const response of client.watch(job.request.id)) {
    if (response.progress) break;
  }
  const signalled = Date.now();
  worker.child.kill('SIGTERM');
  const { code } = await worker.exited;
  assert.strictEqual(code, 0, worker.stderr());
  // The job has 8 rounds of 100 ms: the server ended the call once its outcome came, well before the 10 s grace.
  assert.ok(Date.now() - signalled < 5000, `exited ${Date.now() - signalled} ms after SIGTERM`);
  const final = await client.wait(job.request.id);
  assert.strictEqual(final.state, 'REQUEST_STATE_FINISHED', JSON.stringify(final.error));
  assert.deepStrictEqual(final.data, { worker: 'drainer', language: 'node', attempt: '1' });
  assert.match(worker.stderr(), /SIGTERM: draining \(1 running\)/);
});

test('a result past the server\'s max_result_bytes fails its job RESULT_TOO_LARGE, attempt 1, and the session goes on', async (t) => {
  const { target } = await startServer(t, SERVE);
  const worker = new Worker({ target, name: 'big' });
  worker.register('node-big', { retryPolicy: { maxAttempts: 3 } }, async (job) => ({ data: { x: 'a'.repeat(Number(job.request.data.size)) } }));
  const registered = new Promise((resolve) => worker.once('registered', resolve));
  const running = worker.run();
  t.after(() => worker.stop());
  await registered;
  const client = new AjsClient(target);
  t.after(() => client.close());
  const { job } = await client.submit('node-big', { data: { size: String(5 * 1024 * 1024) } });
  const failed = await client.wait(job.request.id);
  assert.strictEqual(failed.state, 'REQUEST_STATE_FAILED');
  assert.strictEqual(failed.error.code, status.RESOURCE_EXHAUSTED);
  assert.match(failed.error.message, /the job returned 5242881 bytes, more than the server's limit of \d+/);
  const ErrorInfo = loadStatusRoot().lookupType('google.rpc.ErrorInfo');
  const info = failed.error.details.find((detail) => (detail.type_url || detail.typeUrl).endsWith('google.rpc.ErrorInfo'));
  assert.ok(info, JSON.stringify(failed.error));
  assert.strictEqual(ErrorInfo.decode(info.value).reason, 'RESULT_TOO_LARGE');
  assert.strictEqual((await client.get(job.request.id)).attempt, 1, 'non-retryable');
  const { job: small } = await client.submit('node-big', { data: { size: '10' } });
  const finished = await client.wait(small.request.id);
  assert.strictEqual(finished.state, 'REQUEST_STATE_FINISHED', JSON.stringify(finished.error));
  assert.strictEqual(finished.data.x, 'a'.repeat(10));
  await worker.drain();
  await running;
});

test('auth over TLS: a worker token registers and runs a job; a token without the worker role is refused for good (exit 1)', async (t) => {
  const dir = tempDir(t);
  const { caFile, certFile, keyFile } = makeCertificates(dir);
  const principals = { runner: { token: 'runner-token', roles: ['worker'] }, alice: { token: 'alice-token', roles: [] } };
  const { target } = await startServer(t, [...SERVE, '--tls-cert', certFile, '--tls-key', keyFile, '--tokens-file', tokensFile(dir, principals)]);
  const good = startHashWorker(t, target, ['--name', 'authorized', '--tls-ca', caFile], { AJS_TOKEN: 'runner-token' });
  assert.match(await good.registered, /\S/);
  const client = new AjsClient(target, { tls: { caFile }, token: 'alice-token' });
  t.after(() => client.close());
  const { job } = await client.submit('node-hash', { input: { data: Buffer.from('tls'), algorithm: 'ALGORITHM_SHA256', rounds: 2 } });
  const final = await client.wait(job.request.id);
  assert.strictEqual(final.state, 'REQUEST_STATE_FINISHED', JSON.stringify(final.error));
  assert.deepStrictEqual(await client.decodeOutput(final), { hexDigest: expectedDigest('tls', 2) });
  const refused = startHashWorker(t, target, ['--name', 'refused', '--tls-ca', caFile, '--token', 'alice-token']);
  const { code } = await refused.exited;
  assert.strictEqual(code, 1);
  assert.match(refused.stderr(), /refused: PERMISSION_DENIED/);
  assert.strictEqual(refused.stdout(), '');
});
