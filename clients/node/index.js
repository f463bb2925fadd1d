'use strict';
// ajs-grpc-client: the Node.js client and worker of ajs-grpc. See README.md and index.d.ts.

const grpc = require('@grpc/grpc-js');
const { AjsClient, toDate, stateName } = require('./lib/client');
const { AjsError, decodeDetails } = require('./lib/errors');
const { loadContract } = require('./lib/contract');
const { Worker, JobError, descriptorSet } = require('./lib/worker');

module.exports = {
  AjsClient, AjsError, decodeDetails, toDate, stateName, loadContract, status: grpc.status,
  Worker, JobError, descriptorSet,
};
