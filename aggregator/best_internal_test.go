package aggregator

import (
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/runner"
)

// TestBestCoversEveryParticipant: a round whose validation leaves out a
// participant (a straggler's result missing) cannot become the best model,
// however good the mean of the others.
func TestBestCoversEveryParticipant(t *testing.T) {
	plan := experiment.DefaultPlan()
	plan.Rounds = 5
	a := &Aggregator{plan: &plan, log: hclog.NewNullLogger()}
	amv := func(round int, accs map[string]float64) RoundSummary {
		s := RoundSummary{Round: round, Aggregates: map[string]map[string]float64{}}
		sum := 0.0
		for name, acc := range accs {
			s.Results = append(s.Results, TaskResult{Collaborator: name, Task: runner.TaskAggregatedValidation, Samples: 1, Metrics: map[string]float64{"accuracy": acc}})
			sum += acc
		}
		s.Aggregates[runner.TaskAggregatedValidation] = map[string]float64{"accuracy": sum / float64(len(accs))}
		return s
	}
	a.best = a.scoreBest(amv(2, map[string]float64{"a": 0.75, "b": 0.25}), 2)
	if a.best == nil || a.best.Round != 1 || a.best.Value != 0.5 {
		t.Fatalf("best after a round both sites scored: %+v", a.best)
	}
	// Round 3: only site a, the easy one, reported.
	if b := a.scoreBest(amv(3, map[string]float64{"a": 0.9}), 2); b != a.best {
		t.Errorf("a score over 1 of 2 participants became the best: %+v", b)
	}
	// Once b has dropped out for good, one site is every participant.
	if b := a.scoreBest(amv(3, map[string]float64{"a": 0.9}), 1); b == nil || b.Round != 2 || b.Value != 0.9 {
		t.Errorf("best after b dropped: %+v", b)
	}
}
