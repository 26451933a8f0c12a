package aggregator

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"go.opentelemetry.io/otel/trace"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/tensor"
)

// roundState is one round's reports, guarded by the aggregator's mutex.
type roundState struct {
	number   int
	tasks    []string
	deadline time.Time
	opened   time.Time // by the wall clock, for the round's duration metric
	// ctx carries the round's span (see internal/tracing), ended when the
	// round closes.
	ctx  context.Context
	span trace.Span
	// rejoining are the participants a resumed round waits for before its
	// deadline counts (see startRound); nil once none is awaited.
	rejoining map[string]bool

	closed   bool
	reported map[string]map[string]bool // collaborator → task → result counted
	inflight map[string]map[string]bool // collaborator → task → upload in progress
	results  []TaskResult
	trainers map[string]bool
	// committing counts accepted train uploads still folding into the sum;
	// the round's close waits for them. commitErr holds folds that failed
	// (a spilled stage that could not be read back), which fail the round.
	committing sync.WaitGroup
	commitErr  error
	// updates holds whole train updates for median, trimmed mean, krum,
	// multi-krum and registered strategies; weights their weights, which
	// only strategies use.
	updates []tensor.Model
	weights []float64
	// partial are train uploads whose connection broke, kept until they
	// are resumed, started over, or the round closes: by collaborator.
	partial map[string]*partialUpload
	// sec is the round's secure aggregation (secure.go), made on its
	// first message; nil without aggregation.secure.
	sec *secureRound
}

// partialUpload is what a broken train upload left: its stage, the decoder
// that checked its frames (its Position is what was received), and the
// header it started with.
type partialUpload struct {
	st     stage
	dec    *tensor.Decoder
	header *fxv1.ResultHeader
}

// takePartial removes and returns name's kept upload, if any. The caller
// holds a.mu.
func (r *roundState) takePartial(name string) *partialUpload {
	p := r.partial[name]
	delete(r.partial, name)
	return p
}

// dropPartials discards every kept upload (the round closed). The caller
// holds a.mu.
func (r *roundState) dropPartials() {
	for name, p := range r.partial {
		p.st.Discard()
		delete(r.partial, name)
	}
}

func newRoundState(n int, tasks []string, deadline time.Time) *roundState {
	return &roundState{
		number:   n,
		tasks:    tasks,
		deadline: deadline,
		ctx:      context.Background(),
		span:     trace.SpanFromContext(context.Background()),
		reported: map[string]map[string]bool{},
		inflight: map[string]map[string]bool{},
		trainers: map[string]bool{},
		partial:  map[string]*partialUpload{},
	}
}

// remaining lists the tasks a collaborator still owes, in plan order.
func (r *roundState) remaining(name string) []string {
	var out []string
	for _, t := range r.tasks {
		if !r.reported[name][t] {
			out = append(out, t)
		}
	}
	return out
}

func (r *roundState) completedAll(name string) bool { return len(r.remaining(name)) == 0 }

func mark(m map[string]map[string]bool, name, task string, v bool) {
	if m[name] == nil {
		m[name] = map[string]bool{}
	}
	m[name][task] = v
}

// stage receives one train upload's chunks, after the wire decoder has
// checked them against the model's layout, and counts the upload only on
// Commit: a refused upload never reaches the round's model. Keep may hold
// on to raw (a fresh gRPC message's bytes) rather than copy it.
type stage interface {
	Keep(name string, elem int64, raw []byte, dtype tensor.DType) error
	Commit(weight float64) error
	Discard()
}

// newStage picks how the round keeps a train upload. FedAvg and the server
// optimisers fold it into the Accumulator's running sum, staged while it
// streams in memory up to StageBudget (one model) and on disk beyond, so
// memory holds about two models however many collaborators upload at once. Median, trimmed mean, krum and multi-krum need every update at
// the round's close: they keep each one whole in memory, N models for N
// collaborators.
func (a *Aggregator) newStage(r *roundState) (stage, error) {
	if a.collects() {
		return &collectStage{a: a, r: r, model: newLike(a.layout)}, nil
	}
	return a.acc.Begin()
}

// collects reports whether the algorithm needs every update at once.
func (a *Aggregator) collects() bool {
	alg := a.plan.Aggregation.Algorithm
	return alg == "median" || alg == "trimmed_mean" || alg == "krum" || alg == "multi_krum" || a.strategy != nil
}

// collectStage assembles an update in memory for the algorithms that
// collect (see collects).
type collectStage struct {
	a     *Aggregator
	r     *roundState
	model tensor.Model
}

func (s *collectStage) Keep(name string, elem int64, raw []byte, dtype tensor.DType) error {
	t := s.model.Get(name)
	if t == nil || t.DType != dtype {
		return fmt.Errorf("unknown tensor %q", name)
	}
	if err := tensor.CheckFiniteRaw(raw, dtype, elem); err != nil {
		return fmt.Errorf("tensor %q: %w", name, err)
	}
	copy(t.Data[elem*int64(dtype.Size()):], raw)
	return nil
}

func (s *collectStage) Commit(weight float64) error {
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	s.r.updates = append(s.r.updates, s.model)
	s.r.weights = append(s.r.weights, weight)
	return nil
}

func (s *collectStage) Discard() { s.model = nil }

// newLike allocates a zeroed model with layout's tensors.
func newLike(layout tensor.Model) tensor.Model {
	out := make(tensor.Model, len(layout))
	for i, t := range layout {
		out[i] = tensor.New(t.Name, t.DType, t.Shape)
	}
	return out
}

// aggregate computes the round's new global model with the plan's algorithm.
func (a *Aggregator) aggregate(ctx context.Context, r *roundState) (tensor.Model, error) {
	if a.strategy != nil {
		return a.runStrategy(ctx, r)
	}
	switch a.plan.Aggregation.Algorithm {
	case "median":
		return tensor.Median(r.updates)
	case "trimmed_mean":
		return tensor.TrimmedMean(r.updates, a.plan.Aggregation.Trim)
	case "krum":
		return tensor.Krum(r.updates, a.plan.Aggregation.Byzantine)
	case "multi_krum":
		f, m := a.plan.Aggregation.Byzantine, a.plan.Aggregation.Select
		if m == 0 {
			m = len(r.updates) - f // the plan's default: all but f
		}
		return tensor.MultiKrum(r.updates, f, m)
	}
	if a.plan.Async() {
		mean, err := a.acc.TakeMean() // the mean update, Σ w·f(s)·Δ / Σ w·f(s)
		if err != nil {
			return nil, err
		}
		return asyncStep(a.shared(a.model), mean, a.plan.AsyncLR())
	}
	takeMean := a.acc.TakeMean
	if a.plan.Aggregation.Secure {
		takeMean = func() (tensor.Model, error) { return a.secureMean(ctx, r) }
	}
	avg, err := takeMean()
	if err != nil {
		return nil, err
	}
	if a.plan.Scaffold() {
		a.mu.Lock()
		trained := len(r.trainers)
		a.mu.Unlock()
		return a.scaffoldStep(a.model, avg, trained)
	}
	if a.opt == nil {
		return avg, nil
	}
	next, err := a.opt.Step(a.shared(a.model), avg)
	if err != nil {
		return nil, err
	}
	if a.acc != nil { // nil under secure aggregation, whose mean is a model of its own
		a.acc.GiveBack(avg) // the next round's sum reuses its memory
	}
	a.optSteps++
	return next, nil
}

// sortedKeys returns a map's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
