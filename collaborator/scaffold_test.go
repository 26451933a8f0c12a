package collaborator

import (
	"context"
	"math"
	"path/filepath"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// sgdRunner takes K steps of size η with a constant gradient g per
// element, corrected as SCAFFOLD asks: y = x − K·η·(g + corr). It records
// the corrections it was given.
type sgdRunner struct {
	g        float32
	steps    int64
	stepSize float64
	seen     []map[string][]float32
}

func (s *sgdRunner) Train(_ context.Context, task runner.Task, m tensor.Model) (runner.Result, error) {
	seen := map[string][]float32{}
	out := m.Clone()
	for _, t := range out {
		corr := task.Scaffold.Correction[t.Name].Float32s()
		seen[t.Name] = append([]float32(nil), corr...)
		v := t.Float32s()
		for i := range v {
			v[i] -= float32(float64(s.steps)*s.stepSize) * (s.g + corr[i])
		}
	}
	s.seen = append(s.seen, seen)
	return runner.Result{Model: out, Samples: 4, Steps: s.steps, StepSize: s.stepSize}, nil
}

func (s *sgdRunner) Validate(context.Context, runner.Task, tensor.Model) (runner.Result, error) {
	return runner.Result{Samples: 1}, nil
}

func scaffoldModel(x, c []float32) tensor.Model {
	return tensor.Model{
		tensor.FromFloat32("w", []int64{int64(len(x))}, x),
		tensor.FromFloat32("scaffold.c/w", []int64{int64(len(c))}, c),
	}
}

func near(t *testing.T, what string, got, want []float32) {
	t.Helper()
	for i := range want {
		if math.Abs(float64(got[i]-want[i])) > 1e-5 {
			t.Fatalf("%s = %v, want %v", what, got, want)
		}
	}
}

// TestScaffoldVariateByHand runs train tasks of a site by hand. With
// K = 2 steps of η = 0.25 (K·η = 0.5):
//
// round 1, gradient 1: x = [1, 2], c = [0.2, −0.4], c_i = 0 (none kept
// yet): correction c − c_i = [0.2, −0.4]; y = x − 0.5·(1 + corr) =
// [0.4, 1.7]; c_i⁺ = c_i − c + (x − y)/0.5 = [−0.2, 0.4] + [1.2, 0.6] =
// [1, 1] (the gradient: option II recovers it exactly for constant
// gradients); Δc_i = [1, 1]. The upload is y under w and Δc_i under
// scaffold.c/w. c_i⁺ is pending until the upload is taken.
//
// round 2, gradient 2: x = [0, 0], c = [0.5, 0.5], c_i = [1, 1]: correction
// [−0.5, −0.5]; y = −0.5·(2 − 0.5) = [−0.75, −0.75]; c_i⁺ = [1, 1] −
// [0.5, 0.5] + [1.5, 1.5] = [2, 2]; Δc_i = [1, 1]. Handed out again (a
// restart), it starts from round 1's c_i again. Its upload is late: never
// confirmed.
//
// round 3: c_i is still round 1's [1, 1], so the correction is [−0.5, −0.5].
func TestScaffoldVariateByHand(t *testing.T) {
	dir := t.TempDir()
	r := &sgdRunner{g: 1, steps: 2, stepSize: 0.25}
	c := newCollaborator(Config{ExperimentID: "e", Name: "site", Runner: r, WorkDir: dir, Scaffold: true, Logger: hclog.NewNullLogger()}, nil, nil)
	ctx := context.Background()
	keptIn := func(file string) []float32 {
		t.Helper()
		m, _, err := tensor.ReadFile(filepath.Join(dir, file))
		if err != nil {
			t.Fatal(err)
		}
		return m.Get("w").Float32s()
	}

	c.model = scaffoldModel([]float32{1, 2}, []float32{0.2, -0.4})
	res, err := c.runTask(ctx, runner.Task{Name: runner.TaskTrain, Round: 1})
	if err != nil {
		t.Fatal(err)
	}
	near(t, "round 1 correction", r.seen[0]["w"], []float32{0.2, -0.4})
	if got := names(res.Model); len(got) != 2 || got[0] != "w" || got[1] != "scaffold.c/w" {
		t.Fatalf("round 1 upload holds %v, want [w scaffold.c/w]", got)
	}
	near(t, "round 1 y", res.Model.Get("w").Float32s(), []float32{0.4, 1.7})
	near(t, "round 1 Δc_i", res.Model.Get("scaffold.c/w").Float32s(), []float32{1, 1})
	near(t, "round 1 pending c_i", keptIn(scaffoldNextFile), []float32{1, 1})
	if c.model.Get("scaffold.c/w").Float32s()[0] != 0.2 {
		t.Fatal("the round's model was modified")
	}
	if err := c.confirmVariate(1); err != nil {
		t.Fatal(err)
	}
	near(t, "round 1 kept c_i", keptIn(scaffoldFile), []float32{1, 1})

	c.model = scaffoldModel([]float32{0, 0}, []float32{0.5, 0.5})
	r.g = 2
	for attempt := range 2 { // the second: round 2 handed out again
		res, err = c.runTask(ctx, runner.Task{Name: runner.TaskTrain, Round: 2})
		if err != nil {
			t.Fatal(err)
		}
		near(t, "round 2 correction", r.seen[1+attempt]["w"], []float32{-0.5, -0.5})
		near(t, "round 2 y", res.Model.Get("w").Float32s(), []float32{-0.75, -0.75})
		near(t, "round 2 Δc_i", res.Model.Get("scaffold.c/w").Float32s(), []float32{1, 1})
		near(t, "round 2 pending c_i", keptIn(scaffoldNextFile), []float32{2, 2})
	}

	if _, err = c.runTask(ctx, runner.Task{Name: runner.TaskTrain, Round: 3}); err != nil {
		t.Fatal(err)
	}
	near(t, "round 3 correction (round 2's upload not taken)", r.seen[3]["w"], []float32{-0.5, -0.5})
	if err := c.confirmVariate(2); err != nil { // a late word about round 2 changes nothing
		t.Fatal(err)
	}
	near(t, "kept c_i", keptIn(scaffoldFile), []float32{1, 1})
	if err := c.confirmVariate(3); err != nil {
		t.Fatal(err)
	}
	near(t, "round 3 kept c_i", keptIn(scaffoldFile), []float32{2, 2}) // gradient 2, as round 2
	near(t, "round 1's, set aside", keptIn(scaffoldPrevFile), []float32{1, 1})

	// The validations see the weights alone.
	if got := c.weights(c.model); len(got) != 1 || got[0].Name != "w" {
		t.Fatalf("the runner's model holds %v, want [w]", names(got))
	}
}

// A runner that does not report K and η cannot update the site's variate.
func TestScaffoldNeedsSteps(t *testing.T) {
	r := &sgdRunner{g: 1, steps: 0, stepSize: 0.1}
	c := newCollaborator(Config{ExperimentID: "e", Name: "site", Runner: r, WorkDir: t.TempDir(), Scaffold: true, Logger: hclog.NewNullLogger()}, nil, nil)
	c.model = scaffoldModel([]float32{1}, []float32{0})
	if _, err := c.runTask(context.Background(), runner.Task{Name: runner.TaskTrain, Round: 1}); err == nil {
		t.Fatal("a train result without K and η was accepted")
	}
	c.model = tensor.Model{tensor.FromFloat32("w", []int64{1}, []float32{1})}
	r.steps = 1
	if _, err := c.runTask(context.Background(), runner.Task{Name: runner.TaskTrain, Round: 1}); err == nil {
		t.Fatal("a model without the server's control variate was accepted")
	}
}
