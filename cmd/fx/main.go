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
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newRootCommand().ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "fx:", err)
		os.Exit(1)
	}
}
