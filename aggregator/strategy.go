package aggregator

import (
	"context"
	"fmt"
	"slices"
	"sync"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/tensor"
)

// Strategy is an aggregation rule of your own: at a training round's close
// it gets the round's train updates, whole, and the model the round started
// from, and returns the round's new global model. Register it with
// RegisterStrategy in an fx binary of your own (see cmd/fx/app and
// examples/custom-strategy); a plan names it in aggregation.algorithm and
// configures it in aggregation.options.
//
// Like median and krum, a strategy keeps every update whole until the
// round closes: the aggregator holds N+2 models for N sites (the updates,
// the global model and the result), where fedavg holds about two. Rules
// that need only a weighted sum are cheaper as fedavg or a server
// optimiser.
//
// A strategy holds no state of its own across rounds: the aggregator
// checkpoints models, not strategies, so after a restart a round runs
// again with only the global model to go on. It must not modify the
// models it is given.
type Strategy interface {
	Aggregate(ctx context.Context, round StrategyRound) (tensor.Model, error)
}

// StrategyFunc makes a function a Strategy.
type StrategyFunc func(ctx context.Context, round StrategyRound) (tensor.Model, error)

// Aggregate calls f.
func (f StrategyFunc) Aggregate(ctx context.Context, round StrategyRound) (tensor.Model, error) {
	return f(ctx, round)
}

// OptionsChecker is implemented by a strategy that takes options: the
// director calls CheckOptions on a plan's aggregation.options at
// submission, so a bad option is refused there, with the error's message
// shown to the researcher, rather than when the first round closes.
type OptionsChecker interface {
	CheckOptions(options map[string]any) error
}

// StrategyRound is what a strategy aggregates.
type StrategyRound struct {
	// Number is the round, from 1.
	Number int
	// Global is the model the round started from, which the updates were
	// trained from, less the tensors the plan keeps at the sites
	// (aggregation.local), which are never uploaded. Read only.
	Global tensor.Model
	// Updates are the round's train updates, in the order they arrived;
	// at least stragglers.min_reporting of them. Each has Global's
	// tensors (names, dtypes, shapes), with finite values.
	Updates []Update
	// Options are the plan's aggregation.options, as YAML decoded them
	// (numbers are int or float64); nil when it gives none.
	Options map[string]any
}

// Update is one site's trained model and its weight under the plan's
// aggregation.weights: its train samples by default (bounded by those its
// envoy registered), or 1 with weights: equal.
type Update struct {
	Model  tensor.Model
	Weight float64
}

var strategies = struct {
	sync.RWMutex
	m map[string]Strategy
}{m: map[string]Strategy{}}

// RegisterStrategy makes s the aggregation algorithm name in this process:
// plans may name it, the director accepts them, and its aggregators run
// it. Call it before app.Main (in main or an init function). It panics on
// a name that is built in or taken, or that is not lowercase letters,
// digits, '_' and '-', as experiment.RegisterAlgorithm does.
func RegisterStrategy(name string, s Strategy) {
	if s == nil {
		panic("aggregator.RegisterStrategy: nil strategy for " + name)
	}
	var check func(map[string]any) error
	if c, ok := s.(OptionsChecker); ok {
		check = c.CheckOptions
	}
	experiment.RegisterAlgorithm(name, check) // panics first on a bad name
	strategies.Lock()
	defer strategies.Unlock()
	strategies.m[name] = s
}

// strategyFor returns the strategy registered as algorithm, if any.
func strategyFor(algorithm string) (Strategy, bool) {
	strategies.RLock()
	defer strategies.RUnlock()
	s, ok := strategies.m[algorithm]
	return s, ok
}

// runStrategy aggregates a round with the plan's strategy and checks what
// it returns as strictly as an upload: the next round's model must be
// what every site can load.
func (a *Aggregator) runStrategy(ctx context.Context, r *roundState) (tensor.Model, error) {
	updates := make([]Update, len(r.updates))
	for i, m := range r.updates {
		updates[i] = Update{Model: m, Weight: r.weights[i]}
	}
	name := a.plan.Aggregation.Algorithm
	out, err := a.strategy.Aggregate(ctx, StrategyRound{Number: r.number, Global: a.shared(a.model), Updates: updates, Options: a.plan.Aggregation.Options})
	if err != nil {
		return nil, fmt.Errorf("strategy %s: %w", name, err)
	}
	if slices.Contains(out, nil) {
		return nil, fmt.Errorf("strategy %s returned a model with a nil tensor", name)
	}
	if err := out.Validate(); err != nil {
		return nil, fmt.Errorf("strategy %s returned an invalid model: %w", name, err)
	}
	if err := a.layout.Matches(out); err != nil {
		return nil, fmt.Errorf("strategy %s returned a model unlike the global one: %w", name, err)
	}
	for _, t := range out {
		if err := t.CheckFinite(); err != nil {
			return nil, fmt.Errorf("strategy %s returned tensor %q: %w", name, t.Name, err)
		}
	}
	a.log.Info("round aggregated by a registered strategy", "round", r.number, "strategy", name, "updates", len(updates))
	// In the global model's order, which the round file and the sites'
	// decoders follow.
	index := out.Index()
	ordered := make(tensor.Model, len(a.layout))
	for i, t := range a.layout {
		ordered[i] = index[t.Name]
	}
	return ordered, nil
}
