package ajs_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"ajs-grpc/clients/go/ajs"
	"ajs-grpc/clients/go/ajspb"
	"ajs-grpc/clients/go/internal/liveserver"
)

// writePEM writes one PEM block to dir/name and returns the path.
func writePEM(t *testing.T, dir, name, kind string, der []byte) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// certificates makes a CA and a server certificate for 127.0.0.1 signed by it; it returns
// the paths of the CA's certificate and of the server's certificate and key.
func certificates(t *testing.T) (caFile, certFile, keyFile string) {
	t.Helper()
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTemplate := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "ajs test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	serverKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serverTemplate := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	serverDER, err := x509.CreateCertificate(rand.Reader, serverTemplate, ca, &serverKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(serverKey)
	if err != nil {
		t.Fatal(err)
	}
	return writePEM(t, dir, "ca.pem", "CERTIFICATE", caDER),
		writePEM(t, dir, "server.pem", "CERTIFICATE", serverDER),
		writePEM(t, dir, "server-key.pem", "PRIVATE KEY", keyDER)
}

// Over TLS (trusting a CA file) with a bearer token, calls run as the token's principal;
// without the token they are refused with UNAUTHENTICATED and reason NO_TOKEN.
func TestTLSAndBearerToken(t *testing.T) {
	caFile, certFile, keyFile := certificates(t)
	token := "go-client-test-token"
	server := liveserver.Start(t, "--tls-cert", certFile, "--tls-key", keyFile, "--tokens-file", tokensFile(t, token, "gopher"))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	client := dial(t, server.Target, ajs.Options{CAFile: caFile, Token: token})
	job, _, err := client.Submit(ctx, &ajspb.Request{Type: "echo", Data: map[string]string{"hello": "go"}})
	if err != nil {
		t.Fatal(err)
	}
	if creator := job.GetRequest().GetCreator(); creator != "gopher" {
		t.Fatalf("creator %q, want the token's principal gopher", creator)
	}
	final, err := client.Wait(ctx, job.GetRequest().GetId())
	if err != nil || final.GetState() != ajspb.RequestState_REQUEST_STATE_FINISHED || final.GetData()["hello"] != "go" {
		t.Fatalf("echo ended %v %v, %v", final.GetState(), final.GetData(), err)
	}

	anonymous := dial(t, server.Target, ajs.Options{CAFile: caFile})
	_, err = anonymous.Get(ctx, job.GetRequest().GetId())
	if ajs.Code(err) != codes.Unauthenticated || ajs.Reason(err) != "NO_TOKEN" {
		t.Fatalf("without a token: %v", err)
	}

	if _, err := ajs.Dial("192.0.2.1:50051", ajs.Options{Token: token}); err == nil {
		t.Fatal("Dial would send a token in plain text beyond loopback without InsecureToken")
	}
}

// Without TLS a token goes to a loopback address (and only there, unless InsecureToken).
func TestBearerTokenInPlainTextToLoopback(t *testing.T) {
	token := "go-client-plain-token"
	server := liveserver.Start(t, "--tokens-file", tokensFile(t, token, "gopher"))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	client := dial(t, server.Target, ajs.Options{Token: token})
	job, _, err := client.Submit(ctx, &ajspb.Request{Type: "echo"})
	if err != nil || job.GetRequest().GetCreator() != "gopher" {
		t.Fatalf("submit with a token over plaintext to %s: %v, %v", server.Target, job, err)
	}
	if _, err := ajs.Dial("192.0.2.1:50051", ajs.Options{Token: token, InsecureToken: true}); err != nil {
		t.Fatalf("InsecureToken: %v", err)
	}
}

// tokensFile writes a tokens file giving token to principal and returns its path.
func tokensFile(t *testing.T, token, principal string) string {
	t.Helper()
	digest := sha256.Sum256([]byte(token))
	path := filepath.Join(t.TempDir(), "tokens.toml")
	entry := "[[tokens]]\nsha256 = \"" + hex.EncodeToString(digest[:]) + "\"\nprincipal = \"" + principal + "\"\n"
	if err := os.WriteFile(path, []byte(entry), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
