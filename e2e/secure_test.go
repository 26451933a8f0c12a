package e2e

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// TestSecureAggregation: a director and three envoys run an experiment with
// aggregation.secure through real processes. Every round's key exchange,
// masked uploads and unmasking pass through the aggregator, the experiment
// finishes, and the final global model — the sum the aggregator unmasked —
// scores on the sites' validation data as a plain FedAvg model does (a
// mask left in it would make it noise). A plan combining secure with median
// is refused at submission, saying why.
func TestSecureAggregation(t *testing.T) {
	sites := []string{"site-1", "site-2", "site-3"}
	f := newFed(t, []string{"alice"}, sites)
	f.startDirector(directorOptions{})
	for i, s := range sites {
		f.startEnvoy(s, syntheticShard(i+1, 3, ""))
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, sites...)

	secure := func(name, alg string) string {
		p := strings.Replace(syntheticPlan(name, 3, "", ""), "aggregation: {algorithm: fedavg}",
			"aggregation: {algorithm: "+alg+", secure: true, secure_threshold: 2, secure_range: 2}", 1)
		return strings.Replace(p, "participants: {min: 2,", "participants: {min: 3,", 1)
	}
	r := f.exp("alice", "submit", writePlan(t, secure("secure-median", "median")))
	if r.err == nil || !strings.Contains(r.stderr, "aggregation.secure: cannot be combined with algorithm median") {
		t.Fatalf("submitting secure with median: %v\n%s", r.err, r.stderr)
	}

	const rounds = 3
	start := time.Now()
	f.submit("alice", writePlan(t, secure("secure", "fedavg")))
	final := f.waitState(c, "secure", 3*time.Minute, fxv1.ExperimentState_FINISHED)
	t.Logf("%d secure rounds with 3 envoys in %s", rounds, time.Since(start).Round(time.Millisecond))
	checkEndedParticipants(t, final)

	evs := f.watchEvents("alice", "secure")
	agg := aggregates(t, evs)
	for r := 1; r <= rounds; r++ {
		if got := reporters(evs, r, runner.TaskTrain); !slices.Equal(got, sites) {
			t.Errorf("round %d: train reported by %v, want every site", r, got)
		}
	}
	t.Logf("aggregated validation per round: %v", accuracies(agg, runner.TaskAggregatedValidation))
	// Round rounds+1 validates the last global model.
	if acc := agg[rounds+1][runner.TaskAggregatedValidation]["accuracy"]; acc < 0.5 {
		t.Errorf("the final global model scores %.3f: the synthetic data should be easy, unless the sum was not unmasked", acc)
	}
	// Each site took part in every round's secure aggregation.
	for _, s := range sites {
		log := f.envoys[s].log()
		if n := strings.Count(log, "secure aggregation: unmask request answered"); n != rounds {
			t.Errorf("%s answered %d unmask requests, want %d", s, n, rounds)
		}
	}
}

// TestSecureAggregationSiteKilled (issue 20): four envoys run a secure
// experiment with threshold 3; one is killed (SIGKILL) once it has
// exchanged its keys for a round, so its pairwise masks are in the others'
// updates. The round closes all the same: the survivors reveal what
// removes the dead site's masks (or its self-mask, if its masked update
// made it in), and the new model is the survivors' true mean, which the
// next round's validation shows by scoring as well as before. The site,
// restarted, takes part again with fresh keys, and the experiment
// finishes.
func TestSecureAggregationSiteKilled(t *testing.T) {
	sites := []string{"site-1", "site-2", "site-3", "site-4"}
	f := newFed(t, []string{"alice"}, sites)
	f.startDirector(directorOptions{})
	var victim *proc
	for i, s := range sites {
		victim = f.startEnvoy(s, syntheticShard(i+1, len(sites), "features: 64\ntrain_samples: 24000\nvalid_samples: 1000\n"))
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, sites...)

	const rounds = 5
	p := syntheticPlan("secure-kill", rounds, "hidden: [64], lr: 0.05, momentum: 0.9, batch_size: 64, epochs: 2", "deadline: 20s, min_reporting: 3")
	p = strings.Replace(p, "aggregation: {algorithm: fedavg}", "aggregation: {algorithm: fedavg, secure: true, secure_threshold: 3, secure_range: 2}", 1)
	p = strings.Replace(p, "participants: {min: 2,", "participants: {min: 3,", 1)
	f.submit("alice", writePlan(t, p))

	// Kill site-4 once it has exchanged keys in round 2 or later.
	var killRound int
	f.waitFor(2*time.Minute, "site-4 to exchange keys in round 2", func() (bool, error) {
		for _, line := range strings.Split(victim.log(), "\n") {
			if strings.Contains(line, "secure aggregation: keys exchanged") {
				if r := atoi(logField(line, "round")); r >= 2 && r < rounds {
					killRound = r
				}
			}
		}
		return killRound != 0, nil
	})
	victim.kill(t)
	t.Logf("killed site-4 after its key exchange of round %d", killRound)

	f.waitFor(2*time.Minute, "the round site-4 died in to close", func() (bool, error) {
		e, err := getExp(c, "secure-kill")
		if err != nil {
			return false, err
		}
		return int(e.GetRound()) > killRound || experiment.Ended(e.GetState()), fmt.Errorf("%s, round %d", e.GetState(), e.GetRound())
	})
	victim.start(t)
	final := f.waitState(c, "secure-kill", 4*time.Minute, fxv1.ExperimentState_FINISHED)
	checkEndedParticipants(t, final)

	evs := f.watchEvents("alice", "secure-kill")
	checkSequences(t, evs)
	agg := aggregates(t, evs)
	t.Logf("aggregated validation per round: %v", accuracies(agg, runner.TaskAggregatedValidation))
	// The round's survivors reported; the model they made scores as the
	// model before it did (a mask left in the sum would wreck it).
	got := reporters(evs, killRound, runner.TaskTrain)
	if len(got) < 3 || !slices.Contains(got, "site-1") || !slices.Contains(got, "site-2") || !slices.Contains(got, "site-3") {
		t.Errorf("round %d: train reported by %v, want the three survivors (and site-4 only if its masked update made it in)", killRound, got)
	}
	before := agg[killRound][runner.TaskAggregatedValidation]["accuracy"]
	after := agg[killRound+1][runner.TaskAggregatedValidation]["accuracy"]
	if after < 0.5 || after < before-0.1 {
		t.Errorf("the model of round %d scores %.3f after %.3f before it: the survivors' sum was not unmasked", killRound, after, before)
	}
	if acc := agg[rounds+1][runner.TaskAggregatedValidation]["accuracy"]; acc < 0.5 {
		t.Errorf("the final global model scores %.3f", acc)
	}
	// The aggregator unmasked that round with site-4 dropped or as a
	// survivor whose self-mask the others revealed.
	dlog := f.director.log()
	unmasked := false
	for _, line := range strings.Split(dlog, "\n") {
		if strings.Contains(line, "secure aggregation: unmasking") && atoi(logField(line, "round")) == killRound {
			unmasked = true
			t.Logf("round %d unmasked with survivors %s, dropped %s", killRound, logField(line, "survivors"), logField(line, "dropped"))
		}
	}
	if !unmasked {
		t.Errorf("the aggregator did not unmask round %d", killRound)
	}
	// Restarted, site-4 exchanged fresh keys and trained again.
	rejoined := false
	for r := killRound + 1; r <= rounds; r++ {
		rejoined = rejoined || slices.Contains(reporters(evs, r, runner.TaskTrain), "site-4")
	}
	if !rejoined {
		t.Errorf("site-4 never trained again after its restart (rounds %d..%d)", killRound+1, rounds)
	}
}
