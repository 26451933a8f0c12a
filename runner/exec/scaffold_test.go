package exec

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// scaffoldScript is a numpy train loop on fx.site: K = 2 steps of η = 0.25
// along a constant gradient of 1, corrected by task.scaffold_correction(),
// so y = x − 0.5·(1 + corr); it reports K and η.
const scaffoldScript = `
import numpy as np
from fx import site

for task in site.tasks():
    if not task.train:
        task.send(samples=1, metrics={"accuracy": 0.5})
        continue
    corr = task.scaffold_correction()
    w = task.model()
    out = {n: (a - 0.5 * (1 + corr.get(n, 0))).astype(np.float32) for n, a in w.items()}
    if task.scaffold:
        task.send(out, samples=4, steps=2, step_size=0.25)
    else:
        task.send(out, samples=4)
`

// TestScaffoldThroughFxSite: a persistent exec runner hands a SCAFFOLD
// train task's correction to a Python command written on fx.site, as a
// file the command reads, and returns the steps and step size it reports;
// a train task without SCAFFOLD reports neither. The per-task protocol
// refuses a SCAFFOLD task.
func TestScaffoldThroughFxSite(t *testing.T) {
	needPython(t)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "train.py"), []byte(scaffoldScript), 0o600); err != nil {
		t.Fatal(err)
	}
	c := pythonConfig(t, hclog.NewNullLogger(), ModePersistent)
	c.Dir, c.Command = dir, []string{"python3", "train.py"}
	r, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	model := tensor.Model{tensor.FromFloat32("w", []int64{2}, []float32{1, 2})}
	corr := &runner.Scaffold{Correction: map[string]*tensor.Tensor{"w": tensor.FromFloat32("w", []int64{2}, []float32{0.2, -0.4})}}
	ctx := context.Background()
	res, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 1, Scaffold: corr}, model)
	if err != nil {
		t.Fatal(err)
	}
	if res.Steps != 2 || res.StepSize != 0.25 {
		t.Errorf("K = %d, η = %v; want 2 and 0.25", res.Steps, res.StepSize)
	}
	for i, want := range []float32{0.4, 1.7} { // x − 0.5·(1 + [0.2, −0.4])
		if got := res.Model[0].Float32s()[i]; math.Abs(float64(got-want)) > 1e-6 {
			t.Errorf("w[%d] = %v, want %v", i, got, want)
		}
	}
	plain, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 2}, model)
	if err != nil {
		t.Fatal(err)
	}
	if plain.Steps != 0 || plain.StepSize != 0 || plain.Model[0].Float32s()[0] != 0.5 {
		t.Errorf("without SCAFFOLD: K = %d, η = %v, w = %v; want neither, and x − 0.5", plain.Steps, plain.StepSize, plain.Model[0].Float32s())
	}

	c = pythonConfig(t, hclog.NewNullLogger(), ModePerTask)
	c.Dir, c.Command = dir, []string{"python3", "train.py"}
	pt, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pt.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 1, Scaffold: corr}, model); err == nil || !strings.Contains(err.Error(), "persistent") {
		t.Errorf("per task: error %v, want one naming the persistent protocol", err)
	}
}
