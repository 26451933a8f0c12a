package e2e

import (
	"math"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// TestEvaluationOfATrainedModel: a model trained by one experiment,
// downloaded with the CLI, is evaluated on the same sites by an evaluation
// experiment. Each site's score equals the trained experiment's final
// validation of that model at that site, and the overall score is their
// sample-weighted mean; nothing trains, and `fx experiment status` lists the
// scores. An evaluation without the model is refused before it is sent.
func TestEvaluationOfATrainedModel(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	f.startDirector(directorOptions{})
	f.startEnvoy("site-1", syntheticShard(1, 2, ""))
	f.startEnvoy("site-2", syntheticShard(2, 2, ""))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")

	const rounds = 2
	f.submit("alice", writePlan(t, syntheticPlan("trained", rounds, "", "")))
	f.waitState(c, "trained", 2*time.Minute, fxv1.ExperimentState_FINISHED)
	// The final validation (round rounds+1) scores the last model.
	var trained []*fxv1.MetricEvent
	for _, ev := range f.watchEvents("alice", "trained") {
		if ev.GetRound() == rounds+1 && ev.GetTask() == runner.TaskAggregatedValidation {
			trained = append(trained, ev)
		}
	}
	final := experiment.EvaluationOf(relabel(trained, 1))
	if final.Overall == nil || len(final.Sites) != 2 {
		t.Fatalf("the trained experiment's final validation: %v", trained)
	}

	plan := strings.Replace(syntheticPlan("eval", 1, "", ""), "best_model:", "tasks: [aggregated_model_validation]\nbest_model:", 1)
	dir := writePlan(t, plan)
	if r := f.exp("alice", "submit", dir); r.err == nil || !strings.Contains(r.stderr, "scores the model you give it") {
		t.Fatalf("an evaluation without its model: %v %q, want it refused", r.err, r.stderr)
	}
	f.mustExp("alice", "model", "trained", "--last", "-o", filepath.Join(dir, experiment.InitialModelFile))
	f.submit("alice", dir)
	done := f.waitState(c, "eval", 2*time.Minute, fxv1.ExperimentState_FINISHED)
	if done.GetRound() != 1 {
		t.Errorf("the evaluation ended at round %d, want 1", done.GetRound())
	}
	if b := done.GetBest(); b == nil || b.GetRound() != 0 {
		t.Errorf("best %v, want the given model, round 0", b)
	}

	ev, err := c.Evaluation(t.Context(), "eval")
	if err != nil {
		t.Fatal(err)
	}
	if len(ev.Sites) != 2 || ev.Overall == nil {
		t.Fatalf("evaluation: %v", ev)
	}
	for _, e := range f.watchEvents("alice", "eval") {
		if e.GetTask() != runner.TaskAggregatedValidation || e.GetRound() != 1 {
			t.Errorf("the evaluation reported %s in round %d: it should validate once, and train nothing", e.GetTask(), e.GetRound())
		}
	}
	var samples int64
	var weighted float64
	for i, s := range ev.Sites {
		want := final.Sites[i]
		if s.GetCollaborator() != want.GetCollaborator() || s.GetSamples() != want.GetSamples() || !nearlyEqual(s.GetMetrics()["accuracy"], want.GetMetrics()["accuracy"]) {
			t.Errorf("%s scored %v on %d samples; the trained experiment's final validation there: %v on %d",
				s.GetCollaborator(), s.GetMetrics(), s.GetSamples(), want.GetMetrics(), want.GetSamples())
		}
		samples += s.GetSamples()
		weighted += float64(s.GetSamples()) * s.GetMetrics()["accuracy"]
	}
	overall := ev.Overall.GetMetrics()["accuracy"]
	if ev.Overall.GetSamples() != samples || !nearlyEqual(overall, weighted/float64(samples)) {
		t.Errorf("overall accuracy %v on %d samples, want the sites' weighted mean %v on %d", overall, ev.Overall.GetSamples(), weighted/float64(samples), samples)
	}
	if want := final.Overall.GetMetrics()["accuracy"]; !nearlyEqual(overall, want) {
		t.Errorf("overall accuracy %v, the trained experiment's last validation %v", overall, want)
	}
	t.Logf("evaluation: overall accuracy %.4f over %d samples", overall, samples)

	out := f.mustExp("alice", "status", "eval")
	for _, want := range []string{"EVALUATION", "site-1", "site-2", "overall (weighted by samples)"} {
		if !strings.Contains(out, want) {
			t.Errorf("fx experiment status eval does not show %q:\n%s", want, out)
		}
	}
}

// relabel returns copies of events as if of round r.
func relabel(evs []*fxv1.MetricEvent, r int32) []*fxv1.MetricEvent {
	out := make([]*fxv1.MetricEvent, len(evs))
	for i, e := range evs {
		out[i] = &fxv1.MetricEvent{Round: r, Task: e.GetTask(), Collaborator: e.GetCollaborator(), Samples: e.GetSamples(), Metrics: e.GetMetrics()}
	}
	return out
}

func nearlyEqual(a, b float64) bool { return math.Abs(a-b) <= 1e-9 }
