'use strict';
// Errors of the client: a gRPC status with its google.rpc details decoded.

const grpc = require('@grpc/grpc-js');
const { loadStatusRoot } = require('./contract');

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/**
 * Decodes the `details` of a google.rpc.Status (each an Any) into plain objects:
 * `{ typeUrl, type, value }`, `value` decoded when the type is one of
 * google/rpc/error_details.proto, else the raw bytes.
 */
function decodeDetails(details = []) {
  const root = loadStatusRoot();
  return details.map((any) => {
    const typeUrl = any.typeUrl || any.type_url || '';
    const type = typeUrl.slice(typeUrl.lastIndexOf('/') + 1);
    let value = Buffer.from(any.value || []);
    if (type.startsWith('google.rpc.')) {
      try {
        const message = root.lookupType(type);
        value = message.toObject(message.decode(value), { longs: Number, enums: String, defaults: true, arrays: true, objects: true });
      } catch {
        // not a detail type this client knows: the raw bytes stay
      }
    }
    return { typeUrl, type, value };
  });
}

/** The common parts of decoded details: ErrorInfo, BadRequest's and QuotaFailure's violations. */
function summarize(details) {
  const find = (type) => details.find((detail) => detail.type === type && !Buffer.isBuffer(detail.value));
  const info = find('google.rpc.ErrorInfo');
  const badRequest = find('google.rpc.BadRequest');
  const quota = find('google.rpc.QuotaFailure');
  return {
    errorInfo: info ? { reason: info.value.reason, domain: info.value.domain, metadata: info.value.metadata } : null,
    fieldViolations: badRequest
      ? badRequest.value.fieldViolations.map(({ field, description }) => ({ field, description }))
      : [],
    quotaViolations: quota ? quota.value.violations.map(({ subject, description }) => ({ subject, description })) : [],
  };
}

/**
 * A failed call (or a job's google.rpc.Status): `code` (a number, as grpc.status),
 * `codeName` ("INVALID_ARGUMENT"), `message` (the server's text), `reason`, `domain`
 * and `errorMetadata` from the ErrorInfo, `fieldViolations` from BadRequest,
 * `quotaViolations` from QuotaFailure, every decoded detail in `statusDetails`, and
 * the trailing `metadata`.
 */
class AjsError extends Error {
  constructor({ code, message, details = [], metadata = null, cause = undefined }) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'AjsError';
    this.code = code;
    this.codeName = CODE_NAMES[code] || String(code);
    this.statusDetails = decodeDetails(details);
    const { errorInfo, fieldViolations, quotaViolations } = summarize(this.statusDetails);
    this.errorInfo = errorInfo;
    this.reason = errorInfo ? errorInfo.reason : '';
    this.domain = errorInfo ? errorInfo.domain : '';
    this.errorMetadata = errorInfo ? errorInfo.metadata : {};
    this.fieldViolations = fieldViolations;
    this.quotaViolations = quotaViolations;
    this.metadata = metadata;
  }

  /** An AjsError of a grpc-js ServiceError, its details read from grpc-status-details-bin. */
  static fromServiceError(error) {
    if (error instanceof AjsError) return error;
    let details = [];
    let message = typeof error.details === 'string' ? error.details : error.message;
    const trailer = error.metadata && typeof error.metadata.get === 'function' ? error.metadata.get('grpc-status-details-bin') : [];
    if (trailer.length) {
      try {
        const Status = loadStatusRoot().lookupType('google.rpc.Status');
        const status = Status.toObject(Status.decode(trailer[0]), { longs: Number, defaults: true, arrays: true });
        details = status.details;
        if (status.message) message = status.message;
      } catch {
        // an unreadable trailer: the code and message are still right
      }
    }
    return new AjsError({ code: typeof error.code === 'number' ? error.code : grpc.status.UNKNOWN, message, details, metadata: error.metadata || null, cause: error });
  }

  /** An AjsError of a google.rpc.Status message (e.g. a failed job's Response.error). */
  static fromStatus(status) {
    return new AjsError({ code: status.code, message: status.message, details: status.details || [] });
  }
}

module.exports = { AjsError, decodeDetails, CODE_NAMES };
