package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"io"
	"strings"
	"testing"
	"time"

	"ajs-grpc/clients/go/internal/liveserver"
)

// The demo against a real server that is killed and started again on the same port while
// the demo watches its countdown: the watch resumes, the countdown ends FINISHED with each
// Response seen once, the second countdown ends CANCELLED, and the error shows its reason.
func TestDemoAcrossAServerRestart(t *testing.T) {
	server := liveserver.Start(t, "--shutdown-grace", "0.5", "--cancel-grace", "1")
	ctx, cancel := context.WithTimeout(context.Background(), 180*time.Second)
	defer cancel()
	output, write := io.Pipe()
	done := make(chan error, 1)
	var stderr strings.Builder
	go func() {
		err := run(ctx, []string{"-target", server.Target, "-steps", "6", "-interval", "0.3", "-id", "demo"}, write, &stderr)
		write.Close()
		done <- err
	}()
	var lines []string
	restarted := make(chan error, 1)
	killed := false
	scanner := bufio.NewScanner(output)
	for scanner.Scan() {
		line := scanner.Text()
		lines = append(lines, line)
		t.Log(line)
		if !killed && strings.HasPrefix(line, "countdown demo: #") && strings.Contains(line, "%") {
			killed = true
			go func() {
				server.Kill()
				restarted <- server.Restart()
			}()
		}
	}
	if err := <-done; err != nil {
		t.Fatalf("the demo failed: %v\n%s\nserver log:\n%s", err, stderr.String(), server.Log())
	}
	if !killed {
		t.Fatal("the countdown showed no progress: nothing was restarted")
	}
	if err := <-restarted; err != nil {
		t.Fatal(err)
	}
	text := strings.Join(lines, "\n")
	for _, want := range []string{
		"countdown demo: stream dropped (Unavailable",
		"countdown demo: ended FINISHED after ",
		"each seen once, in order",
		"countdown demo-cancel: cancel asked",
		"countdown demo-cancel: ended CANCELLED",
		`GetJob("demo-unknown"): NotFound, reason REQUEST_NOT_FOUND (domain ajs.v1`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("no %q in the output", want)
		}
	}
}

func TestDemoFlags(t *testing.T) {
	var stderr strings.Builder
	if err := run(context.Background(), []string{"-h"}, io.Discard, &stderr); !errors.Is(err, flag.ErrHelp) || !strings.Contains(stderr.String(), "-steps") {
		t.Fatalf("-h: %v\n%s", err, stderr.String())
	}
	for _, args := range [][]string{{"-steps", "abc"}, {"-steps", "0"}, {"-interval", "-1"}, {"extra"}} {
		stderr.Reset()
		if err := run(context.Background(), args, io.Discard, &stderr); !errors.Is(err, errUsage) || stderr.Len() == 0 {
			t.Errorf("%v: %v, %q", args, err, stderr.String())
		}
	}
}
