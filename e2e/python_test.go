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

// TestPythonRunner: the reference runner in examples/python-runner (numpy
// softmax regression on fx.site, the site library every envoy hands its
// runners) completes the example's five rounds over two envoys. Its plan
// names `python3`, which each envoy resolves through its runners' PATH
// (/usr/bin:/bin), so Debian's python3 runs, not a user's pyenv shim. The
// archive carries the initial model, written by `runner.py init`: an
// aggregator cannot make one for an exec runner. Each site starts one
// runner process for all the experiment's tasks (besides the one start at
// review), and the output of the site that shares it reaches the
// researcher.
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
			if !strings.Contains(plan, "rounds: 5\n") {
				t.Fatal("examples/python-runner/plan.yaml no longer runs 5 rounds; update this test")
			}
			for _, r := range [][2]string{{"tags: [fashion-mnist]", "tags: [" + tag + "]"}} {
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
	sdk, err := filepath.Abs(filepath.Join("..", "sdk", "python"))
	if err != nil {
		t.Fatal(err)
	}
	init := exec.Command(systemPython, "runner.py", "init", "--features", features, "--classes", classes)
	init.Dir = exp
	init.Env = append(os.Environ(), "PYTHONPATH="+sdk, "PYTHONDONTWRITEBYTECODE=1")
	if out, err := init.CombinedOutput(); err != nil {
		t.Fatalf("runner.py init: %v\n%s", err, out)
	}
	initial, _, err := tensor.ReadFile(filepath.Join(exp, "model.safetensors"))
	if err != nil {
		t.Fatalf("runner.py init wrote no readable model: %v", err)
	}

	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	f.startDirector(directorOptions{})
	f.startEnvoyOpts("site-1", shardOf(1), envoyOptions{shareLogs: true})
	f.startEnvoy("site-2", shardOf(2))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")

	start := time.Now()
	e := f.submit("alice", exp)
	final := f.waitState(c, e.GetName(), 5*time.Minute, fxv1.ExperimentState_FINISHED)
	t.Logf("%s: 5 rounds of the Python runner on %s over 2 envoys in %s", e.GetName(), tag, time.Since(start).Round(100*time.Millisecond))
	if final.GetRound() != 5 {
		t.Errorf("finished at round %d, want 5", final.GetRound())
	}

	evs := f.watchEvents("alice", e.GetName())
	agg := aggregates(t, evs)
	for r := 1; r <= 5; r++ {
		if got := reporters(evs, r, runner.TaskTrain); !slices.Equal(got, []string{"site-1", "site-2"}) {
			t.Errorf("round %d: train reported by %v, want both sites", r, got)
		}
	}
	acc := agg[6][runner.TaskAggregatedValidation]["accuracy"]
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
	// The runners were Debian's python3, one process a site for every task
	// (5 rounds × 3 and the final validation), and one start at review.
	for _, name := range []string{"site-1", "site-2"} {
		log := f.envoys[name].log()
		if strings.Contains(log, ".pyenv") {
			t.Errorf("%s ran a pyenv interpreter", name)
		}
		var review, serving int
		for line := range strings.SplitSeq(log, "\n") {
			switch {
			case !strings.Contains(line, "runner process ready"):
			case strings.Contains(line, "check=true"):
				review++
			default:
				serving++
			}
		}
		if review != 1 || serving != 1 {
			t.Errorf("%s started its runner %d times at review and %d times for 16 tasks, want 1 and 1", name, review, serving)
		}
	}
	// Sites send their runners' output every second or so: the last lines
	// may arrive just after the experiment ends.
	var logs string
	f.waitFor(time.Minute, "site-1's runner output of round 5", func() (bool, error) {
		logs = f.mustExp("alice", "logs", e.GetName())
		return strings.Contains(logs, "site-1  train r5  stderr: epoch 1/1: loss"), nil
	})
	if !strings.Contains(logs, "site-1  train r1  stderr: epoch 1/1: loss") {
		t.Errorf("fx experiment logs lacks site-1's training progress:\n%s", logs)
	}
	if strings.Contains(logs, "site-2") {
		t.Errorf("fx experiment logs shows site-2, which does not share its runners' output:\n%s", logs)
	}
}
