'use strict';
// The hash example (hash.js) against a live `ajs serve` (in-memory queue), and its options.

const test = require('node:test');
const assert = require('node:assert');
const crypto = require('node:crypto');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { runHash } = require('../hash');
const { AjsClient } = require('..');
const { startServer } = require('./helpers');

function expectedDigest(data, rounds) {
  let value = Buffer.from(data);
  for (let i = 0; i < rounds; i += 1) value = crypto.createHash('sha256').update(value).digest();
  return value.toString('hex');
}

test('the Node client runs a typed hash job and prints its digest', async (t) => {
  const { target } = await startServer(t);
  const progress = [];
  const digest = await runHash({ target, data: 'hello', algorithm: 'SHA256', rounds: 1000 }, (line) => progress.push(line));
  assert.strictEqual(digest, expectedDigest('hello', 1000));
  assert.ok(progress.some((line) => line.includes('1000/1000 rounds')), progress.join('\n'));
});

test('a wrong input is refused with INVALID_ARGUMENT and a BadRequest on request.input', async (t) => {
  const { target } = await startServer(t);
  const client = new AjsClient(target);
  t.after(() => client.close());
  await assert.rejects(
    client.submit('hash', { input: { typeUrl: 'type.googleapis.com/x.Y', value: Buffer.alloc(0) } }),
    (error) => {
      assert.strictEqual(error.code, 3); // INVALID_ARGUMENT
      assert.match(error.message, /request\.input: must hold a ajs\.examples\.v1\.HashRequest/);
      assert.ok(error.metadata.get('grpc-status-details-bin').length > 0);
      assert.ok(error.fieldViolations.some((v) => v.field === 'request.input'), JSON.stringify(error.fieldViolations));
      return true;
    },
  );
});

test('batchSubmit queues a batch atomically, in order, and names the refused request', async (t) => {
  const { target } = await startServer(t);
  const client = new AjsClient(target);
  t.after(() => client.close());
  const answers = await client.batchSubmit([
    { type: 'echo', id: 'n1', data: { n: '1' } },
    { type: 'echo', id: 'n1', data: { n: '1' } },
    { type: 'hash', input: { data: Buffer.from('hi'), algorithm: 'ALGORITHM_SHA256', rounds: 1 } },
  ]);
  assert.deepStrictEqual(answers.map((a) => a.created), [true, false, true]);
  assert.strictEqual(answers[0].job.request.id, 'n1');
  const final = await client.wait(answers[2].job.request.id);
  assert.strictEqual(final.state, 'REQUEST_STATE_FINISHED');
  await assert.rejects(client.batchSubmit([{ type: 'echo', id: 'n2' }, { type: '' }]), (error) => {
    assert.strictEqual(error.code, 3); // INVALID_ARGUMENT
    assert.match(error.message, /^requests\[1\]: invalid request: request\.type: must not be empty/);
    return true;
  });
  await assert.rejects(client.get('n2'), (error) => error.code === 5); // nothing queued
});

function runCli(...args) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [path.resolve(__dirname, '..', 'hash.js'), ...args]);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk) => { stdout += chunk; });
    child.stderr.on('data', (chunk) => { stderr += chunk; });
    child.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

test('--help prints the usage and exits 0', async () => {
  const { code, stdout, stderr } = await runCli('--help');
  assert.strictEqual(code, 0);
  assert.match(stdout, /^usage: ajs-hash /);
  assert.strictEqual(stderr, '');
});

test('a bad --rounds or an unknown option is a one-line usage error, exit 2', async () => {
  for (const args of [['--rounds', 'abc'], ['--rounds', '0'], ['--rounds', '1.5'], ['--bogus']]) {
    const { code, stdout, stderr } = await runCli(...args);
    assert.strictEqual(code, 2, `${args.join(' ')}: exit ${code}`);
    assert.strictEqual(stdout, '');
    assert.strictEqual(stderr.trim().split('\n').length, 1, stderr);
    assert.match(stderr, /^ajs-hash: /);
  }
});

test('the declared Node.js version is one every installed dependency supports', () => {
  const lowest = (range) => Number((/>=\s*(\d+)/.exec(range) || [null, '0'])[1]);
  const declared = lowest(require('../package.json').engines.node);
  const lock = require('../package-lock.json');
  for (const [name, entry] of Object.entries(lock.packages)) {
    if (name && entry.engines && entry.engines.node && /^>=/.test(entry.engines.node.trim())) {
      assert.ok(lowest(entry.engines.node) <= declared, `${name} needs node ${entry.engines.node}, package.json says >=${declared}`);
    }
  }
  assert.ok(Number(process.versions.node.split('.')[0]) >= declared);
});
