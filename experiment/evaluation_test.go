package experiment

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
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
