// Command fx is the one binary of the fx federated-learning system: it starts
// a director or an envoy, manages certificates, and drives experiments.
// Each subcommand is thin: it builds a package's Config and calls its Run.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/fx-fl/fx/runner/sandbox"
)

func main() {
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
