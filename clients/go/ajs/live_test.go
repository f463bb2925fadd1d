package ajs_test

// These tests run the client against a real `ajs serve` (AJS_BIN) on 127.0.0.1, with a
// SQLite database, restarted for real where the test says so.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"ajs-grpc/clients/go/ajs"
	"ajs-grpc/clients/go/ajspb"
	"ajs-grpc/clients/go/internal/liveserver"
)

func dial(t *testing.T, target string, opts ajs.Options) *ajs.Client {
	t.Helper()
	client, err := ajs.Dial(target, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func countdown(id string, steps int, interval string) *ajspb.Request {
	return &ajspb.Request{Id: id, Type: "countdown", Data: map[string]string{"steps": fmt.Sprint(steps), "interval": interval}}
}

func describe(r *ajspb.Response) string {
	text := fmt.Sprintf("#%d %s", r.GetSequence(), r.GetState())
	if p := r.GetProgress(); p != nil {
		text += fmt.Sprintf(" %.0f%%", 100*p.GetFraction())
	}
	if e := ajs.StatusError(r.GetError()); e != nil {
		text += " " + e.Reason
	}
	return text
}

// A watch of a running countdown while the server is killed (SIGKILL) and, later, stopped
// (SIGTERM), each time started again on the same port and database: the watch resumes by
// itself and sees every Response once, in order, up to FINISHED, the same Responses a
// fresh watch replays afterwards.
func TestWatchResumesAcrossServerRestarts(t *testing.T) {
	server := liveserver.Start(t, "--shutdown-grace", "0.5", "--cancel-grace", "0.5")
	client := dial(t, server.Target, ajs.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 180*time.Second)
	defer cancel()

	// 12 steps of 0.3 s: long enough that the watch, which resumes with a backoff (up to
	// about 1.5 s after a restart), still sees the second run's progress in time to
	// interrupt it again (6 steps were too few on a loaded machine).
	job, created, err := client.Submit(ctx, countdown("go-restart", 12, "0.3"))
	if err != nil || !created {
		t.Fatalf("submit: created %v, %v", created, err)
	}
	id := job.GetRequest().GetId()

	var resumes []ajs.Resume
	watch := client.Watch(ctx, id, 0, ajs.WithOnResume(func(r ajs.Resume) { resumes = append(resumes, r) }))
	defer watch.Close()
	restarted := make(chan error, 1)
	restarting := false
	kills := []func(){server.Kill, server.Stop} // a crash, then a graceful shutdown
	var seen []*ajspb.Response
	var log []string
	for {
		r, err := watch.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("watch ended with %v after %v\nserver log:\n%s", err, log, server.Log())
		}
		seen = append(seen, r)
		log = append(log, describe(r))
		// A progress Response of the run under way: interrupt the server now, while
		// this watch is open, and start it again, on another goroutine.
		if r.GetProgress() != nil && !restarting && len(kills) > 0 {
			restarting = true
			kill := kills[0]
			kills = kills[1:]
			go func() {
				kill()
				restarted <- server.Restart()
			}()
		}
		if restarting {
			select {
			case err := <-restarted:
				if err != nil {
					t.Fatal(err)
				}
				restarting = false
			default:
			}
		}
	}
	if restarting {
		if err := <-restarted; err != nil {
			t.Fatal(err)
		}
	}
	if len(kills) != 0 {
		t.Fatalf("the job finished before both restarts: %v", log)
	}
	for i, r := range seen {
		if r.GetSequence() != uint64(i+1) {
			t.Fatalf("Response %d has sequence %d: each must come once, in order: %v", i, r.GetSequence(), log)
		}
	}
	final := seen[len(seen)-1]
	if !final.GetIsFinal() || final.GetState() != ajspb.RequestState_REQUEST_STATE_FINISHED {
		t.Fatalf("the last Response is not a final FINISHED one: %v", log)
	}
	if len(resumes) < 2 || watch.Resumes() < 2 {
		t.Fatalf("the watch resumed %d times (%d attempts) across two restarts: %v", len(resumes), watch.Resumes(), log)
	}
	// Both restarts interrupted the running job: it was queued again twice.
	queued := 0
	for _, r := range seen {
		if r.GetState() == ajspb.RequestState_REQUEST_STATE_CREATED {
			queued++
		}
	}
	if queued < 3 {
		t.Fatalf("the job was queued %d times: the restarts did not interrupt it: %v\nserver log:\n%s", queued, log, server.Log())
	}
	// A fresh watch replays exactly what the resumed one saw.
	replay := client.Watch(ctx, id, 0)
	var replayed []string
	for {
		r, err := replay.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		replayed = append(replayed, describe(r))
	}
	if strings.Join(replayed, "\n") != strings.Join(log, "\n") {
		t.Fatalf("resumed watch saw\n%s\nbut the stored Responses are\n%s", strings.Join(log, "\n"), strings.Join(replayed, "\n"))
	}
	t.Logf("%d Responses, each once, across a SIGKILL and a SIGTERM: %v", len(seen), log)
	for _, r := range resumes {
		t.Logf("resume attempt %d after #%d (waited %v): %v", r.Attempt, r.AfterSequence, r.Delay.Round(time.Millisecond), r.Err)
	}
}

// Watching from a sequence returns only the later Responses.
func TestWatchFromASequence(t *testing.T) {
	server := liveserver.Start(t)
	client := dial(t, server.Target, ajs.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, _, err := client.Submit(ctx, countdown("go-after", 2, "0")); err != nil {
		t.Fatal(err)
	}
	final, err := client.Wait(ctx, "go-after")
	if err != nil {
		t.Fatal(err)
	}
	watch := client.Watch(ctx, "go-after", final.GetSequence()-1)
	r, err := watch.Next()
	if err != nil || r.GetSequence() != final.GetSequence() {
		t.Fatalf("got %v, %v; want the final Response #%d", r, err, final.GetSequence())
	}
	if r, err := watch.Next(); err != io.EOF {
		t.Fatalf("after the final Response: %v, %v; want io.EOF", r, err)
	}
}

// Cancelling a running countdown ends it CANCELLED; cancelling it again is refused.
func TestCancelARunningJob(t *testing.T) {
	server := liveserver.Start(t, "--cancel-grace", "2")
	client := dial(t, server.Target, ajs.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, _, err := client.Submit(ctx, countdown("go-cancel", 1000, "0.2")); err != nil {
		t.Fatal(err)
	}
	watch := client.Watch(ctx, "go-cancel", 0)
	defer watch.Close()
	var last *ajspb.Response
	cancelled := false
	for {
		r, err := watch.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		last = r
		if r.GetState() == ajspb.RequestState_REQUEST_STATE_PENDING && !cancelled {
			job, err := client.Cancel(ctx, "go-cancel")
			if err != nil {
				t.Fatal(err)
			}
			if job.GetState() != ajspb.RequestState_REQUEST_STATE_CANCELLED && !job.GetCancelRequested() {
				t.Fatalf("after CancelJob: state %v, cancel_requested %v", job.GetState(), job.GetCancelRequested())
			}
			cancelled = true
		}
	}
	if last.GetState() != ajspb.RequestState_REQUEST_STATE_CANCELLED || !last.GetIsFinal() {
		t.Fatalf("final Response %s, want CANCELLED", describe(last))
	}
	job, err := client.Get(ctx, "go-cancel")
	if err != nil || job.GetState() != ajspb.RequestState_REQUEST_STATE_CANCELLED {
		t.Fatalf("GetJob: %v, %v", job.GetState(), err)
	}
	_, err = client.Cancel(ctx, "go-cancel")
	var e *ajs.Error
	if !errors.As(err, &e) || e.Code != codes.FailedPrecondition || e.Reason == "" || e.Domain != ajs.Domain {
		t.Fatalf("cancelling an ended job: %#v", err)
	}
	t.Logf("cancelling again: %v", err)
}

// Errors carry their google.rpc details: the ErrorInfo reason, domain and metadata, and
// the BadRequest field violations of an invalid request.
func TestErrorsCarryTheirReason(t *testing.T) {
	server := liveserver.Start(t)
	client := dial(t, server.Target, ajs.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	_, err := client.Get(ctx, "no-such-job")
	var e *ajs.Error
	if !errors.As(err, &e) {
		t.Fatalf("GetJob of an unknown id: %#v, want an *ajs.Error", err)
	}
	if e.Code != codes.NotFound || e.Reason != "REQUEST_NOT_FOUND" || e.Domain != "ajs.v1" || e.Metadata["request_id"] != "no-such-job" {
		t.Fatalf("GetJob of an unknown id: %+v", e)
	}
	if ajs.Reason(err) != "REQUEST_NOT_FOUND" || ajs.Code(err) != codes.NotFound || status.Code(err) != codes.NotFound {
		t.Fatalf("helpers: %q %v %v", ajs.Reason(err), ajs.Code(err), status.Code(err))
	}
	if !strings.Contains(err.Error(), "REQUEST_NOT_FOUND") {
		t.Fatalf("message %q names no reason", err)
	}

	// A watch of an unknown job ends at once with the same error: nothing to retry.
	watch := client.Watch(ctx, "no-such-job", 0, ajs.WithOnResume(func(r ajs.Resume) { t.Errorf("resumed after %v", r.Err) }))
	if _, err := watch.Next(); ajs.Reason(err) != "REQUEST_NOT_FOUND" {
		t.Fatalf("watching an unknown job: %v", err)
	}

	_, _, err = client.Submit(ctx, &ajspb.Request{})
	if !errors.As(err, &e) || e.Code != codes.InvalidArgument {
		t.Fatalf("submitting a request without type: %v", err)
	}
	fields := map[string]string{}
	for _, v := range e.FieldViolations {
		fields[v.GetField()] = v.GetDescription()
	}
	if _, ok := fields["request.type"]; !ok {
		t.Fatalf("no field violation on request.type: %+v (%v)", fields, err)
	}
}

// WatchJobs follows several countdowns (and not an echo, which the filter leaves out)
// while the server is killed and started again: every Response of every matching job
// comes once, and a later watch from the first bookmark's token replays the same ones.
func TestWatchJobsResumesAcrossARestart(t *testing.T) {
	server := liveserver.Start(t, "--shutdown-grace", "0.5")
	client := dial(t, server.Target, ajs.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 180*time.Second)
	defer cancel()

	filter := ajs.JobsFilter{Types: []string{"countdown"}}
	var resumes []ajs.Resume
	watch := client.WatchJobs(ctx, filter, "", ajs.WithBookmarks(), ajs.WithOnResume(func(r ajs.Resume) { resumes = append(resumes, r) }))
	defer watch.Close()
	first, err := watch.Next()
	if err != nil || first.GetResponse() != nil || first.GetResumeToken() == "" {
		t.Fatalf("first message %v, %v; want a bookmark", first, err)
	}
	start := first.GetResumeToken()
	ids := []string{"jobs-a", "jobs-b"}
	for _, id := range ids {
		if _, _, err := client.Submit(ctx, countdown(id, 4, "0.3")); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := client.Submit(ctx, &ajspb.Request{Id: "jobs-echo", Type: "echo"}); err != nil {
		t.Fatal(err)
	}

	seen := map[string][]uint64{}
	var order []string
	ended := map[string]bool{}
	restarted := make(chan error, 1)
	killed := false
	for len(ended) < len(ids) {
		message, err := watch.Next()
		if err != nil {
			t.Fatalf("WatchJobs ended with %v after %v\nserver log:\n%s", err, order, server.Log())
		}
		r := message.GetResponse()
		if r == nil {
			continue // a bookmark
		}
		id := r.GetRequestId()
		if message.GetType() != "countdown" || message.GetQueue() != "default" {
			t.Fatalf("%s: type %q queue %q got through the filter", id, message.GetType(), message.GetQueue())
		}
		seen[id] = append(seen[id], r.GetSequence())
		order = append(order, fmt.Sprintf("%s#%d", id, r.GetSequence()))
		if r.GetIsFinal() {
			ended[id] = true
		}
		if !killed && r.GetProgress() != nil {
			killed = true
			go func() {
				server.Kill()
				restarted <- server.Restart()
			}()
		}
	}
	if err := <-restarted; err != nil {
		t.Fatal(err)
	}
	if len(resumes) == 0 {
		t.Fatalf("no resume across the restart: %v", order)
	}
	for _, id := range ids {
		for i, sequence := range seen[id] {
			if sequence != uint64(i+1) {
				t.Fatalf("%s: sequences %v, want each once from 1: %v", id, seen[id], order)
			}
		}
	}
	// The token of the first bookmark still works after the restart: the same Responses again.
	again := client.WatchJobs(ctx, filter, start)
	defer again.Close()
	for i, want := range order {
		message, err := again.Next()
		if err != nil {
			t.Fatal(err)
		}
		r := message.GetResponse()
		if got := fmt.Sprintf("%s#%d", r.GetRequestId(), r.GetSequence()); got != want {
			t.Fatalf("replay %d: %s, want %s (first watch: %v)", i, got, want, order)
		}
	}
	t.Logf("%d Responses of %d jobs, each once, across a SIGKILL (%d resume attempts)", len(order), len(ids), len(resumes))
}
