package geomedian

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/tensor"
)

// model is a two-tensor model, fc.weight = w and fc.bias = b, with an
// integer counter the strategy must leave as the global model has it.
func model(w, b float32, steps int64) tensor.Model {
	counter := tensor.New("steps", tensor.I64, []int64{1})
	counter.Data[0] = byte(steps)
	return tensor.Model{
		tensor.FromFloat32("fc.weight", []int64{1}, []float32{w}),
		tensor.FromFloat32("fc.bias", []int64{1}, []float32{b}),
		counter,
	}
}

func round(options map[string]any, weights []float64, points ...[2]float32) aggregator.StrategyRound {
	r := aggregator.StrategyRound{Number: 1, Global: model(-1, -1, 7), Options: options}
	for i, p := range points {
		r.Updates = append(r.Updates, aggregator.Update{Model: model(p[0], p[1], 99), Weight: weights[i]})
	}
	return r
}

func aggregate(t *testing.T, r aggregator.StrategyRound) (w, b float64, steps byte) {
	t.Helper()
	m, err := Strategy{}.Aggregate(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	if err := model(0, 0, 0).Matches(m); err != nil {
		t.Fatalf("the result's layout: %v", err)
	}
	return float64(m.Get("fc.weight").Float32s()[0]), float64(m.Get("fc.bias").Float32s()[0]), m.Get("steps").Data[0]
}

// Three sites at (0,0), (2,0) and (12,0), weighing 1 each. The weighted
// mean, Weiszfeld's start, is 14/3; the distances to it 14/3, 8/3 and
// 22/3, so one step weighs the points 3/14, 3/8 and 3/22 and moves to
//
//	(2·3/8 + 12·3/22) / (3/14 + 3/8 + 3/22) = (1470/616) / (447/616) = 490/149
//
// ≈ 3.2886, from the mean's 4.6667 towards the median, 2.
func TestOneWeiszfeldStep(t *testing.T) {
	w, b, steps := aggregate(t, round(map[string]any{"iterations": 1}, []float64{1, 1, 1}, [2]float32{0, 0}, [2]float32{2, 0}, [2]float32{12, 0}))
	if math.Abs(w-490.0/149) > 1e-5 || b != 0 {
		t.Fatalf("got (%v, %v), want (490/149 = %v, 0)", w, b, 490.0/149)
	}
	if steps != 7 {
		t.Fatalf("the integer tensor is %d, want the global model's 7", steps)
	}
}

// On a line the geometric median is the weighted median: 2 for equal
// weights, whatever the outlier at 1000; 12 once that site weighs more
// than the other two together. The mean would be 334 and about 600.
func TestConvergesToTheMedian(t *testing.T) {
	for _, c := range []struct {
		weights []float64
		want    float64
	}{
		{[]float64{1, 1, 1}, 2},
		{[]float64{1, 1, 3}, 1000},
	} {
		w, _, _ := aggregate(t, round(map[string]any{"iterations": 200, "epsilon": 1e-9}, c.weights, [2]float32{0, 3}, [2]float32{2, 3}, [2]float32{1000, 3}))
		if math.Abs(w-c.want) > 1e-2 {
			t.Errorf("weights %v: got %v, want %v", c.weights, w, c.want)
		}
	}
}

func TestCheckOptions(t *testing.T) {
	for _, c := range []struct {
		options map[string]any
		wants   string // "" when valid
	}{
		{nil, ""},
		{map[string]any{"iterations": 5, "epsilon": 1e-8}, ""},
		{map[string]any{"iterations": 0}, "iterations must be an integer from 1 to 1000"},
		{map[string]any{"iterations": 2.5}, "iterations must be an integer"},
		{map[string]any{"epsilon": -1.0}, "epsilon must be a number > 0"},
		{map[string]any{"iteration": 3}, `unknown option "iteration"`},
	} {
		err := Strategy{}.CheckOptions(c.options)
		if (c.wants == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.wants)) {
			t.Errorf("%v: got %v, want %q", c.options, err, c.wants)
		}
	}
}

// The example's plan is valid once the strategy is registered, as it is
// in the example's fx.
func TestExamplePlan(t *testing.T) {
	aggregator.RegisterStrategy(Name, Strategy{})
	data, err := os.ReadFile(filepath.Join("..", "experiment", experiment.PlanFile))
	if err != nil {
		t.Fatal(err)
	}
	p, err := experiment.ParsePlan(data)
	if err != nil {
		t.Fatal(err)
	}
	if p.Aggregation.Algorithm != Name || p.Aggregation.Options["iterations"] != 10 {
		t.Fatalf("aggregation %+v", p.Aggregation)
	}
}
