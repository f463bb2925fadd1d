'use strict';
// AjsClient against a live `ajs serve` (in-memory queue): submit, get, list paging,
// cancel, retry, batch, typed inputs and outputs, watch, error details.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert');
const crypto = require('node:crypto');
const { AjsClient, AjsError, toDate, status } = require('..');
const { startServer } = require('./helpers');

describe('AjsClient against a live server', () => {
  const cleanups = [];
  let client;

  before(async () => {
    const { target } = await startServer({ after: (fn) => cleanups.push(fn) });
    client = new AjsClient(target);
  });
  after(async () => {
    client.close();
    for (const cleanup of cleanups) await cleanup();
  });

  const unique = (prefix) => `${prefix}-${crypto.randomUUID()}`;

  it('submits a job, gets it back, and a resubmit of the same id is not created again', async () => {
    const id = unique('echo');
    const before = Date.now();
    const first = await client.submit('echo', { id, data: { greeting: 'hi' }, priority: 3, queue: 'node' });
    assert.strictEqual(first.created, true);
    assert.strictEqual(first.job.request.id, id);
    assert.strictEqual(first.job.request.queue, 'node');
    assert.ok(toDate(first.job.request.createTime).getTime() >= before - 5000);
    const again = await client.submit('echo', { id, data: { greeting: 'hi' }, priority: 3, queue: 'node' });
    assert.strictEqual(again.created, false);

    const final = await client.wait(id);
    assert.strictEqual(final.state, 'REQUEST_STATE_FINISHED');
    assert.strictEqual(final.isFinal, true);
    assert.deepStrictEqual(final.data, { greeting: 'hi' });

    const job = await client.get(id);
    assert.strictEqual(job.state, 'REQUEST_STATE_FINISHED');
    assert.deepStrictEqual(job.request.data, { greeting: 'hi' });
    assert.strictEqual(job.request.priority, 3);
    const basic = await client.get(id, { view: 'BASIC' });
    assert.deepStrictEqual(basic.request.data, {}); // BASIC leaves payloads out
  });

  it('lists every job of a filter across pages, in order and newest first', async () => {
    const parent = unique('parent');
    await client.submit('echo', { id: parent });
    const ids = [];
    for (let i = 0; i < 7; i += 1) {
      const { job } = await client.submit('echo', { id: `${parent}-child-${i}`, parentId: parent });
      ids.push(job.request.id);
    }
    const pages = [];
    for await (const page of client.listPages({ parentId: parent, pageSize: 3 })) pages.push(page.jobs.map((job) => job.request.id));
    assert.deepStrictEqual(pages.map((page) => page.length), [3, 3, 1]);
    assert.deepStrictEqual(pages.flat(), ids);

    const listed = [];
    for await (const job of client.list({ parentId: parent, pageSize: 2 })) listed.push(job.request.id);
    assert.deepStrictEqual(listed, ids);

    const newest = [];
    for await (const job of client.list({ parentId: parent, pageSize: 4, orderBy: 'create_time desc' })) newest.push(job.request.id);
    assert.deepStrictEqual(newest, [...ids].reverse());

    for (const id of ids) await client.wait(id);
    const finished = [];
    for await (const job of client.list({ parentId: parent, states: ['FINISHED'], types: ['echo'] })) finished.push(job.request.id);
    assert.deepStrictEqual(finished, ids);
    const failed = [];
    for await (const job of client.list({ parentId: parent, states: ['REQUEST_STATE_FAILED'] })) failed.push(job);
    assert.deepStrictEqual(failed, []);
  });

  it('cancels a running job; cancelling it again is FAILED_PRECONDITION', async () => {
    const { job } = await client.submit('countdown', { data: { steps: '200', interval: '0.2' } });
    const id = job.request.id;
    for await (const response of client.watch(id)) {
      if (response.state === 'REQUEST_STATE_PENDING') break; // it runs
    }
    const cancelled = await client.cancel(id);
    assert.strictEqual(cancelled.request.id, id);
    const final = await client.wait(id);
    assert.strictEqual(final.state, 'REQUEST_STATE_CANCELLED');
    await assert.rejects(client.cancel(id), (error) => {
      assert.ok(error instanceof AjsError);
      assert.strictEqual(error.code, status.FAILED_PRECONDITION);
      assert.strictEqual(error.codeName, 'FAILED_PRECONDITION');
      assert.ok(error.reason, 'an ErrorInfo reason');
      return true;
    });
  });

  it('retries a failed job: the watch goes on after the final Response with the new run', async () => {
    const { job } = await client.submit('fail', { data: { message: 'no luck' } });
    const id = job.request.id;
    const first = await client.wait(id);
    assert.strictEqual(first.state, 'REQUEST_STATE_FAILED');
    const failure = AjsError.fromStatus(first.error);
    assert.match(failure.message, /no luck/);

    const retried = await client.retry(id);
    assert.strictEqual(retried.state, 'REQUEST_STATE_CREATED');
    const again = [];
    for await (const response of client.watch(id, { afterSequence: first.sequence })) again.push(response);
    assert.strictEqual(again[0].sequence, first.sequence + 1);
    assert.strictEqual(again[0].state, 'REQUEST_STATE_CREATED');
    assert.strictEqual(again[0].data.reason, 'MANUAL_RETRY');
    assert.strictEqual(again.at(-1).state, 'REQUEST_STATE_FAILED');
    assert.deepStrictEqual(again.map((r) => r.sequence), again.map((_, i) => first.sequence + 1 + i));

    await assert.rejects(client.retry(unique('nobody')), (error) => error.code === status.NOT_FOUND);
    assert.strictEqual(await client.delete(id), 1);
    await assert.rejects(client.get(id), (error) => error.code === status.NOT_FOUND);
  });

  it('builds typed inputs from the descriptors ListJobTypes publishes, and reads typed outputs', async () => {
    const types = await client.jobTypes();
    const hash = types.find((type) => type.name === 'hash');
    assert.strictEqual(hash.inputType, 'ajs.examples.v1.HashRequest');
    assert.ok(hash.root, 'a protobufjs Root of its descriptors');
    assert.strictEqual(types.find((type) => type.name === 'echo').root, null);

    // Field names as in the .proto or in lowerCamelCase; enums by name; bytes as a Buffer or base64.
    const expected = crypto.createHash('sha256').update('typed').digest('hex');
    for (const input of [
      { data: Buffer.from('typed'), algorithm: 'ALGORITHM_SHA256', rounds: 1 },
      { data: Buffer.from('typed').toString('base64'), algorithm: 'ALGORITHM_SHA256', rounds: '1' },
    ]) {
      const { job } = await client.submit('hash', { input });
      assert.strictEqual(job.request.input.type_url, 'type.googleapis.com/ajs.examples.v1.HashRequest');
      assert.deepStrictEqual(await client.decodeAny(job.request.input), {
        data: Buffer.from('typed').toString('base64'), algorithm: 'ALGORITHM_SHA256', rounds: 1,
      });
      const final = await client.wait(job.request.id);
      assert.deepStrictEqual(await client.decodeOutput(final), { hexDigest: expected });
    }
    // Checked here, before a call: an unknown field, a wrong value, an untyped or unknown type.
    for (const [type, input, pattern] of [
      ['hash', { dta: 'x' }, /unknown field: "dta"/],
      ['hash', { rounds: 'many' }, /rounds: invalid integer/],
      ['hash', { algorithm: 'ALGORITHM_MD4' }, /algorithm/],
      ['echo', { anything: 1 }, /takes no typed input/],
      ['no-such-type', {}, /runs no job type no-such-type/],
    ]) {
      await assert.rejects(client.submit(type, { input }), (error) => {
        assert.strictEqual(error.code, status.INVALID_ARGUMENT);
        assert.match(error.message, pattern);
        return true;
      });
    }
  });

  it('batchSubmit queues a DAG in one call, and depends_on holds the child until its parent ends', async () => {
    const first = unique('first');
    const answers = await client.batchSubmit([
      { type: 'countdown', id: first, data: { steps: '2', interval: '0.05' } },
      { type: 'hash', dependsOn: [first], input: { data: Buffer.from('after'), algorithm: 'ALGORITHM_SHA512', rounds: 2 } },
    ]);
    assert.deepStrictEqual(answers.map((answer) => answer.created), [true, true]);
    assert.ok(answers[1].job.request.id, 'an id given by the client');
    assert.deepStrictEqual(answers[1].job.request.dependsOn, [first]);
    const final = await client.wait(answers[1].job.request.id);
    assert.strictEqual(final.state, 'REQUEST_STATE_FINISHED', final.error && final.error.message);
    const parent = await client.get(first);
    assert.ok(toDate(parent.updateTime) <= toDate(final.createTime));
  });

  it('watch replays after a sequence, and stops when its signal is aborted', async () => {
    const { job } = await client.submit('countdown', { data: { steps: '3', interval: '0.05' } });
    const all = [];
    for await (const response of client.watch(job.request.id)) all.push(response.sequence);
    assert.deepStrictEqual(all, all.map((_, i) => i + 1));
    const tail = [];
    for await (const response of client.watch(job.request.id, { afterSequence: 2 })) tail.push(response.sequence);
    assert.deepStrictEqual(tail, all.slice(2));
    // At or past the final Response of an ended job: nothing, and the watch ends (no retries).
    for (const afterSequence of [all.length, all.length + 10]) {
      const none = [];
      const retried = [];
      for await (const response of client.watch(job.request.id, { afterSequence, onRetry: (error) => retried.push(error) })) none.push(response);
      assert.deepStrictEqual([none, retried], [[], []]);
    }

    const long = await client.submit('countdown', { data: { steps: '500', interval: '0.2' } });
    const controller = new AbortController();
    const seen = [];
    await assert.rejects(async () => {
      for await (const response of client.watch(long.job.request.id, { signal: controller.signal })) {
        seen.push(response.sequence);
        if (seen.length === 2) controller.abort();
      }
    }, (error) => error.name === 'AbortError');
    assert.deepStrictEqual(seen, [1, 2]);
    await client.cancel(long.job.request.id);
  });

  it('watch throws at once on an error that is no outage, and gives up after maxRetries on one', async () => {
    const retried = [];
    await assert.rejects(async () => {
      for await (const response of client.watch(unique('missing'), { onRetry: () => retried.push(1) })) assert.fail(response);
    }, (error) => error instanceof AjsError && error.code === status.NOT_FOUND);
    assert.deepStrictEqual(retried, []);

    const nowhere = new AjsClient('127.0.0.1:1'); // nothing listens there
    try {
      const delays = [];
      await assert.rejects(async () => {
        for await (const response of nowhere.watch('x', {
          backoff: { initialMs: 10, maxMs: 40, maxRetries: 3 },
          onRetry: (error, attempt, delayMs) => delays.push([error.codeName, attempt, delayMs]),
        })) assert.fail(response);
      }, (error) => error.code === status.UNAVAILABLE);
      assert.deepStrictEqual(delays.map(([code, attempt]) => [code, attempt]), [['UNAVAILABLE', 1], ['UNAVAILABLE', 2], ['UNAVAILABLE', 3]]);
      assert.ok(delays.every(([, attempt, delayMs]) => delayMs <= 40 * 1.2 && delayMs >= Math.min(40, 10 * 2 ** (attempt - 1)) * 0.8));
    } finally {
      nowhere.close();
    }
  });

  it('errors carry the code, the message and the google.rpc details', async () => {
    await assert.rejects(client.get(unique('missing')), (error) => {
      assert.ok(error instanceof AjsError);
      assert.strictEqual(error.code, status.NOT_FOUND);
      assert.strictEqual(error.codeName, 'NOT_FOUND');
      assert.match(error.message, /missing-/);
      assert.ok(error.reason, 'ErrorInfo.reason');
      assert.ok(error.domain, 'ErrorInfo.domain');
      assert.strictEqual(error.errorInfo.reason, error.reason);
      assert.ok(error.statusDetails.some((detail) => detail.type === 'google.rpc.ErrorInfo'));
      return true;
    });
    await assert.rejects(client.submit('', { data: { a: 'b' } }), (error) => {
      assert.strictEqual(error.code, status.INVALID_ARGUMENT);
      assert.deepStrictEqual(error.fieldViolations.map((violation) => violation.field), ['request.type']);
      assert.ok(error.fieldViolations[0].description);
      assert.ok(error.statusDetails.some((detail) => detail.type === 'google.rpc.BadRequest'));
      return true;
    });
    await assert.rejects(client.listPage({}, 'not a token'), (error) => error.code === status.INVALID_ARGUMENT);
  });
});
