// Package e2e runs whole federations of real fx processes on 127.0.0.1: a
// director, envoys and the researcher's CLI, each a separate process of the
// fx binary that TestMain builds once, each with its own configuration file
// and log file (printed when a test fails). The tests drive them the way
// operators and researchers do (fx pki, fx director start, fx envoy start,
// fx experiment ..., fx envoy approve ...) and check what a user would see;
// where the CLI refuses to send something (a zip-slip archive, a wrong-shape
// update) they speak gRPC directly to show that the director and the
// aggregator refuse it too.
//
//	go test ./e2e/ -count=1 -v            # about 1.5 minutes on 2 cores
//	go test -short ./e2e/                 # skips them all
//
// TestFederatedAccuracy needs Fashion-MNIST in /usr/share/datasets
// (apt-get install dataset-fashion-mnist) and TestPythonRunner needs
// /usr/bin/python3 with numpy (apt-get install python3-numpy); they skip
// otherwise. E2E_FASHION_HYPER overrides the accuracy test's MLP
// hyper-parameters. The parties are built without -race, so the suite runs
// the same under go test -race.
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
