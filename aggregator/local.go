package aggregator

import (
	"fmt"
	"path"
	"strings"

	"github.com/fx-fl/fx/tensor"
)

// Personalised layers (aggregation.local): the sites keep the tensors the
// plan names and never upload them, so the aggregator's rounds are over the
// other tensors only. Uploads, the accumulator, the server optimiser and
// the strategies all see the shared tensors (a.layout); the global model a
// round hands out is whole, its local tensors at their initial values, so
// that a site without its own yet (a site's first round) starts from them
// and a downloaded model loads where the full model is expected.

// splitLocal checks aggregation.local against the model's tensors and
// returns copies of the local ones, nil when the plan keeps none. Every
// pattern must match a tensor, so that a typo does not quietly aggregate
// what was meant to stay at the sites, and at least one tensor must be
// left to aggregate.
func (a *Aggregator) splitLocal(m tensor.Model) (tensor.Model, error) {
	if err := a.checkSecureLayout(m); err != nil {
		return nil, err
	}
	agg := &a.plan.Aggregation
	if len(agg.Local) == 0 {
		return nil, nil
	}
	for _, p := range agg.Local {
		matched := false
		for _, t := range m {
			if ok, _ := path.Match(p, t.Name); ok {
				matched = true
				break
			}
		}
		if !matched {
			return nil, fmt.Errorf("aggregator: aggregation.local: %q matches none of the model's tensors (%s): fix the name or the pattern", p, tensorNames(m, 8))
		}
	}
	var local tensor.Model
	for _, t := range m {
		if agg.IsLocal(t.Name) {
			local = append(local, t.Clone())
		}
	}
	if len(local) == len(m) {
		return nil, fmt.Errorf("aggregator: aggregation.local (%s) matches every tensor of the model: nothing would be aggregated; keep only some layers local, such as the head", strings.Join(agg.Local, ", "))
	}
	return local, nil
}

// shared returns m's tensors that are aggregated: all of them unless the
// plan keeps some local. The tensors are m's own, not copies.
func (a *Aggregator) shared(m tensor.Model) tensor.Model {
	if a.local == nil || m == nil {
		return m
	}
	out := make(tensor.Model, 0, len(m)-len(a.local))
	for _, t := range m {
		if !a.plan.Aggregation.IsLocal(t.Name) {
			out = append(out, t)
		}
	}
	return out
}

// withLocal completes an aggregated model of the shared tensors with the
// local ones' initial values, in the whole model's order.
func (a *Aggregator) withLocal(next tensor.Model) tensor.Model {
	if a.local == nil {
		return next
	}
	agg, local := next.Index(), a.local.Index()
	out := make(tensor.Model, len(a.whole))
	for i, t := range a.whole {
		if u := local[t.Name]; u != nil {
			out[i] = u
		} else {
			out[i] = agg[t.Name]
		}
	}
	return out
}

func tensorNames(m tensor.Model, most int) string {
	var names []string
	for i, t := range m {
		if i == most {
			names = append(names, fmt.Sprintf("and %d more", len(m)-most))
			break
		}
		names = append(names, t.Name)
	}
	return strings.Join(names, ", ")
}
