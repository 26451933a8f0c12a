package aggregator_test

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fx-fl/fx/collaborator"
	"github.com/fx-fl/fx/internal/testpki"
	"github.com/fx-fl/fx/pki"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// scaffoldRunner takes one local step of size 1 along the constant
// gradient −Step, corrected as SCAFFOLD asks: y = x + Step − (c − c_i).
// Its variate c_i⁺ is then the gradient, −Step, every round. It records
// the correction's first element per round, and waits for gate (when set)
// before training round 3.
type scaffoldRunner struct {
	Step float32
	gate <-chan struct{}
	mu   sync.Mutex
	corr map[int]float32
}

func (s *scaffoldRunner) Train(ctx context.Context, task runner.Task, m tensor.Model) (runner.Result, error) {
	if task.Round == 3 && s.gate != nil {
		select {
		case <-s.gate:
		case <-ctx.Done():
			return runner.Result{}, ctx.Err()
		}
	}
	if task.Scaffold == nil {
		return runner.Result{}, fmt.Errorf("round %d: no SCAFFOLD correction", task.Round)
	}
	out := m.Clone()
	for _, t := range out {
		if strings.HasPrefix(t.Name, "scaffold.") {
			return runner.Result{}, fmt.Errorf("the runner was handed the control variate %s", t.Name)
		}
		corr := task.Scaffold.Correction[t.Name].Float32s()
		v := t.Float32s()
		for i := range v {
			v[i] += s.Step - corr[i]
		}
	}
	s.mu.Lock()
	s.corr[task.Round] = task.Scaffold.Correction["fc.weight"].Float32s()[0]
	s.mu.Unlock()
	return runner.Result{Model: out, Samples: 10, Steps: 1, StepSize: 1}, nil
}

func (s *scaffoldRunner) Validate(_ context.Context, task runner.Task, m tensor.Model) (runner.Result, error) {
	for _, t := range m {
		if strings.HasPrefix(t.Name, "scaffold.") {
			return runner.Result{}, fmt.Errorf("%s: the runner was handed the control variate %s", task.Name, t.Name)
		}
	}
	return runner.Result{Samples: 10, Metrics: map[string]float64{"accuracy": 0.5}}, nil
}

// TestScaffoldRoundsAndResume runs SCAFFOLD with η_g = 0.5 over real gRPC:
// sites a (step 1) and b (step 3) drift apart, and their variates pull
// them together. Worked by hand, x₀ the initial model:
//
//	round 1: c = 0, corrections 0; y_a = x₀+1, y_b = x₀+3; c_a = −1,
//	         c_b = −3 (Δ the same); x₁ = x₀ + 0.5·2 = x₀+1; c = 0 + (2/2)·(−2) = −2.
//	round 2: corrections c − c_i: a −1, b +1; y_a = y_b = x₁+2; Δc_i = 0;
//	         x₂ = x₀+2; c = −2.
//	round 3: as round 2: x₃ = x₀+3; c = −2.
//
// The aggregator is stopped once round 2 is complete, while the sites wait
// to train round 3, and started again on its directory: round 3's model
// steps from round 2's x and c, which it read back from round 2's file (a
// lost c would give c = 0 in round 3's file). Round 0's file holds c = 0;
// each site keeps its own variate in its work directory.
func TestScaffoldRoundsAndResume(t *testing.T) {
	plan := parsePlan(t, `
name: test
rounds: 3
participants: {min: 2}
runner: {kind: builtin, model: mlp}
aggregation: {algorithm: scaffold, lr: 0.5}
stragglers: {deadline: 1m, min_reporting: 2}
tasks: [train, locally_tuned_model_validation]
best_model: {task: locally_tuned_model_validation}
`)
	f := newFederation(t, plan, "a", "b")
	f.start()
	gate := make(chan struct{})
	runners := map[string]*scaffoldRunner{
		"a": {Step: 1, gate: gate, corr: map[int]float32{}},
		"b": {Step: 3, gate: gate, corr: map[int]float32{}},
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	dirs := map[string]string{}
	var results []<-chan error
	for _, name := range []string{"a", "b"} {
		dirs[name] = t.TempDir()
		c, err := collaborator.New(collaborator.Config{
			ExperimentID: experimentID, Name: name, Address: f.addr,
			DialOptions: testpki.DialOptions(f.ca.Keyring(pki.RoleEnvoy, name), "localhost"),
			Runner:      runners[name], WorkDir: dirs[name], Logger: testLogger(t, name), Scaffold: true,
		})
		if err != nil {
			t.Fatal(err)
		}
		out := make(chan error, 1)
		go func() { out <- c.Run(ctx) }()
		results = append(results, out)
	}
	f.sink.waitRounds(t, 2, 30*time.Second)
	if err := f.stop(); err == nil {
		t.Fatal("the stopped aggregator says the experiment finished")
	}
	f.start()
	close(gate)
	if err := f.wait(30 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	for i, res := range results {
		if err := <-res; !finished(err) {
			t.Errorf("collaborator %d: %v, want quit", i, err)
		}
	}

	x0 := f.initial
	for r := 0; r <= 3; r++ {
		m := readModel(t, f.dir, r)
		for _, name := range []string{"fc.weight", "fc.bias"} {
			want := values(x0, name)
			for i := range want {
				want[i] += float32(r)
			}
			nearly(t, fmt.Sprintf("round %d %s", r, name), values(m, name), want)
			c := m.Get("scaffold.c/" + name)
			if c == nil {
				t.Fatalf("round %d's model has no scaffold.c/%s: %v", r, name, m)
			}
			wantC := float32(-2)
			if r == 0 {
				wantC = 0
			}
			nearly(t, fmt.Sprintf("round %d scaffold.c/%s", r, name), c.Float32s(), fill(len(want), wantC))
		}
	}
	for name, want := range map[string][]float32{"a": {0, -1, -1}, "b": {0, 1, 1}} {
		r := runners[name]
		r.mu.Lock()
		for i, w := range want {
			if got := r.corr[i+1]; math.Abs(float64(got-w)) > 1e-5 {
				t.Errorf("site %s round %d: correction %v, want %v", name, i+1, got, w)
			}
		}
		r.mu.Unlock()
		kept, _, err := tensor.ReadFile(filepath.Join(dirs[name], "scaffold.safetensors"))
		if err != nil {
			t.Fatalf("site %s's variate: %v", name, err)
		}
		nearly(t, "site "+name+"'s variate", values(kept, "fc.weight"), fill(6, -runners[name].Step))
	}
}

func fill(n int, v float32) []float32 {
	out := make([]float32, n)
	for i := range out {
		out[i] = v
	}
	return out
}

func nearly(t *testing.T, what string, got, want []float32) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s = %v, want %v", what, got, want)
	}
	for i := range want {
		if math.Abs(float64(got[i]-want[i])) > 1e-4 {
			t.Fatalf("%s = %v, want %v", what, got, want)
		}
	}
}
