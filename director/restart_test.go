package director

import (
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/protobuf/proto"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/director/store"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestRestart stops the director and starts a new one on the same data_dir:
// pending, running and finished experiments come back in their states, the
// running one's aggregator is relaunched, and the metric log continues
// without losing or repeating events.
func TestRestart(t *testing.T) {
	f := newFed(t, func(c *Config) { c.ReviewPolicy = ReviewManual })
	ctx := ctxT(t)
	f.register("a", "fashion")
	f.register("b", "fashion")
	approve := func(id string) {
		_, err := f.admin().ApproveExperiment(ctx, &fxv1.ReviewExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: id}})
		must(t, err)
	}
	start := func(id string) *fakeAgg {
		approve(id)
		f.waitState(id, fxv1.ExperimentState_OFFERED)
		for _, n := range []string{"a", "b"} {
			_, err := f.answer(n, id, true)
			must(t, err)
		}
		f.waitState(id, fxv1.ExperimentState_RUNNING)
		return f.launcher.agg(t, id, 1)
	}
	plan := func(name string) string {
		return "name: " + name + "\nrounds: 2\nparticipants: {min: 2, tags: [fashion]}\nrunner: {kind: builtin, model: mlp}\n"
	}
	finished := f.submitPlan("alice", plan("done"))
	agg := start(finished.Id)
	agg.completeRound(t)
	agg.completeRound(t)
	agg.result <- nil
	f.waitState(finished.Id, fxv1.ExperimentState_FINISHED)

	running := f.submitPlan("alice", plan("running"))
	agg = start(running.Id)
	agg.completeRound(t)
	pending := f.submitPlan("bob", plan("pending"))

	before := map[string]*fxv1.Experiment{}
	for _, id := range []string{finished.Id, running.Id, pending.Id} {
		before[id] = f.get("", id)
	}
	metricsBefore := watchAll(t, f, running.Id, 9)
	if lr := before[running.Id].GetParticipants()[0].GetLastRound(); lr != 1 {
		t.Errorf("last_round before restart %d, want 1", lr)
	}

	f.restart()

	for id, b := range before {
		a := f.get("", id)
		// Liveness is not durable: after a restart every envoy is offline
		// until it heartbeats, so compare stored fields only.
		for _, x := range []*fxv1.Experiment{a, b} {
			for _, p := range x.Participants {
				p.State = fxv1.ParticipantState_PARTICIPANT_STATE_UNSPECIFIED
			}
		}
		if !proto.Equal(a, b) {
			t.Errorf("experiment %s after restart:\n%v\nbefore:\n%v", b.GetName(), a, b)
		}
	}
	// The running experiment's aggregator is relaunched with the same
	// directory; envoys that reconnect are told where it now listens.
	agg2 := f.launcher.agg(t, running.Id, 1)
	if agg2.spec.Dir != agg.spec.Dir {
		t.Errorf("relaunched in %s, was %s", agg2.spec.Dir, agg.spec.Dir)
	}
	must(t, f.heartbeat("a", running.Id))
	w := f.watch("a")
	if s := w.next(t, running.Id, "start").GetStart(); s.GetAggregatorAddress() != agg2.spec.Listener.Addr().String() || s.GetRound() != 2 {
		t.Errorf("start after restart: %v", s)
	}
	metricsAfter := watchAll(t, f, running.Id, 9)
	for i := range metricsBefore {
		if !proto.Equal(metricsBefore[i], metricsAfter[i]) {
			t.Fatalf("event %d after restart %v, before %v", i, metricsAfter[i], metricsBefore[i])
		}
	}
	agg2.completeRound(t)
	next := watchAll(t, f, running.Id, 18)
	if next[9].GetSequence() != 10 || next[9].GetRound() != 2 {
		t.Errorf("first event after restart: %v", next[9])
	}
	agg2.result <- nil
	f.waitState(running.Id, fxv1.ExperimentState_FINISHED)
	if got := f.get("", pending.Id); got.GetState() != fxv1.ExperimentState_PENDING {
		t.Errorf("pending after restart: %v", got.GetState())
	}
	approve(pending.Id)
	f.waitState(pending.Id, fxv1.ExperimentState_OFFERED)
}

// TestRoundDurableButUnreportedIsCompletedAtLoad: a director that dies
// after the aggregator's checkpoint of a round is durable but before the
// round is reported leaves the round in the files only. The next director
// (a restart, or a standby taking over) completes it from them: in its
// metric log, in its log once, and in the store, so the load after does
// not say it again.
func TestRoundDurableButUnreportedIsCompletedAtLoad(t *testing.T) {
	var logs syncBuffer
	f := newFed(t, func(c *Config) {
		c.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Info, Output: &logs})
	})
	f.register("a", "fashion")
	f.register("b", "fashion")
	exp := f.submitPlan("alice", "name: unreported\nrounds: 3\nparticipants: {min: 2, tags: [fashion]}\nrunner: {kind: builtin, model: mlp}\n")
	f.waitState(exp.Id, fxv1.ExperimentState_OFFERED)
	for _, n := range []string{"a", "b"} {
		_, err := f.answer(n, exp.Id, true)
		must(t, err)
	}
	f.waitState(exp.Id, fxv1.ExperimentState_RUNNING)
	agg := f.launcher.agg(t, exp.Id, 1)
	agg.completeRound(t)
	agg.writeRound(t) // round 2 durable, never reported

	completions := func(round int) int {
		n := 0
		for _, line := range strings.Split(logs.String(), "\n") {
			if strings.Contains(line, "round completed:") && strings.Contains(line, fmt.Sprintf(" round=%d ", round)) {
				n++
			}
		}
		return n
	}
	f.restart()
	if n := completions(2); n != 1 {
		t.Errorf("round 2 logged completed %d times after the load, want once:\n%s", n, logs.String())
	}
	if got := f.get("", exp.Id).GetRound(); got != 3 {
		t.Errorf("experiment in round %d after the load, want 3", got)
	}
	evs := watchAll(t, f, exp.Id, 18) // 9 a round: 2 sites × 3 tasks, 3 aggregates
	if r := evs[17].GetRound(); r != 2 {
		t.Errorf("last event of the metric log is round %d's, want round 2's", r)
	}
	f.restart()
	if n := completions(2); n != 1 {
		t.Errorf("round 2 logged completed %d times after a second load, want once", n)
	}
	if n := completions(1); n != 1 {
		t.Errorf("round 1 logged completed %d times, want once (reported, never learned from the files)", n)
	}
}

// watchAll reads the first n metric events of an experiment.
func watchAll(t *testing.T, f *fed, id string, n int) []*fxv1.MetricEvent {
	t.Helper()
	stream, err := f.admin().WatchMetrics(ctxT(t), &fxv1.WatchMetricsRequest{Experiment: &fxv1.ExperimentRef{Id: id}})
	must(t, err)
	evs, err := collect(t, stream, n)
	must(t, err)
	if len(evs) != n {
		t.Fatalf("%d events, want %d", len(evs), n)
	}
	return evs
}

// TestSecondDirectorRefused: two directors on one data_dir would corrupt
// each other's view, so the second fails to start and says why.
func TestSecondDirectorRefused(t *testing.T) {
	f := newFed(t, nil)
	cfg := f.config()
	defer cfg.Listener.Close()
	_, err := New(cfg)
	if err == nil || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("second director on one data_dir: %v", err)
	}
}

func TestBadConfig(t *testing.T) {
	tests := []struct {
		name string
		mod  func(*Config)
		key  string
	}{
		{"no data dir", func(c *Config) { c.DataDir = "" }, "data_dir"},
		{"grace shorter than period", func(c *Config) { c.OfflineAfter = time.Second; c.HeartbeatPeriod = 2 * time.Second }, "offline_after"},
		{"policy", func(c *Config) { c.ReviewPolicy = "sometimes" }, "review_policy"},
		{"concurrency", func(c *Config) { c.MaxConcurrent = -1 }, "max_concurrent_experiments"},
		{"ports", func(c *Config) { c.AggregatorPortMin, c.AggregatorPortMax = 9000, 8000 }, "aggregator.port_min"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Config{DataDir: t.TempDir(), Store: store.NewMem()}
			tt.mod(&cfg)
			if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), tt.key) {
				t.Fatalf("New = %v, want an error naming %s", err, tt.key)
			}
		})
	}
}

// The sample counts envoys had registered when an experiment started bound
// what their results may claim for every launch of its aggregator: an envoy
// that re-registers with inflated counts mid-run, then sees the director
// restart, is still held to the counts it started with.
func TestRegisteredCountsSurviveReRegistrationAndRestart(t *testing.T) {
	f := newFed(t, nil)
	e, agg := f.running("alice")
	want := map[string]aggregator.SampleCounts{"a": {Train: 100, Valid: 10}, "b": {Train: 100, Valid: 10}}
	if !maps.Equal(agg.spec.Registered, want) {
		t.Fatalf("launched with registered counts %v, want %v", agg.spec.Registered, want)
	}
	_, err := f.envoy("a").RegisterEnvoy(ctxT(t), &fxv1.RegisterEnvoyRequest{
		EnvoyName: "a", Version: "test",
		Shard: &fxv1.DatasetShard{Tags: []string{"fashion"}, SampleShape: []int64{28, 28}, TrainSamples: 1 << 62, ValidSamples: 1 << 62, Classes: 10},
	})
	must(t, err)
	f.restart()
	relaunched := f.launcher.agg(t, e.Id, 1)
	if !maps.Equal(relaunched.spec.Registered, want) {
		t.Fatalf("relaunched after a restart with registered counts %v, want %v", relaunched.spec.Registered, want)
	}
}
