'use strict';
// The ajs.v1 contract, loaded once: the gRPC service (by @grpc/proto-loader, fields in
// lowerCamelCase) and a protobufjs Root of google.rpc's Status and error details, which
// decode the grpc-status-details-bin trailer and Response.error.

const path = require('node:path');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// proto/ holds a copy of the repository's protos/ajs/v1/job_service.proto and
// worker_service.proto, so that the package works outside the repository (a test checks
// the copies are current).
const PROTOS = path.resolve(__dirname, '..', 'proto');
const GOOGLEAPIS = path.dirname(require.resolve('google-proto-files/package.json'));

let service = null;
let statusRoot = null;

/** The ajs.v1 package of the gRPC definition (JobService, WorkerService and their messages). */
function loadContract() {
  if (!service) {
    const definition = protoLoader.loadSync(['ajs/v1/job_service.proto', 'ajs/v1/worker_service.proto'], {
      includeDirs: [PROTOS, GOOGLEAPIS],
      keepCase: false,
      longs: Number,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    service = grpc.loadPackageDefinition(definition).ajs.v1;
  }
  return service;
}

/** A protobufjs Root holding google.rpc.Status and google/rpc/error_details.proto. */
function loadStatusRoot() {
  if (!statusRoot) {
    const root = new protobuf.Root();
    root.resolvePath = (origin, target) => {
      for (const dir of [PROTOS, GOOGLEAPIS]) {
        const candidate = path.join(dir, target);
        if (fs.existsSync(candidate)) return candidate;
      }
      return protobuf.util.path.resolve(origin, target);
    };
    root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
    root.resolveAll();
    statusRoot = root;
  }
  return statusRoot;
}

module.exports = { loadContract, loadStatusRoot, PROTOS };
