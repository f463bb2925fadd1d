// Package examplespb holds the Go stubs of the example plugins' messages
// (plugins/examples/protos: ajs.examples.v1.HashRequest, HashResponse, Algorithm), generated
// by ../generate.sh with protoc-gen-go. The example worker cmd/ajs-go-worker uses them. The
// generated files are not committed, so they never drift from the protos.
package examplespb
