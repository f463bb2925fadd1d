package ajs_test

// The worker loop against a real `ajs serve` (AJS_BIN) on 127.0.0.1: workers run in this
// process (cmd/ajs-go-worker's tests run it as a process, killed and drained for real).

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/known/anypb"

	"ajs-grpc/clients/go/ajs"
	"ajs-grpc/clients/go/ajspb"
	"ajs-grpc/clients/go/examplespb"
	"ajs-grpc/clients/go/internal/hashjob"
	"ajs-grpc/clients/go/internal/liveserver"
)

// testWorker is a Worker running on its own goroutine until the test ends.
type testWorker struct {
	*ajs.Worker
	ids  chan string // each registration's worker id
	stop context.CancelFunc
	done chan error // Run's result
	logs *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startWorker runs a worker with register's types and waits for its registration.
func startWorker(t *testing.T, client *ajs.Client, opts ajs.WorkerOptions, register func(*ajs.Worker)) *testWorker {
	t.Helper()
	tw := &testWorker{ids: make(chan string, 10), done: make(chan error, 1), logs: &syncBuffer{}}
	opts.OnRegistered = func(id string) { tw.ids <- id }
	opts.Logger = log.New(tw.logs, "worker: ", log.Lmicroseconds)
	tw.Worker = ajs.NewWorker(client.Conn(), opts)
	register(tw.Worker)
	ctx, stop := context.WithCancel(context.Background())
	tw.stop = stop
	go func() { tw.done <- tw.Run(ctx) }()
	t.Cleanup(func() {
		stop()
		select {
		case <-tw.done:
		case <-time.After(20 * time.Second):
			t.Errorf("the worker did not stop within 20 s:\n%s", tw.logs)
		}
	})
	select {
	case <-tw.ids:
	case err := <-tw.done:
		t.Fatalf("the worker ended before registering: %v\n%s", err, tw.logs)
	case <-time.After(20 * time.Second):
		t.Fatalf("the worker did not register within 20 s:\n%s", tw.logs)
	}
	return tw
}

func hashRequest(t *testing.T, id, typeName string, input *examplespb.HashRequest, data map[string]string) *ajspb.Request {
	t.Helper()
	packed, err := anypb.New(input)
	if err != nil {
		t.Fatal(err)
	}
	return &ajspb.Request{Id: id, Type: typeName, Input: packed, Data: data}
}

// responses watches a job to its end and returns all its Responses.
func responses(t *testing.T, ctx context.Context, client *ajs.Client, id string, each func(*ajspb.Response)) []*ajspb.Response {
	t.Helper()
	watch := client.Watch(ctx, id, 0)
	defer watch.Close()
	var all []*ajspb.Response
	for {
		r, err := watch.Next()
		if err == io.EOF {
			return all
		}
		if err != nil {
			t.Fatalf("watching %s: %v (after %d Responses)", id, err, len(all))
		}
		all = append(all, r)
		if each != nil {
			each(r)
		}
	}
}

// A typed job runs in the worker: progress after each round reaches the watcher, the
// output is the digest, the data name the worker and attempt; the type is listed with its
// typed contract; an unsupported algorithm fails the job at once with the worker's reason.
func TestWorkerRunsTypedJobs(t *testing.T) {
	server := liveserver.Start(t)
	client := dial(t, server.Target, ajs.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tw := startWorker(t, client, ajs.WorkerOptions{Name: "go-typed"}, func(w *ajs.Worker) {
		if err := w.Register(hashjob.Spec("go-hash-typed"), hashjob.Handler(w.Name())); err != nil {
			t.Fatal(err)
		}
	})

	types, err := client.Service().ListJobTypes(ctx, &ajspb.ListJobTypesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var declared *ajspb.JobType
	for _, jt := range types.GetJobTypes() {
		if jt.GetName() == "go-hash-typed" {
			declared = jt
		}
	}
	if declared == nil || declared.GetInputType() != "ajs.examples.v1.HashRequest" || declared.GetOutputType() != "ajs.examples.v1.HashResponse" ||
		declared.GetDescription() != "hashes data in a Go worker" || declared.GetRetryPolicy().GetMaxAttempts() != 3 {
		t.Fatalf("ListJobTypes lists go-hash-typed as %v", declared)
	}

	input := &examplespb.HashRequest{Data: []byte("hello"), Algorithm: examplespb.Algorithm_ALGORITHM_SHA256, Rounds: 3}
	if _, _, err := client.Submit(ctx, hashRequest(t, "go-typed-1", "go-hash-typed", input, nil)); err != nil {
		t.Fatal(err)
	}
	all := responses(t, ctx, client, "go-typed-1", nil)
	var progress []string
	for _, r := range all {
		if p := r.GetProgress(); p != nil {
			progress = append(progress, fmt.Sprintf("%.3f %s", p.GetFraction(), p.GetMessage()))
		}
	}
	if want := []string{"0.333 round 1/3", "0.667 round 2/3", "1.000 round 3/3"}; strings.Join(progress, ",") != strings.Join(want, ",") {
		t.Fatalf("progress %q, want %q", progress, want)
	}
	final := all[len(all)-1]
	if final.GetState() != ajspb.RequestState_REQUEST_STATE_FINISHED {
		t.Fatalf("final Response %s %v\n%s", describe(final), final, tw.logs)
	}
	digest := []byte("hello")
	for i := 0; i < 3; i++ {
		sum := sha256.Sum256(digest)
		digest = sum[:]
	}
	var output examplespb.HashResponse
	if err := final.GetOutput().UnmarshalTo(&output); err != nil || output.GetHexDigest() != hex.EncodeToString(digest) {
		t.Fatalf("output %v (%v), want the digest %x", final.GetOutput(), err, digest)
	}
	if d := final.GetData(); d["worker"] != "go-typed" || d["language"] != "go" || d["attempt"] != "1" {
		t.Fatalf("final data %v", d)
	}

	// An algorithm the worker does not support: FAILED at once, with the worker's reason and
	// metadata (the contract keeps those; the server states its own ErrorInfo domain).
	input = &examplespb.HashRequest{Data: []byte("x"), Algorithm: examplespb.Algorithm_ALGORITHM_BLAKE2B}
	if _, _, err := client.Submit(ctx, hashRequest(t, "go-typed-blake", "go-hash-typed", input, nil)); err != nil {
		t.Fatal(err)
	}
	final, err = client.Wait(ctx, "go-typed-blake")
	if err != nil {
		t.Fatal(err)
	}
	failure := ajs.StatusError(final.GetError())
	if final.GetState() != ajspb.RequestState_REQUEST_STATE_FAILED || failure == nil || failure.Code != codes.InvalidArgument ||
		failure.Reason != "ALGORITHM_NOT_SUPPORTED" || failure.Metadata["algorithm"] != "ALGORITHM_BLAKE2B" || !strings.Contains(failure.Message, "not supported here") {
		t.Fatalf("BLAKE2B: %s: code %v reason %q domain %q message %q", describe(final), failure.Code, failure.Reason, failure.Domain, failure.Message)
	}
	if job, err := client.Get(ctx, "go-typed-blake"); err != nil || job.GetAttempt() != 1 {
		t.Fatalf("BLAKE2B ran %d times (%v); InvalidArgument is not retried", job.GetAttempt(), err)
	}

	// The declared input type is checked at submit.
	wrong, _ := anypb.New(&examplespb.HashResponse{HexDigest: "00"})
	_, _, err = client.Submit(ctx, &ajspb.Request{Id: "go-typed-wrong", Type: "go-hash-typed", Input: wrong})
	if ajs.Code(err) != codes.InvalidArgument {
		t.Fatalf("submitting a HashResponse as input: %v, want InvalidArgument", err)
	}
}

// CancelJob reaches the handler: its context is cancelled with the server's reason, and
// the job ends CANCELLED at once.
func TestWorkerCancel(t *testing.T) {
	server := liveserver.Start(t, "--cancel-grace", "10")
	client := dial(t, server.Target, ajs.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	reasons := make(chan string, 1)
	startWorker(t, client, ajs.WorkerOptions{Name: "go-cancel"}, func(w *ajs.Worker) {
		err := w.Register(ajs.JobTypeSpec{Name: "go-wait"}, func(ctx context.Context, job *ajs.Assignment) (*ajs.Result, error) {
			if err := job.Progress(0, "waiting to be cancelled", nil); err != nil {
				return nil, err
			}
			select {
			case <-ctx.Done():
				reasons <- job.CancelReason()
				return nil, ctx.Err()
			case <-time.After(30 * time.Second):
				return &ajs.Result{}, nil
			}
		})
		if err != nil {
			t.Fatal(err)
		}
	})
	if _, _, err := client.Submit(ctx, &ajspb.Request{Id: "go-cancel-1", Type: "go-wait"}); err != nil {
		t.Fatal(err)
	}
	var asked time.Time
	all := responses(t, ctx, client, "go-cancel-1", func(r *ajspb.Response) {
		if r.GetProgress() != nil && asked.IsZero() {
			asked = time.Now()
			if _, err := client.Cancel(ctx, "go-cancel-1"); err != nil {
				t.Fatal(err)
			}
		}
	})
	took := time.Since(asked)
	final := all[len(all)-1]
	if asked.IsZero() || final.GetState() != ajspb.RequestState_REQUEST_STATE_CANCELLED {
		t.Fatalf("final Response %s (cancel asked: %v)", describe(final), !asked.IsZero())
	}
	select {
	case reason := <-reasons:
		if reason != "CANCELLED_BY_CLIENT" {
			t.Fatalf("the handler's context was cancelled with reason %q", reason)
		}
	default:
		t.Fatal("the handler's context was not cancelled")
	}
	if took > 3*time.Second {
		t.Fatalf("the job took %v to end CANCELLED after CancelJob", took)
	}
	t.Logf("CANCELLED %v after CancelJob: %s", took.Round(time.Millisecond), describe(final))
}

// A result past the server's max_result_bytes fails its job at once (ResourceExhausted,
// RESULT_TOO_LARGE, attempt 1 whatever the retry policy) instead of ending the session:
// the next job of the same worker runs.
func TestWorkerResultTooLarge(t *testing.T) {
	server := liveserver.Start(t)
	client := dial(t, server.Target, ajs.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tw := startWorker(t, client, ajs.WorkerOptions{Name: "go-big"}, func(w *ajs.Worker) {
		spec := ajs.JobTypeSpec{Name: "go-big", RetryPolicy: &ajspb.RetryPolicy{MaxAttempts: 3}}
		err := w.Register(spec, func(ctx context.Context, job *ajs.Assignment) (*ajs.Result, error) {
			var size int
			fmt.Sscan(job.Request.GetData()["size"], &size)
			return &ajs.Result{Data: map[string]string{"x": strings.Repeat("a", size)}}, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
	if _, _, err := client.Submit(ctx, &ajspb.Request{Id: "go-big-1", Type: "go-big", Data: map[string]string{"size": fmt.Sprint(5 << 20)}}); err != nil {
		t.Fatal(err)
	}
	final, err := client.Wait(ctx, "go-big-1")
	if err != nil {
		t.Fatal(err)
	}
	failure := ajs.StatusError(final.GetError())
	want := fmt.Sprintf("the job returned %d bytes, more than the server's limit of ", 1+5<<20)
	if final.GetState() != ajspb.RequestState_REQUEST_STATE_FAILED || failure == nil || failure.Code != codes.ResourceExhausted ||
		failure.Reason != "RESULT_TOO_LARGE" || !strings.Contains(failure.Message, want) {
		t.Fatalf("final Response %s\n%s", describe(final), tw.logs)
	}
	if job, err := client.Get(ctx, "go-big-1"); err != nil || job.GetAttempt() != 1 {
		t.Fatalf("the job ran %d times (%v): RESULT_TOO_LARGE is not retried", job.GetAttempt(), err)
	}
	if _, _, err := client.Submit(ctx, &ajspb.Request{Id: "go-big-2", Type: "go-big", Data: map[string]string{"size": "10"}}); err != nil {
		t.Fatal(err)
	}
	final, err = client.Wait(ctx, "go-big-2")
	if err != nil || final.GetState() != ajspb.RequestState_REQUEST_STATE_FINISHED || final.GetData()["x"] != "aaaaaaaaaa" {
		t.Fatalf("the next job: %s (%v)\n%s", describe(final), err, tw.logs)
	}
	select {
	case id := <-tw.ids:
		t.Fatalf("the worker registered again (%s): the big result ended its session\n%s", id, tw.logs)
	default:
	}
}

// Credits: a worker never runs more jobs at once than MaxConcurrent, and takes the next
// job as soon as one ends.
func TestWorkerCredits(t *testing.T) {
	server := liveserver.Start(t)
	client := dial(t, server.Target, ajs.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, limit := range []int{1, 2} {
		typeName := fmt.Sprintf("go-credits-%d", limit)
		var now, most int32
		startWorker(t, client, ajs.WorkerOptions{Name: typeName, MaxConcurrent: limit}, func(w *ajs.Worker) {
			err := w.Register(ajs.JobTypeSpec{Name: typeName}, func(ctx context.Context, job *ajs.Assignment) (*ajs.Result, error) {
				n := atomic.AddInt32(&now, 1)
				defer atomic.AddInt32(&now, -1)
				for {
					m := atomic.LoadInt32(&most)
					if n <= m || atomic.CompareAndSwapInt32(&most, m, n) {
						break
					}
				}
				time.Sleep(300 * time.Millisecond)
				return &ajs.Result{Data: map[string]string{"running": fmt.Sprint(n)}}, nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
		jobs := 2*limit + 1
		start := time.Now()
		for i := 0; i < jobs; i++ {
			if _, _, err := client.Submit(ctx, &ajspb.Request{Id: fmt.Sprintf("%s-%d", typeName, i), Type: typeName}); err != nil {
				t.Fatal(err)
			}
		}
		for i := 0; i < jobs; i++ {
			final, err := client.Wait(ctx, fmt.Sprintf("%s-%d", typeName, i))
			if err != nil || final.GetState() != ajspb.RequestState_REQUEST_STATE_FINISHED {
				t.Fatalf("job %d: %v %v", i, describe(final), err)
			}
		}
		if most != int32(limit) {
			t.Fatalf("MaxConcurrent %d: at most %d jobs ran at once", limit, most)
		}
		t.Logf("MaxConcurrent %d: %d jobs of 300 ms in %v, at most %d at once", limit, jobs, time.Since(start).Round(time.Millisecond), most)
	}
}

// The server killed and started again on the same port: the worker registers again by
// itself and runs the jobs submitted afterwards.
func TestWorkerReconnects(t *testing.T) {
	server := liveserver.Start(t, "--shutdown-grace", "0.5")
	client := dial(t, server.Target, ajs.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tw := startWorker(t, client, ajs.WorkerOptions{Name: "go-reconnect", MaxBackoff: 500 * time.Millisecond}, func(w *ajs.Worker) {
		if err := w.Register(hashjob.Spec("go-hash-reconnect"), hashjob.Handler(w.Name())); err != nil {
			t.Fatal(err)
		}
	})
	server.Kill()
	if err := server.Restart(); err != nil {
		t.Fatal(err)
	}
	select {
	case id := <-tw.ids:
		t.Logf("registered again as %s", id)
	case <-time.After(20 * time.Second):
		t.Fatalf("no new registration within 20 s of the restart:\n%s", tw.logs)
	}
	input := &examplespb.HashRequest{Data: []byte("again"), Algorithm: examplespb.Algorithm_ALGORITHM_SHA512, Rounds: 2}
	if _, _, err := client.Submit(ctx, hashRequest(t, "go-reconnect-1", "go-hash-reconnect", input, nil)); err != nil {
		t.Fatal(err)
	}
	final, err := client.Wait(ctx, "go-reconnect-1")
	if err != nil || final.GetState() != ajspb.RequestState_REQUEST_STATE_FINISHED {
		t.Fatalf("after the restart: %v %v\nworker log:\n%s", describe(final), err, tw.logs)
	}
	want, _ := hashjob.Digest([]byte("again"), examplespb.Algorithm_ALGORITHM_SHA512, 2)
	var output examplespb.HashResponse
	if err := final.GetOutput().UnmarshalTo(&output); err != nil || output.GetHexDigest() != want {
		t.Fatalf("output %v (%v), want %s", final.GetOutput(), err, want)
	}
}

// A registration the server refuses for good ends Run with the server's error, at once.
func TestWorkerRefused(t *testing.T) {
	server := liveserver.Start(t)
	client := dial(t, server.Target, ajs.Options{})
	var logs syncBuffer
	w := ajs.NewWorker(client.Conn(), ajs.WorkerOptions{Name: "go-refused", Logger: log.New(&logs, "", 0)})
	// An input type without the descriptors that define it.
	bad := ajs.JobTypeSpec{Name: "go-refused", Template: &ajspb.JobType{InputType: "no.such.Message"}}
	if err := w.Register(bad, func(context.Context, *ajs.Assignment) (*ajs.Result, error) { return nil, nil }); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err := w.Run(ctx)
	if ajs.Code(err) != codes.InvalidArgument || ctx.Err() != nil {
		t.Fatalf("Run: %v (context: %v), want InvalidArgument at once\n%s", err, ctx.Err(), logs.String())
	}
	t.Logf("refused: %v", err)
}

// Register checks its arguments, and builds the FileDescriptorSet with the imports first.
func TestWorkerRegisterChecks(t *testing.T) {
	w := ajs.NewWorker(nil, ajs.WorkerOptions{})
	handler := func(context.Context, *ajs.Assignment) (*ajs.Result, error) { return nil, nil }
	if err := w.Register(ajs.JobTypeSpec{}, handler); err == nil {
		t.Error("a type without a name was accepted")
	}
	if err := w.Register(ajs.JobTypeSpec{Name: "a"}, nil); err == nil {
		t.Error("a type without a handler was accepted")
	}
	if err := w.Register(ajs.JobTypeSpec{Name: "a"}, handler); err != nil {
		t.Fatal(err)
	}
	if err := w.Register(ajs.JobTypeSpec{Name: "a"}, handler); err == nil {
		t.Error("a type registered twice was accepted")
	}
	// ajs.v1.Response imports any, duration, timestamp and google/rpc/status (which imports any).
	set, err := ajs.FileDescriptorSet(&ajspb.Response{}, &ajspb.Request{})
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(fileSet(t, set), " ")
	if want := "google/protobuf/any.proto google/protobuf/duration.proto google/protobuf/timestamp.proto google/rpc/status.proto ajs/v1/job_service.proto"; got != want {
		t.Fatalf("files %s, want %s", got, want)
	}
}

func fileSet(t *testing.T, serialized []byte) []string {
	t.Helper()
	var set descriptorpb.FileDescriptorSet
	if err := proto.Unmarshal(serialized, &set); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range set.GetFile() {
		names = append(names, f.GetName())
	}
	return names
}

// Over TLS with a bearer token of the worker role: the worker registers and runs a job
// (the token's principal may submit it too).
func TestWorkerOverTLS(t *testing.T) {
	caFile, certFile, keyFile := certificates(t)
	digest := sha256.Sum256([]byte("go-runner-token"))
	tokens := filepath.Join(t.TempDir(), "tokens.toml")
	entry := fmt.Sprintf("[[tokens]]\nsha256 = %q\nprincipal = \"runner\"\nroles = [\"worker\"]\n", hex.EncodeToString(digest[:]))
	if err := os.WriteFile(tokens, []byte(entry), 0o600); err != nil {
		t.Fatal(err)
	}
	server := liveserver.Start(t, "--tls-cert", certFile, "--tls-key", keyFile, "--tokens-file", tokens)
	client := dial(t, server.Target, ajs.Options{CAFile: caFile, Token: "go-runner-token"})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	startWorker(t, client, ajs.WorkerOptions{Name: "go-tls"}, func(w *ajs.Worker) {
		if err := w.Register(hashjob.Spec("go-hash-tls"), hashjob.Handler(w.Name())); err != nil {
			t.Fatal(err)
		}
	})
	input := &examplespb.HashRequest{Data: []byte("tls"), Algorithm: examplespb.Algorithm_ALGORITHM_SHA256}
	if _, _, err := client.Submit(ctx, hashRequest(t, "go-tls-1", "go-hash-tls", input, nil)); err != nil {
		t.Fatal(err)
	}
	final, err := client.Wait(ctx, "go-tls-1")
	if err != nil || final.GetState() != ajspb.RequestState_REQUEST_STATE_FINISHED || final.GetData()["worker"] != "go-tls" {
		t.Fatalf("over TLS: %v %v %v", describe(final), final.GetData(), err)
	}
}
