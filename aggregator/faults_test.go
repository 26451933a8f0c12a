package aggregator_test

import (
	"context"
	"testing"
	"time"
)

const shortDeadline = `
name: test
rounds: 3
participants: {min: 2}
runner: {kind: builtin, model: mlp}
stragglers: {deadline: 1500ms, min_reporting: 1}
`

// A collaborator that stops mid-round: the round closes at its deadline with
// the others; when it comes back it rejoins the round in progress.
func TestStragglerStopsAndRejoins(t *testing.T) {
	f := newFederation(t, parsePlan(t, shortDeadline), "alpha", "beta")
	f.start()
	ctx := t.Context()
	alpha := f.collab(ctx, "alpha", &stepRunner{Step: 1, Samples: 1}, t.TempDir())

	// beta blocks in its first train task, then is stopped.
	betaDir := t.TempDir()
	stuck := &stepRunner{Step: 3, Samples: 1, block: true}
	betaCtx, stopBeta := context.WithCancel(ctx)
	beta := f.collab(betaCtx, "beta", stuck, betaDir)
	f.sink.waitRounds(t, 1, 20*time.Second)
	stopBeta()
	<-beta

	r1 := f.sink.summaries()[0]
	if len(r1.Reported) != 1 || r1.Reported[0] != "alpha" || len(r1.Missing) != 1 || r1.Missing[0] != "beta" {
		t.Fatalf("round 1 reported %v, missing %v; want alpha alone, beta missing", r1.Reported, r1.Missing)
	}
	// Round 1 averaged alpha's update alone.
	if got := values(readModel(t, f.dir, 1), "fc.bias"); !equalFloats(got, []float32{1, 1}) {
		t.Fatalf("round 1 bias %v, want [1 1]", got)
	}

	// beta restarts with a working runner and the same work directory.
	beta = f.collab(ctx, "beta", &stepRunner{Step: 3, Samples: 1}, betaDir)
	if err := f.wait(30 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if err := <-alpha; !finished(err) {
		t.Errorf("alpha: %v", err)
	}
	if err := <-beta; !finished(err) {
		t.Errorf("beta: %v", err)
	}
	// beta reported in a later training round.
	joined := false
	for _, s := range f.sink.summaries()[1:3] {
		for _, name := range s.Reported {
			joined = joined || name == "beta"
		}
	}
	if !joined {
		t.Fatalf("beta never reported after rejoining: %+v", f.sink.summaries())
	}
}

// An aggregator stopped after a round and started again on its directory
// resumes from the next round; its collaborators carry on.
func TestAggregatorResumesFromCheckpoint(t *testing.T) {
	plan := parsePlan(t, threeRounds)
	f := newFederation(t, plan, "alpha", "beta")
	f.start()
	ctx := t.Context()
	gate := make(chan struct{})
	slowBeta := &gatedRunner{stepRunner: stepRunner{Step: 3, Samples: 1}, gate: gate, gateRound: 2}
	alphaCtx, stopAlpha := context.WithCancel(ctx)
	betaCtx, stopBeta := context.WithCancel(ctx)
	alpha := f.collab(alphaCtx, "alpha", &stepRunner{Step: 1, Samples: 1}, t.TempDir())
	beta := f.collab(betaCtx, "beta", slowBeta, t.TempDir())
	f.sink.waitRounds(t, 1, 20*time.Second)
	// Round 2 cannot close while beta is held; stop the aggregator now.
	if err := f.stop(); err == nil {
		t.Fatal("a cancelled aggregator returned nil")
	}
	stopAlpha()
	stopBeta()
	<-alpha
	<-beta
	close(gate)

	f.sink = newSink()
	f.start()
	alpha = f.collab(ctx, "alpha", &stepRunner{Step: 1, Samples: 1}, t.TempDir())
	beta = f.collab(ctx, "beta", &stepRunner{Step: 3, Samples: 1}, t.TempDir())
	if err := f.wait(30 * time.Second); err != nil {
		t.Fatalf("resumed Run: %v", err)
	}
	<-alpha
	<-beta
	sums := f.sink.summaries()
	if len(sums) == 0 || sums[0].Round != 2 {
		t.Fatalf("resumed aggregator's first round is %+v, want round 2", sums)
	}
	// Three rounds of (1+3)/2 = 2 each.
	if got := values(readModel(t, f.dir, 3), "fc.bias"); !equalFloats(got, []float32{6, 6}) {
		t.Fatalf("final bias %v, want [6 6]", got)
	}
}

// gatedRunner's train waits for gate in gateRound.
type gatedRunner struct {
	stepRunner
	gate      chan struct{}
	gateRound int
}

func (g *gatedRunner) Train(ctx context.Context, task runnerTask, m modelT) (runnerResult, error) {
	if task.Round == g.gateRound {
		select {
		case <-g.gate:
		case <-ctx.Done():
			return runnerResult{}, ctx.Err()
		}
	}
	return g.stepRunner.Train(ctx, task, m)
}
