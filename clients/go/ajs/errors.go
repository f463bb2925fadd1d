package ajs

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Domain is the google.rpc.ErrorInfo domain of the errors ajs-grpc returns.
const Domain = "ajs.v1"

// Error is a failed call, or a job's error (Response.error), with its google.rpc details
// decoded. Every error ajs-grpc returns carries an ErrorInfo: branch on Reason, which is
// stable, rather than on Message, which is for humans.
type Error struct {
	// Code is the gRPC status code (codes.NotFound, ...).
	Code codes.Code
	// Message is the status message.
	Message string
	// Reason is the ErrorInfo reason (REQUEST_NOT_FOUND, NO_TOKEN, ...); empty without one.
	Reason string
	// Domain is the ErrorInfo domain ("ajs.v1" for the server's own errors).
	Domain string
	// Metadata is the ErrorInfo metadata (request_id, index, ...).
	Metadata map[string]string
	// FieldViolations are the BadRequest details of an INVALID_ARGUMENT: field path to
	// description, e.g. "request.type" -> "must not be empty".
	FieldViolations []*errdetails.BadRequest_FieldViolation
	// Details are all the decoded details (ErrorInfo, BadRequest, RetryInfo, ...), and an
	// error value for each one that could not be decoded.
	Details []interface{}

	status *status.Status
}

// Error reads "NotFound REQUEST_NOT_FOUND: no request with id 'x'".
func (e *Error) Error() string {
	if e.Reason != "" {
		return fmt.Sprintf("%s %s: %s", e.Code, e.Reason, e.Message)
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}

// GRPCStatus makes status.FromError and status.Code work on an *Error.
func (e *Error) GRPCStatus() *status.Status { return e.status }

// AsError returns err as an *Error when it is (or wraps) a gRPC status error, or err
// unchanged otherwise (nil, a context's error, a local error).
func AsError(err error) error {
	if err == nil {
		return nil
	}
	var already *Error
	if errors.As(err, &already) {
		return err
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	s, ok := status.FromError(err)
	if !ok {
		return err
	}
	return fromStatus(s)
}

// StatusError decodes a google.rpc.Status held in a message, such as the error of a
// FAILED or CANCELLED job's final Response (Response.GetError()). Nil for nil.
func StatusError(s *statuspb.Status) *Error {
	if s == nil {
		return nil
	}
	return fromStatus(status.FromProto(s))
}

func fromStatus(s *status.Status) *Error {
	e := &Error{Code: s.Code(), Message: s.Message(), Details: s.Details(), status: s}
	for _, detail := range e.Details {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			if e.Reason == "" {
				e.Reason, e.Domain, e.Metadata = d.GetReason(), d.GetDomain(), d.GetMetadata()
			}
		case *errdetails.BadRequest:
			e.FieldViolations = append(e.FieldViolations, d.GetFieldViolations()...)
		}
	}
	return e
}

// Reason is the ErrorInfo reason of err, or "" when err carries none.
func Reason(err error) string {
	var e *Error
	if errors.As(AsError(err), &e) {
		return e.Reason
	}
	return ""
}

// Code is the gRPC code of err: codes.OK for nil, codes.Unknown for a non-gRPC error,
// Canceled or DeadlineExceeded for a context's error.
func Code(err error) codes.Code {
	switch {
	case err == nil:
		return codes.OK
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	}
	var e *Error
	if errors.As(AsError(err), &e) {
		return e.Code
	}
	return codes.Unknown
}
