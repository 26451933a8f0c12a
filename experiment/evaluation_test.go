package experiment

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// An evaluation, like an exec plan, is refused before any upload when the
// directory lacks the model it needs.
func TestPrepareUploadWantsTheEvaluatedModel(t *testing.T) {
	dir := t.TempDir()
	plan := "name: eval\nrounds: 1\nrunner: {kind: builtin, model: mlp}\ntasks: [aggregated_model_validation]\n"
	if err := os.WriteFile(filepath.Join(dir, PlanFile), []byte(plan), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := PrepareUpload(dir)
	if err == nil || !strings.Contains(err.Error(), "has no model.safetensors beside its plan: an evaluation (tasks without train) scores the model you give it") {
		t.Fatalf("PrepareUpload without the model: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, InitialModelFile), []byte("weights"), 0o600); err != nil {
		t.Fatal(err)
	}
	u, err := PrepareUpload(dir)
	if err != nil {
		t.Fatalf("PrepareUpload with the model: %v", err)
	}
	u.Close()
}

func TestEvaluationOf(t *testing.T) {
	ev := func(round int32, task, site string, samples int64, acc float64) *fxv1.MetricEvent {
		return &fxv1.MetricEvent{Round: round, Task: task, Collaborator: site, Samples: samples, Metrics: map[string]float64{"accuracy": acc}}
	}
	events := []*fxv1.MetricEvent{
		ev(1, runner.TaskAggregatedValidation, "site-b", 300, 0.7),
		ev(1, runner.TaskAggregatedValidation, "site-a", 100, 0.9),
		ev(1, runner.TaskAggregatedValidation, "", 400, 0.75),
		ev(2, runner.TaskAggregatedValidation, "site-a", 100, 0.1), // not the evaluation's round
	}
	got := EvaluationOf(events)
	if len(got.Sites) != 2 || got.Sites[0] != events[1] || got.Sites[1] != events[0] || got.Overall != events[2] {
		t.Fatalf("EvaluationOf = %v, want site-a, site-b and the aggregate of round 1", got)
	}
	if EvaluationOf(nil).Overall != nil {
		t.Error("an evaluation without events has an overall score")
	}
}
