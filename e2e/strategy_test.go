package e2e

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestCustomStrategy: examples/custom-strategy builds an fx with the
// geomedian strategy registered; with that binary as the director, an
// experiment naming geomedian, submitted with the stock fx CLI to stock fx
// envoys, trains to FINISHED, and a plan naming an algorithm nobody
// registered is refused at submission with the list of known ones.
func TestCustomStrategy(t *testing.T) {
	requireE2E(t)
	custom := filepath.Join(t.TempDir(), "fx-geomedian")
	goCmd, err := exec.LookPath("go")
	if err != nil {
		goCmd = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	build := exec.Command(goCmd, "build", "-o", custom, "./examples/custom-strategy")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./examples/custom-strategy: %v\n%s", err, out)
	}
	stock := fxBin
	t.Cleanup(func() { fxBin = stock })

	sites := []string{"site-1", "site-2"}
	f := newFed(t, []string{"alice"}, sites)
	fxBin = custom // the director only: the processes started from here on
	f.startDirector(directorOptions{})
	fxBin = stock
	for i, s := range sites {
		f.startEnvoy(s, syntheticShard(i+1, 2, ""))
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, sites...)

	plan := strings.Replace(syntheticPlan("geo", 2, "", ""), "aggregation: {algorithm: fedavg}",
		"aggregation: {algorithm: geomedian, options: {iterations: 5}}", 1)
	f.submit("alice", writePlan(t, plan))
	e := f.waitState(c, "geo", 2*time.Minute, fxv1.ExperimentState_FINISHED)
	if b := e.GetBest(); b == nil || b.GetValue() < 0.6 {
		t.Errorf("best model %v, want accuracy ≥ 0.6 on the easy synthetic data", b)
	}
	// The director's aggregator ran the strategy, not a built-in rule.
	if log := f.director.log(); strings.Count(log, "round aggregated by a registered strategy") != 2 || !strings.Contains(log, "strategy=geomedian") {
		t.Errorf("the director's log does not show geomedian aggregating both rounds:\n%s", tail(log, 30))
	}

	// An unregistered name passes the stock CLI (the director may know
	// it) and the director refuses it, naming what it knows.
	bad := strings.Replace(plan, "algorithm: geomedian,", "algorithm: geomedain,", 1)
	bad = strings.Replace(bad, "name: geo", "name: typo", 1)
	r := f.exp("alice", "submit", writePlan(t, bad))
	if r.err == nil || !strings.Contains(r.stderr, `fedadagrad, scaffold or geomedian, got "geomedain"`) {
		t.Fatalf("submitting a misspelt algorithm: %v\n%s", r.err, r.stderr)
	}
	// And the example's options are checked at submission too.
	badOption := strings.Replace(plan, "iterations: 5", "iterations: 0", 1)
	badOption = strings.Replace(badOption, "name: geo", "name: zero", 1)
	r = f.exp("alice", "submit", writePlan(t, badOption))
	if r.err == nil || !strings.Contains(r.stderr, "aggregation.options: for geomedian: iterations must be an integer from 1 to 1000") {
		t.Fatalf("submitting iterations: 0: %v\n%s", r.err, r.stderr)
	}
}
