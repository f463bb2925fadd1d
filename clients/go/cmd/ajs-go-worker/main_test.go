//go:build linux

package main

// The worker as a process against a real `ajs serve`: killed mid-job (another worker
// process runs the job again, which ends once), and drained by SIGTERM. The processes are
// this test binary re-run with AJS_GO_WORKER_MAIN=1, which makes it run main() itself.

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/anypb"

	"ajs-grpc/clients/go/ajs"
	"ajs-grpc/clients/go/ajspb"
	"ajs-grpc/clients/go/examplespb"
	"ajs-grpc/clients/go/internal/hashjob"
	"ajs-grpc/clients/go/internal/liveserver"
)

func TestMain(m *testing.M) {
	if os.Getenv("AJS_GO_WORKER_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// process is a running ajs-go-worker.
type process struct {
	cmd    *exec.Cmd
	lines  chan string // stdout
	stderr *lockedBuilder
	exited chan error
}

type lockedBuilder struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuilder) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuilder) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startProcess runs the worker with args and waits for its "registered" line.
func startProcess(t *testing.T, args ...string) *process {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "AJS_GO_WORKER_MAIN=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p := &process{cmd: cmd, lines: make(chan string, 100), stderr: &lockedBuilder{}, exited: make(chan error, 1)}
	cmd.Stderr = p.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		scanner := bufio.NewScanner(stdout)
		for scanner.Scan() {
			p.lines <- scanner.Text()
		}
		close(p.lines)
		p.exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		if t.Failed() {
			t.Logf("worker %v stderr:\n%s", args, p.stderr)
		}
	})
	select {
	case line := <-p.lines:
		if !strings.HasPrefix(line, "registered ") {
			t.Fatalf("first line %q, want registered <id>", line)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("the worker did not register within 20 s:\n%s", p.stderr)
	}
	return p
}

func submitHash(t *testing.T, ctx context.Context, client *ajs.Client, id string, rounds uint32, pauseMS string) {
	t.Helper()
	input, err := anypb.New(&examplespb.HashRequest{Data: []byte(id), Algorithm: examplespb.Algorithm_ALGORITHM_SHA256, Rounds: rounds})
	if err != nil {
		t.Fatal(err)
	}
	request := &ajspb.Request{Id: id, Type: "go-hash", Input: input, Data: map[string]string{"pause_ms": pauseMS}}
	if _, _, err := client.Submit(ctx, request); err != nil {
		t.Fatal(err)
	}
}

// watchAll watches a job to its end, calling each on each Response.
func watchAll(t *testing.T, ctx context.Context, client *ajs.Client, id string, each func(*ajspb.Response)) []*ajspb.Response {
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
			t.Fatalf("watching %s: %v", id, err)
		}
		all = append(all, r)
		each(r)
	}
}

func checkDigest(t *testing.T, final *ajspb.Response, data string, rounds uint32) {
	t.Helper()
	want, _ := hashjob.Digest([]byte(data), examplespb.Algorithm_ALGORITHM_SHA256, rounds)
	var output examplespb.HashResponse
	if err := final.GetOutput().UnmarshalTo(&output); err != nil || output.GetHexDigest() != want {
		t.Fatalf("output %v (%v), want %s", final.GetOutput(), err, want)
	}
}

// A worker SIGKILLed mid-job: a second worker process runs the job again (attempt 2)
// and it ends FINISHED with exactly one final Response.
func TestKilledWorkersJobRunsElsewhere(t *testing.T) {
	server := liveserver.Start(t)
	client, err := ajs.Dial(server.Target, ajs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	first := startProcess(t, "--target", server.Target, "--name", "go-first")
	submitHash(t, ctx, client, "go-takeover", 6, "200")
	var second *process
	all := watchAll(t, ctx, client, "go-takeover", func(r *ajspb.Response) {
		if r.GetProgress() != nil && second == nil {
			_ = first.cmd.Process.Kill()
			<-first.exited
			second = startProcess(t, "--target", server.Target, "--name", "go-second")
		}
	})
	finals := 0
	for _, r := range all {
		if r.GetIsFinal() {
			finals++
		}
	}
	final := all[len(all)-1]
	if finals != 1 || final.GetState() != ajspb.RequestState_REQUEST_STATE_FINISHED {
		t.Fatalf("%d final Responses; the last is %v\nserver log:\n%s", finals, final, server.Log())
	}
	if d := final.GetData(); d["worker"] != "go-second" || d["attempt"] != "2" || d["language"] != "go" {
		t.Fatalf("final data %v, want the second worker's attempt 2", d)
	}
	checkDigest(t, final, "go-takeover", 6)
	t.Logf("%d Responses, one final, by %s attempt %s", len(all), final.GetData()["worker"], final.GetData()["attempt"])
}

// SIGTERM drains the worker: the running job finishes (FINISHED by that worker, attempt
// 1), the server ends the drained call and the process exits 0.
func TestSIGTERMDrains(t *testing.T) {
	server := liveserver.Start(t)
	client, err := ajs.Dial(server.Target, ajs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	worker := startProcess(t, "--target", server.Target, "--name", "go-drain")
	submitHash(t, ctx, client, "go-drain", 5, "200")
	signalled := time.Time{}
	all := watchAll(t, ctx, client, "go-drain", func(r *ajspb.Response) {
		if r.GetProgress() != nil && signalled.IsZero() {
			signalled = time.Now()
			if err := worker.cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
		}
	})
	final := all[len(all)-1]
	if final.GetState() != ajspb.RequestState_REQUEST_STATE_FINISHED || final.GetData()["worker"] != "go-drain" || final.GetData()["attempt"] != "1" {
		t.Fatalf("final Response %v\nserver log:\n%s", final, server.Log())
	}
	checkDigest(t, final, "go-drain", 5)
	select {
	case err := <-worker.exited:
		if err != nil {
			t.Fatalf("the drained worker exited with %v:\n%s", err, worker.stderr)
		}
	case <-time.After(5 * time.Second): // the drain grace is 10 s: the server ends the call before
		t.Fatalf("the worker did not exit within 5 s of the job's end:\n%s", worker.stderr)
	}
	if !strings.Contains(worker.stderr.String(), "drained: the server ended the call") {
		t.Fatalf("the server did not end the drained call:\n%s", worker.stderr)
	}
	for line := range worker.lines {
		t.Errorf("unexpected output after the registration: %q", line)
	}
	t.Logf("exited 0, %v after SIGTERM", time.Since(signalled).Round(time.Millisecond))
}

func TestFlags(t *testing.T) {
	var stderr strings.Builder
	if err := run(context.Background(), []string{"-h"}, io.Discard, &stderr); !errors.Is(err, flag.ErrHelp) || !strings.Contains(stderr.String(), "-max-concurrent") {
		t.Fatalf("-h: %v\n%s", err, stderr.String())
	}
	for _, args := range [][]string{{"--max-concurrent", "0"}, {"--max-concurrent", "x"}, {"--type", ""}, {"extra"}} {
		stderr.Reset()
		if err := run(context.Background(), args, io.Discard, &stderr); !errors.Is(err, errUsage) || stderr.Len() == 0 {
			t.Errorf("%v: %v, %q", args, err, stderr.String())
		}
	}
}

// With a tokens file: a token with the worker role registers (read from $AJS_TOKEN); a
// token without it is refused for good: the worker exits 1 with the server's reason.
func TestWorkerRoleAuth(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tokens.toml")
	entry := func(token, principal, roles string) string {
		digest := sha256.Sum256([]byte(token))
		return fmt.Sprintf("[[tokens]]\nsha256 = %q\nprincipal = %q\nroles = %s\n", hex.EncodeToString(digest[:]), principal, roles)
	}
	if err := os.WriteFile(path, []byte(entry("runner-token", "runner", `["worker"]`)+entry("alice-token", "alice", "[]")), 0o600); err != nil {
		t.Fatal(err)
	}
	server := liveserver.Start(t, "--tokens-file", path)
	t.Setenv("AJS_TOKEN", "runner-token")
	startProcess(t, "--target", server.Target, "--name", "go-runner")

	refused := exec.Command(os.Args[0], "--target", server.Target, "--token", "alice-token")
	refused.Env = append(os.Environ(), "AJS_GO_WORKER_MAIN=1")
	var stderr strings.Builder
	refused.Stderr = &stderr
	done := make(chan error, 1)
	if err := refused.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- refused.Wait() }()
	select {
	case err := <-done:
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(stderr.String(), "PermissionDenied") {
			t.Fatalf("a token without the worker role: %v\n%s", err, stderr.String())
		}
		t.Logf("refused: %s", strings.TrimSpace(stderr.String()))
	case <-time.After(20 * time.Second):
		_ = refused.Process.Kill()
		t.Fatalf("a worker without the worker role still runs after 20 s:\n%s", stderr.String())
	}
}
