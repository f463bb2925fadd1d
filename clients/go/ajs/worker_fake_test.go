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

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
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
	return acceptWith(t, scripted, &ajspb.WorkerRegistered{WorkerId: id, HeartbeatInterval: durationpb.New(200 * time.Millisecond)})
}

// acceptWith takes the worker's next call and answers its registration with registered.
func acceptWith(t *testing.T, scripted *scriptedServer, registered *ajspb.WorkerRegistered) (ajspb.WorkerService_WorkServer, *ajspb.RegisterWorker) {
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
	err := stream.Send(&ajspb.WorkResponse{Kind: &ajspb.WorkResponse_Registered{Registered: registered}})
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
// on drain: DrainWorker, the running job's outcome and that of an assignment that crossed
// the DrainWorker (no credit), no half-close: the server ends the call.
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
	// Drain while a runs: DrainWorker; c, sent before the server read it, crosses it and
	// runs; a's and c's outcomes once released, no credit; the worker keeps its side open.
	stop()
	if d := next(t, stream).GetDrain(); d == nil {
		t.Fatal("no DrainWorker after the context ended")
	}
	assign(t, stream, "c", 2)
	if p := next(t, stream).GetProgress(); p.GetRequestId() != "c" || p.GetAttempt() != 2 {
		t.Fatalf("want c's progress, got %v", p)
	}
	close(release)
	outcomes := map[string]*ajspb.ReportOutcome{}
	for len(outcomes) < 2 {
		o = next(t, stream).GetOutcome()
		if o == nil || o.GetError() != nil || o.GetOutput().GetTypeUrl() != "type.googleapis.com/ajs.examples.v1.HashResponse" {
			t.Fatalf("want an outcome (no credit after DrainWorker), got %v", o)
		}
		outcomes[o.GetRequestId()] = o
	}
	if outcomes["a"].GetData()["attempt"] != "1" || outcomes["c"].GetData()["attempt"] != "2" {
		t.Fatalf("outcomes %v", outcomes)
	}
	// Holding nothing, the worker only heartbeats: no half-close, no credit.
	deadline = time.Now().Add(400 * time.Millisecond)
	for time.Now().Before(deadline) {
		m, err := stream.Recv()
		if err == io.EOF {
			t.Fatal("the worker closed its side: the server ends a drained call")
		}
		if err != nil || m.GetHeartbeat() == nil {
			t.Fatalf("after the last outcome: %v %v, want heartbeats only", m, err)
		}
	}
	ended := time.Now()
	scripted.ends <- nil // the server ends the call: the drain is complete
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Run did not return after the drain\n%s", logs)
	}
	if took := time.Since(ended); took > 3*time.Second {
		t.Fatalf("Run returned %v after the server ended the call (the grace, not the end?)\n%s", took, logs)
	}
}

// A server that does not end a drained call is cancelled DrainGrace after the worker holds
// no job; Run returns nil.
func TestWorkerDrainGrace(t *testing.T) {
	registered := make(chan string, 1)
	scripted, w, logs := startScripted(t, ajs.WorkerOptions{DrainGrace: 300 * time.Millisecond, OnRegistered: func(id string) { registered <- id }})
	err := w.Register(ajs.JobTypeSpec{Name: "scripted"}, func(ctx context.Context, job *ajs.Assignment) (*ajs.Result, error) {
		return &ajs.Result{}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	stream, _ := accept(t, scripted, "w-1")
	<-registered // (a context ending before the answer arrives abandons the call instead)
	stop()
	if d := next(t, stream).GetDrain(); d == nil {
		t.Fatal("no DrainWorker after the context ended")
	}
	drained := time.Now()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Run did not return after the grace\n%s", logs)
	}
	if took := time.Since(drained); took < 250*time.Millisecond || took > 5*time.Second {
		t.Fatalf("Run returned %v after DrainWorker, want about the 300 ms grace", took)
	}
	for {
		_, err := stream.Recv()
		if err == io.EOF {
			t.Fatal("the worker half-closed instead of cancelling the call")
		}
		if err != nil {
			if status.Code(err) != codes.Canceled {
				t.Fatalf("the call ended with %v, want Canceled", err)
			}
			break
		}
	}
	scripted.ends <- nil
	if !strings.Contains(logs.String(), "did not end the call") {
		t.Fatalf("logs:\n%s", logs)
	}
}

// WorkerRegistered.max_result_bytes: a larger result (data's UTF-8 keys and values plus
// the output Any's size) is reported as ResourceExhausted RESULT_TOO_LARGE, non-retryable,
// without its data and output; one at the limit is sent as is.
func TestWorkerResultLimit(t *testing.T) {
	const limit = 100
	output := &examplespb.HashResponse{HexDigest: strings.Repeat("cd", 10)}
	packed, err := anypb.New(output)
	if err != nil {
		t.Fatal(err)
	}
	anySize := proto.Size(packed)
	scripted, w, logs := startScripted(t, ajs.WorkerOptions{MaxConcurrent: 4})
	err = w.Register(ajs.JobTypeSpec{Name: "scripted", Output: &examplespb.HashResponse{}}, func(ctx context.Context, job *ajs.Assignment) (*ajs.Result, error) {
		switch job.Request.GetId() {
		case "fits": // "é" and "ü" are 2 bytes each: 2 + 49*2 = 100
			return &ajs.Result{Data: map[string]string{"é": strings.Repeat("ü", 49)}}, nil
		case "over": // 102
			return &ajs.Result{Data: map[string]string{"é": strings.Repeat("ü", 50)}}, nil
		case "typed-fits": // the output's Any counts: anySize + 1 + (limit-anySize-1) = 100
			return &ajs.Result{Output: output, Data: map[string]string{"k": strings.Repeat("v", limit-anySize-1)}}, nil
		default: // typed-over: 101
			return &ajs.Result{Output: output, Data: map[string]string{"k": strings.Repeat("v", limit-anySize)}}, nil
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	stream, _ := acceptWith(t, scripted, &ajspb.WorkerRegistered{WorkerId: "w-1", HeartbeatInterval: durationpb.New(time.Second), MaxResultBytes: limit})
	for _, id := range []string{"fits", "over", "typed-fits", "typed-over"} {
		assign(t, stream, id, 1)
	}
	outcomes := map[string]*ajspb.ReportOutcome{}
	credits := 0
	for len(outcomes) < 4 || credits < 4 {
		m := next(t, stream)
		if o := m.GetOutcome(); o != nil {
			outcomes[o.GetRequestId()] = o
		} else if m.GetCredit() != nil {
			credits++
		}
	}
	if o := outcomes["fits"]; o.GetError() != nil || len(o.GetData()["é"]) != 98 {
		t.Fatalf("fits: %v", o)
	}
	if o := outcomes["typed-fits"]; o.GetError() != nil || o.GetOutput() == nil {
		t.Fatalf("typed-fits: %v", o)
	}
	for id, size := range map[string]int{"over": 102, "typed-over": 101} {
		o := outcomes[id]
		want := fmt.Sprintf("the job returned %d bytes, more than the server's limit of %d", size, limit)
		if codes.Code(o.GetError().GetCode()) != codes.ResourceExhausted || o.GetError().GetMessage() != want || !o.GetNonRetryable() || o.GetData() != nil || o.GetOutput() != nil {
			t.Fatalf("%s: %v", id, o)
		}
		details := status.FromProto(o.GetError()).Details()
		info, ok := (*errdetails.ErrorInfo)(nil), len(details) == 1
		if ok {
			info, ok = details[0].(*errdetails.ErrorInfo)
		}
		if !ok {
			t.Fatalf("%s: details %v", id, details)
		}
		if info.GetReason() != "RESULT_TOO_LARGE" || info.GetDomain() != "ajs-grpc" || info.GetMetadata()["bytes"] != fmt.Sprint(size) || info.GetMetadata()["limit"] != fmt.Sprint(limit) {
			t.Fatalf("%s: ErrorInfo %v", id, info)
		}
	}
	stop()
	if d := next(t, stream).GetDrain(); d == nil {
		t.Fatal("no DrainWorker")
	}
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
