package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// TestScaffold: the built-in MLP trained with SCAFFOLD on two sites, as
// real processes. The experiment finishes with a useful model; the global
// model carries the server's control variate (scaffold.c/NAME for every
// weight and bias), zero in the initial model and moved, finite, in the last;
// each site keeps its own variate in its work directory, one per weight and
// bias, made in the last round.
func TestScaffold(t *testing.T) {
	sites := []string{"site-1", "site-2"}
	f := newFed(t, []string{"alice"}, sites)
	f.startDirector(directorOptions{})
	for i, s := range sites {
		f.startEnvoy(s, syntheticShard(i+1, 2, ""))
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, sites...)

	const rounds = 3
	plan := strings.Replace(syntheticPlan("scaffold", rounds, "", ""), "aggregation: {algorithm: fedavg}",
		"aggregation: {algorithm: scaffold}", 1)
	e := f.submit("alice", writePlan(t, plan))

	type kept struct {
		round int
		model tensor.Model
	}
	var mu sync.Mutex
	variates := map[string]kept{}
	ctx, stop := context.WithCancel(context.Background())
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			for _, s := range sites {
				m, meta, err := tensor.ReadFile(filepath.Join(f.dir, "envoys", s, "experiments", e.GetId(), "collaborator", "scaffold.safetensors"))
				if err != nil {
					continue // not yet, or gone
				}
				r, _ := strconv.Atoi(meta["fx.round"])
				mu.Lock()
				if r >= variates[s].round {
					variates[s] = kept{r, m}
				}
				mu.Unlock()
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	done := f.waitState(c, "scaffold", 3*time.Minute, fxv1.ExperimentState_FINISHED)
	stop()
	<-watched
	if b := done.GetBest(); b == nil || b.GetValue() < 0.6 {
		t.Errorf("best model %v, want accuracy ≥ 0.6 on the easy synthetic data", b)
	}

	model := func(args ...string) tensor.Model {
		file := filepath.Join(t.TempDir(), "m.safetensors")
		f.mustExp("alice", append([]string{"model", "scaffold", "-o", file}, args...)...)
		m, _, err := tensor.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	first, last := model("--round", "0"), model("--last")
	weights := []string{"fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias"}
	if len(last) != 2*len(weights) {
		t.Fatalf("the last model has %d tensors, want the MLP's 4 and their 4 control variates", len(last))
	}
	for _, name := range weights {
		c0, c := first.Get("scaffold.c/"+name), last.Get("scaffold.c/"+name)
		if c0 == nil || c == nil {
			t.Fatalf("no scaffold.c/%s in the global models", name)
		}
		if err := c.CheckFinite(); err != nil {
			t.Fatal(err)
		}
		for _, v := range c0.Float32s() {
			if v != 0 {
				t.Fatalf("the initial scaffold.c/%s is not zero", name)
			}
		}
		if equalTensor(c0, c) {
			t.Errorf("scaffold.c/%s did not move in %d rounds", name, rounds)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for _, s := range sites {
		v := variates[s]
		if v.round != rounds || len(v.model) != len(weights) {
			t.Fatalf("%s kept %d tensors of round %d, want its variate of the 4 weights and biases of round %d", s, len(v.model), v.round, rounds)
		}
		for _, name := range weights {
			if v.model.Get(name) == nil {
				t.Fatalf("%s's variate has no %s", s, name)
			}
		}
	}
	if equalTensor(variates["site-1"].model.Get("fc0.weight"), variates["site-2"].model.Get("fc0.weight")) {
		t.Error("the two sites have the same variate: each should estimate its own data's gradient")
	}
}

// TestScaffoldPythonRunner: the reference runner in examples/python-runner
// (numpy on fx.site, persistent protocol) runs a scaffold experiment over
// two envoys as real processes: every train task gets the correction file
// and reports its steps, the experiment finishes with a useful model, and
// the global model's control variate has moved.
func TestScaffoldPythonRunner(t *testing.T) {
	requireE2E(t)
	if out, err := exec.Command(systemPython, "-c", "import numpy").CombinedOutput(); err != nil {
		t.Skipf("%s cannot import numpy (apt-get install python3-numpy): %v %s", systemPython, err, out)
	}
	exp := t.TempDir()
	runnerPy, err := os.ReadFile(filepath.Join("..", "examples", "python-runner", "runner.py"))
	if err != nil {
		t.Fatal(err)
	}
	const rounds = 3
	plan := fmt.Sprintf(`name: scaffold-py
rounds: %d
participants: {min: 2, tags: [synthetic]}
runner:
  kind: exec
  command: [python3, runner.py]
  timeout: 5m
  hyperparameters: {lr: 0.05, momentum: 0.9, batch_size: 64, epochs: 1}
aggregation: {algorithm: scaffold}
stragglers: {deadline: 5m, min_reporting: 2}
best_model: {metric: accuracy, mode: max}
`, rounds)
	for name, content := range map[string]string{"runner.py": string(runnerPy), "plan.yaml": plan} {
		if err := os.WriteFile(filepath.Join(exp, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	sdk, err := filepath.Abs(filepath.Join("..", "sdk", "python"))
	if err != nil {
		t.Fatal(err)
	}
	init := exec.Command(systemPython, "runner.py", "init", "--features", "16", "--classes", "4")
	init.Dir = exp
	init.Env = append(os.Environ(), "PYTHONPATH="+sdk, "PYTHONDONTWRITEBYTECODE=1")
	if out, err := init.CombinedOutput(); err != nil {
		t.Fatalf("runner.py init: %v\n%s", err, out)
	}

	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	f.startDirector(directorOptions{})
	f.startEnvoy("site-1", syntheticShard(1, 2, ""))
	f.startEnvoy("site-2", syntheticShard(2, 2, ""))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")
	e := f.submit("alice", exp)
	final := f.waitState(c, e.GetName(), 5*time.Minute, fxv1.ExperimentState_FINISHED)
	if final.GetRound() != rounds {
		t.Errorf("finished at round %d, want %d", final.GetRound(), rounds)
	}
	agg := aggregates(t, f.watchEvents("alice", e.GetName()))
	t.Logf("aggregated validation accuracy per round: %v", accuracies(agg, runner.TaskAggregatedValidation))
	if acc := agg[rounds+1][runner.TaskAggregatedValidation]["accuracy"]; acc < 0.7 {
		t.Errorf("the final model's aggregated validation accuracy is %.4f, want ≥ 0.7", acc)
	}
	file := filepath.Join(t.TempDir(), "m.safetensors")
	f.mustExp("alice", "model", e.GetName(), "--last", "-o", file)
	last, _, err := tensor.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	cv := last.Get("scaffold.c/fc0.weight")
	if cv == nil {
		t.Fatalf("the last model has no scaffold.c/fc0.weight: %d tensors", len(last))
	}
	moved := false
	for _, v := range cv.Float32s() {
		moved = moved || v != 0
	}
	if !moved {
		t.Error("the server's control variate did not move")
	}
}
