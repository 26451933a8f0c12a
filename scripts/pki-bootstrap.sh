#!/usr/bin/env bash
# pki-bootstrap.sh — create a federation's CA and the certificates of a
# director, envoys, a researcher and an admin in one go, with only the `fx`
# binary at hand (found through $FX, else on PATH).
#
# Usage:
#   scripts/pki-bootstrap.sh [--dir DIR] [--director NAME] [--hosts H1,H2,...]
#                            [--researcher NAME] [--admin NAME] [--org ORG]
#                            [ENVOY_NAME ...]
#
# Defaults: --dir pki, --director localhost, --hosts localhost,127.0.0.1,
# --researcher researcher, --admin admin, --org fx, envoys envoy-1 envoy-2
# envoy-3.
#
# Layout it creates (NAME.crt is the certificate followed by the signing CA,
# NAME.key its private key, mode 0600, ca.crt the federation root):
#
#   DIR/ca/                      the CA (see `fx pki --help`); stays with the operator
#   DIR/director/NAME.{crt,key}  the director, plus ca.crt
#   DIR/envoys/NAME/NAME.{crt,key}  one directory per envoy, plus ca.crt
#   DIR/researcher/NAME.{crt,key}   plus ca.crt
#   DIR/admin/NAME.{crt,key}        plus ca.crt
#
# Idempotent: a second run keeps the CA and every certificate that exists and
# adds only what is missing (say, a new envoy named on the command line). It
# never replaces the CA or a key. Keys made here travel with their
# directories; for a site that must make its own key, use `fx pki csr` there
# and `fx pki sign` at the CA instead.
set -euo pipefail

die() {
  printf 'pki-bootstrap: %s\n' "$*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

dir=pki
director=localhost
hosts=localhost,127.0.0.1
researcher="researcher"
admin="admin"
org=fx
envoys=()

while [ $# -gt 0 ]; do
  case "$1" in
    --dir) [ $# -ge 2 ] || die "--dir needs a value"; dir=$2; shift 2 ;;
    --director) [ $# -ge 2 ] || die "--director needs a value"; director=$2; shift 2 ;;
    --hosts) [ $# -ge 2 ] || die "--hosts needs a value"; hosts=$2; shift 2 ;;
    --researcher) [ $# -ge 2 ] || die "--researcher needs a value"; researcher=$2; shift 2 ;;
    --admin) [ $# -ge 2 ] || die "--admin needs a value"; admin=$2; shift 2 ;;
    --org) [ $# -ge 2 ] || die "--org needs a value"; org=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; envoys+=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) envoys+=("$1"); shift ;;
  esac
done
if [ ${#envoys[@]} -eq 0 ]; then
  envoys=(envoy-1 envoy-2 envoy-3)
fi

fx=${FX:-}
if [ -z "$fx" ]; then
  fx=$(command -v fx) || die "no fx binary: put it on PATH or set FX=/path/to/fx"
fi
[ -x "$fx" ] || die "FX=$fx is not an executable"

ca="$dir/ca"
if [ -e "$ca/root.crt" ] || [ -e "$ca/signing.key" ]; then
  printf 'keep     CA in %s\n' "$ca"
else
  "$fx" pki init --dir "$ca" --org "$org" >/dev/null
  printf 'created  CA in %s\n' "$ca"
fi

# certify ROLE NAME OUT [HOSTS]: issue NAME's certificate into OUT unless it
# is already there.
certify() {
  local role=$1 name=$2 out=$3 host_list=${4:-}
  if [ -e "$out/$name.crt" ] && [ -e "$out/$name.key" ]; then
    printf 'keep     %-10s %-20s %s\n' "$role" "$name" "$out"
    return 0
  fi
  if [ -e "$out/$name.key" ]; then
    die "$out/$name.key exists without $out/$name.crt: fx will not replace a key; move it away, or sign a CSR for it with 'fx pki sign'"
  fi
  local args=(pki certify --dir "$ca" --role "$role" --name "$name" --out "$out")
  if [ -n "$host_list" ]; then
    args+=(--host "$host_list")
  fi
  "$fx" "${args[@]}" >/dev/null
  printf 'created  %-10s %-20s %s\n' "$role" "$name" "$out"
}

certify director "$director" "$dir/director" "$hosts"
for envoy in "${envoys[@]}"; do
  certify envoy "$envoy" "$dir/envoys/$envoy"
done
certify researcher "$researcher" "$dir/researcher"
certify admin "$admin" "$dir/admin"

cat <<EOF

What goes where (each party needs its own directory only):
  director machine   $dir/director/   ($director.crt, $director.key, ca.crt)
                     and the CRL $ca/crl.pem: copy it again after every 'fx pki revoke'
EOF
for envoy_dir in "$dir"/envoys/*/; do
  [ -d "$envoy_dir" ] || continue
  printf '  envoy %-12s %s\n' "$(basename "$envoy_dir")" "$envoy_dir"
done
cat <<EOF
  researcher         $dir/researcher/
  admin              $dir/admin/
  keep to yourself   $ca/ (signing.key issues certificates; root.key can go offline)
Check any certificate with: fx pki show FILE --ca ca.crt --crl $ca/crl.pem
EOF
