#!/usr/bin/env node
'use strict';
// Submits a typed `hash` job, shows its progress, and prints the digest.
// Usage: node hash.js [--target 127.0.0.1:50051] [--data hello] [--algorithm SHA256] [--rounds 1000]
//                     [--token T (default $AJS_TOKEN)] [--tls] [--tls-ca PEM]

const { parseArgs } = require('node:util');
const { AjsClient } = require('./index');

async function runHash({ target, data, algorithm, rounds, tls, token }, log = console.error) {
  const client = new AjsClient(target, { tls, token });
  try {
    const { job } = await client.submit('hash', { input: { data: Buffer.from(data), algorithm: `ALGORITHM_${algorithm}`, rounds } });
    const id = job.request.id;
    const final = await client.wait(id, {
      onResponse: (response) => {
        if (response.progress) log(`${response.state} ${Math.round(response.progress.fraction * 100)}% ${response.progress.message}`);
      },
    });
    if (final.state !== 'REQUEST_STATE_FINISHED') {
      throw new Error(`job ${id} ended ${final.state}: ${final.error ? final.error.message : ''}`);
    }
    return (await client.decodeOutput(final)).hexDigest;
  } finally {
    client.close();
  }
}

const USAGE = 'usage: ajs-hash [--target HOST:PORT] [--data TEXT] [--algorithm SHA256|SHA512] [--rounds N]\n'
  + '                [--token TOKEN] [--tls] [--tls-ca PEM]';

// The options, checked: a usage error is one line (exit 2), as the ajs command's are.
function parseOptions(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      help: { type: 'boolean', short: 'h', default: false },
      target: { type: 'string', default: '127.0.0.1:50051' },
      data: { type: 'string', default: 'hello' },
      algorithm: { type: 'string', default: 'SHA256' },
      rounds: { type: 'string', default: '1000' },
      token: { type: 'string', default: process.env.AJS_TOKEN || '' },
      tls: { type: 'boolean', default: false },
      'tls-ca': { type: 'string', default: '' },
    },
  });
  if (!/^[1-9][0-9]{0,6}$/.test(values.rounds)) {
    throw new Error(`--rounds must be a whole number from 1 to 9999999, not ${JSON.stringify(values.rounds)}`);
  }
  const { 'tls-ca': caFile, ...rest } = values;
  // --tls-ca implies TLS; --tls alone verifies the server with the system's roots.
  return { ...rest, rounds: Number(values.rounds), tls: caFile ? { caFile } : values.tls };
}

if (require.main === module) {
  let options;
  try {
    options = parseOptions(process.argv.slice(2));
  } catch (error) {
    console.error(`ajs-hash: ${error.message} (ajs-hash --help shows the usage)`);
    process.exit(2);
  }
  if (options.help) {
    console.log(`${USAGE}\nSubmits a typed hash job to an ajs-grpc server, shows its progress, prints the digest.`);
    process.exit(0);
  }
  runHash(options).then(
    (digest) => console.log(digest),
    (error) => {
      console.error(`ajs-hash: ${error.message}`);
      process.exit(1);
    },
  );
}

module.exports = { runHash, parseOptions };
