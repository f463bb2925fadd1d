'use strict';
// The package itself: its TypeScript types check against a typed usage file, its copy of
// the contract is the repository's, and a packed tarball holds what it needs to run.

const test = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const path = require('node:path');
const { execFileSync, spawnSync } = require('node:child_process');

const ROOT = path.resolve(__dirname, '..');

test('index.d.ts: tsc --noEmit accepts test/usage.ts (and its @ts-expect-error lines are errors)', () => {
  const tsc = require.resolve('typescript/bin/tsc');
  const run = spawnSync(process.execPath, [tsc, '--noEmit', '-p', path.join(__dirname, 'tsconfig.json')], { encoding: 'utf8' });
  assert.strictEqual(run.status, 0, `tsc failed:\n${run.stdout}${run.stderr}`);
});

test('proto/ holds the repository\'s ajs/v1/job_service.proto (npm run sync-proto copies it)', (t) => {
  const repository = path.resolve(ROOT, '..', '..', 'protos', 'ajs', 'v1', 'job_service.proto');
  if (!fs.existsSync(repository)) {
    t.diagnostic('not in the ajs-grpc repository: nothing to compare with');
    return;
  }
  const copy = fs.readFileSync(path.join(ROOT, 'proto', 'ajs', 'v1', 'job_service.proto'), 'utf8');
  assert.ok(copy === fs.readFileSync(repository, 'utf8'), 'clients/node/proto is out of date: run `npm run sync-proto` in clients/node');
});

test('the packed package holds the code, the types, the contract and the README', () => {
  const [packed] = JSON.parse(execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }));
  const files = packed.files.map((file) => file.path);
  for (const needed of ['index.js', 'index.d.ts', 'lib/client.js', 'lib/errors.js', 'lib/contract.js', 'proto/ajs/v1/job_service.proto', 'README.md', 'package.json']) {
    assert.ok(files.includes(needed), `${needed} is not packed: ${files.join(', ')}`);
  }
  assert.ok(!files.some((file) => file.startsWith('test/')), 'tests are not packed');
});
