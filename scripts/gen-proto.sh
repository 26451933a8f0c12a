#!/usr/bin/env bash
# Regenerates the Go code (and, when its directory exists, the Python code) from
# proto/fx/v1/*.proto. The Go plugins are the versions pinned in go.mod's tool
# block, built into a temporary directory; protoc is Debian's protobuf-compiler.
#
# proto/buf/validate/validate.proto is protovalidate's rule schema, copied
# unchanged from github.com/bufbuild/protovalidate (proto/protovalidate/) at
# the version of the Go module go.mod requires
# (buf.build/gen/go/bufbuild/protovalidate/protocolbuffers/go), whose
# generated package the Go code imports; only Python needs it generated here.
# Upgrade the two together.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v protoc >/dev/null || { echo "protoc not found: apt-get install protobuf-compiler" >&2; exit 1; }
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
go build -o "$bin/protoc-gen-go" google.golang.org/protobuf/cmd/protoc-gen-go
go build -o "$bin/protoc-gen-go-grpc" google.golang.org/grpc/cmd/protoc-gen-go-grpc

rm -f proto/fx/v1/*.pb.go
protoc -I proto \
  --plugin=protoc-gen-go="$bin/protoc-gen-go" --go_out=. --go_opt=module=github.com/fx-fl/fx \
  --plugin=protoc-gen-go-grpc="$bin/protoc-gen-go-grpc" --go-grpc_out=. --go-grpc_opt=module=github.com/fx-fl/fx \
  proto/fx/v1/*.proto

if [ -d sdk/python/fx ]; then
  out=sdk/python/fx/_proto
  rm -rf "$out" && mkdir -p "$out"
  "${PYTHON:-/usr/bin/python3}" -m grpc_tools.protoc -I proto --python_out="$out" --grpc_python_out="$out" proto/fx/v1/*.proto
  # The rules' schema, so the stubs that import it load (Python clients do
  # not enforce the rules; the servers do).
  "${PYTHON:-/usr/bin/python3}" -m grpc_tools.protoc -I proto --python_out="$out" proto/buf/validate/validate.proto
  # grpc_tools writes absolute imports ("from fx.v1 import ..."); make them
  # relative to the package so the SDK needs no sys.path changes.
  find "$out" -name '*.py' -exec sed -i -E 's/^from (fx|buf)\.(v1|validate) import/from fx._proto.\1.\2 import/' {} +
  find "$out" -type d -exec touch {}/__init__.py \;
fi
