package aggregator

import (
	"math"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/tensor"
)

// TestScaffoldStepByHand: x = [1, 2], c = [0.5, −1], an integer step
// counter; the round's mean update is y = [3, 0], Δc = [1, 2], step 7. With
// η_g = 0.5 and 2 of 4 sites reporting (|S|/N = 0.5):
// x ← x + 0.5·(y − x) = [2, 1]; c ← c + 0.5·Δc = [1, 0]; the counter is
// FedAvg's, 7. With η_g = 1 the new x is the mean itself.
func TestScaffoldStepByHand(t *testing.T) {
	global := func() tensor.Model {
		return tensor.Model{
			tensor.FromFloat32("w", []int64{2}, []float32{1, 2}),
			tensor.FromFloat32("scaffold.c/w", []int64{2}, []float32{0.5, -1}),
			tensor.New("steps", tensor.I64, []int64{1}),
		}
	}
	mean := func() tensor.Model {
		m := tensor.Model{
			tensor.FromFloat32("w", []int64{2}, []float32{3, 0}),
			tensor.FromFloat32("scaffold.c/w", []int64{2}, []float32{1, 2}),
			tensor.New("steps", tensor.I64, []int64{1}),
		}
		m[2].Data[0] = 7
		return m
	}
	for _, tc := range []struct {
		lr    float64
		wantX []float32
	}{{0.5, []float32{2, 1}}, {1, []float32{3, 0}}, {2, []float32{5, -2}}} {
		g := global()
		next, err := scaffoldStep(g, mean(), tc.lr, 0.5)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			name string
			want []float32
		}{{"w", tc.wantX}, {"scaffold.c/w", []float32{1, 0}}} {
			got := next.Get(c.name).Float32s()
			for i := range c.want {
				if math.Abs(float64(got[i]-c.want[i])) > 1e-6 {
					t.Errorf("η_g %v: %s = %v, want %v", tc.lr, c.name, got, c.want)
				}
			}
		}
		if next.Get("steps").Data[0] != 7 {
			t.Errorf("η_g %v: the integer tensor is %v, want the mean's 7", tc.lr, next.Get("steps").Data[0])
		}
		if g.Get("w").Float32s()[0] != 1 || g.Get("scaffold.c/w").Float32s()[0] != 0.5 {
			t.Errorf("η_g %v: the global model was modified", tc.lr)
		}
	}
	if _, err := scaffoldStep(global(), tensor.Model{tensor.FromFloat32("w", []int64{3}, []float32{1, 2, 3})}, 1, 1); err == nil {
		t.Error("a mean that does not fit the global model was accepted")
	}
}

// TestAddControlVariates: a zero F32 variate for every float tensor, none
// for integer ones; a model's own variates are kept if they fit and refused
// otherwise.
func TestAddControlVariates(t *testing.T) {
	plan := func() *Aggregator {
		p := mustPlan(t, "aggregation: {algorithm: scaffold}")
		return &Aggregator{plan: p, log: hclog.NewNullLogger()}
	}
	a := plan()
	a.cfg.InitialModel = tensor.Model{
		tensor.FromFloat32("w", []int64{2, 3}, []float32{1, 2, 3, 4, 5, 6}),
		tensor.New("h", tensor.F16, []int64{4}),
		tensor.New("steps", tensor.I64, []int64{1}),
	}
	if err := a.addControlVariates(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, tt := range a.cfg.InitialModel {
		got = append(got, tt.Name)
	}
	want := []string{"w", "h", "steps", "scaffold.c/w", "scaffold.c/h"}
	if len(got) != len(want) {
		t.Fatalf("tensors %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("tensors %v, want %v", got, want)
		}
	}
	if c := a.cfg.InitialModel.Get("scaffold.c/h"); c.DType != tensor.F32 || c.Elements() != 4 {
		t.Errorf("scaffold.c/h is %s%v, want F32[4]", c.DType, c.Shape)
	}
	// Kept as they are a second time (a model a SCAFFOLD experiment made).
	again := plan()
	again.cfg.InitialModel = a.cfg.InitialModel
	if err := again.addControlVariates(); err != nil || len(again.cfg.InitialModel) != 5 {
		t.Fatalf("a model with its variates: %v, %d tensors", err, len(again.cfg.InitialModel))
	}
	for _, bad := range []tensor.Model{
		{tensor.FromFloat32("w", []int64{2}, []float32{1, 2}), tensor.FromFloat32("scaffold.c/w", []int64{3}, []float32{1, 2, 3})},
		{tensor.FromFloat32("w", []int64{2}, []float32{1, 2}), tensor.FromFloat32("scaffold.c/v", []int64{2}, []float32{1, 2})},
		{tensor.New("steps", tensor.I64, []int64{1})},
	} {
		b := plan()
		b.cfg.InitialModel = bad
		if err := b.addControlVariates(); err == nil {
			t.Errorf("%v: accepted", bad)
		}
	}
}

// mustPlan parses a small builtin plan with the given aggregation line.
func mustPlan(t *testing.T, aggregation string) *experiment.Plan {
	t.Helper()
	p, err := experiment.ParsePlan([]byte("name: t\nrounds: 1\nrunner: {kind: builtin, model: mlp}\n" + aggregation + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	return p
}
