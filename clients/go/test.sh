#!/usr/bin/env bash
# From a fresh clone: generates the stubs, builds (the example worker into bin/ajs-go-worker),
# vets and runs the Go tests against a
# live `ajs serve` (AJS_BIN, default the repository's .venv/bin/ajs). Offline: the tools
# come from Debian (lib.sh lists the packages; a missing one fails with the apt-get line).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
export AJS_BIN=${AJS_BIN:-$root/.venv/bin/ajs}
[ -x "$AJS_BIN" ] || { echo "clients/go: AJS_BIN=$AJS_BIN is not an executable ajs (pip install -e . -e plugins/examples into .venv)" >&2; exit 2; }
"$here/generate.sh"
"$here/go.sh" build ./...
"$here/go.sh" build -o "$here/bin/ajs-go-worker" ./cmd/ajs-go-worker  # the example worker other tests run
"$here/go.sh" vet ./...
unformatted=$(cd "$here" && gofmt -l ajs cmd examplespb internal)
[ -z "$unformatted" ] || { echo "clients/go: not gofmt-formatted: $unformatted" >&2; exit 1; }
"$here/go.sh" test -count=1 -timeout 300s "$@" ./...
