package aggregator

import (
	"fmt"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/tensor"
)

// SCAFFOLD (aggregation.algorithm scaffold; Karimireddy et al. 2020, option
// II). The server's control variate c lives in the global model itself:
// for every float tensor NAME of the model, an F32 tensor
// experiment.ScaffoldPrefix+NAME of the same shape, zero at the start. So
// c travels to the sites with every round's model, and is in every round's
// model file and so in the checkpoint: a resumed aggregator has it back
// with the model, and nothing else is kept. A site's train upload carries
// its trained weights y_i under the weights' names and the change of its
// own variate, Δc_i, under c's, so the running weighted sum that FedAvg
// folds gives, at the round's close, the mean of the y_i and the mean of
// the Δc_i at once, in the memory of one model. The aggregator keeps the
// global model (x and c) in memory between rounds to step from it:
//
//	x ← x + η_g · (mean(y_i) − x)      (mean(y_i) itself when η_g = 1)
//	c ← c + (|S|/N) · mean(Δc_i)
//
// with |S| the sites whose train update the round folded and N the
// experiment's participants. The means weigh the updates by
// aggregation.weights, as FedAvg's does (equal: the paper's plain mean).

// addControlVariates gives the initial model of a SCAFFOLD experiment
// its server control variate: a zero F32 tensor for each float tensor that
// has none. Variates it has already (a model a SCAFFOLD experiment
// produced) are kept if they fit; one that does not fit, or names no
// tensor of the model, is refused.
func (a *Aggregator) addControlVariates() error {
	m := a.cfg.InitialModel
	if !a.plan.Scaffold() || m == nil {
		return nil
	}
	if err := m.Validate(); err != nil {
		return fmt.Errorf("initial model: %w", err)
	}
	index := m.Index()
	out := m
	n := 0
	for _, t := range m {
		name, ok := variateOf(t.Name)
		if ok {
			w := index[name]
			if w == nil || !w.DType.IsFloat() {
				return fmt.Errorf("aggregator: initial model: %s is a SCAFFOLD control variate of no float tensor of the model: remove it", t.Name)
			}
			if t.DType != tensor.F32 || !sameShape(t.Shape, w.Shape) {
				return fmt.Errorf("aggregator: initial model: SCAFFOLD control variate %s is %s%v, want F32%v like %s", t.Name, t.DType, t.Shape, w.Shape, name)
			}
			continue
		}
		if !t.DType.IsFloat() || index[experiment.ScaffoldPrefix+t.Name] != nil {
			continue
		}
		out = append(out, tensor.New(experiment.ScaffoldPrefix+t.Name, tensor.F32, t.Shape))
		n++
	}
	if n == 0 && !hasVariates(m) {
		return fmt.Errorf("aggregator: SCAFFOLD needs float tensors to correct, and the initial model has none (%s)", tensorNames(m, 8))
	}
	if n > 0 {
		a.log.Info("SCAFFOLD: the global model carries the server's control variate, zero to start", "tensors", n)
	}
	a.cfg.InitialModel = out
	return nil
}

// variateOf returns the name of the tensor whose control variate name is.
func variateOf(name string) (string, bool) {
	if !experiment.IsControlVariate(name) {
		return "", false
	}
	return name[len(experiment.ScaffoldPrefix):], true
}

func hasVariates(m tensor.Model) bool {
	for _, t := range m {
		if experiment.IsControlVariate(t.Name) {
			return true
		}
	}
	return false
}

func sameShape(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// scaffoldStep turns the round's mean update avg (the mean of the y_i and
// of the Δc_i) into the next global model from global (x and c), in
// avg's memory: see above. trained is |S|, the updates folded.
func (a *Aggregator) scaffoldStep(global, avg tensor.Model, trained int) (tensor.Model, error) {
	return scaffoldStep(global, avg, a.plan.ScaffoldLR(), float64(trained)/float64(len(a.parts)))
}

func scaffoldStep(global, avg tensor.Model, lr, fraction float64) (tensor.Model, error) {
	if global == nil {
		return nil, fmt.Errorf("SCAFFOLD: no global model to step from")
	}
	index := global.Index()
	for _, u := range avg {
		g := index[u.Name]
		if g == nil || !tensor.SameLayout(g, u) {
			return nil, fmt.Errorf("SCAFFOLD: the mean update's %s does not fit the global model", u.Name)
		}
		var f func(old, mean float32) float32
		switch {
		case !u.DType.IsFloat():
			continue // integer tensors: FedAvg's
		case experiment.IsControlVariate(u.Name):
			r := float32(fraction)
			f = func(c, dc float32) float32 { return c + r*dc }
		case lr == 1:
			continue // x + (mean − x) is the mean
		default:
			eta := float32(lr)
			f = func(x, y float32) float32 { return x + eta*(y-x) }
		}
		if u.DType == tensor.F32 {
			us, gs := u.Float32s(), g.Float32s()
			for i, v := range us {
				us[i] = f(gs[i], v)
			}
			continue
		}
		if err := tensor.CombineFloat32(u, g, f); err != nil {
			return nil, err
		}
	}
	return avg, nil
}
