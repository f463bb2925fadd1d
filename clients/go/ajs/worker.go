package ajs

// The worker side of ajs-grpc: WorkerService.Work (protos/ajs/v1/worker_service.proto).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	protov1 "github.com/golang/protobuf/proto"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"

	"ajs-grpc/clients/go/ajspb"
)

// WorkerOptions are the settings of a Worker. The zero value is usable: one job at a time,
// logs to stderr.
type WorkerOptions struct {
	// Name is the worker's name for humans and the server's logs (a host or pod name);
	// need not be unique. Default: "<host>:<pid>".
	Name string
	// MaxConcurrent is how many jobs the worker runs at once (default 1).
	MaxConcurrent int
	// OnRegistered is called each time the worker registers (again after a reconnect),
	// with the session's id.
	OnRegistered func(workerID string)
	// Logger receives what the worker does besides running jobs (reconnects, drains,
	// handler panics). Nil: a logger on stderr. log.New(io.Discard, "", 0) silences it.
	Logger *log.Logger
	// MinBackoff and MaxBackoff bound the wait before a reconnect: it starts at
	// MinBackoff (default 100 ms) and doubles after each failed attempt up to MaxBackoff
	// (default 5 s), with ±20 % jitter; a successful registration resets it.
	MinBackoff, MaxBackoff time.Duration
	// DrainTimeout bounds how long Run waits, once its context ends, for the running jobs
	// to finish; then their contexts are cancelled and the stream is dropped (the server
	// queues them again). 0: no limit.
	DrainTimeout time.Duration
	// DrainGrace is how long a draining worker that holds no job waits for the server to
	// end the call (it does once every job has its outcome) before cancelling it
	// (default 10 s).
	DrainGrace time.Duration
	// AbandonWait is how long a broken stream's jobs (whose contexts are cancelled:
	// the server has queued them again) get to return before the worker reconnects
	// regardless (default 5 s), so that an aborted job rarely overlaps the next ones.
	AbandonWait time.Duration
}

// JobTypeSpec declares a job type the worker runs: RegisterWorker sends it as an
// ajspb.JobType.
type JobTypeSpec struct {
	// Name is the job type (Request.type). Required.
	Name string
	// Description is one line for humans (ListJobTypes shows it).
	Description string
	// Input and Output, when set, are (any instance of) the messages of the type's typed
	// input and output: their full names are sent as input_type and output_type, and
	// their files with all their imports as the file_descriptor_set, so the server checks
	// submits against them and clients without the .proto files can build inputs.
	Input, Output proto.Message
	// RetryPolicy is when a failed attempt runs again (nil: the server's default).
	RetryPolicy *ajspb.RetryPolicy
	// Timeout bounds one attempt (0: no limit); past it the job is cancelled
	// (CancelAssignment JOB_TIMEOUT) and its context's deadline has passed.
	Timeout time.Duration
	// Template, when set, is copied into the declaration first, for the JobType fields
	// not named above (concurrency, rate_limit, ordered_by, unique,
	// allow_failed_dependencies); the fields above replace its own.
	Template *ajspb.JobType
}

// Handler runs one attempt of a job. Its context is cancelled when the server cancels the
// job (CancelAssignment: see Assignment.CancelReason), when the stream the job came on
// breaks, or past the attempt's deadline. It returns the job's result, or an error that
// fails the attempt: an error carrying a gRPC status (NewError, *Error, status.Error)
// is reported with its code, message and details (a non-retryable code such as
// InvalidArgument fails the job at once; others run it again within the type's retry
// policy; NonRetryable(err) fails it at once whatever the code); a context's error is
// reported as Canceled or DeadlineExceeded; any other error as Unknown with its text. A
// panic is reported as Internal.
type Handler func(ctx context.Context, job *Assignment) (*Result, error)

// Result is the successful end of a job.
type Result struct {
	// Output is the typed result (a message of the type's output type), sent packed in
	// an Any; nil for none.
	Output proto.Message
	// Data are untyped results (the final Response's data).
	Data map[string]string
}

// Assignment is one attempt of a job handed to the worker.
type Assignment struct {
	// Request is the request to run (its Input is checked against the type's input type).
	Request *ajspb.Request
	// Attempt is 1 on the first run, higher when the job runs again.
	Attempt uint32
	// Deadline is when the attempt must have ended (the handler's context has it too);
	// zero for no limit.
	Deadline time.Time
	// Dependencies are the final Responses of the request's dependencies.
	Dependencies []*ajspb.Response

	session *session
	reason  atomic.Value // string: why the job was cancelled
	ended   int32        // 1 once the handler has returned
}

// DecodeInput unpacks the request's typed input into into (a message of the type's input
// type). The error is an *Error with code InvalidArgument when there is no input or it
// holds another message, so a handler may return it as is (the job then fails without a
// retry).
func (a *Assignment) DecodeInput(into proto.Message) error {
	input := a.Request.GetInput()
	if input == nil {
		return NewError(codes.InvalidArgument, fmt.Sprintf("request %q has no input (want a %s)", a.Request.GetId(), into.ProtoReflect().Descriptor().FullName()))
	}
	if err := input.UnmarshalTo(into); err != nil {
		return NewError(codes.InvalidArgument, fmt.Sprintf("request %q: decoding its input (%s): %v", a.Request.GetId(), input.GetTypeUrl(), err))
	}
	return nil
}

// Progress reports how far the job has come (fraction between 0 and 1, a message for
// humans, and optional data): a PENDING Response that watchers see. It fails once the
// handler has returned, or when the worker's stream has broken (the job's context is
// then cancelled too).
func (a *Assignment) Progress(fraction float64, message string, data map[string]string) error {
	if atomic.LoadInt32(&a.ended) == 1 {
		return errors.New("ajs: Progress after the job's handler returned")
	}
	return a.session.send(&ajspb.WorkRequest{Kind: &ajspb.WorkRequest_Progress{Progress: &ajspb.ReportProgress{
		RequestId: a.Request.GetId(),
		Attempt:   a.Attempt,
		Progress:  &ajspb.Progress{Fraction: fraction, Message: message},
		Data:      data,
	}}})
}

// CancelReason tells why the job's context was cancelled: the server's reason
// (CANCELLED_BY_CLIENT, JOB_TIMEOUT, SERVER_SHUTDOWN, LEASE_LOST), STREAM_BROKEN when the
// worker lost its stream, DRAIN_TIMEOUT when Run gave up waiting; "" if not cancelled.
func (a *Assignment) CancelReason() string {
	reason, _ := a.reason.Load().(string)
	return reason
}

// NewError makes an error for a handler to return, with a gRPC code, a message and
// google.rpc details such as &errdetails.ErrorInfo{Reason: ..., Domain: ...} or
// &errdetails.RetryInfo{RetryDelay: ...} (which the server honours before the next
// attempt). A detail that cannot be packed is left out.
func NewError(code codes.Code, message string, details ...protov1.Message) *Error {
	s := status.New(code, message)
	for _, detail := range details {
		if with, err := s.WithDetails(detail); err == nil {
			s = with
		}
	}
	return fromStatus(s)
}

// NonRetryable marks a handler's error as final: the outcome says non_retryable, and the
// job ends FAILED whatever its retry policy (the error's code, message and details are
// reported as they are). Nil stays nil.
func NonRetryable(err error) error {
	if err == nil {
		return nil
	}
	return &nonRetryable{err}
}

// IsNonRetryable tells whether err was marked with NonRetryable.
func IsNonRetryable(err error) bool {
	var n *nonRetryable
	return errors.As(err, &n)
}

type nonRetryable struct{ err error }

func (n *nonRetryable) Error() string { return n.err.Error() }
func (n *nonRetryable) Unwrap() error { return n.err }

// Worker runs the jobs of the types registered with Register, handed out by an ajs-grpc
// server's WorkerService, until Run's context ends.
type Worker struct {
	conn grpc.ClientConnInterface
	opts WorkerOptions
	log  *log.Logger

	mu       sync.Mutex
	types    []*ajspb.JobType
	handlers map[string]Handler
	running  bool
}

// NewWorker makes a worker that calls the server over conn (Client.Conn of a Dial, with
// its TLS and token settings, or any gRPC connection).
func NewWorker(conn grpc.ClientConnInterface, opts WorkerOptions) *Worker {
	if opts.Name == "" {
		host, _ := os.Hostname()
		opts.Name = fmt.Sprintf("%s:%d", host, os.Getpid())
	}
	if opts.MaxConcurrent < 1 {
		opts.MaxConcurrent = 1
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = 100 * time.Millisecond
	}
	if opts.MaxBackoff < opts.MinBackoff {
		opts.MaxBackoff = 5 * time.Second
		if opts.MaxBackoff < opts.MinBackoff {
			opts.MaxBackoff = opts.MinBackoff
		}
	}
	if opts.AbandonWait <= 0 {
		opts.AbandonWait = 5 * time.Second
	}
	if opts.DrainGrace <= 0 {
		opts.DrainGrace = 10 * time.Second
	}
	logger := opts.Logger
	if logger == nil {
		logger = log.New(os.Stderr, "ajs worker: ", log.LstdFlags)
	}
	return &Worker{conn: conn, opts: opts, log: logger, handlers: map[string]Handler{}}
}

// Name is the worker's name as registered.
func (w *Worker) Name() string { return w.opts.Name }

// Register declares a job type and the handler that runs its jobs. Call it before Run.
func (w *Worker) Register(spec JobTypeSpec, handler Handler) error {
	if spec.Name == "" {
		return errors.New("ajs: a job type needs a name")
	}
	if handler == nil {
		return fmt.Errorf("ajs: job type %q has no handler", spec.Name)
	}
	declaration := &ajspb.JobType{}
	if spec.Template != nil {
		declaration = proto.Clone(spec.Template).(*ajspb.JobType)
	}
	declaration.Name = spec.Name
	declaration.Description = spec.Description
	declaration.Handler = ""
	if spec.RetryPolicy != nil {
		declaration.RetryPolicy = spec.RetryPolicy
	}
	if spec.Timeout > 0 {
		declaration.Timeout = durationpb.New(spec.Timeout)
	}
	var typed []proto.Message
	if spec.Input != nil {
		declaration.InputType = string(spec.Input.ProtoReflect().Descriptor().FullName())
		typed = append(typed, spec.Input)
	}
	if spec.Output != nil {
		declaration.OutputType = string(spec.Output.ProtoReflect().Descriptor().FullName())
		typed = append(typed, spec.Output)
	}
	if len(typed) > 0 {
		set, err := FileDescriptorSet(typed...)
		if err != nil {
			return fmt.Errorf("ajs: job type %q: %w", spec.Name, err)
		}
		declaration.FileDescriptorSet = set
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.running {
		return fmt.Errorf("ajs: job type %q registered while the worker runs", spec.Name)
	}
	if _, taken := w.handlers[spec.Name]; taken {
		return fmt.Errorf("ajs: job type %q registered twice", spec.Name)
	}
	w.types = append(w.types, declaration)
	w.handlers[spec.Name] = handler
	return nil
}

// FileDescriptorSet serializes a google.protobuf.FileDescriptorSet holding the files that
// define messages and all the files they import, each once, dependencies first.
func FileDescriptorSet(messages ...proto.Message) ([]byte, error) {
	seen := map[string]bool{}
	set := &descriptorpb.FileDescriptorSet{}
	var visit func(file protoreflect.FileDescriptor)
	visit = func(file protoreflect.FileDescriptor) {
		if seen[file.Path()] {
			return
		}
		seen[file.Path()] = true
		imports := file.Imports()
		for i := 0; i < imports.Len(); i++ {
			visit(imports.Get(i).FileDescriptor)
		}
		set.File = append(set.File, protodesc.ToFileDescriptorProto(file))
	}
	for _, message := range messages {
		visit(message.ProtoReflect().Descriptor().ParentFile())
	}
	return proto.Marshal(set)
}

// Run connects, registers the worker's types and runs the jobs the server hands out, at
// most MaxConcurrent at once. When the stream breaks (a server restart, a lost
// connection) the jobs it held are abandoned (their contexts are cancelled: the server has
// queued them again) and Run connects again, after a backoff. When ctx ends, Run drains:
// it sends DrainWorker and no more credit, keeps reading (an assignment that crossed the
// DrainWorker runs like any other), waits for the running jobs (at most DrainTimeout) and
// sends their outcomes; the server then ends the call and Run returns nil (if the server
// has not ended it DrainGrace after the worker holds no job, Run cancels it and returns
// nil). A registration the server
// refuses for good (InvalidArgument, PermissionDenied, FailedPrecondition,
// Unauthenticated, or Unimplemented: a server without WorkerService) ends Run with that
// *Error.
func (w *Worker) Run(ctx context.Context) error {
	w.mu.Lock()
	if w.running {
		w.mu.Unlock()
		return errors.New("ajs: Run called twice")
	}
	if len(w.types) == 0 {
		w.mu.Unlock()
		return errors.New("ajs: no job type registered")
	}
	w.running = true
	register := &ajspb.RegisterWorker{WorkerName: w.opts.Name, JobTypes: w.types, MaxConcurrent: uint32(w.opts.MaxConcurrent)}
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.running = false
		w.mu.Unlock()
	}()

	delay := w.opts.MinBackoff
	for ctx.Err() == nil {
		registered, err := w.runSession(ctx, register)
		if ctx.Err() != nil {
			return nil
		}
		if !registered && refused(err) {
			return err
		}
		if registered {
			delay = w.opts.MinBackoff
		}
		wait := time.Duration(float64(delay) * (0.8 + 0.4*rand.Float64()))
		w.log.Printf("%s; connecting again in %v", describeEnd(err, registered), wait.Round(time.Millisecond))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		if delay *= 2; delay > w.opts.MaxBackoff {
			delay = w.opts.MaxBackoff
		}
	}
	return nil
}

func describeEnd(err error, registered bool) string {
	if registered {
		return fmt.Sprintf("the stream ended (%v)", err)
	}
	return fmt.Sprintf("registering failed (%v)", err)
}

// refused tells whether a registration's error is final: trying again cannot help.
func refused(err error) bool {
	switch Code(err) {
	case codes.InvalidArgument, codes.PermissionDenied, codes.FailedPrecondition, codes.Unauthenticated, codes.Unimplemented:
		return true
	}
	return false
}

type jobKey struct {
	id      string
	attempt uint32
}

// running is a job whose handler runs.
type running struct {
	job    *Assignment
	cancel context.CancelFunc
	result *Result
	err    error
}

// session is one Work stream.
type session struct {
	w      *Worker
	stream ajspb.WorkerService_WorkClient
	sendMu sync.Mutex
	// maxResultBytes is WorkerRegistered.max_result_bytes: a larger result is reported as
	// an error instead; 0: no limit.
	maxResultBytes uint64
}

// send writes one message (Send is not safe for concurrent use: handlers' progress and
// the loop share the stream). The worker never half-closes: the server ends a drained call.
func (s *session) send(request *ajspb.WorkRequest) error {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	return s.stream.Send(request)
}

// runSession runs one stream: registers, runs jobs until the stream ends or ctx does (then
// drains). registered tells whether the server accepted the registration.
func (w *Worker) runSession(ctx context.Context, register *ajspb.RegisterWorker) (registered bool, err error) {
	streamCtx, cancelStream := context.WithCancel(context.Background())
	defer cancelStream()
	// Until registered, ctx ending just abandons the attempt.
	registering := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			cancelStream()
		case <-registering:
		}
	}()
	stream, err := ajspb.NewWorkerServiceClient(w.conn).Work(streamCtx)
	if err != nil {
		close(registering)
		return false, AsError(err)
	}
	s := &session{w: w, stream: stream}
	_ = s.send(&ajspb.WorkRequest{Kind: &ajspb.WorkRequest_Register{Register: register}}) // an error shows in Recv
	first, err := stream.Recv()
	close(registering)
	if err != nil {
		if err == io.EOF {
			err = errors.New("the server ended the stream without answering the registration")
		}
		return false, AsError(err)
	}
	answer := first.GetRegistered()
	if answer == nil {
		return false, fmt.Errorf("the server answered the registration with %T", first.GetKind())
	}
	s.maxResultBytes = answer.GetMaxResultBytes()
	// If ctx ended while registering, serve drains at once (an assignment may already be
	// on its way: it runs).
	interval := answer.GetHeartbeatInterval().AsDuration()
	if interval <= 0 {
		interval = 10 * time.Second
	}
	if w.opts.OnRegistered != nil {
		w.opts.OnRegistered(answer.GetWorkerId())
	}
	w.log.Printf("registered as %s (%s, %d at once, heartbeat every %v)", answer.GetWorkerId(), w.opts.Name, register.GetMaxConcurrent(), interval)
	return true, s.serve(ctx, interval)
}

// serve runs a registered session until the stream ends, or ctx ends and the worker has drained.
func (s *session) serve(ctx context.Context, interval time.Duration) error {
	w := s.w
	ended := make(chan struct{}) // closed when serve returns: late job results are dropped
	defer close(ended)
	incoming := make(chan *ajspb.WorkResponse)
	received := make(chan error, 1) // how the stream ended
	go func() {
		for {
			message, err := s.stream.Recv()
			if err != nil {
				received <- err
				return
			}
			select {
			case incoming <- message:
			case <-ended:
				return
			}
		}
	}()
	finished := make(chan *running)
	jobs := map[jobKey]*running{}
	every := interval / 2
	if every < 10*time.Millisecond {
		every = 10 * time.Millisecond
	}
	heartbeat := time.NewTicker(every)
	defer heartbeat.Stop()
	jobsCtx, cancelJobs := context.WithCancel(context.Background())
	defer cancelJobs()
	abandon := func(reason string) {
		for _, r := range jobs {
			r.job.reason.Store(reason)
			r.cancel()
		}
		// Give the cancelled handlers a moment to return, so they rarely overlap the jobs
		// of the next session.
		timeout := time.After(w.opts.AbandonWait)
		for len(jobs) > 0 {
			select {
			case r := <-finished:
				delete(jobs, jobKey{r.job.Request.GetId(), r.job.Attempt})
			case <-timeout:
				w.log.Printf("%d abandoned jobs still run after %v; going on without them", len(jobs), w.opts.AbandonWait)
				return
			}
		}
	}

	stopping := ctx.Done()
	draining := false
	var drainTimeout <-chan time.Time
	// Draining and holding no job: the server ends the call. graceTimer cancels it if the
	// server has not within DrainGrace; an assignment that crossed the DrainWorker stops it.
	var graceTimer *time.Timer
	var grace <-chan time.Time
	awaitEnd := func() {
		if draining && len(jobs) == 0 && grace == nil {
			graceTimer = time.NewTimer(w.opts.DrainGrace)
			grace = graceTimer.C
		}
	}
	defer func() {
		if graceTimer != nil {
			graceTimer.Stop()
		}
	}()
	for {
		select {
		case <-stopping:
			stopping = nil
			draining = true
			_ = s.send(&ajspb.WorkRequest{Kind: &ajspb.WorkRequest_Drain{Drain: &ajspb.DrainWorker{}}})
			w.log.Printf("draining: %d jobs running", len(jobs))
			if w.opts.DrainTimeout > 0 {
				drainTimeout = time.After(w.opts.DrainTimeout)
			}
			awaitEnd()
		case <-grace:
			w.log.Printf("drained, but the server did not end the call within %v; cancelling it", w.opts.DrainGrace)
			return nil // the deferred cancel ends the call
		case <-drainTimeout:
			w.log.Printf("drain timeout (%v): abandoning %d jobs", w.opts.DrainTimeout, len(jobs))
			abandon("DRAIN_TIMEOUT")
			return nil // the deferred cancel drops the stream: the server queues them again
		case <-heartbeat.C:
			_ = s.send(&ajspb.WorkRequest{Kind: &ajspb.WorkRequest_Heartbeat{Heartbeat: &ajspb.Heartbeat{}}})
		case err := <-received:
			if err == io.EOF && draining && len(jobs) == 0 {
				w.log.Printf("drained: the server ended the call")
				return nil
			}
			if err == io.EOF {
				err = errors.New("the server ended the stream")
			}
			err = AsError(err)
			if len(jobs) > 0 {
				w.log.Printf("the stream ended (%v): abandoning %d jobs (the server queues them again)", err, len(jobs))
				abandon("STREAM_BROKEN")
			}
			if draining {
				return nil
			}
			return err
		case message := <-incoming:
			switch kind := message.GetKind().(type) {
			case *ajspb.WorkResponse_Assignment:
				// After DrainWorker too: an assignment that crossed it runs and reports.
				s.start(jobsCtx, kind.Assignment, jobs, finished, ended)
				if grace != nil && len(jobs) > 0 {
					graceTimer.Stop()
					graceTimer, grace = nil, nil
				}
			case *ajspb.WorkResponse_Cancel:
				c := kind.Cancel
				if r, ok := jobs[jobKey{c.GetRequestId(), c.GetAttempt()}]; ok {
					r.job.reason.Store(c.GetReason())
					r.cancel()
				}
			default:
				w.log.Printf("ignoring an unexpected %T from the server", kind)
			}
		case r := <-finished:
			delete(jobs, jobKey{r.job.Request.GetId(), r.job.Attempt})
			_ = s.send(&ajspb.WorkRequest{Kind: &ajspb.WorkRequest_Outcome{Outcome: outcome(r, s.maxResultBytes)}})
			if draining {
				awaitEnd() // no credit after DrainWorker
			} else {
				_ = s.send(&ajspb.WorkRequest{Kind: &ajspb.WorkRequest_Credit{Credit: &ajspb.GrantCredit{Count: 1}}})
			}
		}
	}
}

// start runs an assignment's handler on its own goroutine.
func (s *session) start(jobsCtx context.Context, a *ajspb.Assignment, jobs map[jobKey]*running, finished chan<- *running, ended <-chan struct{}) {
	w := s.w
	key := jobKey{a.GetRequest().GetId(), a.GetAttempt()}
	if _, dup := jobs[key]; dup {
		w.log.Printf("ignoring a second assignment of %s attempt %d", key.id, key.attempt)
		return
	}
	job := &Assignment{Request: a.GetRequest(), Attempt: a.GetAttempt(), Dependencies: a.GetDependencies(), session: s}
	jobCtx, cancel := context.WithCancel(jobsCtx)
	if a.GetDeadline() != nil {
		job.Deadline = a.GetDeadline().AsTime()
		var cancelDeadline context.CancelFunc
		jobCtx, cancelDeadline = context.WithDeadline(jobCtx, job.Deadline)
		cancelBoth := cancel
		cancel = func() { cancelDeadline(); cancelBoth() }
	}
	r := &running{job: job, cancel: cancel}
	jobs[key] = r
	w.mu.Lock()
	handler := w.handlers[a.GetRequest().GetType()]
	w.mu.Unlock()
	go func() {
		defer cancel()
		if handler == nil {
			r.err = NewError(codes.Unimplemented, fmt.Sprintf("worker %s runs no job type %q", w.opts.Name, a.GetRequest().GetType()))
		} else {
			r.result, r.err = call(jobCtx, handler, job, w.log)
		}
		atomic.StoreInt32(&job.ended, 1)
		select {
		case finished <- r:
		case <-ended:
		}
	}()
}

func call(ctx context.Context, handler Handler, job *Assignment, logger *log.Logger) (result *Result, err error) {
	defer func() {
		if p := recover(); p != nil {
			logger.Printf("the handler of %s (%s) panicked: %v\n%s", job.Request.GetId(), job.Request.GetType(), p, debug.Stack())
			result, err = nil, NewError(codes.Internal, fmt.Sprintf("the job's handler panicked: %v", p))
		}
	}()
	return handler(ctx, job)
}

// outcome is the ReportOutcome of a finished handler. A result larger than
// maxResultBytes (when not 0) is replaced by a RESOURCE_EXHAUSTED error.
func outcome(r *running, maxResultBytes uint64) *ajspb.ReportOutcome {
	o := report(r)
	if maxResultBytes == 0 || o.Error != nil {
		return o
	}
	if size := resultSize(o.GetData(), o.GetOutput()); size > maxResultBytes {
		o.Data, o.Output, o.NonRetryable = nil, nil, true
		o.Error = NewError(codes.ResourceExhausted,
			fmt.Sprintf("the job returned %d bytes, more than the server's limit of %d", size, maxResultBytes),
			&errdetails.ErrorInfo{Reason: "RESULT_TOO_LARGE", Domain: "ajs-grpc", Metadata: map[string]string{
				"bytes": fmt.Sprint(size), "limit": fmt.Sprint(maxResultBytes),
			}}).GRPCStatus().Proto()
	}
	return o
}

// resultSize is the size of a job's result as WorkerRegistered.max_result_bytes counts it:
// the bytes of its data's keys and values (UTF-8) plus the serialized size of its output.
func resultSize(data map[string]string, output *anypb.Any) uint64 {
	size := 0
	for key, value := range data {
		size += len(key) + len(value)
	}
	if output != nil {
		size += proto.Size(output)
	}
	return uint64(size)
}

// report is the ReportOutcome of a finished handler, as it returned.
func report(r *running) *ajspb.ReportOutcome {
	o := &ajspb.ReportOutcome{RequestId: r.job.Request.GetId(), Attempt: r.job.Attempt}
	if r.err != nil {
		o.Error = statusOf(r.err, r.job.CancelReason())
		o.NonRetryable = IsNonRetryable(r.err)
		return o
	}
	if r.result == nil {
		return o
	}
	o.Data = r.result.Data
	if r.result.Output != nil {
		output, err := anypb.New(r.result.Output)
		if err != nil {
			o.Data, o.Error = nil, status.Newf(codes.Internal, "packing the job's output: %v", err).Proto()
			return o
		}
		o.Output = output
	}
	return o
}

// statusOf turns a handler's error into the google.rpc.Status of its outcome.
func statusOf(err error, cancelReason string) *statuspb.Status {
	var carrier interface{ GRPCStatus() *status.Status }
	if errors.As(err, &carrier) {
		if s := carrier.GRPCStatus(); s != nil && s.Code() != codes.OK {
			return s.Proto()
		}
	}
	switch {
	case errors.Is(err, context.Canceled):
		if cancelReason != "" {
			return status.Newf(codes.Canceled, "the job stopped (%s): %v", cancelReason, err).Proto()
		}
		return status.New(codes.Canceled, err.Error()).Proto()
	case errors.Is(err, context.DeadlineExceeded):
		return status.New(codes.DeadlineExceeded, err.Error()).Proto()
	}
	return status.New(codes.Unknown, err.Error()).Proto()
}
