package tensor

import (
	"encoding/binary"
	"math"
	"path/filepath"
	"strings"
	"testing"
)

// refOpt is the update rule of Reddi et al. written out for one coordinate in
// float64, as the reference the optimiser is checked against.
type refOpt struct {
	kind                  OptimizerKind
	lr, b1, b2, tau, m, v float64
}

func (r *refOpt) step(x, avg float64) float64 {
	d := avg - x
	r.m = r.b1*r.m + (1-r.b1)*d
	switch r.kind {
	case FedAdagrad:
		r.v = r.v + d*d
	case FedAdam:
		r.v = r.b2*r.v + (1-r.b2)*d*d
	case FedYogi:
		s := 0.0
		if r.v-d*d > 0 {
			s = 1
		} else if r.v-d*d < 0 {
			s = -1
		}
		r.v = r.v - (1-r.b2)*d*d*s
	}
	return x + r.lr*r.m/(math.Sqrt(r.v)+r.tau)
}

func optModel(x []float32, x64 []float64, steps uint64) Model {
	w := FromFloat32("w", []int64{int64(len(x))}, x)
	d := New("d", F64, []int64{int64(len(x64))})
	copy(d.Float64s(), x64)
	h := New("h", F16, []int64{int64(len(x))})
	if err := h.SetFloat32(x); err != nil {
		panic(err)
	}
	s := New("steps", I64, []int64{})
	binary.LittleEndian.PutUint64(s.Data, steps)
	return Model{w, d, h, s}
}

func TestOptimizers(t *testing.T) {
	// Three rounds; the averages pull coordinates different ways, including
	// one where the pseudo-gradient changes sign (exercising Yogi's sign term).
	x0 := []float32{0.5, -1, 0, 2}
	avgs := [][]float32{{0.75, -1.5, 0.01, 2}, {0.5, -1.25, -0.5, 2.5}, {1, -1, 0.25, 1.5}}
	for _, kind := range []OptimizerKind{FedAdam, FedYogi, FedAdagrad} {
		t.Run(string(kind), func(t *testing.T) {
			cfg := DefaultOptimizerConfig(kind)
			cfg.LR = 0.1
			global := optModel(x0, []float64{0.5, -1, 0, 2}, 1)
			opt, err := NewOptimizer(cfg, global)
			if err != nil {
				t.Fatal(err)
			}
			refs := make([]refOpt, len(x0))
			want := make([]float64, len(x0))
			for i := range refs {
				refs[i] = refOpt{kind: kind, lr: cfg.LR, b1: cfg.Beta1, b2: cfg.Beta2, tau: cfg.Tau, v: cfg.Tau * cfg.Tau}
				want[i] = float64(x0[i])
			}
			for round, a := range avgs {
				a64 := make([]float64, len(a))
				for i := range a {
					a64[i] = float64(a[i])
				}
				avg := optModel(a, a64, uint64(10+round))
				next, err := opt.Step(global, avg)
				if err != nil {
					t.Fatal(err)
				}
				for i := range want {
					want[i] = refs[i].step(want[i], float64(a[i]))
				}
				for i, w := range want {
					if g := float64(next.Get("w").Float32s()[i]); math.Abs(g-w) > 1e-5 {
						t.Errorf("round %d F32 element %d = %v, want %v", round, i, g, w)
					}
					if g := next.Get("d").Float64s()[i]; math.Abs(g-w) > 1e-12 {
						t.Errorf("round %d F64 element %d = %v, want %v", round, i, g, w)
					}
				}
				if s := binary.LittleEndian.Uint64(next.Get("steps").Data); s != uint64(10+round) {
					t.Errorf("integer tensor = %d, want the average's %d", s, 10+round)
				}
				// The F16 tensor follows its own rounded trajectory; check it
				// stays within half precision of the reference.
				h, _ := next.Get("h").Float32Copy()
				for i, w := range want {
					if math.Abs(float64(h[i])-w) > 0.01*(math.Abs(w)+1) {
						t.Errorf("round %d F16 element %d = %v, want about %v", round, i, h[i], w)
					}
				}
				global = next
			}
		})
	}
}

func TestOptimizerInitialState(t *testing.T) {
	cfg := DefaultOptimizerConfig(FedAdam)
	opt, err := NewOptimizer(cfg, optModel([]float32{1, 2}, []float64{1, 2}, 0))
	if err != nil {
		t.Fatal(err)
	}
	state := opt.State()
	wantNames := []string{"m/w", "v/w", "m/d", "v/d", "m/h", "v/h"}
	if len(state) != len(wantNames) {
		t.Fatalf("state has %d tensors, want %d", len(state), len(wantNames))
	}
	for i, name := range wantNames {
		if state[i].Name != name {
			t.Errorf("state tensor %d is %q, want %q", i, state[i].Name, name)
		}
	}
	// v starts at τ² = 1e-6, m at 0.
	if v := state.Get("v/w").Float32s(); v[0] != float32(1e-6) || v[1] != float32(1e-6) {
		t.Errorf("v/w = %v, want τ² = 1e-6", v)
	}
	if v := state.Get("v/d").Float64s(); v[0] != 1e-6 {
		t.Errorf("v/d = %v, want 1e-6", v)
	}
	if m := state.Get("m/h"); m.DType != F32 || m.Float32s()[0] != 0 {
		t.Errorf("m/h = %s %v, want F32 zeros", m.DType, m.Float32s())
	}
}

func TestOptimizerStateRoundTrip(t *testing.T) {
	cfg := DefaultOptimizerConfig(FedYogi)
	global := optModel([]float32{1, 2, 3}, []float64{1, 2, 3}, 0)
	avg1 := optModel([]float32{1.5, 1, 3}, []float64{1.5, 1, 3}, 0)
	avg2 := optModel([]float32{2, 0, 4}, []float64{2, 0, 4}, 0)
	opt, err := NewOptimizer(cfg, global)
	if err != nil {
		t.Fatal(err)
	}
	g1, err := opt.Step(global, avg1)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "opt.safetensors")
	if err := WriteFile(path, opt.State(), opt.Metadata()); err != nil {
		t.Fatal(err)
	}
	state, md, err := ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	restored, err := RestoreOptimizer(cfg, global, state, md)
	if err != nil {
		t.Fatal(err)
	}
	want, err := opt.Step(g1, avg2)
	if err != nil {
		t.Fatal(err)
	}
	got, err := restored.Step(g1, avg2)
	if err != nil {
		t.Fatal(err)
	}
	assertModelsEqual(t, got, want)

	var reshaped Model
	for _, t := range state {
		if t.Name == "m/w" {
			t = New("m/w", F32, []int64{2})
		}
		reshaped = append(reshaped, t)
	}
	tests := []struct {
		name  string
		cfg   OptimizerConfig
		state Model
		md    map[string]string
		want  string
	}{
		{"other kind", DefaultOptimizerConfig(FedAdam), state, md, "saved by fedyogi"},
		{"missing tensor", cfg, state[1:], md, "missing"},
		{"wrong shape", cfg, reshaped, nil, "want F32[3]"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := RestoreOptimizer(tc.cfg, global, tc.state, tc.md); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

func TestOptimizerRejects(t *testing.T) {
	base := DefaultOptimizerConfig(FedAdam)
	with := func(f func(*OptimizerConfig)) OptimizerConfig {
		c := base
		f(&c)
		return c
	}
	configs := []struct {
		name string
		cfg  OptimizerConfig
		want string
	}{
		{"kind", with(func(c *OptimizerConfig) { c.Kind = "fedsgd" }), "unknown server optimiser"},
		{"lr", with(func(c *OptimizerConfig) { c.LR = 0 }), "learning rate"},
		{"beta1", with(func(c *OptimizerConfig) { c.Beta1 = 1 }), "beta1"},
		{"beta2", with(func(c *OptimizerConfig) { c.Beta2 = -0.1 }), "beta2"},
		{"tau", with(func(c *OptimizerConfig) { c.Tau = math.Inf(1) }), "tau"},
	}
	global := optModel([]float32{1, 2}, []float64{1, 2}, 0)
	for _, tc := range configs {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewOptimizer(tc.cfg, global); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
	adagrad := DefaultOptimizerConfig(FedAdagrad)
	adagrad.Beta2 = 7 // ignored by Adagrad
	if _, err := NewOptimizer(adagrad, global); err != nil {
		t.Errorf("Adagrad with an unused beta2: %v", err)
	}

	// A NaN average fails the step and leaves the state untouched.
	opt, err := NewOptimizer(base, global)
	if err != nil {
		t.Fatal(err)
	}
	before := opt.State()
	nan := optModel([]float32{1, float32(math.NaN())}, []float64{1, 2}, 0)
	if _, err := opt.Step(global, nan); err == nil || !strings.Contains(err.Error(), "not finite") {
		t.Fatalf("NaN step: err = %v", err)
	}
	assertModelsEqual(t, opt.State(), before)
	other := Model{FromFloat32("x", []int64{2}, []float32{1, 2})}
	if _, err := opt.Step(other, other); err == nil || !strings.Contains(err.Error(), "does not fit") {
		t.Errorf("foreign model: err = %v", err)
	}
	if _, err := opt.Step(global, other); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Errorf("mismatched average: err = %v", err)
	}
}
