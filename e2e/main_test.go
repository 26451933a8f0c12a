// Package e2e runs whole federations of real fx processes on 127.0.0.1: a
// director, envoys and the researcher's CLI, each a separate process of the
// fx binary that TestMain builds once, each with its own configuration file
// and log file. The tests drive them the way operators and researchers do
// (fx pki, fx director start, fx envoy start, fx experiment ...) and check
// what a user would see. They are skipped with -short.
package e2e

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"
)

// fxBin is the fx binary built by TestMain; empty under -short.
var fxBin string

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "fx-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	fxBin = filepath.Join(dir, "fx")
	if err := buildFx(fxBin); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// buildFx builds ./cmd/fx (without -race, whatever the tests run with: the
// parties are ordinary processes) into out.
func buildFx(out string) error {
	goCmd, err := exec.LookPath("go")
	if err != nil {
		goCmd = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	start := time.Now()
	cmd := exec.Command(goCmd, "build", "-o", out, "./cmd/fx")
	cmd.Dir = ".."
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/fx: %v\n%s", err, b)
	}
	fmt.Fprintf(os.Stderr, "e2e: built %s in %s\n", out, time.Since(start).Round(time.Millisecond))
	return nil
}
