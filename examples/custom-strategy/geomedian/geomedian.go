// Package geomedian is an example of an aggregation strategy of your own:
// the weighted geometric median of the sites' models, found by Weiszfeld's
// algorithm. The geometric median is the point with the least weighted sum
// of (Euclidean) distances to the updates, so, unlike the mean, a few
// updates far from the others move it only a little, and unlike the
// coordinate-wise median it treats the model as one vector (Pillutla et
// al. 2022, "Robust Aggregation for Federated Learning", call it RFA).
//
// Register it in a main package of your own (see ../main.go):
//
//	aggregator.RegisterStrategy(geomedian.Name, geomedian.Strategy{})
//
// and name it in a plan:
//
//	aggregation: {algorithm: geomedian, options: {iterations: 10}}
package geomedian

import (
	"context"
	"errors"
	"fmt"
	"math"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/tensor"
)

// Name is the strategy's aggregation.algorithm.
const Name = "geomedian"

// Defaults of the options.
const (
	// DefaultIterations: Weiszfeld's algorithm converges fast on a few
	// updates; RFA's authors found 3 to 10 enough.
	DefaultIterations = 10
	// DefaultEpsilon keeps an update that the estimate reaches from
	// getting an infinite weight (a distance below it counts as it).
	DefaultEpsilon = 1e-6
)

// Strategy is the geometric median as an aggregator.Strategy. Options
// (aggregation.options): iterations, an integer ≥ 1, and epsilon, a number
// > 0. F32 and F64 tensors are aggregated; other tensors (integer
// counters, say) keep the global model's values.
type Strategy struct{}

var _ aggregator.OptionsChecker = Strategy{}

// CheckOptions refuses options that Aggregate could not use, so that the
// director refuses the plan at submission.
func (Strategy) CheckOptions(o map[string]any) error {
	_, _, err := options(o)
	return err
}

func options(o map[string]any) (iterations int, epsilon float64, err error) {
	iterations, epsilon = DefaultIterations, DefaultEpsilon
	for k, v := range o {
		switch k {
		case "iterations":
			n, ok := v.(int)
			if !ok || n < 1 || n > 1000 {
				return 0, 0, fmt.Errorf("iterations must be an integer from 1 to 1000, got %v", v)
			}
			iterations = n
		case "epsilon":
			f, ok := v.(float64)
			if !ok || !(f > 0) || math.IsInf(f, 0) {
				return 0, 0, fmt.Errorf("epsilon must be a number > 0 such as 1e-6, got %v", v)
			}
			epsilon = f
		default:
			return 0, 0, fmt.Errorf("unknown option %q (geomedian takes iterations and epsilon)", k)
		}
	}
	return iterations, epsilon, nil
}

// Aggregate returns the weighted geometric median of the round's updates.
// It starts from their weighted mean and takes Weiszfeld steps: each
// update is weighted by its weight over its distance to the current
// estimate, and the estimate becomes their weighted mean.
func (Strategy) Aggregate(ctx context.Context, r aggregator.StrategyRound) (tensor.Model, error) {
	iterations, epsilon, err := options(r.Options)
	if err != nil {
		return nil, err
	}
	if len(r.Updates) == 0 {
		return nil, errors.New("no updates to aggregate")
	}
	// Each update as one vector of its float tensors, in float64.
	points := make([][]float64, len(r.Updates))
	for i, u := range r.Updates {
		if points[i], err = flatten(u.Model); err != nil {
			return nil, err
		}
	}
	beta := make([]float64, len(points))
	for i, u := range r.Updates {
		beta[i] = u.Weight
	}
	z := weightedMean(points, beta)
	for range iterations {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		for i, p := range points {
			beta[i] = r.Updates[i].Weight / max(distance(p, z), epsilon)
		}
		z = weightedMean(points, beta)
	}
	return unflatten(z, r.Global), nil
}

func flatten(m tensor.Model) ([]float64, error) {
	var out []float64
	for _, t := range m {
		switch t.DType {
		case tensor.F32:
			for _, v := range t.Float32s() {
				out = append(out, float64(v))
			}
		case tensor.F64:
			out = append(out, t.Float64s()...)
		case tensor.F16, tensor.BF16:
			return nil, fmt.Errorf("tensor %q is %s: this example handles F32 and F64 only", t.Name, t.DType)
		}
	}
	return out, nil
}

// unflatten puts z's values into a copy of the global model's float
// tensors, and keeps the others as they are.
func unflatten(z []float64, global tensor.Model) tensor.Model {
	out := make(tensor.Model, len(global))
	for i, t := range global {
		c := t.Clone()
		switch t.DType {
		case tensor.F32:
			vs := c.Float32s()
			for j := range vs {
				vs[j] = float32(z[j])
			}
			z = z[len(vs):]
		case tensor.F64:
			z = z[copy(c.Float64s(), z):]
		}
		out[i] = c
	}
	return out
}

func weightedMean(points [][]float64, w []float64) []float64 {
	out := make([]float64, len(points[0]))
	var total float64
	for _, x := range w {
		total += x
	}
	for i, p := range points {
		f := w[i] / total
		for j, v := range p {
			out[j] += f * v
		}
	}
	return out
}

func distance(a, b []float64) float64 {
	var s float64
	for i := range a {
		d := a[i] - b[i]
		s += d * d
	}
	return math.Sqrt(s)
}
