package aggregator_test

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/runner"
)

const threeRounds = `
name: test
rounds: 3
participants: {min: 2}
runner: {kind: builtin, model: mlp}
stragglers: {deadline: 30s, min_reporting: 1}
`

// FedAvg over three collaborators for three rounds: each round every weight
// moves by the sample-weighted mean of the steps, computed here by hand.
func TestRoundsFedAvg(t *testing.T) {
	f := newFederation(t, parsePlan(t, threeRounds), "alpha", "beta", "gamma")
	f.start()
	ctx := t.Context()
	runners := []*stepRunner{
		{Step: 1, Samples: 1, Accuracy: func(r int) float64 { return 0.5 + 0.1*float64(r) }},
		{Step: 2, Samples: 2, Accuracy: func(r int) float64 { return 0.4 + 0.1*float64(r) }},
		{Step: 4, Samples: 1, Accuracy: func(r int) float64 { return 0.3 + 0.1*float64(r) }},
	}
	f.runToEnd(ctx, runners)
	// Σ w·step / Σ w = (1·1 + 2·2 + 1·4) / 4 = 2.25 per round.
	const perRound = 2.25
	for round := 0; round <= 3; round++ {
		got := values(readModel(t, f.dir, round), "fc.weight")
		want := []float32{1, 2, 3, 4, 5, 6}
		for i := range want {
			want[i] += perRound * float32(round)
		}
		if !equalFloats(got, want) {
			t.Errorf("round %d weights %v, want %v", round, got, want)
		}
	}
	sums := f.sink.summaries()
	// Three training rounds and one that validates the final model.
	if len(sums) != 4 {
		t.Fatalf("%d round summaries, want 4", len(sums))
	}
	for i, s := range sums {
		if s.Round != i+1 {
			t.Errorf("summary %d is round %d", i, s.Round)
		}
	}
	// Aggregated validation in round r scores round r-1's model:
	// (1·(0.5+0.1r) + 2·(0.4+0.1r) + 1·(0.3+0.1r)) / 4 = 0.4 + 0.1r.
	for _, s := range sums {
		want := 0.4 + 0.1*float64(s.Round)
		if got := s.Aggregates[runner.TaskAggregatedValidation]["accuracy"]; !near(got, want) {
			t.Errorf("round %d aggregated accuracy %v, want %v", s.Round, got, want)
		}
	}
	if !slices.Equal(sums[0].Reported, []string{"alpha", "beta", "gamma"}) {
		t.Errorf("round 1 reported %v", sums[0].Reported)
	}
	if got := sums[3].Results; len(got) != 3 || got[0].Task != runner.TaskAggregatedValidation {
		t.Errorf("final round results %+v, want one validation per collaborator", got)
	}
	// Best by max accuracy: the final validation round (4) scores round 3's model.
	if b := f.sink.best; b == nil || b.Round != 3 || !near(b.Value, 0.8) {
		t.Errorf("best = %+v, want round 3 at 0.8", b)
	}
	hist, best, err := aggregator.History(f.dir)
	if err != nil || len(hist) != 4 || best == nil || best.Round != 3 {
		t.Errorf("History = %d rounds, best %+v, %v", len(hist), best, err)
	}
	// Each collaborator ran each task once per round, in plan order.
	want := []runner.Task{}
	for r := 1; r <= 3; r++ {
		for _, task := range f.plan.Tasks {
			want = append(want, runner.Task{Name: task, Round: r})
		}
	}
	want = append(want, runner.Task{Name: runner.TaskAggregatedValidation, Round: 4})
	if got := runners[1].tasks(); !slices.Equal(got, want) {
		t.Errorf("beta ran %v, want %v", got, want)
	}
	if _, err := os.Stat(filepath.Join(f.dir, "spool")); err == nil {
		entries, _ := os.ReadDir(filepath.Join(f.dir, "spool"))
		if len(entries) != 0 {
			t.Errorf("spool holds %d leftover files", len(entries))
		}
	}
}

func near(a, b float64) bool { d := a - b; return d < 1e-9 && d > -1e-9 }
