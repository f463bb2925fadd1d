package ajs_test

// The worker loop against a scripted WorkerService in this process: the exact messages
// of the protocol (register, credits, progress, outcome, cancel, drain, reconnect).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"ajs-grpc/clients/go/ajs"
	"ajs-grpc/clients/go/ajspb"
	"ajs-grpc/clients/go/examplespb"
)

type scriptedServer struct {
	ajspb.UnimplementedWorkerServiceServer
	calls chan ajspb.WorkerService_WorkServer
	ends  chan error // what each Work call returns
}

func (s *scriptedServer) Work(stream ajspb.WorkerService_WorkServer) error {
	s.calls <- stream
	return <-s.ends
}

// startScripted serves a scripted WorkerService and returns a worker connected to it.
func startScripted(t *testing.T, opts ajs.WorkerOptions) (*scriptedServer, *ajs.Worker, *syncBuffer) {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	scripted := &scriptedServer{calls: make(chan ajspb.WorkerService_WorkServer, 1), ends: make(chan error, 1)}
	ajspb.RegisterWorkerServiceServer(server, scripted)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	client := dial(t, listener.Addr().String(), ajs.Options{})
	logs := &syncBuffer{}
	opts.Logger = log.New(logs, "", log.Lmicroseconds)
	return scripted, ajs.NewWorker(client.Conn(), opts), logs
}

// next is the worker's next message other than a heartbeat.
func next(t *testing.T, stream ajspb.WorkerService_WorkServer) *ajspb.WorkRequest {
	t.Helper()
	for {
		m, err := stream.Recv()
		if err != nil {
			t.Fatalf("receiving from the worker: %v", err)
		}
		if m.GetHeartbeat() == nil {
			return m
		}
	}
}

func accept(t *testing.T, scripted *scriptedServer, id string) (ajspb.WorkerService_WorkServer, *ajspb.RegisterWorker) {
	t.Helper()
	var stream ajspb.WorkerService_WorkServer
	select {
	case stream = <-scripted.calls:
	case <-time.After(10 * time.Second):
		t.Fatal("the worker did not call Work")
	}
	register := next(t, stream).GetRegister()
	if register == nil {
		t.Fatal("the first message is no RegisterWorker")
	}
	err := stream.Send(&ajspb.WorkResponse{Kind: &ajspb.WorkResponse_Registered{Registered: &ajspb.WorkerRegistered{WorkerId: id, HeartbeatInterval: durationpb.New(200 * time.Millisecond)}}})
	if err != nil {
		t.Fatal(err)
	}
	return stream, register
}

func assign(t *testing.T, stream ajspb.WorkerService_WorkServer, id string, attempt uint32) {
	t.Helper()
	err := stream.Send(&ajspb.WorkResponse{Kind: &ajspb.WorkResponse_Assignment{Assignment: &ajspb.Assignment{
		Request: &ajspb.Request{Id: id, Type: "scripted"}, Attempt: attempt,
	}}})
	if err != nil {
		t.Fatal(err)
	}
}

// The messages of a session, in order: register with the declared types, progress,
// an outcome then a credit per job, a cancelled job's CANCELLED outcome, heartbeats, and
// on drain: DrainWorker, the running job's outcome (no credit), the end of the stream.
func TestWorkerProtocol(t *testing.T) {
	scripted, w, logs := startScripted(t, ajs.WorkerOptions{Name: "scripted", MaxConcurrent: 2})
	release := make(chan struct{})
	reasons := make(chan string, 3)
	err := w.Register(ajs.JobTypeSpec{Name: "scripted", Input: &examplespb.HashRequest{}, Output: &examplespb.HashResponse{}},
		func(ctx context.Context, job *ajs.Assignment) (*ajs.Result, error) {
			if err := job.Progress(0.5, "half", map[string]string{"k": "v"}); err != nil {
				return nil, err
			}
			select {
			case <-ctx.Done():
				reasons <- job.CancelReason()
				return nil, ctx.Err()
			case <-release:
			}
			return &ajs.Result{Output: &examplespb.HashResponse{HexDigest: "ab"}, Data: map[string]string{"attempt": fmt.Sprint(job.Attempt)}}, nil
		})
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()

	stream, register := accept(t, scripted, "w-1")
	types := register.GetJobTypes()
	if register.GetWorkerName() != "scripted" || register.GetMaxConcurrent() != 2 || len(types) != 1 ||
		types[0].GetInputType() != "ajs.examples.v1.HashRequest" || types[0].GetOutputType() != "ajs.examples.v1.HashResponse" || len(types[0].GetFileDescriptorSet()) == 0 {
		t.Fatalf("registration %v", register)
	}
	assign(t, stream, "a", 1)
	assign(t, stream, "b", 3)
	progressed := map[string]bool{}
	for len(progressed) < 2 {
		p := next(t, stream).GetProgress()
		if p == nil || p.GetProgress().GetFraction() != 0.5 || p.GetData()["k"] != "v" {
			t.Fatalf("want progress, got %v", p)
		}
		progressed[p.GetRequestId()] = true
	}
	// Cancel b: its outcome is CANCELLED, then one credit.
	if err := stream.Send(&ajspb.WorkResponse{Kind: &ajspb.WorkResponse_Cancel{Cancel: &ajspb.CancelAssignment{RequestId: "b", Attempt: 3, Reason: "CANCELLED_BY_CLIENT"}}}); err != nil {
		t.Fatal(err)
	}
	o := next(t, stream).GetOutcome()
	if o.GetRequestId() != "b" || o.GetAttempt() != 3 || codes.Code(o.GetError().GetCode()) != codes.Canceled {
		t.Fatalf("want b's CANCELLED outcome, got %v", o)
	}
	if reason := <-reasons; reason != "CANCELLED_BY_CLIENT" {
		t.Fatalf("cancel reason %q", reason)
	}
	if c := next(t, stream).GetCredit(); c.GetCount() != 1 {
		t.Fatalf("want a credit, got %v", c)
	}
	// Heartbeats come about every 100 ms (half the interval).
	beats := 0
	deadline := time.Now().Add(350 * time.Millisecond)
	for time.Now().Before(deadline) {
		m, err := stream.Recv()
		if err != nil || m.GetHeartbeat() == nil {
			t.Fatalf("want heartbeats only, got %v %v", m, err)
		}
		beats++
	}
	if beats < 2 {
		t.Fatalf("%d heartbeats in 350 ms", beats)
	}
	// Drain while a runs: DrainWorker, then a's outcome once released, no credit, the end.
	stop()
	if d := next(t, stream).GetDrain(); d == nil {
		t.Fatal("no DrainWorker after the context ended")
	}
	close(release)
	o = next(t, stream).GetOutcome()
	if o.GetRequestId() != "a" || o.GetError() != nil || o.GetData()["attempt"] != "1" || o.GetOutput().GetTypeUrl() != "type.googleapis.com/ajs.examples.v1.HashResponse" {
		t.Fatalf("want a's outcome, got %v", o)
	}
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil || m.GetHeartbeat() == nil {
			t.Fatalf("after the last outcome: %v %v, want the end of the stream", m, err)
		}
	}
	scripted.ends <- nil
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Run did not return after the drain\n%s", logs)
	}
}

// A broken stream abandons its jobs (their contexts are cancelled, STREAM_BROKEN) and the
// worker registers again; a refused registration ends Run with the server's error.
func TestWorkerReconnectsThenRefused(t *testing.T) {
	scripted, w, logs := startScripted(t, ajs.WorkerOptions{MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
	reasons := make(chan string, 1)
	err := w.Register(ajs.JobTypeSpec{Name: "scripted"}, func(ctx context.Context, job *ajs.Assignment) (*ajs.Result, error) {
		<-ctx.Done()
		reasons <- job.CancelReason()
		return nil, ctx.Err()
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- w.Run(context.Background()) }()
	stream, _ := accept(t, scripted, "w-1")
	assign(t, stream, "x", 1)
	scripted.ends <- status.Error(codes.Unavailable, "going away")
	select {
	case reason := <-reasons:
		if reason != "STREAM_BROKEN" {
			t.Fatalf("reason %q", reason)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the job was not abandoned\n%s", logs)
	}
	accept(t, scripted, "w-2")
	scripted.ends <- status.Error(codes.Unavailable, "going away again")
	// The third registration is refused for good.
	select {
	case stream = <-scripted.calls:
	case <-time.After(10 * time.Second):
		t.Fatalf("no third call\n%s", logs)
	}
	next(t, stream)
	scripted.ends <- status.Error(codes.PermissionDenied, "not a worker")
	select {
	case err := <-done:
		if ajs.Code(err) != codes.PermissionDenied {
			t.Fatalf("Run: %v, want PermissionDenied", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Run did not end on a refusal\n%s", logs)
	}
}

// A handler's error marked NonRetryable says so in its outcome; a panic is Internal.
func TestWorkerOutcomeErrors(t *testing.T) {
	scripted, w, logs := startScripted(t, ajs.WorkerOptions{})
	err := w.Register(ajs.JobTypeSpec{Name: "scripted"}, func(ctx context.Context, job *ajs.Assignment) (*ajs.Result, error) {
		if job.Request.GetId() == "panics" {
			panic("oops")
		}
		return nil, ajs.NonRetryable(errors.New("boom"))
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	stream, _ := accept(t, scripted, "w-1")
	assign(t, stream, "fails", 1)
	o := next(t, stream).GetOutcome()
	if o.GetRequestId() != "fails" || !o.GetNonRetryable() || codes.Code(o.GetError().GetCode()) != codes.Unknown || o.GetError().GetMessage() != "boom" {
		t.Fatalf("outcome %v", o)
	}
	next(t, stream) // the credit
	assign(t, stream, "panics", 1)
	o = next(t, stream).GetOutcome()
	if o.GetNonRetryable() || codes.Code(o.GetError().GetCode()) != codes.Internal || !strings.Contains(o.GetError().GetMessage(), "oops") {
		t.Fatalf("outcome %v", o)
	}
	stop()
	scripted.ends <- nil
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Run did not return\n%s", logs)
	}
}
