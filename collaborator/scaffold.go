package collaborator

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/membudget"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// SCAFFOLD (Config.Scaffold, the plan's aggregation.algorithm scaffold;
// Karimireddy et al. 2020, option II). The round's global model carries
// the server's control variate c beside the weights x, as F32 tensors
// named experiment.ScaffoldPrefix + a weight's name (see the aggregator's
// scaffold.go). The site keeps its own variate c_i in its work directory,
// zero before its first round. Its train task:
//
//   - hands the runner x alone, with the correction c − c_i for every float
//     tensor (runner.Task.Scaffold), which the runner adds to the gradient at
//     every local step, and which reports K steps of size η;
//   - from the trained weights y_i computes c_i⁺ = c_i − c + (x − y_i)/(K·η);
//   - keeps c_i⁺, durably, as pending, before anything of the round is
//     uploaded;
//   - uploads y_i under the weights' names and Δc_i = c_i⁺ − c_i under c's;
//   - once the aggregator has taken that upload, c_i⁺ becomes the site's
//     variate (confirmVariate). An upload that came too late (the round
//     closed without it) leaves the site's variate as it was: the server's
//     c never had its Δc_i, and c stays the mean of the sites' variates.
//
// The validations score the weights alone. Like the personalised layers
// (local.go), two files keep the variate, each with the round that made
// it, so that a round run again after a restart starts from the variate
// the site had before that round; a third holds the pending one.
const (
	scaffoldFile     = "scaffold.safetensors"
	scaffoldPrevFile = "scaffold.prev.safetensors"
	scaffoldNextFile = "scaffold.next.safetensors"
)

// weights returns m without SCAFFOLD's control variates: what the runner
// sees. The tensors are m's own.
func (c *Collaborator) weights(m tensor.Model) tensor.Model {
	if !c.cfg.Scaffold {
		return m
	}
	out := make(tensor.Model, 0, len(m))
	for _, t := range m {
		if !experiment.IsControlVariate(t.Name) {
			out = append(out, t)
		}
	}
	return out
}

// trainScaffold runs SCAFFOLD's train task (see above).
func (c *Collaborator) trainScaffold(ctx context.Context, task runner.Task) (runner.Result, error) {
	x := c.weights(c.model)
	// Besides the round's model (x and c) and the trained weights, which
	// the collaborator's budget holds, the task holds the site's variate,
	// the correction (which becomes c_i⁺) and Δc_i: three F32 copies of
	// the weights.
	defer membudget.Reserve(3*f32Bytes(x), 0)()
	index := c.model.Index()
	kept, from, err := c.keptVariate(task.Round)
	if err != nil {
		return runner.Result{}, err
	}
	ci := kept.Index()
	// corr = c − c_i, for every float tensor of x; it becomes c_i⁺ below.
	corr := make(map[string]*tensor.Tensor, len(x))
	for _, t := range x {
		if !t.DType.IsFloat() {
			continue
		}
		cs := index[experiment.ScaffoldPrefix+t.Name]
		if cs == nil || cs.DType != tensor.F32 || !slices.Equal(cs.Shape, t.Shape) {
			return runner.Result{}, fmt.Errorf("SCAFFOLD: the round's model has no F32 control variate %s%s of %s's shape %v", experiment.ScaffoldPrefix, t.Name, t.Name, t.Shape)
		}
		d := cs.Clone()
		d.Name = t.Name
		if k := ci[t.Name]; k != nil {
			if !tensor.SameLayout(k, d) {
				return runner.Result{}, fmt.Errorf("SCAFFOLD: the site's control variate of %s (kept in %s) is %s%v, the model's %v: remove the file to start the site's variate again from zero",
					t.Name, filepath.Join(c.cfg.WorkDir, scaffoldFile), k.DType, k.Shape, t.Shape)
			}
			ds, ks := d.Float32s(), k.Float32s()
			for i := range ds {
				ds[i] -= ks[i]
			}
		}
		corr[t.Name] = d
	}
	if len(corr) == 0 {
		return runner.Result{}, errors.New("SCAFFOLD: the round's model has no float tensors to correct")
	}
	task.Scaffold = &runner.Scaffold{Correction: corr}
	res, err := c.cfg.Runner.Train(ctx, task, x)
	if err != nil {
		return res, err
	}
	if err := x.Matches(res.Model); err != nil {
		return res, fmt.Errorf("the runner's trained model does not match the global model: %w", err)
	}
	kη := float64(res.Steps) * res.StepSize
	if res.Steps <= 0 || !(kη > 0) || math.IsInf(kη, 0) {
		return res, fmt.Errorf("SCAFFOLD: the runner reported %d local steps of size %v: it must report how many steps it took (K ≥ 1) and their size (η > 0) to update the site's control variate", res.Steps, res.StepSize)
	}
	y := res.Model.Index()
	deltas := make(map[string]*tensor.Tensor, len(corr))
	next := make(tensor.Model, 0, len(corr))
	for _, t := range x {
		d := corr[t.Name]
		if d == nil {
			continue
		}
		xs, err := t.Float32Copy()
		if err != nil {
			return res, err
		}
		ys, err := y[t.Name].Float32Copy()
		if err != nil {
			return res, err
		}
		var old []float32
		if k := ci[t.Name]; k != nil {
			old = k.Float32s()
		}
		delta := tensor.New(experiment.ScaffoldPrefix+t.Name, tensor.F32, t.Shape)
		ds, dv := d.Float32s(), delta.Float32s()
		for i := range ds {
			// c_i⁺ = c_i − c + (x − y)/(Kη) = (x − y)/(Kη) − (c − c_i)
			ds[i] = float32(float64(xs[i]-ys[i])/kη) - ds[i]
			dv[i] = ds[i]
			if old != nil {
				dv[i] -= old[i]
			}
		}
		if err := delta.CheckFinite(); err != nil {
			return res, fmt.Errorf("SCAFFOLD: the site's control variate diverged: %w", err)
		}
		deltas[t.Name] = delta
		next = append(next, d)
	}
	if err := c.keepVariate(task.Round, next); err != nil {
		return res, err
	}
	c.log.Debug("SCAFFOLD: the site's control variate updated", "round", task.Round, "steps", res.Steps, "step_size", res.StepSize, "previous_from_round", from)
	// The upload: y under the weights' names, Δc_i under c's, in the global
	// model's order.
	upload := make(tensor.Model, 0, len(c.model))
	for _, t := range c.model {
		if name, ok := controlled(t.Name); ok {
			upload = append(upload, deltas[name])
		} else {
			upload = append(upload, y[t.Name])
		}
	}
	res.Model = upload
	return res, nil
}

// f32Bytes is the size of m's float tensors in F32.
func f32Bytes(m tensor.Model) int64 {
	var n int64
	for _, t := range m {
		if t.DType.IsFloat() {
			n += 4 * t.Elements()
		}
	}
	return n
}

// controlled returns the name of the tensor a control variate's name is of.
func controlled(name string) (string, bool) {
	if !experiment.IsControlVariate(name) {
		return "", false
	}
	return name[len(experiment.ScaffoldPrefix):], true
}

// keptVariate returns the newest control variate the site kept from a
// round before round, and that round; an empty model (zero) if none.
func (c *Collaborator) keptVariate(round int) (tensor.Model, int, error) {
	for _, name := range []string{scaffoldFile, scaffoldPrevFile} {
		m, meta, err := tensor.ReadFile(filepath.Join(c.cfg.WorkDir, name))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, 0, fmt.Errorf("SCAFFOLD: the site's control variate: %w", err)
		}
		made, err := strconv.Atoi(meta[localRound])
		if err != nil {
			return nil, 0, fmt.Errorf("SCAFFOLD: the site's control variate (%s): no round recorded", name)
		}
		if made < round {
			return m, made, nil
		}
	}
	return nil, 0, nil
}

// keepVariate keeps the site's control variate c_i⁺ made in round,
// durably, as pending until its upload is taken (confirmVariate).
func (c *Collaborator) keepVariate(round int, ci tensor.Model) error {
	if err := tensor.WriteFile(filepath.Join(c.cfg.WorkDir, scaffoldNextFile), ci, map[string]string{localRound: strconv.Itoa(round)}); err != nil {
		return fmt.Errorf("SCAFFOLD: keep the site's control variate: %w", err)
	}
	return nil
}

// confirmVariate makes the pending variate of round the site's, once the
// aggregator took round's train upload: the newest file kept so far moves
// aside if an earlier round made it. Nothing is pending when the upload
// was of results kept from before (it was confirmed then).
func (c *Collaborator) confirmVariate(round int) error {
	if !c.cfg.Scaffold {
		return nil
	}
	next := filepath.Join(c.cfg.WorkDir, scaffoldNextFile)
	h, err := tensor.ReadHeaderFile(next)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("SCAFFOLD: the site's pending control variate: %w", err)
	}
	if r, err := strconv.Atoi(h.Metadata[localRound]); err != nil || r != round {
		return nil // another round's, whose upload was not taken
	}
	cur := filepath.Join(c.cfg.WorkDir, scaffoldFile)
	if h, err := tensor.ReadHeaderFile(cur); err == nil {
		if r, err := strconv.Atoi(h.Metadata[localRound]); err == nil && r < round {
			if err := os.Rename(cur, filepath.Join(c.cfg.WorkDir, scaffoldPrevFile)); err != nil {
				return fmt.Errorf("SCAFFOLD: keep the site's control variate: %w", err)
			}
		}
	}
	if err := os.Rename(next, cur); err != nil {
		return fmt.Errorf("SCAFFOLD: keep the site's control variate: %w", err)
	}
	return nil
}
