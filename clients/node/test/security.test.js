'use strict';
// Bearer tokens and TLS against a live `ajs serve --tokens-file ... --tls-cert ... --tls-key ...`.

const { it } = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const { AjsClient, status } = require('..');
const { startServer, tempDir, tokensFile, makeCertificates, makeClientCertificate } = require('./helpers');

const PRINCIPALS = {
  alice: { token: 'alice-node-token' },
  bob: { token: 'bob-node-token' },
  root: { token: 'root-node-token', roles: ['admin'] },
};

it('tokens: a call without one is UNAUTHENTICATED; with one, each principal sees its own jobs and has quotas', async (t) => {
  const dir = tempDir(t);
  const { target } = await startServer(t, ['--connector', 'memory', '--tokens-file', tokensFile(dir, PRINCIPALS)]);
  const anonymous = new AjsClient(target);
  const alice = new AjsClient(target, { token: PRINCIPALS.alice.token });
  const bob = new AjsClient(target, { token: async () => PRINCIPALS.bob.token }); // a function, e.g. a refresher
  const root = new AjsClient(target, { token: PRINCIPALS.root.token });
  const wrong = new AjsClient(target, { token: 'not-a-token' });
  t.after(() => [anonymous, alice, bob, root, wrong].forEach((client) => client.close()));

  for (const call of [() => anonymous.submit('echo'), () => anonymous.jobTypes(), () => wrong.get('x')]) {
    await assert.rejects(call(), (error) => {
      assert.strictEqual(error.code, status.UNAUTHENTICATED);
      assert.ok(error.reason, 'an ErrorInfo reason');
      return true;
    });
  }

  const { job } = await alice.submit('echo', { data: { from: 'alice' } });
  assert.strictEqual(job.request.creator, 'alice');
  assert.strictEqual((await alice.wait(job.request.id)).state, 'REQUEST_STATE_FINISHED');
  await assert.rejects(bob.get(job.request.id), (error) => error.code === status.NOT_FOUND); // not bob's
  // An admin sees every job, by its stored name (alice's "x" is "~alice/x").
  assert.strictEqual((await root.get(`~alice/${job.request.id}`)).request.creator, 'alice');
  // A quota (not for admins): RESOURCE_EXHAUSTED with ErrorInfo metadata and a QuotaFailure.
  await assert.rejects(alice.submit('echo', { priority: 2000000000 }), (error) => {
    assert.strictEqual(error.code, status.RESOURCE_EXHAUSTED);
    assert.strictEqual(error.reason, 'PRIORITY_QUOTA');
    assert.ok(Number(error.errorMetadata.max_priority) < 2000000000, JSON.stringify(error.errorMetadata));
    assert.strictEqual(error.quotaViolations.length, 1);
    assert.match(error.quotaViolations[0].subject, /^principal:/);
    return true;
  });
  const bobs = [];
  for await (const listed of bob.list()) bobs.push(listed);
  assert.deepStrictEqual(bobs, []);
});

it('TLS: a client trusting the CA (with a token, as call credentials) works; plaintext and untrusted clients fail', async (t) => {
  const dir = tempDir(t);
  const { caFile, certFile, keyFile } = makeCertificates(dir);
  const server = await startServer(t, [
    '--connector', 'memory', '--tls-cert', certFile, '--tls-key', keyFile, '--tokens-file', tokensFile(dir, PRINCIPALS),
  ]);
  const target = `localhost:${server.port}`;
  const trusted = new AjsClient(target, { tls: { caFile }, token: PRINCIPALS.alice.token });
  const inlineCa = new AjsClient(target, { tls: { ca: fs.readFileSync(caFile) }, token: PRINCIPALS.alice.token });
  const noToken = new AjsClient(target, { tls: { caFile } });
  const plaintext = new AjsClient(target, { token: PRINCIPALS.alice.token });
  const systemRoots = new AjsClient(target, { tls: true, token: PRINCIPALS.alice.token }); // our CA is not among them
  t.after(() => [trusted, inlineCa, noToken, plaintext, systemRoots].forEach((client) => client.close()));

  const { job } = await trusted.submit('hash', { input: { data: Buffer.from('tls'), algorithm: 'ALGORITHM_SHA256', rounds: 1 } });
  assert.strictEqual(job.request.creator, 'alice');
  const final = await trusted.wait(job.request.id);
  assert.strictEqual(final.state, 'REQUEST_STATE_FINISHED');
  assert.strictEqual((await inlineCa.get(job.request.id)).state, 'REQUEST_STATE_FINISHED');

  await assert.rejects(noToken.get(job.request.id), (error) => error.code === status.UNAUTHENTICATED);
  for (const client of [plaintext, systemRoots]) {
    await assert.rejects(client.get(job.request.id), (error) => {
      assert.strictEqual(error.code, status.UNAVAILABLE);
      return true;
    });
  }
});

it('mutual TLS: a client certificate mapped to a principal is that principal, without a token', async (t) => {
  const dir = tempDir(t);
  const { caFile, certFile, keyFile } = makeCertificates(dir);
  const bot = makeClientCertificate(dir, 'node-bot', 'node-bot.clients.example.com');
  const stranger = makeClientCertificate(dir, 'stranger', 'stranger.clients.example.com');
  const tokens = tokensFile(dir, PRINCIPALS, { 'node-bot': { san: 'node-bot.clients.example.com' } });
  const server = await startServer(t, [
    '--connector', 'memory', '--tls-cert', certFile, '--tls-key', keyFile, '--tls-client-ca', caFile, '--tokens-file', tokens,
  ]);
  const target = `localhost:${server.port}`;
  const client = new AjsClient(target, { tls: { caFile, certFile: bot.certFile, keyFile: bot.keyFile } });
  const unmapped = new AjsClient(target, { tls: { caFile, cert: fs.readFileSync(stranger.certFile), key: fs.readFileSync(stranger.keyFile) } });
  t.after(() => [client, unmapped].forEach((c) => c.close()));

  const { job } = await client.submit('echo', { data: { via: 'mtls' } });
  assert.strictEqual(job.request.creator, 'node-bot');
  assert.strictEqual((await client.wait(job.request.id)).state, 'REQUEST_STATE_FINISHED');
  await assert.rejects(unmapped.get(job.request.id), (error) => {
    assert.strictEqual(error.code, status.UNAUTHENTICATED);
    assert.strictEqual(error.reason, 'UNKNOWN_CERTIFICATE');
    return true;
  });
  assert.throws(() => new AjsClient(target, { tls: { caFile, certFile: bot.certFile } }), /needs its key/);
});
