'use strict';
// How a client or a worker connects: channel credentials (plaintext, TLS, mutual TLS)
// and the bearer token of every call. Shared by AjsClient and Worker.

const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');

// Reconnect quickly after a server restart (grpc-js waits up to 2 minutes by default).
const DEFAULT_CHANNEL_OPTIONS = {
  'grpc.initial_reconnect_backoff_ms': 200,
  'grpc.max_reconnect_backoff_ms': 5000,
};

/** Channel credentials of the `tls` option: true (system roots) or { ca | caFile, cert | certFile, key | keyFile }. */
function channelCredentials(tls) {
  if (!tls) return grpc.credentials.createInsecure();
  const options = tls === true ? {} : tls;
  const read = (inline, file) => (inline !== undefined ? Buffer.from(inline) : file ? fs.readFileSync(file) : null);
  const ca = read(options.ca, options.caFile); // null: the system's roots (Node's bundled CA list)
  const cert = read(options.cert, options.certFile);
  const key = read(options.key, options.keyFile);
  if (Boolean(cert) !== Boolean(key)) throw new TypeError('tls: a client certificate needs its key, and a key its certificate');
  return grpc.credentials.createSsl(ca, key, cert);
}

/** `token` is a string or a function giving one (maybe a Promise): the bearer token of every call. */
function tokenSource(token) {
  if (token === undefined || token === null || token === '') return null;
  const get = typeof token === 'function' ? token : () => token;
  return async () => {
    const value = await get();
    return value ? `Bearer ${value}` : null;
  };
}

/**
 * The credentials and channel options of `{ tls, token, credentials, channelOptions }`:
 * `{ credentials, options }` for a grpc-js client constructor.
 */
function channelSetup({ tls = false, token, credentials, channelOptions = {} } = {}) {
  const authorization = tokenSource(token);
  let creds = credentials || channelCredentials(tls);
  const interceptors = [];
  const secure = credentials ? (typeof credentials._isSecure === 'function' ? credentials._isSecure() : true) : Boolean(tls);
  if (authorization && secure) {
    // Call credentials: grpc-js sends them only over a secure channel.
    creds = grpc.credentials.combineChannelCredentials(
      creds,
      grpc.credentials.createFromMetadataGenerator((_params, callback) => {
        authorization().then((value) => {
          const metadata = new grpc.Metadata();
          if (value) metadata.set('authorization', value);
          callback(null, metadata);
        }, callback);
      }),
    );
  } else if (authorization) {
    // Plaintext (a server on localhost, or TLS ended by a proxy in front): the same
    // header, added by an interceptor, since grpc-js composes no call credentials here.
    interceptors.push((callOptions, nextCall) => new grpc.InterceptingCall(nextCall(callOptions), {
      start(metadata, listener, next) {
        authorization().then((value) => {
          if (value) metadata.set('authorization', value);
          next(metadata, listener);
        }, (error) => {
          listener.onReceiveStatus({ code: grpc.status.UNAUTHENTICATED, details: `token: ${error.message}`, metadata: new grpc.Metadata() });
        });
      },
    }));
  }
  return { credentials: creds, options: { ...DEFAULT_CHANNEL_OPTIONS, ...channelOptions, interceptors } };
}

module.exports = { channelSetup, channelCredentials, tokenSource, DEFAULT_CHANNEL_OPTIONS };
