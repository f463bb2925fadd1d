// Command ajs-go-demo shows the Go client at work against an ajs-grpc server: it submits
// a countdown job and watches it to the end, resuming by itself when the stream drops
// (restart the server while it runs to see it), then submits another countdown and
// cancels it while it runs, and finally asks for an unknown job to show an error's reason.
//
//	ajs-go-demo -target 127.0.0.1:50051 -steps 10 -interval 0.5
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"

	"ajs-grpc/clients/go/ajs"
	"ajs-grpc/clients/go/ajspb"
)

func main() {
	rand.Seed(time.Now().UnixNano())
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errUsage):
		os.Exit(2)
	case err != nil:
		fmt.Fprintln(os.Stderr, "ajs-go-demo:", err)
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

type settings struct {
	target, caFile, serverName, token string
	insecureToken                     bool
	steps                             int
	interval                          float64
	id                                string
}

func parse(args []string, stderr io.Writer) (settings, error) {
	var s settings
	flags := flag.NewFlagSet("ajs-go-demo", flag.ContinueOnError)
	flags.SetOutput(stderr)
	flags.Usage = func() {
		fmt.Fprintf(stderr, "Usage: ajs-go-demo [flags]\n\n"+
			"Submits a countdown job and watches it to FINISHED (restart the server meanwhile: the\n"+
			"watch resumes with nothing missed or repeated), cancels a second countdown while it\n"+
			"runs, and shows the reason of an error.\n\nFlags:\n")
		flags.PrintDefaults()
	}
	flags.StringVar(&s.target, "target", "127.0.0.1:50051", "the server's `host:port`")
	flags.StringVar(&s.caFile, "ca-file", "", "PEM `file` of the CA of the server's certificate; turns TLS on")
	flags.StringVar(&s.serverName, "server-name", "", "the `name` in the server's certificate, if not the target's host")
	flags.StringVar(&s.token, "token", "", "bearer `token` (default: $AJS_TOKEN)")
	flags.BoolVar(&s.insecureToken, "insecure-token", false, "send the token in plain text beyond loopback (without TLS it goes only to 127.0.0.1, ::1, localhost)")
	flags.IntVar(&s.steps, "steps", 10, "the countdown's steps, 1 to 100000")
	flags.Float64Var(&s.interval, "interval", 0.5, "`seconds` between two steps, 0 to 3600")
	flags.StringVar(&s.id, "id", "", "the id of the watched countdown (default: go-demo-<random>); the cancelled one is <id>-cancel")
	if err := flags.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return s, err
		}
		return s, errUsage // the flag package has said what is wrong
	}
	switch {
	case flags.NArg() > 0:
		fmt.Fprintf(stderr, "ajs-go-demo: unexpected argument %q\n", flags.Arg(0))
		return s, errUsage
	case s.steps < 1 || s.steps > 100000:
		fmt.Fprintf(stderr, "ajs-go-demo: -steps must be between 1 and 100000, got %d\n", s.steps)
		return s, errUsage
	case s.interval < 0 || s.interval > 3600:
		fmt.Fprintf(stderr, "ajs-go-demo: -interval must be between 0 and 3600, got %g\n", s.interval)
		return s, errUsage
	}
	if s.token == "" {
		s.token = os.Getenv("AJS_TOKEN")
	}
	if s.id == "" {
		s.id = fmt.Sprintf("go-demo-%06x", rand.Intn(1<<24))
	}
	return s, nil
}

// run is the whole command; main adds the process's arguments, output and exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	s, err := parse(args, stderr)
	if err != nil {
		return err
	}
	client, err := ajs.Dial(s.target, ajs.Options{CAFile: s.caFile, ServerName: s.serverName, Token: s.token, InsecureToken: s.insecureToken})
	if err != nil {
		return err
	}
	defer client.Close()
	say := func(format string, a ...interface{}) { fmt.Fprintf(stdout, format+"\n", a...) }

	// 1. A countdown, watched to the end across whatever happens to the server.
	data := map[string]string{"steps": fmt.Sprint(s.steps), "interval": fmt.Sprint(s.interval)}
	_, created, err := submit(ctx, client, &ajspb.Request{Id: s.id, Type: "countdown", Data: data})
	if err != nil {
		return fmt.Errorf("submitting countdown %s: %w", s.id, err)
	}
	say("countdown %s: submitted (%d steps, every %gs; created %v)", s.id, s.steps, s.interval, created)
	final, count, resumes, err := follow(ctx, client, s.id, say, nil)
	if err != nil {
		return err
	}
	say("countdown %s: ended %s after %d Responses, each seen once, in order (%d reconnection attempts)",
		s.id, state(final.GetState()), count, resumes)
	if final.GetState() != ajspb.RequestState_REQUEST_STATE_FINISHED {
		return fmt.Errorf("countdown %s ended %s", s.id, state(final.GetState()))
	}

	// 2. Another countdown, cancelled while it runs.
	other := s.id + "-cancel"
	if _, _, err := submit(ctx, client, &ajspb.Request{Id: other, Type: "countdown", Data: map[string]string{"steps": "1000", "interval": "0.2"}}); err != nil {
		return fmt.Errorf("submitting countdown %s: %w", other, err)
	}
	say("countdown %s: submitted (1000 steps), to be cancelled once it runs", other)
	cancelled := false
	final, _, _, err = follow(ctx, client, other, say, func(r *ajspb.Response) error {
		if cancelled || r.GetState() != ajspb.RequestState_REQUEST_STATE_PENDING {
			return nil
		}
		cancelled = true
		job, err := client.Cancel(ctx, other)
		if err != nil {
			return fmt.Errorf("cancelling %s: %w", other, err)
		}
		say("countdown %s: cancel asked: state %s, cancel requested %v", other, state(job.GetState()), job.GetCancelRequested())
		return nil
	})
	if err != nil {
		return err
	}
	say("countdown %s: ended %s", other, state(final.GetState()))
	if final.GetState() != ajspb.RequestState_REQUEST_STATE_CANCELLED {
		return fmt.Errorf("countdown %s ended %s, not CANCELLED", other, state(final.GetState()))
	}

	// 3. An error and its reason.
	unknown := s.id + "-unknown"
	_, err = client.Get(ctx, unknown)
	var failure *ajs.Error
	if !errors.As(err, &failure) {
		return fmt.Errorf("GetJob(%q) answered %v, not an error with a reason", unknown, err)
	}
	say("GetJob(%q): %s, reason %s (domain %s, metadata %v)", unknown, failure.Code, failure.Reason, failure.Domain, failure.Metadata)
	return nil
}

// submit sends a request, again while the server is unreachable: submits are idempotent
// on the request id, so a resubmit never makes a second job.
func submit(ctx context.Context, client *ajs.Client, request *ajspb.Request) (*ajspb.Job, bool, error) {
	delay := 100 * time.Millisecond
	for {
		job, created, err := client.Submit(ctx, request)
		if err == nil || ajs.Reason(err) != "" || ajs.Code(err) != codes.Unavailable {
			return job, created, err
		}
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return nil, false, ctx.Err()
		}
		if delay < 2*time.Second {
			delay *= 2
		}
	}
}

// follow watches a job to its final Response, printing each one and each reconnection,
// and checks that the sequences come once each, without gaps.
func follow(ctx context.Context, client *ajs.Client, id string, say func(string, ...interface{}), each func(*ajspb.Response) error) (*ajspb.Response, int, int, error) {
	watch := client.Watch(ctx, id, 0, ajs.WithOnResume(func(r ajs.Resume) {
		if r.Attempt == 1 {
			say("countdown %s: stream dropped (%v); resuming after #%d in %v", id, r.Err, r.AfterSequence, r.Delay.Round(time.Millisecond))
		} else {
			say("countdown %s: attempt %d failed (%v); trying again in %v", id, r.Attempt-1, r.Err, r.Delay.Round(time.Millisecond))
		}
	}))
	defer watch.Close()
	var last *ajspb.Response
	count := 0
	for {
		r, err := watch.Next()
		if err == io.EOF {
			return last, count, watch.Resumes(), nil
		}
		if err != nil {
			return nil, count, watch.Resumes(), fmt.Errorf("watching %s: %w", id, err)
		}
		count++
		if r.GetSequence() != uint64(count) {
			return nil, count, watch.Resumes(), fmt.Errorf("watching %s: Response #%d came as the %dth", id, r.GetSequence(), count)
		}
		say("countdown %s: %s", id, describe(r))
		last = r
		if each != nil {
			if err := each(r); err != nil {
				return nil, count, watch.Resumes(), err
			}
		}
	}
}

func state(s ajspb.RequestState) string { return strings.TrimPrefix(s.String(), "REQUEST_STATE_") }

// describe reads "#3 PENDING 20% 8 to go" or "#9 CANCELLED (CANCELLED: ...)".
func describe(r *ajspb.Response) string {
	text := fmt.Sprintf("#%d %s", r.GetSequence(), state(r.GetState()))
	if p := r.GetProgress(); p != nil {
		text += fmt.Sprintf(" %3.0f%% %s", 100*p.GetFraction(), p.GetMessage())
	} else if data := r.GetData(); len(data) > 0 {
		keys := make([]string, 0, len(data))
		for k := range data {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		pairs := make([]string, len(keys))
		for i, k := range keys {
			pairs[i] = k + "=" + data[k]
		}
		text += " " + strings.Join(pairs, " ")
	}
	if e := ajs.StatusError(r.GetError()); e != nil {
		text += fmt.Sprintf(" (%s %s: %s)", e.Code, e.Reason, e.Message)
	}
	return text
}
