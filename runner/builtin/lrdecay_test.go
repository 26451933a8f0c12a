package builtin

import (
	"context"
	"math"
	"strings"
	"testing"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/runner"
)

func TestRoundLR(t *testing.T) {
	hp, err := ParseHyperparameters(ModelSoftmax, map[string]any{"lr": 0.2, "lr_decay": 0.5})
	if err != nil {
		t.Fatal(err)
	}
	for round, want := range map[int]float64{0: 0.2, 1: 0.2, 2: 0.1, 3: 0.05, 5: 0.0125} {
		if got := hp.RoundLR(round); math.Abs(got-want) > 1e-15 {
			t.Errorf("round %d: lr %v, want %v", round, got, want)
		}
	}
	plain, err := ParseHyperparameters(ModelSoftmax, map[string]any{"lr": 0.2})
	if err != nil {
		t.Fatal(err)
	}
	if plain.LRDecay != 1 || plain.RoundLR(7) != 0.2 {
		t.Errorf("without lr_decay: decay %v, round 7's lr %v; want 1 and 0.2", plain.LRDecay, plain.RoundLR(7))
	}
	for _, bad := range []any{0, -0.5, 1.5} {
		_, err := ParseHyperparameters(ModelSoftmax, map[string]any{"lr_decay": bad})
		if err == nil || !strings.Contains(err.Error(), `"lr_decay"`) || !strings.Contains(err.Error(), "(0, 1]") {
			t.Errorf("lr_decay %v: %v; want an error naming it and its range", bad, err)
		}
	}
}

// TestTrainLRDecay trains the softmax model one SGD step in round 3 at
// lr 0.2 and lr_decay 0.5, so at 0.2·0.5² = 0.05, from zero weights on one
// sample x = (1, 2) of class 0. At zero weights both classes have
// probability ½, so the gradient of the cross-entropy is (p − y)·xᵀ =
// (−½, ½)ᵀ(1, 2) for the weights and (−½, ½) for the bias, and the step
// gives W = −0.05·that = ((0.025, 0.05), (−0.025, −0.05)) and b =
// (0.025, −0.025). The SCAFFOLD step size it reports is that lr too.
func TestTrainLRDecay(t *testing.T) {
	one := dataset.Split{X: []float32{1, 2}, Y: []int32{0}, N: 1}
	d := &dataset.Dataset{Train: one, Valid: one, SampleShape: []int64{2}, Classes: 2, Description: "one sample"}
	hyper := map[string]any{"lr": 0.2, "lr_decay": 0.5, "momentum": 0, "batch_size": 1, "epochs": 1}
	r, err := New(Config{Model: ModelSoftmax, Hyperparameters: hyper, Data: d})
	if err != nil {
		t.Fatal(err)
	}
	m, err := InitialModel(ModelSoftmax, hyper, d.SampleShape, d.Classes)
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range m {
		clear(x.Data)
	}
	res, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain, Round: 3}, m)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]float32{weightName(0): {0.025, 0.05, -0.025, -0.05}, biasName(0): {0.025, -0.025}}
	for _, x := range res.Model {
		w, ok := want[x.Name]
		if !ok {
			t.Fatalf("unexpected tensor %s", x.Name)
		}
		got := x.Float32s()
		for i := range w {
			if math.Abs(float64(got[i]-w[i])) > 1e-7 {
				t.Errorf("%s = %v, want %v", x.Name, got, w)
				break
			}
		}
	}
	if got := r.scaffoldStepSize(3); math.Abs(got-0.05) > 1e-15 {
		t.Errorf("SCAFFOLD step size in round 3: %v, want 0.05", got)
	}
}
