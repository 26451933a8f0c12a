// Package app is the fx command: every subcommand of the fx binary, behind
// one entry point, Main. It is a package of its own, rather than cmd/fx's
// main, so that a program of yours can be an fx binary with additions: a
// main package that registers, say, an aggregation strategy
// (aggregator.RegisterStrategy) and then calls Main builds an fx that runs
// it, without a fork of fx (examples/custom-strategy shows one). Each
// subcommand is thin: it builds a package's Config and calls its Run.
package app

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/fx-fl/fx/runner/sandbox"
)

// Main runs the fx command line with os.Args and exits the process with
// fx's exit code (see `fx --help`). Call it from main, after whatever the
// binary registers: it does not return.
func Main() {
	// An exec runner's sandbox starts as this binary (a trampoline that
	// confines itself, then runs the runner): that must happen before
	// anything else does.
	sandbox.Main()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	stopProfile := startProfile()
	err := newRootCommand().ExecuteContext(ctx)
	stopProfile()
	if err != nil {
		fmt.Fprintln(os.Stderr, "fx:", err)
		stop()
		os.Exit(exitCode(err))
	}
}
