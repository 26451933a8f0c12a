package e2e

import (
	"os"
	osexec "os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestPyTorchExample runs examples/pytorch-fashion-mnist as a researcher
// would: the initial model written by the example's own script, the
// directory submitted to three envoys holding a third of Fashion-MNIST
// each, the best model downloaded and scored by the example's evaluate.py
// on the 10,000 held-out test images: at least 0.88 within the plan's 10
// rounds. No timing is asserted; the rounds take what the machine gives.
func TestPyTorchExample(t *testing.T) {
	requireFashionMNIST(t)
	if err := osexec.Command("/usr/bin/python3", "-c", "import torch, numpy").Run(); err != nil {
		t.Skipf("/usr/bin/python3 cannot import torch and numpy (%v): apt-get install python3-torch python3-numpy", err)
	}
	example, err := filepath.Abs("../examples/pytorch-fashion-mnist")
	if err != nil {
		t.Fatal(err)
	}
	sdk, _ := filepath.Abs("../sdk/python")
	python := func(dir string, args ...string) string {
		t.Helper()
		cmd := osexec.Command("/usr/bin/python3", args...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "PYTHONPATH="+sdk+":"+example, "PYTHONDONTWRITEBYTECODE=1")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("python3 %v: %v\n%s", args, err, out)
		}
		return string(out)
	}

	envoys := []string{"site-a", "site-b", "site-c"}
	f := newFed(t, []string{"alice"}, envoys)
	f.startDirector(directorOptions{})
	for i, n := range envoys {
		// Three runners share two cores: one thread each.
		f.startEnvoyOpts(n, fashionShard(i+1, len(envoys), ""), envoyOptions{execEnv: []string{"OMP_NUM_THREADS=1"}})
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, envoys...)

	dir := t.TempDir()
	for _, name := range []string{"plan.yaml", "train.py"} {
		b, err := os.ReadFile(filepath.Join(example, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	python(dir, "train.py", "init")
	f.submit("alice", dir)
	e := f.waitState(c, "fashion-cnn", 60*time.Minute, fxv1.ExperimentState_FINISHED)
	t.Logf("best: round %d, %s %.4f on the sites' validation shards", e.GetBest().GetRound(), e.GetBest().GetMetric(), e.GetBest().GetValue())

	best := filepath.Join(t.TempDir(), "best.safetensors")
	f.mustExp("alice", "model", "fashion-cnn", "--best", "-o", best)
	out := python(example, "evaluate.py", best, fashionMNIST)
	m := regexp.MustCompile(`test accuracy ([0-9.]+) on 10000 images`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("evaluate.py printed %q", out)
	}
	acc, _ := strconv.ParseFloat(m[1], 64)
	t.Logf("held-out test accuracy of the best model: %.4f", acc)
	if acc < 0.88 {
		t.Errorf("test accuracy %.4f after 10 rounds, want ≥ 0.88", acc)
	}
}
