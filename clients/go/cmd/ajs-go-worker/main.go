// Command ajs-go-worker is an example remote worker of ajs-grpc: it connects to a server's
// WorkerService, registers one job type (go-hash by default, typed input
// ajs.examples.v1.HashRequest, output ajs.examples.v1.HashResponse) and runs its jobs:
// the SHA-256 or SHA-512 of the input's data, hashed again for the remaining rounds, with
// progress after each round. It prints "registered <worker id>" on stdout each time it
// registers (again after a reconnect) and logs the rest on stderr. SIGTERM (or SIGINT)
// drains it: no new jobs, the running ones finish and report, then it exits 0; a second
// signal ends it at once.
//
//	ajs-go-worker --target 127.0.0.1:50051 [--token TOKEN] [--name NAME] [--type go-hash] [--max-concurrent 1] [--tls] [--tls-ca PEM]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"syscall"

	"ajs-grpc/clients/go/ajs"
	"ajs-grpc/clients/go/internal/hashjob"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop() // a second signal ends the process at once
	}()
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errUsage):
		os.Exit(2)
	case err != nil:
		fmt.Fprintln(os.Stderr, "ajs-go-worker:", err)
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

type settings struct {
	target, caFile, serverName, token, name, typeName string
	insecureToken, tls                                bool
	maxConcurrent                                     int
}

func parse(args []string, stderr io.Writer) (settings, error) {
	var s settings
	flags := flag.NewFlagSet("ajs-go-worker", flag.ContinueOnError)
	flags.SetOutput(stderr)
	flags.Usage = func() {
		fmt.Fprintf(stderr, "Usage: ajs-go-worker --target HOST:PORT [--token TOKEN] [--name NAME] [--type TYPE] [--max-concurrent N]\n\n"+
			"Runs the example hash job (input ajs.examples.v1.HashRequest, output HashResponse) for an\n"+
			"ajs-grpc server. Prints \"registered <worker id>\" on each registration; SIGTERM drains it.\n\nFlags:\n")
		flags.PrintDefaults()
	}
	flags.StringVar(&s.target, "target", "127.0.0.1:50051", "the server's `host:port`")
	flags.StringVar(&s.token, "token", "", "bearer `token` of a principal with the worker role (default: $AJS_TOKEN)")
	flags.StringVar(&s.name, "name", "", "the worker's `name` in the server's logs and in each job's data (default: <host>:<pid>)")
	flags.StringVar(&s.typeName, "type", hashjob.DefaultType, "the job `type` to register")
	flags.IntVar(&s.maxConcurrent, "max-concurrent", 1, "how many jobs to run at once, 1 to 10000")
	flags.StringVar(&s.caFile, "ca-file", "", "PEM `file` of the CA of the server's certificate; turns TLS on")
	flags.StringVar(&s.caFile, "tls-ca", "", "the same as --ca-file (the Node worker's name for it)")
	flags.BoolVar(&s.tls, "tls", false, "TLS with the system's certificate authorities (implied by --ca-file)")
	flags.StringVar(&s.serverName, "server-name", "", "the `name` in the server's certificate, if not the target's host")
	flags.BoolVar(&s.insecureToken, "insecure-token", false, "send the token in plain text beyond loopback (without TLS it goes only to 127.0.0.1, ::1, localhost)")
	if err := flags.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return s, err
		}
		return s, errUsage // the flag package has said what is wrong
	}
	switch {
	case flags.NArg() > 0:
		fmt.Fprintf(stderr, "ajs-go-worker: unexpected argument %q\n", flags.Arg(0))
		return s, errUsage
	case s.maxConcurrent < 1 || s.maxConcurrent > 10000:
		fmt.Fprintf(stderr, "ajs-go-worker: --max-concurrent must be between 1 and 10000, got %d\n", s.maxConcurrent)
		return s, errUsage
	case s.typeName == "":
		fmt.Fprintln(stderr, "ajs-go-worker: --type must not be empty")
		return s, errUsage
	}
	if s.token == "" {
		s.token = os.Getenv("AJS_TOKEN")
	}
	return s, nil
}

// run is the whole command; main adds the process's arguments, output, signals and exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	s, err := parse(args, stderr)
	if err != nil {
		return err
	}
	client, err := ajs.Dial(s.target, ajs.Options{CAFile: s.caFile, TLS: s.tls, ServerName: s.serverName, Token: s.token, InsecureToken: s.insecureToken})
	if err != nil {
		return err
	}
	defer client.Close()
	worker := ajs.NewWorker(client.Conn(), ajs.WorkerOptions{
		Name:          s.name,
		MaxConcurrent: s.maxConcurrent,
		Logger:        log.New(stderr, "ajs-go-worker: ", log.LstdFlags|log.Lmicroseconds),
		OnRegistered:  func(id string) { fmt.Fprintf(stdout, "registered %s\n", id) },
	})
	if err := worker.Register(hashjob.Spec(s.typeName), hashjob.Handler(worker.Name())); err != nil {
		return err
	}
	return worker.Run(ctx)
}
