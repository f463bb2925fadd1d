#!/usr/bin/env bash
# Generates the Go stubs of protos/ajs/v1/*.proto into ajspb/ with protoc, protoc-gen-go
# and protoc-gen-go-grpc (Debian's), and those of the example plugins' messages
# (plugins/examples/protos: ajs.examples.v1.HashRequest, ...) into examplespb/, which the
# example worker cmd/ajs-go-worker uses. The stubs are not committed: run this after a
# change to the protos (go.sh and test.sh run it when the stubs are missing or older).
#
# google/rpc/status.proto is read from googleapis-common-protos (the Python package the
# server itself uses): $GOOGLEAPIS_PROTOS names a directory holding google/rpc/status.proto,
# else it is found with $PYTHON, the python beside $AJS_BIN, the repository's .venv, or python3.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

ajs_go_need_command protoc protobuf-compiler
ajs_go_need_command protoc-gen-go protoc-gen-go
ajs_go_need_command protoc-gen-go-grpc protoc-gen-go-grpc
[ -f /usr/include/google/protobuf/any.proto ] || ajs_go_missing "google/protobuf/*.proto not found in /usr/include (Debian package libprotobuf-dev)"

googleapis=${GOOGLEAPIS_PROTOS:-}
if [ -z "$googleapis" ]; then
  for python in "${PYTHON:-}" "${AJS_BIN:+$(dirname "$AJS_BIN")/python}" "$root/.venv/bin/python" python3; do
    [ -n "$python" ] || continue
    command -v "$python" >/dev/null 2>&1 || continue
    googleapis=$("$python" -c 'import google.rpc, pathlib; print(pathlib.Path(list(google.rpc.__path__)[0]).parent.parent)' 2>/dev/null) || continue
    [ -f "$googleapis/google/rpc/status.proto" ] && break
    googleapis=
  done
fi
if [ -z "$googleapis" ] || [ ! -f "$googleapis/google/rpc/status.proto" ]; then
  echo "clients/go: google/rpc/status.proto not found: set GOOGLEAPIS_PROTOS to a directory holding it," >&2
  echo "  or PYTHON to a python with googleapis-common-protos (the server's venv has it: pip install -e . in .venv)" >&2
  exit 2
fi

# protos/ declares no go_package: map each file to our package here (M options).
pkg=ajs-grpc/clients/go/ajspb
cd "$root/protos"
mapfile -t sources < <(find ajs -name '*.proto' | sort)
maps=()
for source in "${sources[@]}"; do maps+=("M$source=$pkg"); done
go_opts=$(IFS=,; echo "module=ajs-grpc/clients/go,${maps[*]}")
rm -f "$here"/ajspb/*.pb.go
protoc -I . -I /usr/include -I "$googleapis" \
  --go_out="$here" --go_opt="$go_opts" \
  --go-grpc_out="$here" --go-grpc_opt="$go_opts" \
  "${sources[@]}"
echo "generated $(cd "$here" && ls ajspb/*.pb.go | tr '\n' ' ')from ${sources[*]}" >&2

# The example plugins' messages (no services), into their own package.
examples_pkg=ajs-grpc/clients/go/examplespb
cd "$root/plugins/examples/protos"
mapfile -t examples < <(find ajs -name '*.proto' | sort)
maps=()
for source in "${examples[@]}"; do maps+=("M$source=$examples_pkg"); done
go_opts=$(IFS=,; echo "module=ajs-grpc/clients/go,${maps[*]}")
rm -f "$here"/examplespb/*.pb.go
protoc -I . -I /usr/include --go_out="$here" --go_opt="$go_opts" "${examples[@]}"
echo "generated $(cd "$here" && ls examplespb/*.pb.go | tr '\n' ' ')from ${examples[*]}" >&2
