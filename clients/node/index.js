'use strict';
// ajs-grpc-client: the Node.js client of ajs-grpc. See README.md and index.d.ts.

const grpc = require('@grpc/grpc-js');
const { AjsClient, toDate, stateName } = require('./lib/client');
const { AjsError, decodeDetails } = require('./lib/errors');
const { loadContract } = require('./lib/contract');

module.exports = { AjsClient, AjsError, decodeDetails, toDate, stateName, loadContract, status: grpc.status };
