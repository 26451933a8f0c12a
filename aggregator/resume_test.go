package aggregator_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// waitProgress waits until a collaborator's progress says it reported
// every task of round.
func (s *recordingSink) waitProgress(t *testing.T, name string, round int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		s.mu.Lock()
		done := false
		for _, p := range s.progress {
			done = done || (p.Collaborator == name && p.LastRound >= round)
		}
		s.mu.Unlock()
		if done {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not report every task of round %d within %s", name, round, timeout)
		}
		<-time.After(10 * time.Millisecond)
	}
}

// countTasks counts a runner's calls of one task in one round.
func countTasks(r *stepRunner, task string, round int) int {
	n := 0
	for _, c := range r.tasks() {
		if c.Name == task && c.Round == round {
			n++
		}
	}
	return n
}

// TestResumedRoundTakesFinishedResults: the aggregator stops (its director
// restarts) in round 2 after alpha has reported all of its tasks and
// before beta has. The restarted aggregator hands round 2 out again; alpha
// sends the results it computed before, trained weights included, without
// running a task again, and beta finishes the task it was running.
func TestResumedRoundTakesFinishedResults(t *testing.T) {
	f := newFederation(t, parsePlan(t, threeRounds), "alpha", "beta")
	f.start()
	ctx := t.Context()
	gate := make(chan struct{})
	alphaRunner := &stepRunner{Step: 1, Samples: 1}
	slowBeta := &gatedRunner{stepRunner: stepRunner{Step: 3, Samples: 1}, gate: gate, gateRound: 2}
	alpha := f.collab(ctx, "alpha", alphaRunner, t.TempDir())
	beta := f.collab(ctx, "beta", slowBeta, t.TempDir())
	f.sink.waitProgress(t, "alpha", 2, 20*time.Second)
	if err := f.stop(); err == nil {
		t.Fatal("a cancelled aggregator returned nil")
	}

	f.sink = newSink()
	f.start()
	close(gate) // beta's round-2 train, running all along, ends now
	if err := f.wait(30 * time.Second); err != nil {
		t.Fatalf("resumed Run: %v", err)
	}
	for name, done := range map[string]<-chan error{"alpha": alpha, "beta": beta} {
		if err := <-done; !finished(err) {
			t.Errorf("%s: %v", name, err)
		}
	}
	for _, task := range threeRoundTasks(t) {
		if n := countTasks(alphaRunner, task, 2); n != 1 {
			t.Errorf("alpha ran %s of round 2 %d times, want once: its results were computed again after the restart", task, n)
		}
		if n := countTasks(&slowBeta.stepRunner, task, 2); n != 1 {
			t.Errorf("beta ran %s of round 2 %d times, want once", task, n)
		}
	}
	sums := f.sink.summaries()
	if len(sums) == 0 || sums[0].Round != 2 || strings.Join(sums[0].Reported, ",") != "alpha,beta" {
		t.Fatalf("the resumed round 2: %+v, want both updates", sums)
	}
	// Round 2 averaged both updates: (1+3)/2 on top of round 1's 2.
	if got := values(readModel(t, f.dir, 2), "fc.bias"); !equalFloats(got, []float32{4, 4}) {
		t.Errorf("round 2 bias %v, want [4 4]", got)
	}
}

// threeRoundTasks is the task list of the threeRounds plan.
func threeRoundTasks(t *testing.T) []string {
	return parsePlan(t, threeRounds).Tasks
}

const resumeGracePlan = `
name: test
rounds: 2
participants: {min: 2}
runner: {kind: builtin, model: mlp}
stragglers: {deadline: 500ms, min_reporting: 1}
`

// interruptRound2 runs round 1 with alpha and beta, then stops the
// aggregator in round 2 and the collaborators with it, as a director
// killed mid-round would leave them.
func interruptRound2(t *testing.T, f *federation) {
	t.Helper()
	f.start()
	ctx, stop := context.WithCancel(t.Context())
	gate := make(chan struct{}) // never opened: round 2 stays open
	a := f.collab(ctx, "alpha", &gatedRunner{stepRunner: stepRunner{Step: 1, Samples: 1}, gate: gate, gateRound: 2}, t.TempDir())
	b := f.collab(ctx, "beta", &gatedRunner{stepRunner: stepRunner{Step: 3, Samples: 1}, gate: gate, gateRound: 2}, t.TempDir())
	f.sink.waitRounds(t, 1, 20*time.Second)
	if err := f.stop(); err == nil {
		t.Fatal("a cancelled aggregator returned nil")
	}
	stop()
	<-a
	<-b
}

// TestResumedRoundWaitsForParticipants: a resumed round's deadline counts
// once its participants are back, not from the restart. Here they come back
// after four of the plan's 500ms deadlines, well within the rejoin grace,
// and the round completes with both; before, it closed at the deadline with
// no report and the experiment failed.
func TestResumedRoundWaitsForParticipants(t *testing.T) {
	f := newFederation(t, parsePlan(t, resumeGracePlan), "alpha", "beta")
	interruptRound2(t, f)

	f.sink = newSink()
	f.grace = time.Minute
	f.start()
	<-time.After(2 * time.Second) // the participants are away, as while envoys reconnect
	if err := f.runErr(); err != nil {
		t.Fatalf("the resumed round did not wait for its participants: %v", err)
	}
	ctx := t.Context()
	alpha := f.collab(ctx, "alpha", &stepRunner{Step: 1, Samples: 1}, t.TempDir())
	beta := f.collab(ctx, "beta", &stepRunner{Step: 3, Samples: 1}, t.TempDir())
	if err := f.wait(30 * time.Second); err != nil {
		t.Fatalf("resumed Run: %v", err)
	}
	<-alpha
	<-beta
	sums := f.sink.summaries()
	if len(sums) == 0 || sums[0].Round != 2 || strings.Join(sums[0].Reported, ",") != "alpha,beta" {
		t.Fatalf("the resumed round 2: %+v, want both updates", sums)
	}
}

// TestResumedRoundGraceEnds: a participant that does not come back is a
// straggler once the rejoin grace is over: the round closes at the grace
// plus the deadline with the participant that did come back.
func TestResumedRoundGraceEnds(t *testing.T) {
	f := newFederation(t, parsePlan(t, resumeGracePlan), "alpha", "beta")
	interruptRound2(t, f)

	f.sink = newSink()
	f.grace = time.Second
	restarted := time.Now()
	f.start()
	alpha := f.collab(t.Context(), "alpha", &stepRunner{Step: 1, Samples: 1}, t.TempDir())
	if err := f.wait(30 * time.Second); err != nil {
		t.Fatalf("resumed Run: %v", err)
	}
	<-alpha
	sums := f.sink.summaries()
	if len(sums) == 0 || sums[0].Round != 2 || strings.Join(sums[0].Reported, ",") != "alpha" || strings.Join(sums[0].Missing, ",") != "beta" {
		t.Fatalf("the resumed round 2: %+v, want alpha's update and beta missing", sums)
	}
	if took, least := time.Since(restarted), f.grace+500*time.Millisecond; took < least {
		t.Errorf("the resumed round closed %s after the restart, before the grace and the deadline (%s) were over", took, least)
	}
}

// runErr is Run's result if it has returned (an error, or "returned" for
// nil), or nil while it runs.
func (f *federation) runErr() error {
	select {
	case err := <-f.done:
		f.done <- err
		if err == nil {
			return errors.New("Run returned")
		}
		return err
	default:
		return nil
	}
}
