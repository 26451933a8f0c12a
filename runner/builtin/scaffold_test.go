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

// TestStepScaffold checks one SGD step against values worked out by hand:
// w ← w − lr·(∇ + (c − c_i)), for the weights and the biases.
func TestStepScaffold(t *testing.T) {
	n := newNetwork([]int{2, 2}, 1, naiveGemm)
	copy(n.w[0], []float32{1, 2, 3, 4})
	copy(n.b[0], []float32{0.5, -0.5})
	copy(n.vw[0], []float32{0.1, 0.2, 0.3, 0.4}) // the gradient
	copy(n.vb[0], []float32{0.1, -0.1})
	n.cw = [][]float32{{1, 0, -1, 0.5}}
	n.cb = [][]float32{{0, 0.2}}
	n.step(0.5, 0, 0)
	// w − 0.5·([0.1, 0.2, 0.3, 0.4] + [1, 0, −1, 0.5]) = w − 0.5·[1.1, 0.2, −0.7, 0.9]
	wantW := []float32{0.45, 1.9, 3.35, 3.55}
	// b − 0.5·([0.1, −0.1] + [0, 0.2]) = b − 0.5·[0.1, 0.1]
	wantB := []float32{0.45, -0.55}
	for _, c := range []struct {
		name      string
		got, want []float32
	}{{"weight", n.w[0], wantW}, {"bias", n.b[0], wantB}} {
		for i := range c.want {
			if math.Abs(float64(c.got[i]-c.want[i])) > 1e-6 {
				t.Errorf("%s[%d] = %v, want %v", c.name, i, c.got[i], c.want[i])
			}
		}
	}
}

// correction returns a correction of the model's layout whose every
// element is k.
func correction(m tensor.Model, k float32) *runner.Scaffold {
	out := map[string]*tensor.Tensor{}
	for _, t := range m {
		c := tensor.New(t.Name, tensor.F32, t.Shape)
		v := c.Float32s()
		for i := range v {
			v[i] = k
		}
		out[t.Name] = c
	}
	return &runner.Scaffold{Correction: out}
}

// TestTrainScaffold trains one full-batch SGD step without momentum with
// and without a correction: both start at the global model with the same
// gradient, so the corrected weights are the plain ones less lr·k, k being
// the correction's every element. The result reports K = 1 and η = lr; with
// momentum β and several minibatches, K counts the steps and η is
// lr/(1 − β).
func TestTrainScaffold(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 6, Classes: 3, TrainSamples: 60, ValidSamples: 10, Seed: 2})
	const lr, k = 0.2, 0.25
	hyper := map[string]any{"hidden": []any{5}, "lr": lr, "momentum": 0, "batch_size": d.Train.N, "epochs": 1}
	global, err := InitialModel(ModelMLP, hyper, d.SampleShape, d.Classes)
	if err != nil {
		t.Fatal(err)
	}
	r, err := New(Config{Model: ModelMLP, Hyperparameters: hyper, Data: d})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	plain, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 1}, global)
	if err != nil {
		t.Fatal(err)
	}
	if plain.Steps != 0 || plain.StepSize != 0 {
		t.Errorf("a task without a correction reports K = %d, η = %v: want neither", plain.Steps, plain.StepSize)
	}
	corrected, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 1, Scaffold: correction(global, k)}, global)
	if err != nil {
		t.Fatal(err)
	}
	if corrected.Steps != 1 || corrected.StepSize != lr {
		t.Errorf("K = %d, η = %v; want 1 and %v", corrected.Steps, corrected.StepSize, lr)
	}
	for i, p := range plain.Model {
		ps, cs := p.Float32s(), corrected.Model[i].Float32s()
		for j := range ps {
			if want := ps[j] - lr*k; math.Abs(float64(cs[j]-want)) > 1e-6 {
				t.Fatalf("%s[%d] = %v, want %v (plain %v)", p.Name, j, cs[j], want, ps[j])
			}
		}
	}
	// The correction is the task's: the next plain task trains plainly.
	again, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 1}, global)
	if err != nil {
		t.Fatal(err)
	}
	if !equalWithin(again.Model, plain.Model, 0) {
		t.Fatal("a task after a corrected one trained differently from plain training")
	}

	hyper = map[string]any{"hidden": []any{5}, "lr": lr, "momentum": 0.5, "batch_size": 25, "epochs": 2}
	r, err = New(Config{Model: ModelMLP, Hyperparameters: hyper, Data: d})
	if err != nil {
		t.Fatal(err)
	}
	res, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 1, Scaffold: correction(global, 0)}, global)
	if err != nil {
		t.Fatal(err)
	}
	if res.Steps != 6 || math.Abs(res.StepSize-lr/0.5) > 1e-12 { // 2 epochs × ⌈60/25⌉ minibatches
		t.Errorf("K = %d, η = %v; want 6 and %v", res.Steps, res.StepSize, lr/0.5)
	}
}

func TestScaffoldCorrectionRefused(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 4, Classes: 2, TrainSamples: 10, ValidSamples: 2, Seed: 1})
	r, err := New(Config{Model: ModelSoftmax, Data: d})
	if err != nil {
		t.Fatal(err)
	}
	global, err := InitialModel(ModelSoftmax, nil, d.SampleShape, d.Classes)
	if err != nil {
		t.Fatal(err)
	}
	missing := correction(global, 0).Correction
	delete(missing, "fc0.bias")
	missing["other"] = tensor.New("other", tensor.F32, []int64{2})
	short := correction(global, 0).Correction
	short["fc0.bias"] = tensor.New("fc0.bias", tensor.F32, []int64{1})
	for name, corr := range map[string]map[string]*tensor.Tensor{"missing": missing, "short": short} {
		_, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain, Round: 1, Scaffold: &runner.Scaffold{Correction: corr}}, global)
		if err == nil || !strings.Contains(err.Error(), "fc0.bias") {
			t.Errorf("%s: error %v, want one naming fc0.bias", name, err)
		}
	}
}

// Evaluate scores a SCAFFOLD experiment's model, control variates and all,
// as it scores the weights alone.
func TestEvaluateLeavesOutControlVariates(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 4, Classes: 2, TrainSamples: 10, ValidSamples: 2, TestSamples: 20, Seed: 1})
	global, err := InitialModel(ModelSoftmax, nil, d.SampleShape, d.Classes)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	plain, err := Evaluate(ctx, ModelSoftmax, nil, global, d)
	if err != nil {
		t.Fatal(err)
	}
	with := append(global.Clone(), tensor.New(runner.ControlVariatePrefix+"fc0.weight", tensor.F32, global[0].Shape))
	got, err := Evaluate(ctx, ModelSoftmax, nil, with, d)
	if err != nil {
		t.Fatal(err)
	}
	if got.Metrics["accuracy"] != plain.Metrics["accuracy"] || got.Metrics["loss"] != plain.Metrics["loss"] {
		t.Fatalf("with control variates %v, without %v", got.Metrics, plain.Metrics)
	}
}
