'use strict';
// The package itself: its TypeScript types check against a typed usage file, its copies of
// the contract and of the example's hash.proto are the repository's, and a packed tarball holds what it needs to run.

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

// The copies the package carries, and the repository's files they copy (npm run sync-proto).
const COPIES = [
  ['proto/ajs/v1/job_service.proto', 'protos/ajs/v1/job_service.proto'],
  ['proto/ajs/v1/worker_service.proto', 'protos/ajs/v1/worker_service.proto'],
  ['examples/proto/ajs/examples/v1/hash.proto', 'plugins/examples/protos/ajs/examples/v1/hash.proto'],
];

for (const [copy, original] of COPIES) {
  test(`${copy} is the repository's ${original} (npm run sync-proto copies it)`, (t) => {
    const repository = path.resolve(ROOT, '..', '..', original);
    if (!fs.existsSync(repository)) {
      t.diagnostic('not in the ajs-grpc repository: nothing to compare with');
      return;
    }
    const held = fs.readFileSync(path.join(ROOT, copy), 'utf8');
    assert.ok(held === fs.readFileSync(repository, 'utf8'), `clients/node/${copy} is out of date: run \`npm run sync-proto\` in clients/node`);
  });
}

test('the packed package holds the code, the types, the contract and the README', () => {
  const [packed] = JSON.parse(execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }));
  const files = packed.files.map((file) => file.path);
  const wanted = [
    'index.js', 'index.d.ts', 'lib/client.js', 'lib/errors.js', 'lib/contract.js', 'lib/channel.js', 'lib/worker.js',
    'lib/descriptors.js', 'proto/ajs/v1/job_service.proto', 'proto/ajs/v1/worker_service.proto',
    'examples/hash-worker.js', 'examples/proto/ajs/examples/v1/hash.proto', 'README.md', 'package.json',
  ];
  for (const needed of wanted) {
    assert.ok(files.includes(needed), `${needed} is not packed: ${files.join(', ')}`);
  }
  assert.ok(!files.some((file) => file.startsWith('test/')), 'tests are not packed');
});
