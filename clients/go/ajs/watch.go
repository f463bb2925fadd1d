package ajs

import (
	"context"
	"io"
	"math/rand"
	"strings"
	"time"

	"google.golang.org/grpc/codes"

	"ajs-grpc/clients/go/ajspb"
)

// Resume describes one reconnection of a Watcher, for WithOnResume.
type Resume struct {
	// Err is why the stream ended (a dropped connection, a server going away).
	Err error
	// AfterSequence is the last sequence seen: the new stream starts after it.
	AfterSequence uint64
	// Attempt counts the failed attempts in a row, from 1.
	Attempt int
	// Delay is the wait before the new attempt.
	Delay time.Duration
}

// WatchOption changes how a Watcher resumes.
type WatchOption func(*watchSettings)

type watchSettings struct {
	minDelay, maxDelay time.Duration
	maxAttempts        int
	onResume           func(Resume)
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

// Watcher follows one job's Responses: see Client.Watch. It is not safe for concurrent
// use; one goroutine calls Next.
type Watcher struct {
	client   *Client
	ctx      context.Context
	id       string
	settings watchSettings

	last    uint64 // the greatest sequence returned so far (or the starting after_sequence)
	stream  ajspb.JobService_WatchJobClient
	cancel  context.CancelFunc // ends the current stream
	failed  int                // failed attempts in a row
	resumes int
	err     error // set once the watch has ended: io.EOF after the final Response
}

// Watch follows the job of request id from the Response after afterSequence (0: from the
// first): Next returns each Response once, in sequence order, and io.EOF after the final
// one. When the stream drops (Unavailable: a server restart, a lost connection, a server
// going away), Watch waits (backing off) and calls WatchJob again with after_sequence set
// to the last sequence it returned, so no Response is missed or repeated. Errors that
// retrying cannot fix (NotFound, PermissionDenied, ...) end the watch as an *Error;
// the context ending ends it with the context's error.
func (c *Client) Watch(ctx context.Context, id string, afterSequence uint64, opts ...WatchOption) *Watcher {
	settings := watchSettings{minDelay: 100 * time.Millisecond, maxDelay: 5 * time.Second}
	for _, opt := range opts {
		opt(&settings)
	}
	return &Watcher{client: c, ctx: ctx, id: id, settings: settings, last: afterSequence}
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
					return nil, err
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
				return nil, err
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

var errEndedEarly = &Error{Code: codes.Unavailable, Message: "the stream ended before the final Response"}

// retry waits before the next attempt after err, or ends the watch; nil means go on.
func (w *Watcher) retry(err error) error {
	if w.ctx.Err() != nil {
		return w.end(w.ctx.Err())
	}
	if !resumable(err) {
		return w.end(AsError(err))
	}
	w.failed++
	if w.settings.maxAttempts > 0 && w.failed > w.settings.maxAttempts {
		return w.end(AsError(err))
	}
	delay := w.settings.minDelay << uint(w.failed-1)
	if delay > w.settings.maxDelay || delay <= 0 {
		delay = w.settings.maxDelay
	}
	delay = time.Duration(float64(delay) * (0.8 + 0.4*rand.Float64()))
	if w.settings.onResume != nil {
		w.settings.onResume(Resume{Err: AsError(err), AfterSequence: w.last, Attempt: w.failed, Delay: delay})
	}
	timer := time.NewTimer(delay)
	defer timer.Stop()
	select {
	case <-timer.C:
		w.resumes++
		return nil
	case <-w.ctx.Done():
		return w.end(w.ctx.Err())
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
