package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// systemPython is Debian's interpreter, which has numpy from python3-numpy.
const systemPython = "/usr/bin/python3"

// TestPythonRunner (issue #7): the reference runner in examples/python-runner
// (numpy softmax regression behind the exec runner protocol) completes a
// three-round experiment over two envoys. Its plan names `python3`, which
// each envoy resolves through PATH=/usr/bin:/bin, so Debian's python3 runs,
// not a user's pyenv shim. The archive carries the initial model, written
// by `runner.py init`: an aggregator cannot make one for an exec runner.
func TestPythonRunner(t *testing.T) {
	requireE2E(t)
	if out, err := exec.Command(systemPython, "-c", "import numpy").CombinedOutput(); err != nil {
		t.Skipf("%s cannot import numpy (apt-get install python3-numpy): %v %s", systemPython, err, out)
	}
	// Fashion-MNIST as the example is written for; else the generated
	// data set the runner also reads.
	features, classes, tag := "784", "10", "fashion-mnist"
	shardOf := func(i int) shard { return fashionShard(i, 2, "") }
	if _, err := os.Stat(filepath.Join(fashionMNIST, "train-images-idx3-ubyte.gz")); err != nil {
		features, classes, tag = "16", "4", "synthetic"
		shardOf = func(i int) shard { return syntheticShard(i, 2, "") }
	}

	exp := t.TempDir()
	for _, name := range []string{"runner.py", "plan.yaml"} {
		b, err := os.ReadFile(filepath.Join("..", "examples", "python-runner", name))
		if err != nil {
			t.Fatal(err)
		}
		if name == "plan.yaml" {
			plan := string(b)
			for _, r := range [][2]string{{"rounds: 5\n", "rounds: 3\n"}, {"tags: [fashion-mnist]", "tags: [" + tag + "]"}} {
				if !strings.Contains(plan, r[0]) {
					t.Fatalf("examples/python-runner/plan.yaml has no %q any more; update this test", r[0])
				}
				plan = strings.Replace(plan, r[0], r[1], 1)
			}
			b = []byte(plan)
		}
		if err := os.WriteFile(filepath.Join(exp, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	init := exec.Command(systemPython, "runner.py", "init", "--features", features, "--classes", classes)
	init.Dir = exp
	if out, err := init.CombinedOutput(); err != nil {
		t.Fatalf("runner.py init: %v\n%s", err, out)
	}
	initial, _, err := tensor.ReadFile(filepath.Join(exp, "model.safetensors"))
	if err != nil {
		t.Fatalf("runner.py init wrote no readable model: %v", err)
	}

	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	f.startDirector(directorOptions{})
	for i, name := range []string{"site-1", "site-2"} {
		f.startEnvoy(name, shardOf(i+1), "PATH=/usr/bin:/bin")
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")

	start := time.Now()
	e := f.submit("alice", exp)
	final := f.waitState(c, e.GetName(), 5*time.Minute, fxv1.ExperimentState_FINISHED)
	t.Logf("%s: 3 rounds of the Python runner on %s over 2 envoys in %s", e.GetName(), tag, time.Since(start).Round(100*time.Millisecond))
	if final.GetRound() != 3 {
		t.Errorf("finished at round %d, want 3", final.GetRound())
	}

	evs := f.watchEvents("alice", e.GetName())
	agg := aggregates(t, evs)
	for r := 1; r <= 3; r++ {
		if got := reporters(evs, r, runner.TaskTrain); !slices.Equal(got, []string{"site-1", "site-2"}) {
			t.Errorf("round %d: train reported by %v, want both sites", r, got)
		}
	}
	acc := agg[4][runner.TaskAggregatedValidation]["accuracy"]
	t.Logf("aggregated validation accuracy per round: %v", accuracies(agg, runner.TaskAggregatedValidation))
	if acc < 0.7 {
		t.Errorf("the final model's aggregated validation accuracy is %.4f, want ≥ 0.7", acc)
	}

	// The last model has the initial model's tensors, trained.
	file := filepath.Join(t.TempDir(), "last.safetensors")
	f.mustExp("alice", "model", e.GetName(), "--last", "-o", file)
	m, _, err := tensor.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := initial.Matches(m); err != nil {
		t.Errorf("the last model's layout differs from the initial model's: %v", err)
	}
	if w := m.Get("fc0.weight"); w == nil || len(w.Shape) != 2 || w.Shape[1] != int64(atoi(features)) {
		t.Errorf("fc0.weight: %v, want [%s %s]", w, classes, features)
	}
	// The runners were Debian's python3.
	for _, name := range []string{"site-1", "site-2"} {
		if log := f.envoys[name].log(); strings.Contains(log, ".pyenv") {
			t.Errorf("%s ran a pyenv interpreter", name)
		}
	}
}
