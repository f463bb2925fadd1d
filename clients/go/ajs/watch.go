package ajs

import (
	"context"
	"io"
	"math/rand"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"ajs-grpc/clients/go/ajspb"
)

// Resume describes one reconnection of a Watcher, for WithOnResume.
type Resume struct {
	// Err is why the stream ended (a dropped connection, a server going away).
	Err error
	// AfterSequence is the last sequence seen: the new stream starts after it (Watch).
	AfterSequence uint64
	// AfterToken is the last resume token seen: the new stream starts after it (WatchJobs).
	AfterToken string
	// Attempt counts the failed attempts in a row, from 1.
	Attempt int
	// Delay is the wait before the new attempt.
	Delay time.Duration
}

// WatchOption changes how a Watcher or a JobsWatcher resumes.
type WatchOption func(*watchSettings)

type watchSettings struct {
	minDelay, maxDelay time.Duration
	maxAttempts        int
	onResume           func(Resume)
	bookmarks          bool
}

// WithBackoff sets the wait before the first reconnection attempt (100 ms by default);
// it doubles after each failed one, up to max (5 s by default), with ±20 % jitter. It is
// reset once a Response arrives.
func WithBackoff(first, max time.Duration) WatchOption {
	return func(s *watchSettings) { s.minDelay, s.maxDelay = first, max }
}

// WithMaxAttempts gives up after n failed reconnection attempts in a row, returning the
// last error. 0 (the default) keeps trying until the context ends.
func WithMaxAttempts(n int) WatchOption {
	return func(s *watchSettings) { s.maxAttempts = n }
}

// WithOnResume calls f before each reconnection (from the goroutine calling Next).
func WithOnResume(f func(Resume)) WatchOption {
	return func(s *watchSettings) { s.onResume = f }
}

// WithBookmarks makes a JobsWatcher's Next return the bookmarks too (messages without a
// Response, holding only a resume token): the first one tells that the stream is live.
func WithBookmarks() WatchOption {
	return func(s *watchSettings) { s.bookmarks = true }
}

// Watcher follows one job's Responses: see Client.Watch. It is not safe for concurrent
// use; one goroutine calls Next.
type Watcher struct {
	client *Client
	ctx    context.Context
	id     string
	resumer

	last   uint64 // the greatest sequence returned so far (or the starting after_sequence)
	stream ajspb.JobService_WatchJobClient
	cancel context.CancelFunc // ends the current stream
	err    error              // set once the watch has ended: io.EOF after the final Response
}

// resumer holds the reconnection state shared by Watcher and JobsWatcher.
type resumer struct {
	settings watchSettings
	failed   int // failed attempts in a row
	resumes  int
}

func newResumer(opts []WatchOption) resumer {
	settings := watchSettings{minDelay: 100 * time.Millisecond, maxDelay: 5 * time.Second}
	for _, opt := range opts {
		opt(&settings)
	}
	return resumer{settings: settings}
}

// Watch follows the job of request id from the Response after afterSequence (0: from the
// first): Next returns each Response once, in sequence order, and io.EOF after the final
// one. When the stream drops (Unavailable: a server restart, a lost connection, a server
// going away), Watch waits (backing off) and calls WatchJob again with after_sequence set
// to the last sequence it returned, so no Response is missed or repeated. Errors that
// retrying cannot fix (NotFound, PermissionDenied, ...) end the watch as an *Error;
// the context ending ends it with the context's error.
func (c *Client) Watch(ctx context.Context, id string, afterSequence uint64, opts ...WatchOption) *Watcher {
	return &Watcher{client: c, ctx: ctx, id: id, resumer: newResumer(opts), last: afterSequence}
}

// LastSequence is the sequence of the last Response Next returned (or the starting
// after_sequence): pass it to a later Watch to go on from there.
func (w *Watcher) LastSequence() uint64 { return w.last }

// Resumes counts the reconnection attempts so far.
func (w *Watcher) Resumes() int { return w.resumes }

// Close ends the watch and its stream; Next then returns io.EOF (or the error it had).
func (w *Watcher) Close() {
	w.end(io.EOF)
}

func (w *Watcher) end(err error) error {
	if w.cancel != nil {
		w.cancel()
		w.cancel, w.stream = nil, nil
	}
	if w.err == nil {
		w.err = err
	}
	return w.err
}

// Next returns the next Response, io.EOF after the final one, or the error that ended
// the watch.
func (w *Watcher) Next() (*ajspb.Response, error) {
	for w.err == nil {
		if w.stream == nil {
			ctx, cancel := context.WithCancel(w.ctx)
			stream, err := w.client.svc.WatchJob(ctx, &ajspb.WatchJobRequest{RequestId: w.id, AfterSequence: w.last})
			if err != nil {
				cancel()
				if err := w.retry(err); err != nil {
					return nil, w.end(err)
				}
				continue
			}
			w.stream, w.cancel = stream, cancel
		}
		message, err := w.stream.Recv()
		if err != nil {
			w.cancel()
			w.cancel, w.stream = nil, nil
			if err == io.EOF {
				// The server ended the stream before the final Response: it went away
				// between two Responses. Resume like after any other drop.
				err = errEndedEarly
			}
			if err := w.retry(err); err != nil {
				return nil, w.end(err)
			}
			continue
		}
		response := message.GetResponse()
		if response == nil || response.GetSequence() <= w.last {
			continue // never expected (the server sends only later ones); never passed on twice
		}
		w.last, w.failed = response.GetSequence(), 0
		if response.GetIsFinal() {
			w.end(io.EOF)
		}
		return response, nil
	}
	return nil, w.err
}

var errEndedEarly = fromStatus(status.New(codes.Unavailable, "the server ended the stream early"))

func (w *Watcher) retry(err error) error {
	return w.wait(w.ctx, err, Resume{AfterSequence: w.last})
}

// wait waits before the next attempt after err, or says why to give up (the context
// ended, err cannot be fixed by retrying, too many attempts); nil means try again.
func (r *resumer) wait(ctx context.Context, err error, at Resume) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if !resumable(err) {
		return AsError(err)
	}
	r.failed++
	if r.settings.maxAttempts > 0 && r.failed > r.settings.maxAttempts {
		return AsError(err)
	}
	delay := r.settings.minDelay << uint(r.failed-1)
	if delay > r.settings.maxDelay || delay <= 0 {
		delay = r.settings.maxDelay
	}
	delay = time.Duration(float64(delay) * (0.8 + 0.4*rand.Float64()))
	if r.settings.onResume != nil {
		at.Err, at.Attempt, at.Delay = AsError(err), r.failed, delay
		r.settings.onResume(at)
	}
	timer := time.NewTimer(delay)
	defer timer.Stop()
	select {
	case <-timer.C:
		r.resumes++
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// resumable tells a dropped stream (try again) from an answer (give up). The caller has
// checked that its own context has not ended, so Canceled and DeadlineExceeded here come
// from the other side (a server or proxy going away).
func resumable(err error) bool {
	switch Code(err) {
	case codes.Unavailable, codes.Aborted, codes.ResourceExhausted, codes.Canceled, codes.DeadlineExceeded:
		return true
	case codes.Internal:
		// A connection torn down mid-stream (RST_STREAM), not a server bug.
		message := err.Error()
		return strings.Contains(message, "RST_STREAM") || strings.Contains(message, "stream terminated")
	}
	return false
}
