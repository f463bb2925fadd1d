// Package ajs is a small Go client of the ajs-grpc JobService: submit a request, read or
// cancel its job, and watch its Responses to the end, resuming by sequence after a dropped
// stream (a server restart, a network hiccup) so that nothing is missed or repeated; or
// watch many jobs' Responses at once (WatchJobs), resuming by token.
//
// Errors from the server are *Error values that carry the google.rpc details, above all
// the ErrorInfo reason (REQUEST_NOT_FOUND, NO_TOKEN, ...), which is the stable thing to
// branch on. The generated stubs are in package ajspb; Client.Service gives the raw
// JobService client for the calls this package does not wrap.
package ajs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"

	"ajs-grpc/clients/go/ajspb"
)

// Options are the connection settings of Dial. The zero value is a plaintext connection
// without credentials (fine for a server on 127.0.0.1 without a tokens file).
type Options struct {
	// CAFile is a PEM file of the certificate authority that signed the server's
	// certificate. Setting it turns TLS on.
	CAFile string
	// TLS turns TLS on with the system's certificate authorities (implied by CAFile).
	TLS bool
	// ServerName is the name the server's certificate must hold, when it is not the
	// target's host.
	ServerName string
	// Token is a bearer token sent with every call ("authorization: Bearer <token>").
	// It is only sent over TLS, or in plain text to a loopback address (127.0.0.1, ::1,
	// localhost), unless InsecureToken is set.
	Token string
	// InsecureToken allows sending Token in plain text to any address. Anyone on the
	// path can read the token.
	InsecureToken bool
	// DialOptions are passed to grpc.Dial after the ones above (they win).
	DialOptions []grpc.DialOption
}

// Client calls one ajs-grpc server (or a load balancer in front of several). It is safe
// for concurrent use. Close it when done.
type Client struct {
	conn *grpc.ClientConn
	svc  ajspb.JobServiceClient
}

// Dial connects to target ("host:port", or any gRPC target name) with opts. Like
// grpc.Dial it does not wait for the connection: the first call does. After the server
// goes away the connection is re-established in the background, retrying quickly (from
// 100 ms, at most every 3 s) so that a watch resumes soon after a restart.
func Dial(target string, opts Options) (*Client, error) {
	dial := []grpc.DialOption{
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 3 * time.Second},
			MinConnectTimeout: 5 * time.Second,
		}),
	}
	secure := opts.TLS || opts.CAFile != ""
	if secure {
		config := &tls.Config{ServerName: opts.ServerName, MinVersion: tls.VersionTLS12}
		if opts.CAFile != "" {
			pem, err := os.ReadFile(opts.CAFile)
			if err != nil {
				return nil, fmt.Errorf("ajs: reading the CA file: %w", err)
			}
			config.RootCAs = x509.NewCertPool()
			if !config.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("ajs: no PEM certificate in the CA file %s", opts.CAFile)
			}
		}
		dial = append(dial, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	} else {
		dial = append(dial, grpc.WithInsecure())
	}
	if opts.Token != "" {
		plainOK := opts.InsecureToken || isLoopback(target)
		if !secure && !plainOK {
			return nil, fmt.Errorf("ajs: a token is sent in plain text only to a loopback address, not to %s: set CAFile or TLS (or InsecureToken)", target)
		}
		dial = append(dial, grpc.WithPerRPCCredentials(bearerToken{token: opts.Token, requireTLS: !plainOK}))
	}
	dial = append(dial, opts.DialOptions...)
	conn, err := grpc.Dial(target, dial...)
	if err != nil {
		return nil, fmt.Errorf("ajs: dialing %s: %w", target, err)
	}
	return &Client{conn: conn, svc: ajspb.NewJobServiceClient(conn)}, nil
}

// isLoopback tells whether target ("host:port") names this machine.
func isLoopback(target string) bool {
	host, _, err := net.SplitHostPort(target)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// bearerToken sends "authorization: Bearer <token>" with every call.
type bearerToken struct {
	token      string
	requireTLS bool
}

func (b bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

func (b bearerToken) RequireTransportSecurity() bool { return b.requireTLS }

// Close closes the connection; calls in flight end with Canceled.
func (c *Client) Close() error { return c.conn.Close() }

// Conn is the client's gRPC connection, for NewWorker or other services' stubs.
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// Service is the generated JobService client on the same connection, for the calls this
// package does not wrap (ListJobs, BatchSubmitRequests, schedules, ...). Its errors are
// plain gRPC errors: AsError turns one into an *Error.
func (c *Client) Service() ajspb.JobServiceClient { return c.svc }

// Submit enqueues request. Submitting the same request id again returns the existing job
// with created false (submits are idempotent), so a submit that failed with Unavailable
// may simply be sent again.
func (c *Client) Submit(ctx context.Context, request *ajspb.Request) (job *ajspb.Job, created bool, err error) {
	answer, err := c.svc.SubmitRequest(ctx, &ajspb.SubmitRequestRequest{Request: request})
	if err != nil {
		return nil, false, AsError(err)
	}
	return answer.GetJob(), answer.GetCreated(), nil
}

// Get returns the job of request id (with its payloads: the FULL view).
func (c *Client) Get(ctx context.Context, id string) (*ajspb.Job, error) {
	answer, err := c.svc.GetJob(ctx, &ajspb.GetJobRequest{RequestId: id})
	if err != nil {
		return nil, AsError(err)
	}
	return answer.GetJob(), nil
}

// Cancel cancels the job of request id: a queued job ends CANCELLED at once, a running
// one is signalled (cancel_requested) and ends CANCELLED when it stops. Cancelling an
// ended job is FailedPrecondition.
func (c *Client) Cancel(ctx context.Context, id string) (*ajspb.Job, error) {
	answer, err := c.svc.CancelJob(ctx, &ajspb.CancelJobRequest{RequestId: id})
	if err != nil {
		return nil, AsError(err)
	}
	return answer.GetJob(), nil
}

// Wait watches the job of request id to its end and returns its final Response,
// resuming after dropped streams as Watch does.
func (c *Client) Wait(ctx context.Context, id string, opts ...WatchOption) (*ajspb.Response, error) {
	watch := c.Watch(ctx, id, 0, opts...)
	defer watch.Close()
	var last *ajspb.Response
	for {
		response, err := watch.Next()
		if err == io.EOF {
			return last, nil
		}
		if err != nil {
			return nil, err
		}
		last = response
	}
}
