#!/usr/bin/env node
'use strict';
// A remote worker of ajs-grpc in Node.js: runs typed `node-hash` jobs (the example
// ajs.examples.v1.HashRequest -> HashResponse) for a server's queue.
// Usage: node examples/hash-worker.js --target HOST:PORT [--token TOKEN] [--name NAME]
//                                     [--type TYPE] [--max-concurrent N] [--tls] [--tls-ca PEM]
// Prints `registered <worker_id>` on stdout each time it registers; logs to stderr.
// SIGTERM (or SIGINT): drains (finishes the running jobs, reports them) and exits 0.

const crypto = require('node:crypto');
const os = require('node:os');
const path = require('node:path');
const { parseArgs } = require('node:util');
const { setTimeout: sleep } = require('node:timers/promises');
const protobuf = require('protobufjs');
const { Worker, JobError, status } = require('..');

// A copy of plugins/examples/protos/ajs/examples/v1/hash.proto (`npm run sync-proto`).
const HASH_PROTO = path.join(__dirname, 'proto', 'ajs', 'examples', 'v1', 'hash.proto');
const ALGORITHMS = { ALGORITHM_SHA256: 'sha256', ALGORITHM_SHA512: 'sha512' };

/** The protobufjs Root of the example's hash.proto. */
function hashRoot() {
  const root = new protobuf.Root();
  root.loadSync(HASH_PROTO);
  return root.resolveAll();
}

/** The job: hash `data` `rounds` times, reporting progress after each round and pausing `pause_ms`. */
async function hashJob(job, { name, language = 'node' } = {}) {
  const { data, algorithm, rounds: asked } = job.input;
  const hash = ALGORITHMS[algorithm];
  if (!hash) {
    throw new JobError(status.INVALID_ARGUMENT, `algorithm ${algorithm} not supported here`, {
      reason: 'ALGORITHM_NOT_SUPPORTED', domain: 'ajs-grpc', metadata: { algorithm: String(algorithm) },
    });
  }
  const rounds = Math.max(Number(asked) || 0, 1);
  const pauseMs = Math.max(Number(job.request.data.pause_ms) || 0, 0);
  let digest = Buffer.from(data || []);
  for (let done = 1; done <= rounds; done += 1) {
    job.signal.throwIfAborted();
    digest = crypto.createHash(hash).update(digest).digest();
    job.progress(done / rounds, `round ${done}/${rounds}`);
    if (pauseMs > 0) await sleep(pauseMs, undefined, { signal: job.signal });
  }
  job.signal.throwIfAborted();
  return {
    output: { hexDigest: digest.toString('hex') },
    data: { worker: name, language, attempt: String(job.attempt) },
  };
}

const USAGE = 'usage: hash-worker --target HOST:PORT [--token TOKEN] [--name NAME] [--type TYPE] [--max-concurrent N]\n'
  + '                   [--tls] [--tls-ca PEM]';

// The options, checked: a usage error is one line (exit 2).
function parseOptions(argv, env = process.env) {
  const { values } = parseArgs({
    args: argv,
    options: {
      help: { type: 'boolean', short: 'h', default: false },
      target: { type: 'string', default: '127.0.0.1:50051' },
      token: { type: 'string', default: env.AJS_TOKEN || '' },
      name: { type: 'string', default: `${os.hostname()}-${process.pid}` },
      type: { type: 'string', default: 'node-hash' },
      'max-concurrent': { type: 'string', default: '1' },
      tls: { type: 'boolean', default: false },
      'tls-ca': { type: 'string', default: '' },
    },
  });
  if (!/^[1-9][0-9]{0,3}$/.test(values['max-concurrent'])) {
    throw new Error(`--max-concurrent must be a whole number from 1 to 9999, not ${JSON.stringify(values['max-concurrent'])}`);
  }
  if (!values.type) throw new Error('--type must not be empty');
  const caFile = values['tls-ca'];
  return {
    help: values.help, target: values.target, token: values.token, name: values.name, type: values.type,
    maxConcurrent: Number(values['max-concurrent']), tls: caFile ? { caFile } : values.tls,
  };
}

/** A Worker running the hash job as `type`. */
function hashWorker({ target, token, name, type = 'node-hash', maxConcurrent = 1, tls = false }) {
  const worker = new Worker({ target, token, tls, name, maxConcurrent });
  worker.register(type, {
    description: 'hashes data in a Node.js worker',
    inputType: 'ajs.examples.v1.HashRequest',
    outputType: 'ajs.examples.v1.HashResponse',
    root: hashRoot(),
    retryPolicy: { maxAttempts: 3, initialBackoff: 0.2, maxBackoff: 2, multiplier: 2, jitter: 0 },
  }, (job) => hashJob(job, { name }));
  return worker;
}

function main() {
  let options;
  try {
    options = parseOptions(process.argv.slice(2));
  } catch (error) {
    console.error(`hash-worker: ${error.message} (hash-worker --help shows the usage)`);
    process.exit(2);
  }
  if (options.help) {
    console.log(`${USAGE}\nRuns typed hash jobs (ajs.examples.v1.HashRequest) of an ajs-grpc server; SIGTERM drains.`);
    process.exit(0);
  }
  const log = (line) => console.error(`hash-worker: ${line}`);
  const worker = hashWorker(options);
  worker.on('registered', ({ workerId }) => {
    process.stdout.write(`registered ${workerId}\n`);
    log(`registered as ${workerId} with ${options.target} for ${options.type}, ${options.maxConcurrent} at once`);
  });
  worker.on('reconnecting', (error, attempt, delayMs) => log(`stream lost (${error ? `${error.codeName}: ${error.message}` : 'ended'}); again in ${delayMs} ms (try ${attempt})`));
  worker.on('assignment', ({ requestId, attempt }) => log(`job ${requestId} attempt ${attempt}: started`));
  worker.on('cancel', ({ requestId, attempt, reason }) => log(`job ${requestId} attempt ${attempt}: cancel (${reason})`));
  worker.on('outcome', ({ requestId, attempt, error }) => log(`job ${requestId} attempt ${attempt}: ${error ? `failed ${error.code}: ${error.message}` : 'done'}`));
  let signals = 0;
  const stop = (signal) => {
    signals += 1;
    if (signals > 1) {
      log(`${signal} again: exiting at once`);
      process.exit(130);
    }
    log(`${signal}: draining (${worker.running} running)`);
    worker.drain();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  worker.run().then(
    () => {
      log('drained');
      process.exit(0);
    },
    (error) => {
      log(`refused: ${error.codeName || ''} ${error.message}`);
      process.exit(1);
    },
  );
}

if (require.main === module) main();

module.exports = { hashJob, hashWorker, hashRoot, parseOptions };
