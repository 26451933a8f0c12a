package e2e

import (
	"slices"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// slowShard is synthetic data big enough that one train task takes a
// second or more, so a test can act while a round is under way.
func slowShard(i, n int) shard {
	return syntheticShard(i, n, "features: 64\ntrain_samples: 60000\nvalid_samples: 2000\n")
}

const slowHyper = "hidden: [128], lr: 0.05, momentum: 0.9, batch_size: 64, epochs: 8"

// TestEnvoyKilledMidRound: an envoy dies (SIGKILL) while training; the
// round closes at the straggler deadline with the other envoy's update; the
// envoy, restarted with the same configuration and work directory, rejoins
// and reports in a later round; the experiment finishes.
func TestEnvoyKilledMidRound(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	f.startDirector(directorOptions{})
	f.startEnvoy("site-1", slowShard(1, 2))
	victim := f.startEnvoy("site-2", slowShard(2, 2))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")

	const rounds = 5
	start := time.Now()
	f.submit("alice", writePlan(t, syntheticPlan("straggler", rounds, slowHyper, "deadline: 3s, min_reporting: 1, percent: 1.0")))

	// Kill site-2 while it computes a round: it has been handed the
	// round's tasks and has reported none (a collaborator runs them all,
	// then uploads the results).
	var killRound int32
	f.waitFor(time.Minute, "site-2 computing a round", func() (bool, error) {
		e, err := getExp(c, "straggler")
		if err != nil {
			return false, err
		}
		p := participant(e, "site-2")
		if e.GetState() == fxv1.ExperimentState_RUNNING && p != nil && p.GetTask() != "" && p.GetLastRound() < e.GetRound() && e.GetRound() < rounds-2 {
			killRound = e.GetRound()
			return true, nil
		}
		if e.GetRound() >= rounds-2 {
			t.Fatalf("round %d reached before site-2 was seen computing", e.GetRound())
		}
		return false, nil
	})
	victim.kill(t)
	killed := time.Now()
	t.Logf("killed site-2 in round %d, %s after submitting", killRound, killed.Sub(start).Round(time.Millisecond))

	// The round closes without it, at the deadline.
	f.waitFor(30*time.Second, "the round site-2 died in to close", func() (bool, error) {
		e, err := getExp(c, "straggler")
		if err != nil {
			return false, err
		}
		return e.GetRound() > killRound || e.GetState() == fxv1.ExperimentState_FINISHED, nil
	})
	t.Logf("round %d closed %s after the kill", killRound, time.Since(killed).Round(time.Millisecond))

	// Back with the same configuration and work directory.
	victim.start(t)
	e := f.waitState(c, "straggler", 2*time.Minute, fxv1.ExperimentState_FINISHED)
	t.Logf("finished %s after submitting", time.Since(start).Round(time.Millisecond))
	if p := participant(e, "site-2"); p == nil || p.GetState() != fxv1.ParticipantState_COMPLETED {
		t.Errorf("site-2 ended as %v, want COMPLETED", p)
	}

	evs := f.watchEvents("alice", "straggler")
	checkSequences(t, evs)
	agg := aggregates(t, evs)
	for r := 1; r <= rounds; r++ {
		if _, ok := agg[r][runner.TaskTrain]; !ok {
			t.Errorf("round %d: no train aggregate", r)
		}
	}
	k := int(killRound)
	if got := reporters(evs, k, runner.TaskTrain); !slices.Equal(got, []string{"site-1"}) {
		t.Errorf("round %d (site-2 killed while training): train reported by %v, want only site-1", k, got)
	}
	rejoined := 0
	for r := k + 1; r <= rounds; r++ {
		if slices.Contains(reporters(evs, r, runner.TaskTrain), "site-2") {
			rejoined = r
			break
		}
	}
	if rejoined == 0 {
		t.Fatalf("site-2 never reported train after its restart (rounds %d..%d)", k+1, rounds)
	}
	t.Logf("site-2 rejoined and trained in round %d", rejoined)
}
