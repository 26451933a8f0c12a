#!/usr/bin/env bash
# pki-bootstrap.sh — create a federation's CA and the certificates of a
# director, envoys, a researcher and an admin in one go, with only the `fx`
# binary at hand (found through $FX, else on PATH).
#
# Usage:
#   scripts/pki-bootstrap.sh [--dir DIR] [--hosts H1,H2,...] [--director NAME]
#                            [--researcher NAME] [--admin NAME] [--org ORG]
#                            [ENVOY_NAME ...]
#
# --hosts lists every DNS name and IP address the director is reached on;
# its certificate carries them all. The director's name (the certificate's
# CN, and the file name under DIR/director/) is --director, else the first
# DNS name of --hosts; it is always among the hosts. Without either, the
# director is "localhost" with hosts localhost and 127.0.0.1: a federation
# on one machine, as configs/director.yaml expects.
#
# Other defaults: --dir pki, --researcher researcher, --admin admin, --org
# fx, envoys envoy-1 envoy-2 envoy-3.
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
# Run it again to add parties (say, a new envoy named on the command line):
# it keeps the CA and every certificate that exists, and never replaces the
# CA or a key. When --hosts or --director is given and the director's
# certificate exists with other hosts, it renews that certificate for the
# same key with the hosts asked for (`fx pki renew`) and says so. Keys made
# here travel with their directories; for a site that must make its own
# key, use `fx pki csr` there and `fx pki sign` at the CA instead.
set -euo pipefail

die() {
  printf 'pki-bootstrap: %s\n' "$*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

dir=pki
director=
hosts=
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

# The director's name and hosts. Asked for explicitly, they also decide
# whether an existing director certificate still fits.
hosts_asked=false
if [ -n "$hosts" ] || [ -n "$director" ]; then
  hosts_asked=true
fi
if [ -z "$hosts" ] && [ -z "$director" ]; then
  director=localhost
  hosts=localhost,127.0.0.1
fi
IFS=, read -r -a host_list <<<"$hosts"
if [ -z "$director" ]; then
  for h in "${host_list[@]}"; do
    # The first DNS name; an address only when there is no name.
    if [[ ! $h =~ ^[0-9.]+$ && $h != *:* ]]; then
      director=$h
      break
    fi
  done
  director=${director:-${host_list[0]}}
fi
[ -n "$director" ] || die "--hosts is empty: give the director's DNS names and addresses, e.g. --hosts director.example.org,10.0.0.5"
# Envoys and aggregators check the director's certificate against its
# name, so the name is always among its hosts.
in_hosts=false
for h in "${host_list[@]}"; do
  [ "$h" = "$director" ] && in_hosts=true
done
if ! $in_hosts; then
  host_list=("$director" "${host_list[@]}")
fi
hosts=$(IFS=,; printf '%s' "${host_list[*]}")

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

# sorted_hosts H1,H2,...: the hosts sorted, comma-separated, to compare sets.
sorted_hosts() {
  tr ',' '\n' <<<"$1" | sed '/^$/d' | sort -u | paste -sd, -
}

# cert_hosts FILE: the hosts a certificate carries, as sorted_hosts prints them.
cert_hosts() {
  local line
  # show fails on an expired certificate but still prints its hosts.
  line=$("$fx" pki show "$1" 2>/dev/null | sed -n 's/^hosts *//p') || true
  sorted_hosts "$(sed 's/, */,/g; s/^-$//' <<<"$line")"
}

# certify ROLE NAME OUT [HOSTS]: issue NAME's certificate into OUT unless it
# is already there, with the hosts asked for (renewed if they changed).
certify() {
  local role=$1 name=$2 out=$3 host_list=${4:-}
  if [ -e "$out/$name.crt" ] && [ -e "$out/$name.key" ]; then
    if [ -n "$host_list" ] && $hosts_asked; then
      local have
      have=$(cert_hosts "$out/$name.crt")
      if [ "$have" != "$(sorted_hosts "$host_list")" ]; then
        "$fx" pki renew --dir "$ca" --cert "$out/$name.crt" --host "$host_list" >/dev/null
        printf 'renewed  %-10s %-20s %s (hosts were %s, now %s; same key)\n' "$role" "$name" "$out" "$have" "$(sorted_hosts "$host_list")"
        return 0
      fi
    fi
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
if [ "$director" != localhost ]; then
  cat <<EOF
The director's settings (configs/director.yaml) for this certificate:
  tls.cert: $dir/director/$director.crt
  tls.key: $dir/director/$director.key
  advertise.host: $director
and every party dials it as $director:PORT (envoy.yaml director.address, researchers' --director).
EOF
fi
