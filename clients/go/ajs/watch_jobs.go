package ajs

import (
	"context"
	"io"

	"ajs-grpc/clients/go/ajspb"
)

// JobsFilter picks the jobs a JobsWatcher follows. The fields combine with AND; an empty
// one matches everything.
type JobsFilter struct {
	// States keeps the Responses that put their job in one of these states.
	States []ajspb.RequestState
	// Types keeps the jobs of one of these types.
	Types []string
	// Queues keeps the jobs in one of these queues ("default" for requests without one).
	Queues []string
	// ParentID keeps the children of this request.
	ParentID string
}

// JobsWatcher follows the Responses of many jobs: see Client.WatchJobs. It is not safe
// for concurrent use; one goroutine calls Next.
type JobsWatcher struct {
	client *Client
	ctx    context.Context
	filter JobsFilter
	resumer

	token  string // the last resume token seen (or the starting after_token)
	stream ajspb.JobService_WatchJobsClient
	cancel context.CancelFunc
	err    error
}

// WatchJobs follows the Responses of every job that matches filter, as the server stores
// them, from after afterToken (a Token of an earlier watch; "" means from now on). Next
// returns each matching Response once; the bookmarks the server sends only move Token on
// (unless WithBookmarks).
// The stream never ends by itself: cancel ctx or call Close. When it drops, WatchJobs
// waits (backing off) and calls again with after_token = Token, so nothing is missed or
// repeated, across server restarts and on any instance sharing the store (not with the
// in-memory store, which keeps nothing over a restart).
func (c *Client) WatchJobs(ctx context.Context, filter JobsFilter, afterToken string, opts ...WatchOption) *JobsWatcher {
	return &JobsWatcher{client: c, ctx: ctx, filter: filter, resumer: newResumer(opts), token: afterToken}
}

// Token is the resume token of the last message received: a later WatchJobs with it as
// afterToken goes on from there. Empty until the first message (a bookmark) arrives when
// the watch started from now.
func (w *JobsWatcher) Token() string { return w.token }

// Resumes counts the reconnection attempts so far.
func (w *JobsWatcher) Resumes() int { return w.resumes }

// Close ends the watch and its stream; Next then returns io.EOF (or the error it had).
func (w *JobsWatcher) Close() { w.end(io.EOF) }

func (w *JobsWatcher) end(err error) error {
	if w.cancel != nil {
		w.cancel()
		w.cancel, w.stream = nil, nil
	}
	if w.err == nil {
		w.err = err
	}
	return w.err
}

// Next returns the next matching Response with its job's type and queue (the whole
// WatchJobsResponse), or the error that ended the watch (the context's, an *Error that
// retrying cannot fix, io.EOF after Close).
func (w *JobsWatcher) Next() (*ajspb.WatchJobsResponse, error) {
	for w.err == nil {
		if w.stream == nil {
			ctx, cancel := context.WithCancel(w.ctx)
			stream, err := w.client.svc.WatchJobs(ctx, &ajspb.WatchJobsRequest{
				States:     w.filter.States,
				Types:      w.filter.Types,
				Queues:     w.filter.Queues,
				ParentId:   w.filter.ParentID,
				AfterToken: w.token,
			})
			if err != nil {
				cancel()
				if err := w.wait(w.ctx, err, Resume{AfterToken: w.token}); err != nil {
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
				err = errEndedEarly // the stream never ends by itself: the server went away
			}
			if err := w.wait(w.ctx, err, Resume{AfterToken: w.token}); err != nil {
				return nil, w.end(err)
			}
			continue
		}
		w.failed = 0
		if token := message.GetResumeToken(); token != "" {
			w.token = token
		}
		if message.GetResponse() != nil || w.settings.bookmarks {
			return message, nil
		}
	}
	return nil, w.err
}
