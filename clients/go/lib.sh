# Shared by generate.sh, go.sh and test.sh (sourced, not run).
# Everything comes from Debian's packages: nothing is downloaded.

# The Debian packages that hold what these scripts use (one apt-get install line).
AJS_GO_APT_PACKAGES="golang-go protobuf-compiler libprotobuf-dev protoc-gen-go protoc-gen-go-grpc \
golang-google-grpc-dev golang-google-protobuf-dev golang-google-genproto-dev golang-github-golang-protobuf-1-5-dev"

# Where Debian's golang-*-dev packages put their sources (a GOPATH).
AJS_GO_DEBIAN_GOPATH=${AJS_GO_DEBIAN_GOPATH:-/usr/share/gocode}

ajs_go_missing() {
  echo "clients/go: $1" >&2
  echo "  install the Go client's tools with:" >&2
  echo "  apt-get install -y --no-install-recommends $AJS_GO_APT_PACKAGES" >&2
  exit 2
}

ajs_go_need_command() {  # command, package
  command -v "$1" >/dev/null 2>&1 || ajs_go_missing "'$1' not found (Debian package $2)"
}

ajs_go_need_source() {  # import path, package
  [ -d "$AJS_GO_DEBIAN_GOPATH/src/$1" ] || ajs_go_missing "Go package $1 not found under $AJS_GO_DEBIAN_GOPATH/src (Debian package $2)"
}
