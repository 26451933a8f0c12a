package builtin

import (
	"fmt"

	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// SCAFFOLD (runner.Task.Scaffold): a train task of a SCAFFOLD experiment
// carries the correction c − c_i for every weight and bias, which is added
// to the gradient at every step, before momentum, as the weight decay and
// FedProx's proximal term are (see network.step). The task reports its K
// (the minibatch steps it took) and its η: with momentum β the step per
// unit of a steady gradient is lr/(1 − β), the heavy-ball step's, so that
// (x − y)/(K·η) estimates the mean corrected gradient and not 1/(1 − β)
// times it; with β = 0 it is lr, the paper's option II as written.

// setCorrection points the network at the task's correction tensors, after
// checking there is one for every weight and bias and nothing else; nil
// clears it. The tensors are read, never written.
func (r *Runner) setCorrection(s *runner.Scaffold) error {
	n := r.net
	if s == nil {
		n.cw, n.cb = nil, nil
		return nil
	}
	corr := s.Correction
	if len(corr) != len(r.layout) {
		return fmt.Errorf("builtin %s: SCAFFOLD correction has %d tensors, the model %d (%s)", r.model, len(corr), len(r.layout), describe(r.layout))
	}
	cw, cb := make([][]float32, n.layers()), make([][]float32, n.layers())
	for l := range n.layers() {
		for _, p := range []struct {
			name string
			dst  *[]float32
			n    int
		}{{weightName(l), &cw[l], len(n.w[l])}, {biasName(l), &cb[l], len(n.b[l])}} {
			t := corr[p.name]
			if t == nil {
				return fmt.Errorf("builtin %s: SCAFFOLD correction has no %s", r.model, p.name)
			}
			if t.DType != tensor.F32 || t.Elements() != int64(p.n) || len(t.Data) != 4*p.n {
				return fmt.Errorf("builtin %s: SCAFFOLD correction %s is %s%v, want F32 with %d elements", r.model, p.name, t.DType, t.Shape, p.n)
			}
			*p.dst = t.Float32s()
		}
	}
	n.cw, n.cb = cw, cb
	return nil
}

// scaffoldStepSize is SCAFFOLD's η for the runner's settings (see above).
// The round's learning rate is the one its steps took (lr_decay).
func (r *Runner) scaffoldStepSize(round int) float64 {
	return r.hp.RoundLR(round) / (1 - r.hp.Momentum)
}

// scaffoldResult completes a train result of a task with a correction.
func (r *Runner) scaffoldResult(task runner.Task, res *runner.Result, steps int64) {
	if task.Scaffold == nil {
		return
	}
	res.Steps, res.StepSize = steps, r.scaffoldStepSize(task.Round)
}
