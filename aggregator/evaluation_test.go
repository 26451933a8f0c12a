package aggregator_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/runner"
)

const evaluation = `
name: eval
rounds: 1
participants: {min: 2}
runner: {kind: builtin, model: mlp}
stragglers: {deadline: 30s, min_reporting: 2}
tasks: [aggregated_model_validation]
`

// An evaluation runs one round in which every site validates the initial
// model, trains nothing and writes no model; its score is the samples'
// weighted mean of the sites', and the model it scored is the best. A
// restarted aggregator finds it finished.
func TestEvaluationRound(t *testing.T) {
	f := newFederation(t, parsePlan(t, evaluation), "alpha", "beta", "gamma")
	f.start()
	ctx := t.Context()
	runners := []*stepRunner{
		{Samples: 100, Accuracy: func(int) float64 { return 0.9 }},
		{Samples: 300, Accuracy: func(int) float64 { return 0.7 }},
		{Samples: 100, Accuracy: func(int) float64 { return 0.5 }},
	}
	f.runToEnd(ctx, runners)
	for i, r := range runners {
		if got, want := r.tasks(), []runner.Task{{Name: runner.TaskAggregatedValidation, Round: 1}}; !slices.Equal(got, want) {
			t.Errorf("%s ran %v, want %v", f.parts[i], got, want)
		}
	}
	sums := f.sink.summaries()
	if len(sums) != 1 || sums[0].Round != 1 {
		t.Fatalf("summaries %+v, want round 1 alone", sums)
	}
	s := sums[0]
	if len(s.Results) != 3 {
		t.Errorf("results %+v, want one per site", s.Results)
	}
	// (100·0.9 + 300·0.7 + 100·0.5) / 500 = 0.7
	if got := s.Aggregates[runner.TaskAggregatedValidation]["accuracy"]; !near(got, 0.7) {
		t.Errorf("overall accuracy %v, want 0.7", got)
	}
	if !slices.Equal(s.Reported, []string{"alpha", "beta", "gamma"}) || len(s.Missing) != 0 {
		t.Errorf("reported %v, missing %v; want every site reported", s.Reported, s.Missing)
	}
	if b := f.sink.best; b == nil || b.Round != 0 || !near(b.Value, 0.7) {
		t.Errorf("best = %+v, want the given model (round 0) at 0.7", b)
	}
	models, err := os.ReadDir(filepath.Dir(aggregator.ModelPath(f.dir, 0)))
	if err != nil || len(models) != 1 {
		t.Errorf("models kept: %v (%v), want the given model's alone", models, err)
	}
	if !equalFloats(values(readModel(t, f.dir, 0), "fc.weight"), values(f.initial, "fc.weight")) {
		t.Error("the kept model is not the one given")
	}

	f.start() // a restarted director's aggregator
	if err := f.wait(10 * time.Second); err != nil {
		t.Fatalf("restarted Run: %v", err)
	}
	if n := len(f.sink.summaries()); n != 1 {
		t.Errorf("the restarted aggregator ran %d more rounds, want none", n-1)
	}
}

// An evaluation that closes at its deadline with fewer sites' scores than
// min_reporting fails, naming the sites missing.
func TestEvaluationTooFewReports(t *testing.T) {
	plan := parsePlan(t, strings.Replace(evaluation, "deadline: 30s", "deadline: 1s", 1))
	f := newFederation(t, plan, "alpha", "beta")
	f.start()
	f.collab(t.Context(), "alpha", &stepRunner{Samples: 10}, t.TempDir())
	want := "the evaluation closed with results from 1 of the 2 sites stragglers.min_reporting requires (missing: [beta])"
	if err := f.wait(30 * time.Second); err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("Run: %v, want %q", err, want)
	}
}
