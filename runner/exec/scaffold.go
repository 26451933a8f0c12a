package exec

import (
	"errors"
	"fmt"
	"math"
	"path/filepath"

	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// SCAFFOLD through the persistent protocol (runner.Task.Scaffold): a train
// task of a SCAFFOLD experiment carries "scaffold": {"correction": PATH},
// a safetensors file of the correction c − c_i (F32, one tensor per float
// tensor of the model, by its name), which the command adds to each
// parameter's gradient at every local step; its "done" answer reports
// "steps" (K, the local steps it took) and "step_size" (η, each step's
// size per unit of gradient), from which fx updates the site's control
// variate. The per-task protocol does not carry it.

// ScaffoldSpec is a SCAFFOLD train task's addition to the task message.
type ScaffoldSpec struct {
	// Correction is the correction file, written by fx for the task and
	// left unchanged while it runs.
	Correction string `json:"correction"`
}

// correctionFile is where a persistent runner writes a train task's
// correction, over the last task's.
func (ps *persistent) correctionFile() string {
	return filepath.Join(ps.scratch, "models", "correction.safetensors")
}

// writeCorrection writes the task's correction for the command, in the
// model's order.
func writeCorrection(path string, s *runner.Scaffold, model tensor.Model) error {
	out := make(tensor.Model, 0, len(s.Correction))
	for _, t := range model {
		if c := s.Correction[t.Name]; c != nil {
			out = append(out, c)
		}
	}
	if len(out) != len(s.Correction) {
		return errors.New("SCAFFOLD's correction names tensors the model does not have")
	}
	if err := tensor.WriteFile(path, out, nil); err != nil {
		return fmt.Errorf("SCAFFOLD's correction: %w", err)
	}
	return nil
}

// scaffoldSteps checks the K and η a SCAFFOLD train task's answer reports.
func scaffoldSteps(rep *ReplyMessage) (int64, float64, error) {
	if rep.Steps <= 0 || !(rep.StepSize > 0) || math.IsInf(rep.StepSize, 0) {
		return 0, 0, fmt.Errorf("a SCAFFOLD train task's answer must report \"steps\" (the local steps taken, ≥ 1) and \"step_size\" (each step's size, > 0), got %d and %v (with fx.site: task.send(..., steps=K, step_size=lr))", rep.Steps, rep.StepSize)
	}
	return rep.Steps, rep.StepSize, nil
}
