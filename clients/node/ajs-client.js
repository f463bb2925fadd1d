'use strict';
// A small Node.js client of ajs-grpc (ajs.v1.JobService), built with @grpc/grpc-js and
// @grpc/proto-loader from the contract in ../../protos. Typed job inputs are built from
// the descriptors the server publishes with ListJobTypes, so no job .proto is needed.

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const descriptor = require('protobufjs/ext/descriptor');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const GOOGLEAPIS = path.dirname(require.resolve('google-proto-files/package.json'));

function loadContract() {
  const definition = protoLoader.loadSync('ajs/v1/job_service.proto', {
    includeDirs: [PROTOS, GOOGLEAPIS],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).ajs.v1;
}

class AjsClient {
  /** @param {string} target e.g. "127.0.0.1:50051" */
  constructor(target) {
    const ajs = loadContract();
    this.stub = new ajs.JobService(target, grpc.credentials.createInsecure());
  }

  close() {
    this.stub.close();
  }

  call(method, request) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, (error, reply) => (error ? reject(error) : resolve(reply)));
    });
  }

  /** The job types the server runs, each with a protobufjs Root of its messages. */
  async jobTypes() {
    const reply = await this.call('ListJobTypes', {});
    return reply.job_types.map((type) => ({
      ...type,
      root: type.file_descriptor_set.length ? protobuf.Root.fromDescriptor(type.file_descriptor_set) : null,
    }));
  }

  /** Submits a request; `input` is a plain object encoded as the type's input message. */
  async submit(type, { input, data = {}, id = '' } = {}) {
    const request = await this.request(type, { input, data, id });
    return this.call('SubmitRequest', { request });
  }

  /**
   * Submits several requests in one call, atomically: all are queued or none is
   * (BatchSubmitRequests). Each item is `{ type, input, data, id }` as for submit();
   * an empty id gets a fresh one here, so a retried call is recognised. Resolves
   * with one `{ job, created }` per request, in order; a refusal rejects with the
   * request's index in the error (`requests[3]: ...`).
   */
  async submitMany(items) {
    const types = items.some((item) => item.input !== undefined) ? await this.jobTypes() : [];
    const requests = await Promise.all(
      items.map(async ({ type, input, data = {}, id = '' }) => ({
        request: await this.request(type, { input, data, id: id || crypto.randomUUID() }, types),
      })),
    );
    const reply = await this.call('BatchSubmitRequests', { requests });
    return reply.responses;
  }

  /** The ajs.v1.Request of a submit, its typed input encoded with the server's descriptors. */
  async request(type, { input, data = {}, id = '' }, types = null) {
    const request = { id, type, data };
    if (input !== undefined) {
      const described = (types || (await this.jobTypes())).find((t) => t.name === type);
      if (!described || !described.input_type) throw new Error(`the server runs no typed job ${type}`);
      const message = described.root.lookupType(described.input_type);
      const built = message.fromObject(input); // accepts enum names and base64 bytes, as protobuf JSON does
      const problem = message.verify(built);
      if (problem) throw new Error(`bad input for ${described.input_type}: ${problem}`);
      request.input = {
        type_url: `type.googleapis.com/${described.input_type}`,
        value: Buffer.from(message.encode(built).finish()),
      };
    }
    return request;
  }

  /** Calls onResponse for every Response of the job; resolves with the final one. */
  watch(requestId, onResponse = () => {}) {
    return new Promise((resolve, reject) => {
      let last = null;
      const stream = this.stub.WatchJob({ request_id: requestId, after_sequence: 0 });
      stream.on('data', ({ response }) => {
        last = response;
        onResponse(response);
      });
      stream.on('error', reject);
      stream.on('end', () => resolve(last));
    });
  }

  /** Decodes a final Response's output with the descriptors of its job type. */
  async decodeOutput(type, response) {
    const described = (await this.jobTypes()).find((t) => t.name === type);
    const message = described.root.lookupType(described.output_type);
    return message.toObject(message.decode(response.output.value));
  }
}

module.exports = { AjsClient, loadContract };
