// Package hashjob is the example `hash` job run in a Go worker (cmd/ajs-go-worker and the
// worker tests): it hashes HashRequest.data with SHA-256 or SHA-512, then hashes the
// digest again for the remaining rounds, reporting progress after each round.
package hashjob

import (
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"fmt"
	"hash"
	"strconv"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	"ajs-grpc/clients/go/ajs"
	"ajs-grpc/clients/go/ajspb"
	"ajs-grpc/clients/go/examplespb"
)

// DefaultType is the job type the Go example worker registers unless told otherwise.
const DefaultType = "go-hash"

// Spec declares the job type typeName: typed input ajs.examples.v1.HashRequest, output
// ajs.examples.v1.HashResponse, up to 3 attempts (backoff 0.2 s doubling to 2 s, no
// jitter), no timeout.
func Spec(typeName string) ajs.JobTypeSpec {
	return ajs.JobTypeSpec{
		Name:        typeName,
		Description: "hashes data in a Go worker",
		Input:       &examplespb.HashRequest{},
		Output:      &examplespb.HashResponse{},
		RetryPolicy: &ajspb.RetryPolicy{
			MaxAttempts:    3,
			InitialBackoff: durationpb.New(200 * time.Millisecond),
			MaxBackoff:     durationpb.New(2 * time.Second),
			Multiplier:     2,
			Jitter:         0,
		},
	}
}

// Digest is the job's result: H(data), then H(digest) for the remaining rounds (at least
// one round), in lower-case hexadecimal. An algorithm other than SHA-256 or SHA-512 is
// an InvalidArgument *ajs.Error with reason ALGORITHM_NOT_SUPPORTED.
func Digest(data []byte, algorithm examplespb.Algorithm, rounds uint32) (string, error) {
	h, err := hasher(algorithm)
	if err != nil {
		return "", err
	}
	if rounds < 1 {
		rounds = 1
	}
	digest := data
	for i := uint32(0); i < rounds; i++ {
		digest = sum(h, digest)
	}
	return hex.EncodeToString(digest), nil
}

func hasher(algorithm examplespb.Algorithm) (func() hash.Hash, error) {
	switch algorithm {
	case examplespb.Algorithm_ALGORITHM_SHA256:
		return sha256.New, nil
	case examplespb.Algorithm_ALGORITHM_SHA512:
		return sha512.New, nil
	}
	return nil, ajs.NewError(codes.InvalidArgument, fmt.Sprintf("algorithm %s not supported here", algorithm),
		&errdetails.ErrorInfo{Reason: "ALGORITHM_NOT_SUPPORTED", Domain: "ajs-grpc", Metadata: map[string]string{"algorithm": algorithm.String()}})
}

func sum(h func() hash.Hash, data []byte) []byte {
	s := h()
	s.Write(data)
	return s.Sum(nil)
}

// Handler runs the job in the worker named workerName. After each round it reports
// progress ("round 2/5"), then waits the request's data["pause_ms"] milliseconds (default
// 0), unless the job is cancelled: then it stops at once with code Canceled. The result
// is a HashResponse and the data {worker, language: go, attempt}.
func Handler(workerName string) ajs.Handler {
	return func(ctx context.Context, job *ajs.Assignment) (*ajs.Result, error) {
		var input examplespb.HashRequest
		if err := job.DecodeInput(&input); err != nil {
			return nil, err
		}
		h, err := hasher(input.GetAlgorithm())
		if err != nil {
			return nil, err
		}
		pause := time.Duration(0)
		if text, ok := job.Request.GetData()["pause_ms"]; ok {
			ms, err := strconv.ParseUint(text, 10, 32)
			if err != nil {
				return nil, ajs.NewError(codes.InvalidArgument, fmt.Sprintf("data pause_ms %q is not a number of milliseconds", text))
			}
			pause = time.Duration(ms) * time.Millisecond
		}
		rounds := input.GetRounds()
		if rounds < 1 {
			rounds = 1
		}
		stopped := func(done uint32) error {
			return ajs.NewError(codes.Canceled, fmt.Sprintf("cancelled (%s) after round %d/%d", job.CancelReason(), done, rounds))
		}
		digest := input.GetData()
		for done := uint32(1); done <= rounds; done++ {
			if ctx.Err() != nil {
				return nil, stopped(done - 1)
			}
			digest = sum(h, digest)
			// An error here means the stream broke: the context is cancelled then too.
			_ = job.Progress(float64(done)/float64(rounds), fmt.Sprintf("round %d/%d", done, rounds), nil)
			if pause > 0 {
				select {
				case <-ctx.Done():
					return nil, stopped(done)
				case <-time.After(pause):
				}
			}
		}
		return &ajs.Result{
			Output: &examplespb.HashResponse{HexDigest: hex.EncodeToString(digest)},
			Data:   map[string]string{"worker": workerName, "language": "go", "attempt": fmt.Sprint(job.Attempt)},
		}, nil
	}
}
