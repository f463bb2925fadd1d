'use strict';
// What the tests share: a live `ajs serve` (AJS_BIN names the ajs command; default: the
// repository's .venv/bin/ajs), temporary directories, a tokens file, and a throw-away
// certificate authority made with openssl.

const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawn, execFileSync } = require('node:child_process');

const AJS = process.env.AJS_BIN || path.resolve(__dirname, '..', '..', '..', '.venv', 'bin', 'ajs');

/** A fresh directory, removed after the test. */
function tempDir(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ajs-node-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * Starts `ajs serve` with `args` on `address` (default a free port) in `cwd`; resolves
 * when it serves, with `{ process, target, port, kill(signal) }`. The test stops it.
 */
function startServer(t, args = ['--connector', 'memory'], { address = '127.0.0.1:0', cwd = os.tmpdir() } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(AJS, ['serve', '--address', address, ...args], { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
    let log = '';
    let served = false;
    const exited = new Promise((done) => child.once('exit', done));
    const kill = async (signal = 'SIGKILL') => {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await exited;
    };
    t.after(() => kill('SIGKILL'));
    child.stderr.on('data', (chunk) => {
      log += chunk;
      const found = !served && /serving on ((?:127\.0\.0\.1|localhost):(\d+))/.exec(log);
      if (found) {
        served = true;
        resolve({ process: child, target: found[1], port: Number(found[2]), kill, log: () => log });
      }
    });
    child.on('exit', (code) => { if (!served) reject(new Error(`ajs serve exited ${code}:\n${log}`)); });
    child.on('error', reject);
  });
}

/**
 * A tokens file in `dir` for `{ name: { token, roles, types } }`, and client certificates
 * mapped by a subject alternative name: `{ name: { san, roles } }`; returns its path.
 */
function tokensFile(dir, principals, certificates = {}) {
  const entries = Object.entries(principals).map(([principal, { token, roles = [], types }]) => [
    '[[tokens]]',
    `sha256 = "${crypto.createHash('sha256').update(token).digest('hex')}"`,
    `principal = "${principal}"`,
    `roles = ${JSON.stringify(roles)}`,
    ...(types ? [`types = ${JSON.stringify(types)}`] : []),
    '',
  ].join('\n'));
  for (const [principal, { san, roles = [] }] of Object.entries(certificates)) {
    entries.push(['[[certificates]]', `san = "${san}"`, `principal = "${principal}"`, `roles = ${JSON.stringify(roles)}`, ''].join('\n'));
  }
  const file = path.join(dir, 'tokens.toml');
  fs.writeFileSync(file, entries.join('\n'));
  return file;
}

/**
 * A throw-away CA and a server certificate for 127.0.0.1 and localhost, made with the
 * openssl command: `{ caFile, certFile, keyFile }` in `dir`.
 */
function makeCertificates(dir) {
  const file = (name) => path.join(dir, name);
  const openssl = (...args) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1',
    '-subj', '/CN=ajs node test CA', '-keyout', file('ca.key'), '-out', file('ca.pem'),
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign');
  openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', '/CN=localhost',
    '-keyout', file('server.key'), '-out', file('server.csr'));
  fs.writeFileSync(file('server.ext'), [
    'subjectAltName=DNS:localhost,IP:127.0.0.1',
    'extendedKeyUsage=serverAuth',
    'basicConstraints=CA:FALSE',
  ].join('\n'));
  openssl('x509', '-req', '-in', file('server.csr'), '-CA', file('ca.pem'), '-CAkey', file('ca.key'),
    '-CAcreateserial', '-days', '1', '-extfile', file('server.ext'), '-out', file('server.pem'));
  return { caFile: file('ca.pem'), certFile: file('server.pem'), keyFile: file('server.key') };
}

/** A client certificate for `san` (a DNS name) signed by makeCertificates' CA in `dir`: `{ certFile, keyFile }`. */
function makeClientCertificate(dir, name, san) {
  const file = (suffix) => path.join(dir, `${name}${suffix}`);
  const openssl = (...args) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', `/CN=${name}`,
    '-keyout', file('.key'), '-out', file('.csr'));
  fs.writeFileSync(file('.ext'), [`subjectAltName=DNS:${san}`, 'extendedKeyUsage=clientAuth', 'basicConstraints=CA:FALSE'].join('\n'));
  openssl('x509', '-req', '-in', file('.csr'), '-CA', path.join(dir, 'ca.pem'), '-CAkey', path.join(dir, 'ca.key'),
    '-CAcreateserial', '-days', '1', '-extfile', file('.ext'), '-out', file('.pem'));
  return { certFile: file('.pem'), keyFile: file('.key') };
}

/** Waits until `check()` (maybe async) is truthy, polling; fails after `timeoutMs`. */
async function eventually(check, { timeoutMs = 20000, everyMs = 50, what = 'the condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, everyMs));
  }
}

module.exports = { AJS, tempDir, startServer, tokensFile, makeCertificates, makeClientCertificate, eventually };
