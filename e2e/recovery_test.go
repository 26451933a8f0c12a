package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestDamagedStoreRecovered (issue 16 items 2 and 3): a RUNNING
// experiment's director is stopped and its director.db damaged, twice:
// truncated (before: SIGBUS and a stack trace) and emptied to 0 bytes
// (before: the director served with 0 experiments and forgot the running
// one). Each time `fx director start` exits at once naming the file and
// `fx director recover`, without a trace; `fx director recover` restores
// the snapshot the clean stop took; the restarted director resumes the
// experiment, which finishes with every round.
func TestDamagedStoreRecovered(t *testing.T) {
	f, c, _ := slowSites(t)
	const rounds = 6
	f.submit("alice", writePlan(t, syntheticPlan("survivor", rounds, slowHyper, "deadline: 1m, min_reporting: 2")))
	f.waitState(c, "survivor", time.Minute, fxv1.ExperimentState_RUNNING)
	dbPath := filepath.Join(f.dataDir, "director.db")

	for i, damage := range []struct {
		name string
		do   func() error
	}{
		{"truncated", func() error {
			fi, err := os.Stat(dbPath)
			if err != nil {
				return err
			}
			return os.Truncate(dbPath, fi.Size()/2)
		}},
		{"emptied", func() error { return os.Truncate(dbPath, 0) }},
	} {
		f.waitFor(2*time.Minute, "a round to complete", func() (bool, error) {
			e, err := getExp(c, "survivor")
			if err != nil {
				return false, err
			}
			if e.GetState() != fxv1.ExperimentState_RUNNING {
				t.Fatalf("experiment %s before the damage (%s)", e.GetState(), e.GetReason())
			}
			return e.GetRound() > int32(i+1), nil
		})
		f.director.stop(t)
		if err := damage.do(); err != nil {
			t.Fatal(err)
		}

		r := f.runFxEnv(time.Minute, nil, "director", "start", "--config", f.dirConfig)
		out := r.stdout + r.stderr
		if r.err == nil {
			t.Fatalf("%s store: the director started:\n%s", damage.name, out)
		}
		t.Logf("%s store: fx director start: %v\n%s", damage.name, r.err, out)
		for _, want := range []string{dbPath, "fx director recover --data-dir " + f.dataDir} {
			if !strings.Contains(out, want) {
				t.Errorf("%s store: the refusal does not say %q:\n%s", damage.name, want, out)
			}
		}
		for _, trace := range []string{"goroutine ", "panic:", "SIGBUS", "fatal error"} {
			if strings.Contains(out, trace) {
				t.Errorf("%s store: the refusal is a crash (%q):\n%s", damage.name, trace, out)
			}
		}

		rec := f.fx("director", "recover", "--config", f.dirConfig)
		t.Logf("%s store: fx director recover:\n%s", damage.name, rec)
		if !strings.Contains(rec, "restored the store") {
			t.Fatalf("%s store: recover restored nothing:\n%s", damage.name, rec)
		}
		f.restartDirector()
		if e := f.waitState(c, "survivor", time.Minute, fxv1.ExperimentState_RUNNING, fxv1.ExperimentState_FINISHED); e.GetRound() < int32(i+2) {
			t.Errorf("%s store: after recovery at round %d", damage.name, e.GetRound())
		}
	}
	e := f.waitState(c, "survivor", 3*time.Minute, fxv1.ExperimentState_FINISHED)
	if e.GetRound() != rounds {
		t.Errorf("finished at round %d, want %d", e.GetRound(), rounds)
	}
	agg := aggregates(t, f.watchEvents("alice", "survivor"))
	for r := 1; r <= rounds; r++ {
		if _, ok := agg[r]; !ok {
			t.Errorf("no aggregates for round %d", r)
		}
	}
}
