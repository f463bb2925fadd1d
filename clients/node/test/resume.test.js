'use strict';
// watch() and watchJobs() resume across real server restarts: `ajs serve` on SQLite is
// killed (SIGKILL, then SIGTERM) mid-stream and started again on the same port and
// database; the resumed streams hold every Response exactly once.

const { it } = require('node:test');
const assert = require('node:assert');
const path = require('node:path');
const { AjsClient } = require('..');
const { startServer, tempDir, eventually } = require('./helpers');

// A short lease, so that the restarted server claims the killed one's job again soon.
function sqliteArgs(dir) {
  return ['--connector', 'sqlite', '--database', path.join(dir, 'ajs.db'), '--lease', '1s', '--shutdown-grace', '1s'];
}

/** Restarts the server: stopped with `signal`, started again on the same port and database. */
async function restart(t, server, dir, signal) {
  await server.kill(signal);
  return startServer(t, sqliteArgs(dir), { address: `127.0.0.1:${server.port}`, cwd: dir });
}

function sequencesOf(responses) {
  return responses.map((response) => response.sequence);
}

it('watch resumes after the last sequence across server restarts: every Response once, up to FINISHED', { timeout: 120000 }, async (t) => {
  const dir = tempDir(t);
  let server = await startServer(t, sqliteArgs(dir), { cwd: dir });
  const client = new AjsClient(server.target, { backoff: { maxMs: 1000 } });
  t.after(() => client.close());

  const { job } = await client.submit('countdown', { data: { steps: '12', interval: '0.25' } });
  const id = job.request.id;
  const seen = [];
  const retries = [];
  const watching = (async () => {
    for await (const response of client.watch(id, { onRetry: (error) => retries.push(error.codeName) })) seen.push(response);
  })();

  for (const signal of ['SIGKILL', 'SIGTERM']) {
    const before = seen.length;
    await eventually(() => seen.length >= before + 2, { what: `two more Responses before the ${signal}` });
    server = await restart(t, server, dir, signal);
  }
  await watching;

  const final = seen.at(-1);
  assert.strictEqual(final.state, 'REQUEST_STATE_FINISHED');
  assert.ok(final.isFinal);
  assert.deepStrictEqual(sequencesOf(seen), seen.map((_, i) => i + 1), 'each sequence once, none missing');
  assert.ok(retries.length >= 2, `the stream dropped and was resumed (${retries.join(', ')})`);
  // What the watch saw is what the store holds.
  const replay = [];
  for await (const response of client.watch(id)) replay.push(response);
  assert.deepStrictEqual(seen.map((r) => [r.sequence, r.state]), replay.map((r) => [r.sequence, r.state]));
  assert.ok(seen.some((r) => r.state === 'REQUEST_STATE_CREATED' && r.sequence > 1), 'the killed run was handed back to the queue');
});

it('watchJobs resumes with after_token across server restarts: every matching Response once', { timeout: 120000 }, async (t) => {
  const dir = tempDir(t);
  let server = await startServer(t, sqliteArgs(dir), { cwd: dir });
  const client = new AjsClient(server.target, { backoff: { maxMs: 1000 } });
  t.after(() => client.close());

  const events = [];
  const retries = [];
  const controller = new AbortController();
  const watching = (async () => {
    const stream = client.watchJobs({ types: ['countdown'] }, { bookmarks: true, signal: controller.signal, onRetry: (error) => retries.push(error) });
    for await (const event of stream) events.push(event);
  })();
  const ended = watching.catch((error) => error); // ends when aborted, or on a refusal
  const failed = async () => {
    const outcome = await Promise.race([ended, new Promise((resolve) => setImmediate(resolve, null))]);
    if (outcome) throw outcome; // e.g. UNIMPLEMENTED from a server without WatchJobs
    return false;
  };
  await eventually(async () => (await failed()) || events.length > 0, { what: 'the first bookmark' });
  assert.strictEqual(events[0].response, null);
  assert.ok(events[0].resumeToken);

  const ids = [];
  for (let i = 0; i < 2; i += 1) ids.push((await client.submit('countdown', { data: { steps: '10', interval: '0.2' } })).job.request.id);
  const other = (await client.submit('echo', { data: { not: 'watched' } })).job.request.id;
  const responses = () => events.filter((event) => event.response);
  const finished = () => ids.every((id) => responses().some((e) => e.response.requestId === id && e.response.isFinal));

  for (const signal of ['SIGKILL', 'SIGTERM']) {
    const before = responses().length;
    await eventually(async () => (await failed()) || responses().length >= before + 3, { what: `three more Responses before the ${signal}` });
    server = await restart(t, server, dir, signal);
  }
  await eventually(async () => (await failed()) || finished(), { timeoutMs: 60000, what: 'both countdowns to finish' });
  controller.abort();
  assert.strictEqual((await ended).name, 'AbortError');

  assert.ok(retries.length >= 2, 'the stream dropped and was resumed');
  assert.ok(!responses().some((e) => e.response.requestId === other), 'an echo job is not of the watched type');
  for (const event of responses()) {
    assert.strictEqual(event.type, 'countdown');
    assert.strictEqual(event.queue, 'default');
    assert.ok(event.resumeToken);
  }
  for (const id of ids) {
    const mine = responses().filter((e) => e.response.requestId === id).map((e) => e.response);
    const replay = [];
    for await (const response of client.watch(id)) replay.push(response);
    assert.deepStrictEqual(mine.map((r) => [r.sequence, r.state]), replay.map((r) => [r.sequence, r.state]), `job ${id}: every Response once, in order`);
    assert.strictEqual(mine.at(-1).state, 'REQUEST_STATE_FINISHED');
  }
});
