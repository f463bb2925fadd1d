package ajs_test

// Compiled by go vet and go test (not run: it needs a server); README.md shows the same code.

import (
	"context"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"

	"ajs-grpc/clients/go/ajs"
	"ajs-grpc/clients/go/examplespb"
)

func ExampleWorker() {
	// SIGTERM ends the context: Run then drains (no new jobs; the running ones finish).
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	client, err := ajs.Dial("127.0.0.1:50051", ajs.Options{Token: os.Getenv("AJS_TOKEN")})
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	worker := ajs.NewWorker(client.Conn(), ajs.WorkerOptions{Name: "hasher-1", MaxConcurrent: 4})
	spec := ajs.JobTypeSpec{
		Name:   "my-hash",
		Input:  &examplespb.HashRequest{},  // declared with its FileDescriptorSet:
		Output: &examplespb.HashResponse{}, // submits are checked against it
	}
	err = worker.Register(spec, func(ctx context.Context, job *ajs.Assignment) (*ajs.Result, error) {
		var input examplespb.HashRequest
		if err := job.DecodeInput(&input); err != nil {
			return nil, err // InvalidArgument: the job fails without a retry
		}
		if input.GetAlgorithm() != examplespb.Algorithm_ALGORITHM_SHA256 {
			return nil, ajs.NewError(codes.InvalidArgument, "only SHA-256 here",
				&errdetails.ErrorInfo{Reason: "ALGORITHM_NOT_SUPPORTED"})
		}
		_ = job.Progress(0.5, "halfway", nil) // a PENDING Response that watchers see
		if ctx.Err() != nil {
			return nil, ctx.Err() // cancelled: job.CancelReason() says why
		}
		digest := fmt.Sprintf("%x", input.GetData()) // (the real work)
		return &ajs.Result{Output: &examplespb.HashResponse{HexDigest: digest}, Data: map[string]string{"by": "hasher-1"}}, nil
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := worker.Run(ctx); err != nil { // reconnects by itself; nil after a drain
		log.Fatal(err) // the registration was refused for good (a bad declaration, no worker role)
	}
}
