package e2e

import (
	"slices"
	"strings"
	"testing"
	"time"

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
