package builtin

import (
	"context"
	"fmt"
	"strings"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// TaskTest names the final evaluation in Evaluate's errors. It is not a
// task of rounds: sites never see the test split.
const TaskTest = "test"

// Evaluate scores a built-in model's weights on d's test split, with the
// loss and accuracy Validate reports on a validation split. It is the
// final evaluation of a model a researcher keeps (fx quickstart's, the
// accuracy tests'), on data that neither trained nor chose it. The control
// variates a SCAFFOLD experiment's model carries are left out.
func Evaluate(ctx context.Context, model string, hyper map[string]any, weights tensor.Model, d *dataset.Dataset) (runner.Result, error) {
	if d.Test.N == 0 {
		return runner.Result{}, fmt.Errorf("builtin %s: %s has no test split to evaluate on", model, d.Description)
	}
	// A runner validates on its data's validation split; this one's holds
	// the test split (and, since New wants something to train on, so does
	// its training split: nothing trains here).
	view := &dataset.Dataset{
		Train: d.Test, Valid: d.Test,
		SampleShape: d.SampleShape, Classes: d.Classes, ClassNames: d.ClassNames, Description: d.Description,
	}
	r, err := New(Config{Model: model, Hyperparameters: hyper, Data: view})
	if err != nil {
		return runner.Result{}, err
	}
	return r.Validate(ctx, runner.Task{Name: TaskTest}, withoutControlVariates(weights))
}

// withoutControlVariates returns m's tensors but SCAFFOLD's control
// variates (runner.ControlVariatePrefix); m itself when it has none.
func withoutControlVariates(m tensor.Model) tensor.Model {
	out := m[:0:0]
	for _, t := range m {
		if !strings.HasPrefix(t.Name, runner.ControlVariatePrefix) {
			out = append(out, t)
		}
	}
	if len(out) == len(m) {
		return m
	}
	return out
}
