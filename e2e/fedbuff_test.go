package e2e

import (
	"strings"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// TestFedBuff: the built-in MLP trained in asynchronous rounds (FedBuff,
// aggregation.mode async, buffer 2) over three envoys, as real processes.
// Every server step closes with exactly K = 2 train updates (a third that
// arrives meanwhile counts in the next step), the experiment finishes its
// steps, and the final model, scored by every site in the validation round
// after the last step, is useful.
func TestFedBuff(t *testing.T) {
	requireE2E(t)
	sites := []string{"site-1", "site-2", "site-3"}
	f := newFed(t, []string{"alice"}, sites)
	f.startDirector(directorOptions{})
	for i, s := range sites {
		f.startEnvoy(s, syntheticShard(i+1, 3, ""))
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, sites...)

	const steps = 6
	plan := strings.Replace(syntheticPlan("fedbuff", steps, "", ""), "aggregation: {algorithm: fedavg}",
		"aggregation: {mode: async, buffer: 2}", 1)
	plan = strings.Replace(plan, "participants: {min: 2,", "participants: {min: 3,", 1)
	f.submit("alice", writePlan(t, plan))
	done := f.waitState(c, "fedbuff", 3*time.Minute, fxv1.ExperimentState_FINISHED)
	if done.GetRound() != steps {
		t.Errorf("finished at step %d, want %d", done.GetRound(), steps)
	}
	evs := f.watchEvents("alice", "fedbuff")
	for step := 1; step <= steps; step++ {
		if got := reporters(evs, step, runner.TaskTrain); len(got) != 2 {
			t.Errorf("step %d counted the train updates of %v, want exactly K = 2", step, got)
		}
	}
	agg := aggregates(t, evs)
	t.Logf("aggregated validation accuracy per step: %v", accuracies(agg, runner.TaskAggregatedValidation))
	if got := reporters(evs, steps+1, runner.TaskAggregatedValidation); len(got) != len(sites) {
		t.Errorf("the final model was scored by %v, want every site", got)
	}
	if acc := agg[steps+1][runner.TaskAggregatedValidation]["accuracy"]; acc < 0.6 {
		t.Errorf("the final model's aggregated validation accuracy is %.4f, want ≥ 0.6 on the easy synthetic data", acc)
	}
}

// TestFedBuffDirectorKilled: the director (and its aggregator) is killed
// with SIGKILL in the middle of an asynchronous experiment whose sites are
// slow and of different speeds. Restarted, it resumes from the last
// completed step: the updates in that step's buffer are lost, their sites
// train again, and the experiment finishes every step, each step's
// aggregates published once.
func TestFedBuffDirectorKilled(t *testing.T) {
	requireE2E(t)
	sites := []string{"site-1", "site-2", "site-3"}
	f := newFed(t, []string{"alice"}, sites)
	f.startDirector(directorOptions{})
	f.startEnvoy("site-1", syntheticShard(1, 3, "features: 64\ntrain_samples: 10000\nvalid_samples: 2000\n"))
	f.startEnvoy("site-2", syntheticShard(2, 3, "features: 64\ntrain_samples: 10000\nvalid_samples: 2000\n"))
	f.startEnvoy("site-3", slowShard(3, 3))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, sites...)

	const steps = 5
	plan := strings.Replace(syntheticPlan("fedbuff-kill", steps, slowHyper, ""), "aggregation: {algorithm: fedavg}",
		"aggregation: {mode: async, buffer: 2}", 1)
	plan = strings.Replace(plan, "participants: {min: 2,", "participants: {min: 3,", 1)
	f.submit("alice", writePlan(t, plan))
	var killStep int32
	f.waitFor(2*time.Minute, "a step past the first to run", func() (bool, error) {
		e, err := getExp(c, "fedbuff-kill")
		if err != nil {
			return false, err
		}
		if e.GetState() == fxv1.ExperimentState_FINISHED {
			t.Fatal("finished before the moment came")
		}
		killStep = e.GetRound()
		return e.GetState() == fxv1.ExperimentState_RUNNING && killStep >= 2 && killStep < steps, nil
	})
	f.director.kill(t)
	t.Logf("killed the director in step %d", killStep)
	f.restartDirector()
	done := f.waitState(c, "fedbuff-kill", 4*time.Minute, fxv1.ExperimentState_FINISHED)
	if done.GetRound() != steps {
		t.Errorf("finished at step %d, want %d", done.GetRound(), steps)
	}
	evs := f.watchEvents("alice", "fedbuff-kill")
	checkSequences(t, evs)
	agg := aggregates(t, evs) // fails on an aggregate published twice
	for step := 1; step <= steps; step++ {
		if got := reporters(evs, step, runner.TaskTrain); len(got) != 2 {
			t.Errorf("step %d counted the train updates of %v, want exactly K = 2", step, got)
		}
		if _, ok := agg[step][runner.TaskTrain]; !ok {
			t.Errorf("step %d: no train aggregate", step)
		}
	}
}
