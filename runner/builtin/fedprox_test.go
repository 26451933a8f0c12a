package builtin

import (
	"context"
	"math"
	"strings"
	"testing"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// TestStepProximal checks one SGD step against values worked out by hand:
// w ← w − lr·(∇ + μ(w − w_global)), for the weights and the biases.
func TestStepProximal(t *testing.T) {
	const lr = 0.5
	tests := []struct {
		name  string
		mu    float32
		wantW []float32
		wantB []float32
	}{
		// ∇ alone: w − 0.5·∇.
		{"plain", 0, []float32{0.95, 1.9, 2.85, 3.8}, []float32{0.45, -0.45}},
		// w − w_global = [1, 0, 2, 0] and [0.5, −0.5]; μ = 0.1 adds
		// [0.1, 0, 0.2, 0] and [0.05, −0.05] to ∇, so lr·μ·(w − w_global)
		// = [0.05, 0, 0.1, 0] and [0.025, −0.025] more towards the global
		// model.
		{"proximal", 0.1, []float32{0.9, 1.9, 2.75, 3.8}, []float32{0.425, -0.425}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n := newNetwork([]int{2, 2}, 1, naiveGemm)
			n.keepGlobal()
			copy(n.w[0], []float32{1, 2, 3, 4})
			copy(n.b[0], []float32{0.5, -0.5})
			copy(n.gw[0], []float32{0, 2, 1, 4})
			copy(n.gb[0], []float32{0, 0})
			copy(n.vw[0], []float32{0.1, 0.2, 0.3, 0.4}) // the gradient
			copy(n.vb[0], []float32{0.1, -0.1})
			n.step(lr, 0, tc.mu)
			for _, c := range []struct {
				name      string
				got, want []float32
			}{{"weight", n.w[0], tc.wantW}, {"bias", n.b[0], tc.wantB}} {
				for i := range c.want {
					if math.Abs(float64(c.got[i]-c.want[i])) > 1e-6 {
						t.Errorf("%s[%d] = %v, want %v", c.name, i, c.got[i], c.want[i])
					}
				}
			}
		})
	}
}

// TestTrainProximal trains two full-batch SGD steps without momentum, with
// and without μ. The first step starts at the global model, where the
// proximal term is zero, so both reach the same w₁ and the same gradient at
// it; the second step then differs by exactly lr·μ·(w₁ − w_global). One
// full-batch step (batch_size = N) gives w₁.
func TestTrainProximal(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 6, Classes: 3, TrainSamples: 60, ValidSamples: 10, Seed: 2})
	const lr, mu = 0.2, 0.5
	hyper := func(epochs int) map[string]any {
		return map[string]any{"hidden": []any{5}, "lr": lr, "momentum": 0, "batch_size": d.Train.N, "epochs": epochs}
	}
	ctx := context.Background()
	task := runner.Task{Name: runner.TaskTrain, Round: 1}
	train := func(epochs int, mu float64) tensor.Model {
		t.Helper()
		r, err := New(Config{Model: ModelMLP, Hyperparameters: hyper(epochs), Data: d, ProximalMu: mu})
		if err != nil {
			t.Fatal(err)
		}
		global, err := InitialModel(ModelMLP, hyper(epochs), d.SampleShape, d.Classes)
		if err != nil {
			t.Fatal(err)
		}
		res, err := r.Train(ctx, task, global)
		if err != nil {
			t.Fatal(err)
		}
		return res.Model
	}
	global, err := InitialModel(ModelMLP, hyper(1), d.SampleShape, d.Classes)
	if err != nil {
		t.Fatal(err)
	}
	w1 := train(1, 0)
	if w1prox := train(1, mu); !equalWithin(w1, w1prox, 0) {
		t.Fatal("the first step differs with μ: the proximal term must be zero at the global model")
	}
	plain, prox := train(2, 0), train(2, mu)
	moved := 0.0
	for i, g := range global {
		gs, w1s, ps, xs := g.Float32s(), w1[i].Float32s(), plain[i].Float32s(), prox[i].Float32s()
		for j := range gs {
			want := float64(ps[j]) - lr*mu*float64(w1s[j]-gs[j])
			if d := math.Abs(float64(xs[j]) - want); d > 1e-5*(1+math.Abs(want)) {
				t.Fatalf("%s[%d] = %v, want %v (plain SGD %v, w₁ %v, global %v)", g.Name, j, xs[j], want, ps[j], w1s[j], gs[j])
			}
			moved += math.Abs(float64(ps[j] - xs[j]))
		}
	}
	if moved < 1e-3 {
		t.Fatalf("μ moved the weights by %g in all: the test does not exercise the proximal term", moved)
	}
}

// TestProximalKeepsCloser: over many steps a large μ keeps the trained
// weights nearer the global model than plain training, and the runner
// holds no second copy of the weights without μ.
func TestProximalKeepsCloser(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 10, Classes: 4, TrainSamples: 400, ValidSamples: 50, Seed: 4})
	hyper := map[string]any{"lr": 0.1, "batch_size": 20, "epochs": 2}
	global, err := InitialModel(ModelSoftmax, hyper, d.SampleShape, d.Classes)
	if err != nil {
		t.Fatal(err)
	}
	distance := func(mu float64) float64 {
		r, err := New(Config{Model: ModelSoftmax, Hyperparameters: hyper, Data: d, ProximalMu: mu})
		if err != nil {
			t.Fatal(err)
		}
		if (r.net.gw != nil) != (mu > 0) {
			t.Errorf("μ %v: global copy held %v", mu, r.net.gw != nil)
		}
		res, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain, Round: 1}, global)
		if err != nil {
			t.Fatal(err)
		}
		var sum float64
		for i, g := range global {
			for j, v := range g.Float32s() {
				x := float64(res.Model[i].Float32s()[j] - v)
				sum += x * x
			}
		}
		return math.Sqrt(sum)
	}
	plain, prox := distance(0), distance(2)
	if !(prox < 0.8*plain) {
		t.Fatalf("‖w − w_global‖ = %.4f with μ = 2, %.4f without: the proximal term should hold the weights back", prox, plain)
	}
}

func TestProximalMuRefused(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 4, Classes: 2, TrainSamples: 10, ValidSamples: 2, Seed: 1})
	for _, mu := range []float64{-0.1, math.NaN(), math.Inf(1)} {
		_, err := New(Config{Model: ModelSoftmax, Data: d, ProximalMu: mu})
		if err == nil || !strings.Contains(err.Error(), "training.proximal_mu") {
			t.Errorf("μ %v: error %v, want one naming training.proximal_mu", mu, err)
		}
	}
}

// equalWithin reports whether two models of one layout hold values within
// tol of each other.
func equalWithin(a, b tensor.Model, tol float64) bool {
	for i := range a {
		x, y := a[i].Float32s(), b[i].Float32s()
		for j := range x {
			if math.Abs(float64(x[j]-y[j])) > tol {
				return false
			}
		}
	}
	return true
}
