#!/usr/bin/env node
'use strict';
// Submits a typed `hash` job, shows its progress, and prints the digest.
// Usage: node hash.js [--target 127.0.0.1:50051] [--data hello] [--algorithm SHA256] [--rounds 1000]

const { parseArgs } = require('node:util');
const { AjsClient } = require('./ajs-client');

async function runHash({ target, data, algorithm, rounds }, log = console.error) {
  const client = new AjsClient(target);
  try {
    const { job } = await client.submit('hash', {
      input: { data: Buffer.from(data).toString('base64'), algorithm: `ALGORITHM_${algorithm}`, rounds },
    });
    const id = job.request.id;
    const final = await client.watch(id, (response) => {
      if (response.progress) log(`${response.state} ${Math.round(response.progress.fraction * 100)}% ${response.progress.message}`);
    });
    if (final.state !== 'REQUEST_STATE_FINISHED') {
      throw new Error(`job ${id} ended ${final.state}: ${final.error ? final.error.message : ''}`);
    }
    return (await client.decodeOutput('hash', final)).hex_digest;
  } finally {
    client.close();
  }
}

if (require.main === module) {
  const { values } = parseArgs({
    options: {
      target: { type: 'string', default: '127.0.0.1:50051' },
      data: { type: 'string', default: 'hello' },
      algorithm: { type: 'string', default: 'SHA256' },
      rounds: { type: 'string', default: '1000' },
    },
  });
  runHash({ ...values, rounds: Number(values.rounds) }).then(
    (digest) => console.log(digest),
    (error) => {
      console.error(`ajs-hash: ${error.message}`);
      process.exit(1);
    },
  );
}

module.exports = { runHash };
