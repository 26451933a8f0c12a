package aggregator_test

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/fx-fl/fx/aggregator"
)

// roundsOf lists the rounds of the summaries the sink heard, in order.
func roundsOf(s *recordingSink) []int {
	var out []int
	for _, sum := range s.summaries() {
		out = append(out, sum.Round)
	}
	return out
}

// waitTrained waits until runner has been asked to train round.
func waitTrained(t *testing.T, r *stepRunner, round int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !slices.ContainsFunc(r.tasks(), func(task runnerTask) bool { return task.Name == "train" && task.Round == round }) {
		if time.Now().After(deadline) {
			t.Fatalf("no collaborator trained round %d within 30 s (tasks: %v)", round, r.tasks())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The next round runs while the last round's files are written: with the
// save of round 1 held, the collaborators download round 2's model (from
// memory) and train it, and round 1 is not reported completed, nor its
// model file there, until the save has happened. Then every round
// completes once, in order, with the model FedAvg gives.
func TestNextRoundRunsWhileTheRoundIsWritten(t *testing.T) {
	f := newFederation(t, parsePlan(t, threeRounds), "alpha", "beta")
	f.start()
	gate := make(chan struct{})
	aggregator.HoldSaves(f.agg, gate)
	ctx := t.Context()
	alpha, beta := &stepRunner{Step: 1, Samples: 1}, &stepRunner{Step: 3, Samples: 1}
	done := []<-chan error{f.collab(ctx, "alpha", alpha, t.TempDir()), f.collab(ctx, "beta", beta, t.TempDir())}

	waitTrained(t, alpha, 2)
	waitTrained(t, beta, 2)
	if got := roundsOf(f.sink); len(got) != 0 {
		t.Fatalf("rounds %v reported completed while round 1's files were not written", got)
	}
	if _, err := os.Stat(aggregator.ModelPath(f.dir, 1)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("round 1's model file is there before its save ran: %v", err)
	}
	close(gate)
	if err := f.wait(30 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	for _, d := range done {
		if err := <-d; !finished(err) {
			t.Errorf("collaborator: %v, want quit", err)
		}
	}
	if got := roundsOf(f.sink); !slices.Equal(got, []int{1, 2, 3, 4}) {
		t.Fatalf("rounds completed %v, want 1 to 4 once each, in order", got)
	}
	for round, want := range map[int]float32{1: 2, 2: 4, 3: 6} {
		if got := values(readModel(t, f.dir, round), "fc.bias"); !equalFloats(got, []float32{want, want}) {
			t.Errorf("round %d's bias %v, want [%v %v]", round, got, want, want)
		}
	}
}

// A crash before the round's files are written loses the round's files,
// never the experiment: the aggregator stopped with round 1's save held
// (round 2 under way) resumes from the initial model, runs round 1 again
// (it was never reported completed), and every round completes once.
func TestRoundNotWrittenRunsAgainAfterACrash(t *testing.T) {
	f := newFederation(t, parsePlan(t, threeRounds), "alpha", "beta")
	f.start()
	aggregator.HoldSaves(f.agg, make(chan struct{})) // never released
	ctx := t.Context()
	alpha, beta := &stepRunner{Step: 1, Samples: 1}, &stepRunner{Step: 3, Samples: 1}
	done := []<-chan error{f.collab(ctx, "alpha", alpha, t.TempDir()), f.collab(ctx, "beta", beta, t.TempDir())}
	waitTrained(t, alpha, 2)
	if err := f.stop(); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run after cancel: %v", err)
	}
	if got := roundsOf(f.sink); len(got) != 0 {
		t.Fatalf("rounds %v reported completed by the stopped aggregator, whose saves were held", got)
	}
	if _, err := os.Stat(aggregator.ModelPath(f.dir, 1)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("round 1's model file was written although its save was held: %v", err)
	}

	f.start() // the same directory and address: the collaborators come back
	if err := f.wait(60 * time.Second); err != nil {
		t.Fatalf("Run after the restart: %v", err)
	}
	for _, d := range done {
		if err := <-d; !finished(err) {
			t.Errorf("collaborator: %v, want quit", err)
		}
	}
	if got := roundsOf(f.sink); !slices.Equal(got, []int{1, 2, 3, 4}) {
		t.Fatalf("rounds completed %v, want 1 to 4 once each, in order", got)
	}
	if got := values(readModel(t, f.dir, 3), "fc.bias"); !equalFloats(got, []float32{6, 6}) {
		t.Fatalf("final bias %v, want [6 6]", got)
	}
}
