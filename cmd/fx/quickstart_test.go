package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/fx-fl/fx/tensor"
)

// The quickstart runs a whole federation and an experiment, saves a usable
// best model, and on a second run keeps the PKI it made the first time.
func TestQuickstart(t *testing.T) {
	work := t.TempDir()
	args := []string{"quickstart", "--workdir", work, "--data", "synthetic", "--envoys", "2", "--rounds", "2"}
	out, err := run(t, args...)
	if err != nil {
		t.Fatalf("fx quickstart: %v\n%s", err, out)
	}
	for _, want := range []string{"data: a generated data set", "round 1/2", "round 2/2", "final model (round 2): accuracy", "best model: round", "federation stopped"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	acc := regexp.MustCompile(`final model \(round 2\): accuracy (0\.\d+)`).FindStringSubmatch(out)
	if acc == nil || acc[1] < "0.5" {
		t.Errorf("final accuracy %v: the synthetic data is learnable, want ≥ 0.5", acc)
	}
	m, _, err := tensor.ReadFile(filepath.Join(work, "best.safetensors"))
	if err != nil || len(m) == 0 {
		t.Fatalf("best model: %v", err)
	}
	for _, f := range []string{"director.yaml", "envoys/envoy-1.yaml", "logs/director.log", "pki/ca/root.crt"} {
		if _, err := os.Stat(filepath.Join(work, f)); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}

	root, _ := os.ReadFile(filepath.Join(work, "pki", "ca", "root.crt"))
	if out, err := run(t, args...); err != nil {
		t.Fatalf("second fx quickstart: %v\n%s", err, out)
	}
	again, _ := os.ReadFile(filepath.Join(work, "pki", "ca", "root.crt"))
	if !bytes.Equal(root, again) {
		t.Fatal("the second run replaced the CA")
	}
}

func TestQuickstartBadFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		says string
	}{
		{[]string{"--envoys", "0"}, "--envoys"},
		{[]string{"--rounds", "0"}, "--rounds"},
		{[]string{"--data", "mnist"}, "--data"},
	} {
		_, err := run(t, append([]string{"quickstart", "--workdir", t.TempDir()}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%v: error %v, want it to name %s", tc.args, err, tc.says)
		}
	}
}
