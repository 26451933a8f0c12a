package experiment_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/pki"
)

// The director answers a listing a page at a time (100 items by
// default); List reads every page, so a researcher with more
// experiments than one page sees them all, newest first.
func TestClientListReadsEveryPage(t *testing.T) {
	f := newFederation(t)
	c := f.dial(f.config(pki.RoleResearcher, "alice"))
	const n = 105
	dir := t.TempDir()
	var want []string
	for i := range n {
		name := fmt.Sprintf("exp-%03d", i)
		// Selects no site: it waits, offered or queued, without work for
		// the envoys.
		plan := fmt.Sprintf("name: %s\nrounds: 1\nparticipants: {min: 1, tags: [nowhere]}\nrunner: {kind: builtin, model: softmax}\n", name)
		d := filepath.Join(dir, name)
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "plan.yaml"), []byte(plan), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Submit(f.Ctx, d, experiment.SubmitOptions{}); err != nil {
			t.Fatalf("submit %s: %v", name, err)
		}
		want = append([]string{name}, want...)
	}
	for _, lister := range []*experiment.Client{c, f.dial(f.config(pki.RoleAdmin, "root"))} {
		list, err := lister.List(f.Ctx)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, e := range list {
			got = append(got, e.GetName())
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("listed %d experiments, want all %d newest first", len(got), n)
		}
	}
}
