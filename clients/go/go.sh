#!/usr/bin/env bash
# Runs the go command on this client with Debian's Go packages, offline: in GOPATH mode,
# with GOPATH = a workspace holding this directory as ajs-grpc/clients/go (a symlink in
# .gopath/) followed by /usr/share/gocode. Generates the stubs first when they are missing
# or older than protos/. Usage: ./go.sh build ./... | ./go.sh test ./... | ./go.sh run ./cmd/ajs-go-demo
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

ajs_go_need_command go golang-go
ajs_go_need_source google.golang.org/grpc golang-google-grpc-dev
ajs_go_need_source google.golang.org/protobuf golang-google-protobuf-dev
ajs_go_need_source google.golang.org/genproto/googleapis/rpc/status golang-google-genproto-dev
ajs_go_need_source github.com/golang/protobuf golang-github-golang-protobuf-1-5-dev
# grpc 1.33 needs github.com/golang/protobuf 1.4 or later (1.5: a layer over google.golang.org/protobuf);
# golang-github-golang-protobuf-1-3-dev also satisfies the grpc package's dependency, but not the code.
grep -q google.golang.org/protobuf "$AJS_GO_DEBIAN_GOPATH/src/github.com/golang/protobuf/go.mod" 2>/dev/null ||
  ajs_go_missing "github.com/golang/protobuf is older than 1.4 (golang-github-golang-protobuf-1-3-dev?): install golang-github-golang-protobuf-1-5-dev"

stale=0
[ -n "$(ls "$here"/ajspb/*.pb.go 2>/dev/null)" ] || stale=1
[ -n "$(ls "$here"/examplespb/*.pb.go 2>/dev/null)" ] || stale=1
for proto in $(find "$root/protos" "$root/plugins/examples/protos" -name '*.proto'); do
  for stub in "$here"/ajspb/*.pb.go "$here"/examplespb/*.pb.go; do
    [ -e "$stub" ] && [ "$proto" -nt "$stub" ] && stale=1
  done
done
[ "$stale" = 0 ] || "$here/generate.sh"

workspace="$here/.gopath"
mkdir -p "$workspace/src/ajs-grpc/clients"
ln -sfn "$here" "$workspace/src/ajs-grpc/clients/go"
cd "$workspace/src/ajs-grpc/clients/go"
export PWD="$workspace/src/ajs-grpc/clients/go"  # go derives import paths from the logical path
# The build cache needs a home; give it one in the workspace when there is none (CI as root without HOME).
if [ -z "${GOCACHE:-}${XDG_CACHE_HOME:-}${HOME:-}" ]; then export GOCACHE="$workspace/cache"; fi
export GO111MODULE=off GOPATH="$workspace:$AJS_GO_DEBIAN_GOPATH" GOFLAGS= GOPROXY=off
exec go "$@"
