// Package liveserver runs a real `ajs serve` process for the Go client's tests: on
// 127.0.0.1, with a SQLite database in a test's temporary directory so that jobs outlive
// a restart, which Kill/Stop and Start on the same address make.
//
// The ajs command is $AJS_BIN, or the repository's .venv/bin/ajs.
package liveserver

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Server is one `ajs serve` (restartable) and the address it listens on.
type Server struct {
	// Target is "127.0.0.1:port", the same across restarts.
	Target string
	// Dir holds the database (ajs.db) and the server's log (serve.log).
	Dir string

	bin     string
	args    []string
	mu      sync.Mutex
	process *exec.Cmd // nil once it has ended
	exited  chan struct{}
}

var serving = regexp.MustCompile(`serving on (127\.0\.0\.1:\d+)`)

// Binary is the ajs command to run: $AJS_BIN, else the repository's .venv/bin/ajs.
func Binary() (string, error) {
	if bin := os.Getenv("AJS_BIN"); bin != "" {
		return bin, nil
	}
	_, here, _, ok := runtime.Caller(0)
	if !ok {
		return "", fmt.Errorf("set AJS_BIN to the ajs command")
	}
	dir, err := filepath.EvalSymlinks(filepath.Dir(here)) // go.sh builds through a symlink
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "..", "..", "..", "..", ".venv", "bin", "ajs")
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("set AJS_BIN to the ajs command (%s: %v)", bin, err)
	}
	return bin, nil
}

// Start runs `ajs serve --address 127.0.0.1:0 --database <tmp>/ajs.db <args>` and waits
// until it serves. The test ends it (SIGTERM) when it finishes.
func Start(t testing.TB, args ...string) *Server {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Dir: t.TempDir(), bin: bin, args: args}
	t.Cleanup(s.Stop)
	target, err := s.start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.Target = target
	return s
}

// Restart starts the server again on the same address and database, after Kill or Stop,
// and waits until it serves. It may be called from any goroutine.
func (s *Server) Restart() error {
	_, err := s.start(s.Target)
	return err
}

func (s *Server) start(address string) (string, error) {
	logPath := filepath.Join(s.Dir, "serve.log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return "", err
	}
	defer logFile.Close()
	before, err := logFile.Seek(0, io.SeekEnd)
	if err != nil {
		return "", err
	}
	args := append([]string{"serve", "--address", address, "--database", filepath.Join(s.Dir, "ajs.db")}, s.args...)
	process := exec.Command(s.bin, args...)
	process.Dir = s.Dir
	process.Stdout, process.Stderr = logFile, logFile
	dieWithParent(process)
	if err := process.Start(); err != nil {
		return "", fmt.Errorf("starting %s: %w", s.bin, err)
	}
	exited := make(chan struct{})
	go func() {
		_ = process.Wait()
		close(exited)
	}()
	s.mu.Lock()
	s.process, s.exited = process, exited
	s.mu.Unlock()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		text, _ := os.ReadFile(logPath)
		if int64(len(text)) > before {
			if found := serving.FindSubmatch(text[before:]); found != nil {
				return string(found[1]), nil
			}
		}
		select {
		case <-exited:
			text, _ := os.ReadFile(logPath)
			return "", fmt.Errorf("ajs serve exited before serving:\n%s", text[before:])
		case <-time.After(20 * time.Millisecond):
		}
	}
	s.signal(syscall.SIGKILL)
	text, _ := os.ReadFile(logPath)
	return "", fmt.Errorf("ajs serve did not say it serves within 60 s:\n%s", text[before:])
}

// Kill ends the server with SIGKILL (a crash: nothing is drained) and waits until it is gone.
func (s *Server) Kill() { s.signal(syscall.SIGKILL) }

// Stop ends the server with SIGTERM (a graceful shutdown) and waits until it is gone;
// after 60 s it is killed. Stopping a stopped server does nothing.
func (s *Server) Stop() { s.signal(syscall.SIGTERM) }

func (s *Server) signal(sig syscall.Signal) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.process == nil {
		return
	}
	_ = s.process.Process.Signal(sig)
	select {
	case <-s.exited:
	case <-time.After(60 * time.Second):
		_ = s.process.Process.Kill()
		<-s.exited
	}
	s.process = nil
}

// Log is the server's log so far (all its runs), for failure messages.
func (s *Server) Log() string {
	text, _ := os.ReadFile(filepath.Join(s.Dir, "serve.log"))
	return string(text)
}
