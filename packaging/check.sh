#!/usr/bin/env bash
# Checks fx's packaging (docs/packaging.md) on a Debian 12 machine with Go,
# as root: installs what it needs with apt-get, then
#
#   container   builds the image (packaging/container/build.sh: static fx on
#               an empty base, no image pulled), runs `fx version` in it
#   helm        lints the fx-director chart and renders it (helm as a Go
#               tool of packaging/tools), decodes the manifests strictly and
#               checks them (packaging/tools/chartcheck), and checks that bad
#               values are refused
#   director    starts the director in the image with the chart's rendered
#               director.yaml, the PKI laid out as the chart's Secret and a
#               fresh volume for /data: /healthz, /readyz and /metrics answer
#               200, an admin's call over mutual TLS succeeds, SIGTERM stops
#               it cleanly, the store was written by the image's user
#   systemd     systemd-analyze verify and security (exposure thresholds) of
#               both units, systemd-sysusers of the sysusers file; then boots
#               systemd in a container (a Debian base made once with
#               debootstrap and kept) and runs the director and an envoy from
#               the units, with one experiment whose Python runner runs in
#               the envoy's sandbox
#   python      pip-installs sdk/python into a fresh venv and imports fx and
#               fx.site from outside the source tree
#
# Usage: packaging/check.sh [--golang-stage]
#
# --golang-stage also builds the Containerfile's default target, which
# compiles fx in a golang stage: with no registry, on a golang image made
# here from the Debian base and this machine's Go, offline from this
# machine's module cache (a few minutes more).
#
# Idempotent: everything it makes lives in a temporary directory or under
# names starting fx-check (podman containers, volume, images) and is
# replaced on the next run. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH
repo=$PWD

golang_stage=false
for arg in "$@"; do
  case "$arg" in
    --golang-stage) golang_stage=true ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

start=$SECONDS
step() { printf '\n==> packaging [%ds]: %s\n' "$((SECONDS - start))" "$*"; }
die() { printf 'packaging check FAILED: %s\n' "$*" >&2; exit 1; }

work=$(mktemp -d /tmp/fx-packaging-check.XXXXXX)
pip_build_dirs=()
base_pid=
cleanup() {
  if [ -n "$base_pid" ]; then kill "$base_pid" 2>/dev/null || true; fi
  podman rm -f fx-check-director fx-check-systemd >/dev/null 2>&1 || true
  podman volume rm -f fx-check-data >/dev/null 2>&1 || true
  for d in "${pip_build_dirs[@]}"; do rm -rf "$d"; done
  rm -rf "$work"
}
trap cleanup EXIT

image=localhost/fx:check
base_image=localhost/fx-check-debian:bookworm
mirror=${FX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Podman's default limits (1048576 open files and processes) exceed what a
# machine without CAP_SYS_RESOURCE allows; crun refuses cgroup v1/v2 hybrid
# hosts, runc does not (docs/packaging.md).
run_opts=(--runtime runc --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

step "installing system packages"
if [ "$(id -u)" != 0 ]; then die "run as root (apt-get, podman, chown)"; fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  podman runc debootstrap systemd curl file git ca-certificates util-linux \
  python3-venv python3-pip python3-setuptools python3-setuptools-scm python3-packaging \
  python3-grpcio python3-protobuf python3-numpy >/dev/null

# The systemd step's Debian base (debootstrap: mostly downloading) is made
# once and kept; make it in the background while Go compiles.
make_base() {
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,python3-numpy \
    bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || return 1
  tar -C "$work/rootfs" -c . | podman import -q --change 'CMD ["/sbin/init"]' - "$base_image" >/dev/null || return 1
  rm -rf "$work/rootfs"
}
if ! podman image exists "$base_image"; then
  echo "making $base_image with debootstrap from $mirror, in the background (once; kept for later runs)"
  make_base &
  base_pid=$!
fi

step "fx: a static binary (CGO_ENABLED=0 go build -trimpath -ldflags \"-s -w\" ./cmd/fx)"
version=$(git describe --tags --always --dirty 2>/dev/null || echo devel)
commit=$(git rev-parse HEAD 2>/dev/null || true)
date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ldflags="-s -w -X github.com/fx-fl/fx/internal/version.version=$version -X github.com/fx-fl/fx/internal/version.commit=$commit -X github.com/fx-fl/fx/internal/version.date=$date"
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$work/fx" ./cmd/fx
fx=$work/fx
"$fx" version

step "container: build the image (target fx-prebuilt) and run fx version in it"
podman rmi -f "$image" >/dev/null 2>&1 || true
FX_BINARY=$fx packaging/container/build.sh "$image"

step "helm: build helm (go tool, module packaging/tools) and lint the chart"
chart=$repo/packaging/helm/fx-director
values=$chart/ci/test-values.yaml
helm() { (cd "$repo/packaging/tools" && go tool helm "$@"); }
chartcheck() { (cd "$repo/packaging/tools" && go run ./chartcheck "$@"); }
helm lint --strict "$chart" -f "$values"
helm lint --strict "$chart" -f "$values" --set config.launcher=kubernetes

step "helm: template, and check what it renders"
check_args=(-secret fx-director-pki -advertise director.example.org)
helm template fx "$chart" -f "$values" >"$work/rendered.yaml"
chartcheck "${check_args[@]}" -crl -config-out "$work/director.yaml" <"$work/rendered.yaml"
{ grep -q 'path: /readyz' "$work/rendered.yaml" && grep -q 'containerPort: 9464' "$work/rendered.yaml"; } ||
  die "helm template: no /readyz probe or metrics port 9464 in the output"
helm template fx "$chart" -f "$values" --set metrics.enabled=false --set pki.crl=false |
  chartcheck "${check_args[@]}" -metrics=false
helm template fx "$chart" -f "$values" --set metrics.port=9100 --set service.grpcPort=443 \
  --set config.aggregator.port_min=40000 --set config.aggregator.port_max=40003 |
  chartcheck "${check_args[@]}" -crl -metrics-port 9100 -grpc-port 443 -aggregator-min 40000 -aggregator-max 40003
helm template fx "$chart" -f "$values" --set persistence.existingClaim=fx-data |
  chartcheck "${check_args[@]}" -crl -existing-claim fx-data
# The kubernetes launcher: its ServiceAccount, Role and RoleBinding, and the
# config's kubernetes block.
helm template fx "$chart" -f "$values" --set config.launcher=kubernetes |
  chartcheck "${check_args[@]}" -crl -launcher kubernetes
helm template fx "$chart" -f "$values" --set config.launcher=kubernetes --set persistence.existingClaim=fx-data \
  --set config.kubernetes.service_type=NodePort --set config.kubernetes.advertise_host=node1.example.org |
  chartcheck "${check_args[@]}" -crl -launcher kubernetes -existing-claim fx-data
if helm template fx "$chart" -f "$values" --set config.launcher=kubernetes | chartcheck "${check_args[@]}" -crl 2>/dev/null; then
  die "chartcheck accepted RBAC objects the launcher does not need"
fi
# chartcheck itself: a misspelt field must not pass.
if sed '0,/containerPort:/s//containerPorts:/' "$work/rendered.yaml" | chartcheck "${check_args[@]}" -crl 2>/dev/null; then
  die "chartcheck accepted a StatefulSet with a misspelt field (containerPorts)"
fi
echo "chartcheck refuses a misspelt field (containerPorts), as it should"
refused() { # refused MESSAGE HELM-ARGS...: helm template must fail, saying MESSAGE
  local want=$1 out
  shift
  if out=$(helm template fx "$chart" "$@" 2>&1); then die "helm template $* was accepted"; fi
  grep -qF -- "$want" <<<"$out" || die "helm template $*: want an error saying '$want', got: $out"
  echo "refused as it should be ($want): ${*:-the default values}"
}
refused "pki.secretName is required"
refused "pki.secretName is required" -f "$values" --set pki.secretName=
refused "config.advertise.host is required" -f "$values" --set config.advertise.host=
refused "value must be one of 'auto', 'manual'" -f "$values" --set config.review_policy=sometimes
refused "give a range of 1 to 100 ports" -f "$values" --set config.aggregator.port_max=50000
refused "config.data_dir is set by the chart" -f "$values" --set config.data_dir=/srv
refused "minimum: got 0" -f "$values" --set metrics.port=0
refused "value must be one of 'inprocess', 'process', 'kubernetes'" -f "$values" --set config.launcher=k8s
refused "config.kubernetes.pvc is set by the chart" -f "$values" --set config.launcher=kubernetes --set config.kubernetes.pvc=other
refused "additional properties 'memory' not allowed" -f "$values" --set config.launcher=kubernetes --set config.kubernetes.memory=4Gi

step "director: the image runs the chart's director.yaml with the Secret's PKI and a fresh /data volume"
pki=$work/pki
"$fx" pki init --dir "$pki/ca" >/dev/null
"$fx" pki certify --dir "$pki/ca" --role director --name director.example.org \
  --host director.example.org,localhost,127.0.0.1 --out "$pki/director" >/dev/null
"$fx" pki certify --dir "$pki/ca" --role admin --name admin --out "$pki/admin" >/dev/null
mkdir "$work/secret" # as Kubernetes mounts the Secret: tls.crt, tls.key, ca.crt, crl.pem
cp "$pki/director/director.example.org.crt" "$work/secret/tls.crt"
cp "$pki/director/director.example.org.key" "$work/secret/tls.key"
cp "$pki/director/ca.crt" "$work/secret/ca.crt"
cp "$pki/ca/crl.pem" "$work/secret/crl.pem"
chown -R 65532:65532 "$work/secret" && chmod 0750 "$work/secret" && chmod 0440 "$work/secret"/*
chmod 0644 "$work/director.yaml"
podman rm -f fx-check-director >/dev/null 2>&1 || true
podman volume rm -f fx-check-data >/dev/null 2>&1 || true
podman run -d --name fx-check-director "${run_opts[@]}" --network=none \
  -v fx-check-data:/data -v "$work/secret:/pki:ro" -v "$work/director.yaml:/etc/fx/director.yaml:ro" \
  "$image" director start --config /etc/fx/director.yaml >/dev/null
pid=$(podman inspect -f '{{.State.Pid}}' fx-check-director)
innet() { nsenter -t "$pid" -n "$@"; } # the container's network namespace, this machine's tools
code() { innet curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:9464$1" || true; }
for _ in $(seq 50); do [ "$(code /readyz)" = 200 ] && break; sleep 0.2; done
for path in /healthz /readyz /metrics; do
  got=$(code "$path")
  [ "$got" = 200 ] || { podman logs fx-check-director >&2; die "GET $path in the container: $got, want 200"; }
  echo "GET http://127.0.0.1:9464$path in the container: 200"
done
innet curl -s http://127.0.0.1:9464/metrics | grep -q '^fx_' || die "/metrics has no fx_ series"
innet "$fx" envoys list --director 127.0.0.1:50051 --server-name director.example.org \
  --ca "$pki/admin/ca.crt" --cert "$pki/admin/admin.crt" --key "$pki/admin/admin.key" >/dev/null ||
  die "fx envoys list over mutual TLS against the director in the container failed"
echo "fx envoys list (an admin, mutual TLS) against the director in the container: ok"
podman stop -t 30 fx-check-director >/dev/null
rc=$(podman inspect -f '{{.State.ExitCode}}' fx-check-director)
[ "$rc" = 0 ] || { podman logs fx-check-director >&2; die "the director exited $rc after SIGTERM"; }
db=$(podman volume inspect -f '{{.Mountpoint}}' fx-check-data)/director.db
[ "$(stat -c %u:%g "$db")" = 65532:65532 ] || die "$db is not owned by the image's user 65532"
echo "SIGTERM: the director stopped cleanly (exit 0); /data/director.db written by 65532:65532"
podman rm -f fx-check-director >/dev/null
podman volume rm -f fx-check-data >/dev/null

step "systemd: systemd-analyze verify and security of the units, systemd-sysusers"
mkdir "$work/units"
for unit in fx-director fx-envoy; do
  # verify needs ExecStart's binary: point a copy of the unit at the one built above.
  sed "s|^ExecStart=/usr/local/bin/fx |ExecStart=$fx |" "packaging/systemd/$unit.service" >"$work/units/$unit.service"
  grep -q "^ExecStart=$fx " "$work/units/$unit.service" || die "$unit.service: ExecStart is not /usr/local/bin/fx"
done
# verify reports unknown keys and bad values as warnings with exit status 0: any output fails.
out=$(cd "$work/units" && systemd-analyze verify ./fx-director.service ./fx-envoy.service 2>&1) ||
  die "systemd-analyze verify: $out"
[ -z "$out" ] || die "systemd-analyze verify: $out"
echo "systemd-analyze verify: no findings"
# Exposure 0.0 (confined) to 10.0; --threshold counts tenths.
for t in fx-director:20 fx-envoy:30; do
  unit=${t%:*} threshold=${t#*:}
  out=$(cd "$work/units" && systemd-analyze security --offline=true --threshold="$threshold" "./$unit.service" 2>&1) ||
    die "systemd-analyze security $unit.service: exposure above $((threshold / 10)).$((threshold % 10)): $(grep 'Overall exposure' <<<"$out")"
  echo "systemd-analyze security: $(grep 'Overall exposure' <<<"$out" | sed 's/^→ //') (at most $((threshold / 10)).$((threshold % 10)))"
done
mkdir -p "$work/sysroot/etc"
systemd-sysusers --root="$work/sysroot" - <packaging/systemd/fx.sysusers
grep -q '^fx:x:[0-9]*:[0-9]*:.*:/var/lib/fx:' "$work/sysroot/etc/passwd" || die "fx.sysusers made no fx user"

step "systemd: boot systemd in a container; the director and an envoy from the units, one experiment"
if [ -n "$base_pid" ]; then
  echo "waiting for $base_image"
  if ! wait "$base_pid"; then
    base_pid=
    tail -20 "$work/debootstrap.log" >&2
    die "making $base_image with debootstrap failed"
  fi
  base_pid=
fi
sd=$work/systemd-ctx
mkdir -p "$sd/usr/local/bin" "$sd/usr/lib/sysusers.d" "$sd/etc/systemd/system" "$sd/etc/fx/pki" "$sd/root"
cp "$fx" "$sd/usr/local/bin/fx"
cp packaging/systemd/fx-director.service packaging/systemd/fx-envoy.service "$sd/etc/systemd/system/"
cp packaging/systemd/fx.sysusers "$sd/usr/lib/sysusers.d/fx.conf"
"$fx" pki certify --dir "$pki/ca" --role director --name localhost --host localhost,127.0.0.1 --out "$sd/etc/fx/pki/director" >/dev/null
"$fx" pki certify --dir "$pki/ca" --role envoy --name site-a --out "$sd/etc/fx/pki/envoy" >/dev/null
"$fx" pki certify --dir "$pki/ca" --role researcher --name alice --out "$sd/root/researcher" >/dev/null
cat >"$sd/etc/fx/director.yaml" <<'EOF'
listen_address: 127.0.0.1:50051
advertise: {host: localhost}
tls: {cert: /etc/fx/pki/director/localhost.crt, key: /etc/fx/pki/director/localhost.key, ca: /etc/fx/pki/director/ca.crt}
data_dir: /var/lib/fx/director
review_policy: auto
metrics: {listen: "127.0.0.1:9464"}
EOF
cat >"$sd/etc/fx/envoy.yaml" <<'EOF'
name: site-a
director: {address: "localhost:50051"}
tls: {cert: /etc/fx/pki/envoy/site-a.crt, key: /etc/fx/pki/envoy/site-a.key, ca: /etc/fx/pki/envoy/ca.crt}
work_dir: /var/lib/fx/envoy
shard: {kind: synthetic, path: "", features: 16, classes: 4}
exec: {allow: true, python: /usr/bin/python3, sandbox: true}
metrics: {listen: "127.0.0.1:9465"}
EOF
# The example Python runner (numpy, fx.site), on the synthetic data.
mkdir "$sd/root/exp"
cp examples/python-runner/runner.py "$sd/root/exp/"
(cd "$sd/root/exp" && PYTHONPATH="$repo/sdk/python" PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3 runner.py init --features 16 --classes 4 >/dev/null)
cat >"$sd/root/exp/plan.yaml" <<'EOF'
name: packaging-check
rounds: 2
participants: {min: 1}
runner: {kind: exec, command: [python3, runner.py], timeout: 5m, seed: 1}
aggregation: {algorithm: fedavg}
tasks: [aggregated_model_validation, train, locally_tuned_model_validation]
best_model: {metric: accuracy, mode: max}
EOF
printf 'FROM %s\nCOPY etc/ /etc/\nCOPY usr/ /usr/\nCOPY root/ /root/\n' "$base_image" >"$work/Containerfile.systemd"
podman rmi -f localhost/fx-check-systemd:latest >/dev/null 2>&1 || true
podman build -q -f "$work/Containerfile.systemd" -t localhost/fx-check-systemd:latest "$sd" >/dev/null
podman rm -f fx-check-systemd >/dev/null 2>&1 || true
# --privileged: systemd sets up the units' namespaces (ProtectSystem=, PrivateTmp=, ...).
podman run -d --name fx-check-systemd "${run_opts[@]}" --privileged --systemd=always --network=none \
  localhost/fx-check-systemd:latest >/dev/null
insd() { podman exec fx-check-systemd "$@"; }
for _ in $(seq 60); do
  state=$(insd systemctl is-system-running 2>/dev/null || true)
  case "$state" in running | degraded) break ;; esac
  sleep 0.5
done
echo "systemd in the container: $state"
insd sh -c 'chgrp -R fx /etc/fx/pki && chmod 0750 /etc/fx/pki /etc/fx/pki/* && chmod 0640 /etc/fx/pki/*/*.key'
unit_logs() { insd journalctl --no-pager -u fx-director -u fx-envoy | tail -40 >&2; }
insd systemctl start fx-director fx-envoy || { unit_logs; die "systemctl start"; }
pid=$(podman inspect -f '{{.State.Pid}}' fx-check-systemd)
for _ in $(seq 50); do [ "$(code /readyz)" = 200 ] && break; sleep 0.2; done
[ "$(code /readyz)" = 200 ] || { unit_logs; die "the director under fx-director.service is not ready"; }
echo "fx-director.service: active, /readyz 200"
for _ in $(seq 50); do insd journalctl --no-pager -u fx-envoy | grep -q 'connected to the director' && break; sleep 0.2; done
insd journalctl --no-pager -u fx-envoy | grep -q 'exec runners run sandboxed' ||
  { unit_logs; die "fx-envoy.service: the envoy cannot sandbox exec runners under the unit"; }
echo "fx-envoy.service: active, exec runners sandboxed (Landlock, seccomp)"
out=$(insd sh -c 'cd /root && timeout 120 fx experiment submit exp --wait --director 127.0.0.1:50051 --server-name localhost \
  --ca researcher/ca.crt --cert researcher/alice.crt --key researcher/alice.key' 2>&1) || { echo "$out" >&2; unit_logs; die "the experiment under the units failed"; }
grep -q '^FINISHED .*COMPLETED' <<<"$out" || { echo "$out" >&2; unit_logs; die "the experiment under the units did not finish"; }
echo "experiment with a sandboxed Python runner under both units: $(grep '^FINISHED' <<<"$out")"
for unit in fx-director fx-envoy; do
  insd systemctl stop "$unit"
  result=$(insd systemctl show -p Result --value "$unit")
  [ "$result" = success ] || { unit_logs; die "$unit.service stopped with result $result"; }
done
echo "both units stopped cleanly (Result=success)"
podman rm -f fx-check-systemd >/dev/null

if $golang_stage; then
  step "container: the Containerfile's default target (fx compiled in a golang stage), offline"
  golang_image=localhost/fx-check-golang:bookworm
  go mod download # the stage runs offline, from this machine's module cache
  printf 'FROM %s\nCOPY go/ /usr/local/go/\nENV PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin GOPATH=/go GOPROXY=off GOFLAGS=-mod=readonly\n' \
    "$base_image" >"$work/Containerfile.golang"
  podman build -q -f "$work/Containerfile.golang" -t "$golang_image" "$(go env GOROOT)/.." >/dev/null
  podman rmi -f localhost/fx:check-golang >/dev/null 2>&1 || true
  podman build -q "${run_opts[@]:0:2}" -v "$(go env GOMODCACHE):/go/pkg/mod:ro" \
    --file packaging/container/Containerfile --ignorefile packaging/container/Containerfile.dockerignore \
    --build-arg GOLANG_IMAGE="$golang_image" --build-arg FX_VERSION="$version" --build-arg FX_COMMIT="$commit" --build-arg FX_DATE="$date" \
    -t localhost/fx:check-golang . >/dev/null
  got=$(podman run --rm "${run_opts[@]}" --network=none localhost/fx:check-golang version)
  case "$got" in "fx $version "*) echo "podman run localhost/fx:check-golang version: $got" ;; *) die "fx version in the golang-built image: $got" ;; esac
fi

step "python: pip install --no-build-isolation --no-deps ./sdk/python in a fresh venv"
for d in sdk/python/build sdk/python/fx_federated.egg-info; do [ -e "$d" ] || pip_build_dirs+=("$repo/$d"); done
/usr/bin/python3 -m venv --system-site-packages "$work/venv"
"$work/venv/bin/pip" install -q --no-build-isolation --no-deps ./sdk/python
for d in "${pip_build_dirs[@]}"; do rm -rf "$d"; done
(cd "$work" && env -u PYTHONPATH FX_COMMIT="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null)" "$work/venv/bin/python" - "$work/venv") <<'EOF'
import importlib.metadata as md, os, sys
from packaging.requirements import Requirement

venv = os.path.realpath(sys.argv[1])
import fx, fx.site
for mod in (fx, fx.site):
    path = os.path.realpath(mod.__file__)
    assert path.startswith(venv + os.sep), f"{mod.__name__} imported from {path}, not from the venv"
fx.Federation  # the notebook client: grpc and the generated protocol code
version = md.version("fx-federated")
commit = os.environ["FX_COMMIT"]
if "+" in version:  # not a tagged release: the local part names the commit
    assert f"+g{commit}" in version, f"version {version} does not name commit {commit}"
for r in md.requires("fx-federated"):
    req = Requirement(r)
    if req.marker and not req.marker.evaluate({"extra": ""}):
        continue
    have = md.version(req.name)
    assert req.specifier.contains(have, prereleases=True), f"{req}: {have} installed"
print(f"fx-federated {version}: import fx, fx.site from {os.path.dirname(fx.__file__)}; requirements met: "
      + ", ".join(f"{Requirement(r).name} {md.version(Requirement(r).name)}" for r in md.requires("fx-federated") if "extra" not in r))
EOF

step "packaging checks passed in $((SECONDS - start))s"
