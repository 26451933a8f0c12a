package tensor

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
)

// OptimizerKind names a server-side adaptive optimiser of Reddi et al.,
// "Adaptive Federated Optimization" (ICLR 2021).
type OptimizerKind string

// The server optimisers. Their names are the plan's aggregation algorithms.
const (
	FedAdam    OptimizerKind = "fedadam"
	FedYogi    OptimizerKind = "fedyogi"
	FedAdagrad OptimizerKind = "fedadagrad"
)

// OptimizerConfig holds the hyper-parameters of a server optimiser. Start from
// DefaultOptimizerConfig: a zero field is taken literally (β1 = 0 is a valid
// choice), not as "use the default".
type OptimizerConfig struct {
	Kind OptimizerKind
	// LR is the server learning rate η.
	LR float64
	// Beta1 is the momentum decay, in [0, 1).
	Beta1 float64
	// Beta2 is the second-moment decay of Adam and Yogi, in [0, 1); Adagrad ignores it.
	Beta2 float64
	// Tau is the adaptivity τ added to sqrt(v); it also sets v's initial value τ².
	Tau float64
}

// DefaultOptimizerConfig returns η = 0.01, β1 = 0.9, β2 = 0.99, τ = 1e-3.
//
// β1, β2 and τ are the values Reddi et al. use throughout. η needs a word: once
// m and v have warmed up, |m|/sqrt(v) is about 1, so every coordinate moves by
// about η per round whatever the scale of the pseudo-gradient. η is therefore
// a step in weight units, and 0.01 is a cautious one for networks whose weights
// are of order 0.01–1; the paper's tuned server rates range from 1e-3 to 1
// depending on the task, so expect to tune it.
func DefaultOptimizerConfig(kind OptimizerKind) OptimizerConfig {
	return OptimizerConfig{Kind: kind, LR: 0.01, Beta1: 0.9, Beta2: 0.99, Tau: 1e-3}
}

// Validate checks the kind and the ranges of the hyper-parameters.
func (c OptimizerConfig) Validate() error {
	switch c.Kind {
	case FedAdam, FedYogi, FedAdagrad:
	default:
		return fmt.Errorf("unknown server optimiser %q (want %s, %s or %s)", c.Kind, FedAdam, FedYogi, FedAdagrad)
	}
	if !(c.LR > 0) || math.IsInf(c.LR, 0) {
		return fmt.Errorf("%s: learning rate %v must be positive and finite", c.Kind, c.LR)
	}
	if !(c.Beta1 >= 0 && c.Beta1 < 1) {
		return fmt.Errorf("%s: beta1 %v is outside [0, 1)", c.Kind, c.Beta1)
	}
	if c.Kind != FedAdagrad && !(c.Beta2 >= 0 && c.Beta2 < 1) {
		return fmt.Errorf("%s: beta2 %v is outside [0, 1)", c.Kind, c.Beta2)
	}
	if !(c.Tau > 0) || math.IsInf(c.Tau, 0) {
		return fmt.Errorf("%s: tau %v must be positive and finite", c.Kind, c.Tau)
	}
	return nil
}

// Optimizer applies a server optimiser round after round. Its state, the first
// and second moments m and v of every float tensor, persists across rounds and
// can be saved as a Model (State) and restored (RestoreOptimizer), so a
// checkpoint can keep it in a safetensors file next to the model.
//
// The state is float32 for F32, F16 and BF16 tensors and float64 for F64
// tensors, so an F16 model does not lose its small moments to half precision.
// Integer tensors have no state; Step takes them from the averaged update.
// Memory: two working-precision copies of the model.
type Optimizer struct {
	cfg    OptimizerConfig
	layout Model    // names, dtypes and shapes of the model (no data)
	names  []string // float tensors, in layout order
	m, v   map[string]*Tensor
}

// State tensors are named "m/<tensor>" and "v/<tensor>".
const (
	statePrefixM = "m/"
	statePrefixV = "v/"
)

// stateDType is the dtype of the moments of a tensor of dtype d.
func stateDType(d DType) DType {
	if d == F64 {
		return F64
	}
	return F32
}

// NewOptimizer starts an optimiser for models laid out like layout (only names,
// dtypes and shapes are used), with m = 0 and v = τ² as in the paper.
func NewOptimizer(cfg OptimizerConfig, layout Model) (*Optimizer, error) {
	o, err := newOptimizer(cfg, layout)
	if err != nil {
		return nil, err
	}
	tau2 := cfg.Tau * cfg.Tau
	for _, name := range o.names {
		v := o.v[name]
		if v.DType == F64 {
			vs := v.Float64s()
			for i := range vs {
				vs[i] = tau2
			}
		} else {
			vs := v.Float32s()
			for i := range vs {
				vs[i] = float32(tau2)
			}
		}
	}
	return o, nil
}

func newOptimizer(cfg OptimizerConfig, layout Model) (*Optimizer, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	o := &Optimizer{cfg: cfg, m: map[string]*Tensor{}, v: map[string]*Tensor{}}
	seen := make(map[string]bool, len(layout))
	for _, t := range layout {
		if err := ValidateName(t.Name); err != nil {
			return nil, err
		}
		if _, err := CheckShape(t.DType, t.Shape); err != nil {
			return nil, fmt.Errorf("tensor %q: %w", t.Name, err)
		}
		if seen[t.Name] {
			return nil, fmt.Errorf("tensor %q appears twice", t.Name)
		}
		seen[t.Name] = true
		o.layout = append(o.layout, &Tensor{Name: t.Name, DType: t.DType, Shape: slices.Clone(t.Shape)})
		if !t.DType.IsFloat() {
			continue
		}
		if err := ValidateName(statePrefixM + t.Name); err != nil {
			return nil, fmt.Errorf("optimiser state for tensor %q: %w", t.Name, err)
		}
		o.names = append(o.names, t.Name)
		o.m[t.Name] = New(statePrefixM+t.Name, stateDType(t.DType), t.Shape)
		o.v[t.Name] = New(statePrefixV+t.Name, stateDType(t.DType), t.Shape)
	}
	return o, nil
}

// Config returns the optimiser's hyper-parameters.
func (o *Optimizer) Config() OptimizerConfig { return o.cfg }

// State returns a copy of the moments as a Model of tensors "m/<name>" and
// "v/<name>", in layout order, ready for WriteFile together with Metadata.
func (o *Optimizer) State() Model {
	out := make(Model, 0, 2*len(o.names))
	for _, name := range o.names {
		out = append(out, o.m[name].Clone(), o.v[name].Clone())
	}
	return out
}

// Metadata describes the optimiser in safetensors metadata strings, so a saved
// state says what produced it; RestoreOptimizer checks the kind against it.
func (o *Optimizer) Metadata() map[string]string {
	f := func(x float64) string { return strconv.FormatFloat(x, 'g', -1, 64) }
	return map[string]string{
		"fx.optimizer":       string(o.cfg.Kind),
		"fx.optimizer.lr":    f(o.cfg.LR),
		"fx.optimizer.beta1": f(o.cfg.Beta1),
		"fx.optimizer.beta2": f(o.cfg.Beta2),
		"fx.optimizer.tau":   f(o.cfg.Tau),
	}
}

// RestoreOptimizer rebuilds an optimiser from a saved State. The state must
// hold exactly the m and v tensors layout calls for. If metadata (as written by
// Metadata) is given, its kind must match cfg's; hyper-parameters come from
// cfg, so a resumed experiment may change them deliberately.
func RestoreOptimizer(cfg OptimizerConfig, layout Model, state Model, metadata map[string]string) (*Optimizer, error) {
	if k, ok := metadata["fx.optimizer"]; ok && OptimizerKind(k) != cfg.Kind {
		return nil, fmt.Errorf("optimiser state was saved by %s, not %s", k, cfg.Kind)
	}
	o, err := newOptimizer(cfg, layout)
	if err != nil {
		return nil, err
	}
	want := Model{}
	for _, name := range o.names {
		want = append(want, o.m[name], o.v[name])
	}
	if err := state.Validate(); err != nil {
		return nil, fmt.Errorf("optimiser state: %w", err)
	}
	if err := want.Matches(state); err != nil {
		return nil, fmt.Errorf("optimiser state does not fit the model: %w", err)
	}
	for _, t := range state {
		if err := t.CheckFinite(); err != nil {
			return nil, fmt.Errorf("optimiser state: %w", err)
		}
		name, isM := strings.CutPrefix(t.Name, statePrefixM)
		if isM {
			copy(o.m[name].Data, t.Data)
		} else {
			name = strings.TrimPrefix(t.Name, statePrefixV)
			copy(o.v[name].Data, t.Data)
		}
	}
	return o, nil
}

// Step applies one round: with Δ = avg − global, it updates m and v and
// returns global + η·m/(sqrt(v)+τ). Neither argument is modified; both must
// match the optimiser's layout. The state changes only if Step succeeds: a
// non-finite result (an average holding NaN or Inf) leaves it as it was.
func (o *Optimizer) Step(global, avg Model) (Model, error) {
	if err := global.Validate(); err != nil {
		return nil, fmt.Errorf("%s: global model: %w", o.cfg.Kind, err)
	}
	if err := global.Matches(avg); err != nil {
		return nil, fmt.Errorf("%s: average does not match the global model: %w", o.cfg.Kind, err)
	}
	if err := avg.Validate(); err != nil {
		return nil, fmt.Errorf("%s: average: %w", o.cfg.Kind, err)
	}
	if err := o.layout.Matches(global); err != nil {
		return nil, fmt.Errorf("%s: global model does not fit the optimiser state: %w", o.cfg.Kind, err)
	}
	avgIdx := avg.Index()
	out := make(Model, 0, len(global))
	newM := make(map[string]*Tensor, len(o.names))
	newV := make(map[string]*Tensor, len(o.names))
	for _, g := range global {
		a := avgIdx[g.Name]
		if !g.DType.IsFloat() {
			out = append(out, a.Clone())
			continue
		}
		// New moments go to new tensors so that a failed step leaves the old ones.
		m, v := o.m[g.Name], o.v[g.Name]
		m2, v2 := New(m.Name, m.DType, m.Shape), New(v.Name, v.DType, v.Shape)
		x := g.Clone()
		switch g.DType {
		case F64:
			optStep(o.cfg, x.Float64s(), a.Float64s(), m.Float64s(), v.Float64s(), m2.Float64s(), v2.Float64s())
		case F32:
			optStep(o.cfg, x.Float32s(), a.Float32s(), m.Float32s(), v.Float32s(), m2.Float32s(), v2.Float32s())
		default:
			xs, err := x.Float32Copy()
			if err != nil {
				return nil, err
			}
			as, err := a.Float32Copy()
			if err != nil {
				return nil, err
			}
			optStep(o.cfg, xs, as, m.Float32s(), v.Float32s(), m2.Float32s(), v2.Float32s())
			if err := x.SetFloat32(xs); err != nil {
				return nil, err
			}
		}
		if err := x.CheckFinite(); err != nil {
			return nil, fmt.Errorf("%s: updated model is not finite (the average holds NaN or Inf, or the step overflowed): %w", o.cfg.Kind, err)
		}
		newM[g.Name], newV[g.Name] = m2, v2
		out = append(out, x)
	}
	o.m, o.v = newM, newV
	return out, nil
}

// optStep updates x in place from the average avg and the moments m, v,
// writing the new moments to m2, v2; element-wise, in one parallel pass.
func optStep[T float](cfg OptimizerConfig, x, avg, m, v, m2, v2 []T) {
	lr, b1, b2, tau := T(cfg.LR), T(cfg.Beta1), T(cfg.Beta2), T(cfg.Tau)
	kind := cfg.Kind
	parallelBlocks(len(x), blockElems, func(lo, hi int) {
		x := x[lo:hi]
		avg, m, v, m2, v2 := avg[lo:hi], m[lo:hi], v[lo:hi], m2[lo:hi], v2[lo:hi]
		avg, m, v, m2, v2 = avg[:len(x)], m[:len(x)], v[:len(x)], m2[:len(x)], v2[:len(x)]
		for i := range x {
			d := avg[i] - x[i]
			mi := b1*m[i] + (1-b1)*d
			d2 := d * d
			vi := v[i]
			switch kind {
			case FedAdagrad:
				vi += d2
			case FedAdam:
				vi = b2*vi + (1-b2)*d2
			case FedYogi:
				vi -= (1 - b2) * d2 * sign(vi-d2)
			}
			m2[i], v2[i] = mi, vi
			x[i] += lr * mi / (T(math.Sqrt(float64(vi))) + tau)
		}
	})
}

func sign[T float](x T) T {
	switch {
	case x > 0:
		return 1
	case x < 0:
		return -1
	}
	return 0
}
