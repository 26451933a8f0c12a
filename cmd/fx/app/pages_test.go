package app

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// The director answers listings a page at a time (100 by default); the
// CLI lists every experiment all the same.
func TestExperimentListReadsEveryPage(t *testing.T) {
	f := newResearchFederation(t)
	p := []string{"--profile", f.profile}
	const n = 105
	for i := range n {
		dir := t.TempDir()
		// A plan selecting no site: it waits without work for the envoys.
		plan := fmt.Sprintf("name: exp-%03d\nrounds: 1\nparticipants: {min: 1, tags: [nowhere]}\nrunner: {kind: builtin, model: softmax}\n", i)
		if err := os.WriteFile(filepath.Join(dir, "plan.yaml"), []byte(plan), 0o600); err != nil {
			t.Fatal(err)
		}
		if out, _, err := fx(t, append([]string{"experiment", "submit", dir}, p...)...); err != nil {
			t.Fatalf("submit %d: %v\n%s", i, err, out)
		}
	}
	out, _, err := fx(t, append([]string{"experiment", "list", "--output", "json"}, p...)...)
	var list struct {
		Experiments []struct {
			Name string `json:"name"`
		} `json:"experiments"`
	}
	if err != nil || json.Unmarshal([]byte(out), &list) != nil {
		t.Fatalf("experiment list --output json: %v\n%.300s", err, out)
	}
	if len(list.Experiments) != n || list.Experiments[0].Name != "exp-104" || list.Experiments[n-1].Name != "exp-000" {
		t.Fatalf("listed %d experiments, want all %d newest first", len(list.Experiments), n)
	}
}
