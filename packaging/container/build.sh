#!/usr/bin/env bash
# Builds the fx container image with podman without pulling any image: fx is
# built on this machine as a static binary (CGO_ENABLED=0) and put on an
# empty base (the Containerfile's target fx-prebuilt). Then runs `fx version` in
# the image and checks that it prints what the binary prints on the host,
# and that the image runs as fx (65532) with /data and /pki as volumes.
#
# Usage: packaging/container/build.sh [IMAGE]        (default localhost/fx:dev)
#
# Environment:
#   FX_BINARY=PATH       use this static fx instead of building one; else it
#                        is built with the version, commit and date stamped
#                        as `make build` does (internal/version)
#   FX_PODMAN_RUNTIME=R  the OCI runtime of the check run (default: runc when
#                        installed, else podman's own default)
#
# With a registry at hand, `podman build -f packaging/container/Containerfile .`
# builds fx in a golang stage instead (docs/packaging.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH=/usr/local/go/bin:$PATH

image=${1:-localhost/fx:dev}
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

mkdir -p "$ctx/usr/local/bin" "$ctx/empty"
if [ -n "${FX_BINARY:-}" ]; then
  cp "$FX_BINARY" "$ctx/usr/local/bin/fx"
else
  v=github.com/fx-fl/fx/internal/version
  CGO_ENABLED=0 go build -trimpath \
    -ldflags "-s -w -X $v.version=$(git describe --tags --always --dirty 2>/dev/null || echo devel) -X $v.commit=$(git rev-parse HEAD 2>/dev/null) -X $v.date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -o "$ctx/usr/local/bin/fx" ./cmd/fx
fi
if ! file "$ctx/usr/local/bin/fx" 2>/dev/null | grep -q 'statically linked'; then
  echo "build.sh: $ctx/usr/local/bin/fx is not a static binary (build it with CGO_ENABLED=0)" >&2
  exit 1
fi

podman build --quiet \
  --file packaging/container/Containerfile \
  --ignorefile packaging/container/Containerfile.dockerignore \
  --target fx-prebuilt \
  --build-context fxroot="$ctx" \
  --tag "$image" . >/dev/null
echo "built $image ($(podman image inspect --format '{{.Size}}' "$image") bytes)"

# The image's configuration.
got=$(podman image inspect --format '{{.Config.User}} {{json .Config.Entrypoint}} {{json .Config.Volumes}}' "$image")
want='65532:65532 ["/usr/local/bin/fx"] {"/data":{},"/pki":{}}'
if [ "$got" != "$want" ]; then
  printf 'build.sh: image configuration\n  got:  %s\n  want: %s\n' "$got" "$want" >&2
  exit 1
fi

# `fx version` inside the image. Podman's default limits (1048576 open
# files and processes) exceed what a host without CAP_SYS_RESOURCE allows:
# ask for modest ones.
runtime=${FX_PODMAN_RUNTIME:-}
if [ -z "$runtime" ] && command -v runc >/dev/null; then runtime=runc; fi
run_opts=(--rm --network=none --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
if [ -n "$runtime" ]; then run_opts+=(--runtime "$runtime"); fi
in_image=$(podman run "${run_opts[@]}" "$image" version)
on_host=$("$ctx/usr/local/bin/fx" version)
if [ "$in_image" != "$on_host" ]; then
  printf 'build.sh: fx version in the image: %q, on the host: %q\n' "$in_image" "$on_host" >&2
  exit 1
fi
echo "podman run $image version: $in_image"
