// Command fxbench holds fx's benchmark commands that cannot be Go
// benchmarks: they run parties as separate processes, or for minutes. Each
// prints its figures next to a baseline measured in the same run and writes
// them as JSON for `fxbench report`, which makes bench/RESULTS.md.
//
//	fxbench capacity -n 1000     director capacity: N envoys heartbeating over mTLS
//	fxbench fashion              federated Fashion-MNIST: test accuracy per round per algorithm and sharding, and with DP
//	fxbench pytorch              a PyTorch MLP through fx's runner vs directly vs the built-in MLP
//	fxbench large                models of 64 MiB to 1 GiB through director and envoy processes vs raw gRPC
//	fxbench failover             time for a standby director to take over from a killed leader
//	fxbench secure               a secure aggregation (or, -mode dp, DP) round vs a plain one, through director and envoy processes
//	fxbench fedbuff              asynchronous (FedBuff) vs synchronous rounds with one site 5× slower
//	fxbench report               collect bench/out into bench/RESULTS.md
//
// See bench/README.md.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	cmd, args := os.Args[1], os.Args[2:]
	var err error
	switch cmd {
	case "capacity":
		err = capacityMain(args)
	case "serve": // the child process of capacity
		err = serveMain(args)
	case "fashion":
		err = fashionMain(args)
	case "pytorch":
		err = pytorchMain(args)
	case "large":
		err = largeMain(args)
	case "telemetry":
		err = telemetryMain(args)
	case "failover":
		err = failoverMain(args)
	case "secure":
		err = secureMain(args)
	case "fedbuff":
		err = fedbuffMain(args)
	case "rawmove": // the child processes of large's baseline
		err = rawmoveMain(args)
	case "report":
		err = reportMain(args)
	case "-h", "-help", "--help", "help":
		usage()
		return
	default:
		fmt.Fprintf(os.Stderr, "fxbench: unknown command %q\n", cmd)
		usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "fxbench %s: %v\n", cmd, err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, `usage: fxbench <command> [flags]

commands:
  capacity   director capacity: N simulated envoys, each with its own mTLS
             connection and certificate, register and heartbeat; baseline:
             the same connections calling grpc.health.v1 Check on a bare
             gRPC server with the same mTLS
  fashion    federated Fashion-MNIST (built-in MLP, a director and 4 envoys
             as fx processes per curve): test accuracy of every round's
             model for fedavg, fedprox, scaffold, fedadam and fedbuff on IID
             and Dirichlet α = 0.5 shards, and fedavg with DP at ε ≈ 3;
             baseline: centralised training of the same model
  pytorch    the same PyTorch MLP three ways on the same shards: directly in
             one Python process (the floor), through fx's persistent exec
             runner with N envoys as separate fx processes, and fx's
             built-in Go MLP; per-round wall time and the ratios
  large      models of 64 MiB to 1 GiB (-sizes) through a director and N
             envoys as separate fx processes, with an exec runner
             (bench/large/rewrite.py) that rewrites every weight each round;
             baseline: a raw gRPC/mTLS server process and N client processes
             moving the same bytes (each client down and up), alternated;
             per size the round time, the ratio, every process's peak
             resident memory (VmHWM) and any log line of a timeout or retry
  telemetry  the cost of metrics on round time: a director and N envoys
             (default 10) as separate fx processes run the built-in MLP on
             Fashion-MNIST, in trials alternating metrics listeners off and
             on (every party's /metrics read every -scrape); the ratio
  failover   two directors as separate fx processes on one PostgreSQL
             database (started for the run) and data_dir, N envoys (default
             3) given both addresses; the leader is killed (SIGKILL) mid-round,
             in -trials fresh federations: the time until the standby serves
             and until the next round completes, against the goals < 15 s
             and < 15 s + one round
  secure     secure aggregation's cost: a director and N envoys (default 10)
             as separate fx processes run experiments of a -params model
             (default 25M float32) with bench/large/rewrite.py, plain and
             with aggregation.secure (-mode dp: with privacy.dp, at envoys
             keeping a budget), alternating; per trial the median round
             time of each and their ratio (goal ≤ 2; DP ≤ 1.1)
  fedbuff    asynchronous rounds: a director and 4 envoys as fx processes,
             one of them 5× slower (an exec runner that sleeps), run the
             same server steps synchronously and with aggregation.mode
             async, alternating; the wall-time ratio (goal ≤ 0.5)
  report     write bench/RESULTS.md from the outputs in bench/out

Run "fxbench <command> -h" for a command's flags.
`)
}
