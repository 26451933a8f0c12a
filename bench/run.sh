#!/usr/bin/env bash
# Runs every fx benchmark and writes bench/RESULTS.md: `make bench`.
#
# Outputs go to bench/out (git-ignored); the certificate cache of the
# capacity benchmark stays there between runs (bench/out/pki).
#
# Environment:
#   GO                 the go command (default go)
#   BENCH_CAPACITY_N   capacity runs, N or N:LIMIT (LIMIT first calls in flight, 0 none);
#                      default "1000 10000 10000:0"
#   BENCH_WINDOW       capacity measurement window (default 60s)
#   BENCH_MAX_CONNECTING  first calls in flight for N > 1000 (default 128; 0: no limit)
#   BENCH_SKIP         space-separated parts to skip: go capacity pytorch large telemetry failover privacy fedbuff fashion
#   BENCH_LARGE_SIZES  model sizes of fxbench large in MiB (default "64,512,1024")
#   FX_BENCH_ARCHIVE_MIB  archive size of the director's submission benchmark (default 1 GiB)
set -u
cd "$(dirname "$0")/.."
GO=${GO:-go}
OUT=bench/out
N_LIST=${BENCH_CAPACITY_N:-1000 10000 10000:0}
WINDOW=${BENCH_WINDOW:-60s}
SKIP=" ${BENCH_SKIP:-} "
mkdir -p "$OUT"
status=0
uptime > "$OUT/uptime-start.txt"

# gobench NAME PKG PATTERN BENCHTIME: one `go test -bench` run into $OUT/go-NAME.txt.
gobench() {
	local name=$1 pkg=$2 pattern=$3 benchtime=$4
	echo "== go test -bench '$pattern' -benchtime $benchtime $pkg"
	uptime > "$OUT/go-$name.uptime"
	if ! $GO test -run '^$' -bench "$pattern" -benchtime "$benchtime" -timeout 60m "$pkg" 2>&1 | tee "$OUT/go-$name.txt"; then
		echo "!! $pkg $pattern failed (see $OUT/go-$name.txt)"
		status=1
	fi
}

if [[ $SKIP != *" go "* ]]; then
	gobench fold ./aggregator/ 'Fold' 3x
	gobench aggregator-transfer ./aggregator/ 'Transfer' 15x
	gobench aggregator-memory ./aggregator/ 'UploadMemory|RoundOverhead' 1x
	gobench director ./director/ 'SubmitLargeArchive' 1x
	gobench runner ./runner/builtin/ 'Epoch' 2x
fi

$GO build -o "$OUT/fxbench" ./bench/cmd/fxbench || exit 1

if [[ $SKIP != *" capacity "* ]]; then
	# Issue (and time) every envoy certificate the runs need first; they
	# are cached in $OUT/pki and reused by later runs.
	max=0
	for spec in $N_LIST; do n=${spec%%:*}; if [ "$n" -gt "$max" ]; then max=$n; fi; done
	echo "== fxbench capacity -n $max -certs-only"
	"$OUT/fxbench" capacity -n "$max" -certs-only -pki "$OUT/pki" 2>&1 | tee "$OUT/certificates.txt" || status=1
	for spec in $N_LIST; do
		n=${spec%%:*}
		name=capacity-$n
		if [[ $spec == *:* ]]; then
			limit=${spec#*:}
			name=capacity-$n-limit$limit
		else
			# Above 1000 envoys, the staggered starts ask for more TLS
			# handshakes a second than 2 cores finish within the call
			# timeout; a limit on first calls in flight keeps them from
			# timing out and retrying (N:0 runs without it).
			limit=0
			if [ "$n" -gt 1000 ]; then limit=${BENCH_MAX_CONNECTING:-128}; fi
		fi
		echo "== fxbench capacity -n $n -window $WINDOW -max-connecting $limit"
		if ! "$OUT/fxbench" capacity -n "$n" -window "$WINDOW" -max-connecting "$limit" -pki "$OUT/pki" -out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt"; then
			echo "!! capacity -n $n -max-connecting $limit failed (see $OUT/$name.txt)"
			status=1
		fi
	done
fi

if [[ $SKIP != *" pytorch "* ]]; then
	echo "== fxbench pytorch"
	$GO build -o "$OUT/fx" ./cmd/fx || exit 1
	if ! "$OUT/fxbench" pytorch -fx "$OUT/fx" -pki "$OUT/pki" -out "$OUT/pytorch.json" 2>&1 | tee "$OUT/pytorch.txt"; then
		echo "!! pytorch failed (see $OUT/pytorch.txt)"
		status=1
	fi
fi

if [[ $SKIP != *" large "* ]]; then
	echo "== fxbench large"
	$GO build -o "$OUT/fx" ./cmd/fx || exit 1
	if ! "$OUT/fxbench" large -sizes "${BENCH_LARGE_SIZES:-64,512,1024}" -fx "$OUT/fx" -pki "$OUT/pki" -out "$OUT/large.json" 2>&1 | tee "$OUT/large.txt"; then
		echo "!! large failed (see $OUT/large.txt)"
		status=1
	fi
fi

if [[ $SKIP != *" telemetry "* ]]; then
	echo "== fxbench telemetry"
	$GO build -o "$OUT/fx" ./cmd/fx || exit 1
	if ! "$OUT/fxbench" telemetry -fx "$OUT/fx" -pki "$OUT/pki" -out "$OUT/telemetry.json" 2>&1 | tee "$OUT/telemetry.txt"; then
		echo "!! telemetry failed (see $OUT/telemetry.txt)"
		status=1
	fi
fi

if [[ $SKIP != *" failover "* ]]; then
	# Needs PostgreSQL's server binaries (apt-get install postgresql).
	echo "== fxbench failover"
	$GO build -o "$OUT/fx" ./cmd/fx || exit 1
	if ! "$OUT/fxbench" failover -fx "$OUT/fx" -pki "$OUT/pki" -out "$OUT/failover.json" 2>&1 | tee "$OUT/failover.txt"; then
		echo "!! failover failed (see $OUT/failover.txt)"
		status=1
	fi
fi

if [[ $SKIP != *" privacy "* ]]; then
	# Secure aggregation and DP against plain rounds, 10 envoys × 25M parameters.
	$GO build -o "$OUT/fx" ./cmd/fx || exit 1
	for mode in secure dp; do
		echo "== fxbench secure -mode $mode"
		if ! "$OUT/fxbench" secure -mode $mode -fx "$OUT/fx" -pki "$OUT/pki" -out "$OUT/$mode.json" 2>&1 | tee "$OUT/$mode.txt"; then
			echo "!! secure -mode $mode failed (see $OUT/$mode.txt)"
			status=1
		fi
	done
fi

if [[ $SKIP != *" fedbuff "* ]]; then
	# Asynchronous against synchronous rounds with one site 5× slower.
	echo "== fxbench fedbuff"
	$GO build -o "$OUT/fx" ./cmd/fx || exit 1
	if ! "$OUT/fxbench" fedbuff -fx "$OUT/fx" -pki "$OUT/pki" -out "$OUT/fedbuff.json" 2>&1 | tee "$OUT/fedbuff.txt"; then
		echo "!! fedbuff failed (see $OUT/fedbuff.txt)"
		status=1
	fi
fi

if [[ $SKIP != *" fashion "* ]]; then
	# Every algorithm on IID and Dirichlet α = 0.5 shards, then fedavg with
	# DP: one federation of fx processes per curve, about 20 minutes on
	# 2 cores; the plot beside RESULTS.md.
	echo "== fxbench fashion"
	$GO build -o "$OUT/fx" ./cmd/fx || exit 1
	if ! "$OUT/fxbench" fashion -fx "$OUT/fx" -pki "$OUT/pki" -out "$OUT/fashion.json" -plot bench/fashion.png 2>&1 | tee "$OUT/fashion.txt"; then
		echo "!! fashion failed (see $OUT/fashion.txt)"
		status=1
	fi
fi

uptime > "$OUT/uptime-end.txt"
"$OUT/fxbench" report -dir "$OUT" -out bench/RESULTS.md || status=1
exit $status
