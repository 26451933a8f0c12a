package e2e

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/internal/disk/disktest"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/tensor"
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

// TestFullDiskPausesExperiment (issue 16 item 6): the director's data_dir
// is a small tmpfs that something else fills while an experiment runs.
// Before the next round would eat into disk_reserve_bytes the experiment
// goes PAUSED, saying why, instead of FAILED; freeing the space resumes it
// by itself. Filled again, the director is stopped, the space freed and
// the director started again: the experiment resumes and finishes with
// every round. Before, a full disk failed the experiment for good.
func TestFullDiskPausesExperiment(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	mnt := disktest.Small(t, 32<<20)
	f.writeDirectorConfig(directorOptions{})
	cfg, err := os.ReadFile(f.dirConfig)
	if err != nil {
		t.Fatal(err)
	}
	conf := strings.Replace(string(cfg), "data_dir: "+f.dataDir, "data_dir: "+mnt, 1)
	conf += "disk_reserve_bytes: 4194304\npause_retry: 200ms\n"
	if err := os.WriteFile(f.dirConfig, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	f.dataDir = mnt
	f.director = f.newProc("director", nil, "director", "start", "--config", f.dirConfig)
	f.restartDirector()
	f.startEnvoy("site-1", slowShard(1, 2))
	f.startEnvoy("site-2", slowShard(2, 2))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")

	const rounds = 6
	f.submit("alice", writePlan(t, syntheticPlan("full-disk", rounds, slowHyper, "deadline: 1m, min_reporting: 2")))
	fillUntilPaused := func(after int32) {
		t.Helper()
		f.waitFor(2*time.Minute, fmt.Sprintf("round %d", after+1), func() (bool, error) {
			e, err := getExp(c, "full-disk")
			return err == nil && e.GetState() == fxv1.ExperimentState_RUNNING && e.GetRound() > after, err
		})
		// Leave 2 MiB: the round under way is written, the next one
		// would eat into the 4 MiB reserve.
		filler := disktest.Fill(t, mnt)
		fi, err := os.Stat(filler)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(filler, fi.Size()-2<<20); err != nil {
			t.Fatal(err)
		}
		e := f.waitState(c, "full-disk", 2*time.Minute, fxv1.ExperimentState_PAUSED)
		t.Logf("paused in round %d: %s", e.GetRound(), e.GetReason())
		if !strings.Contains(e.GetReason(), "disk_reserve_bytes") || !strings.Contains(e.GetReason(), "resumes by itself once there is room") {
			t.Errorf("paused with reason %q; want the reserve and what happens next", e.GetReason())
		}
	}
	filler := filepath.Join(mnt, "filler")

	fillUntilPaused(1)
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	e := f.waitState(c, "full-disk", time.Minute, fxv1.ExperimentState_RUNNING, fxv1.ExperimentState_FINISHED)
	t.Logf("running again by itself in round %d", e.GetRound())

	fillUntilPaused(e.GetRound())
	f.director.stop(t)
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	f.restartDirector()
	e = f.waitState(c, "full-disk", 3*time.Minute, fxv1.ExperimentState_FINISHED)
	if e.GetRound() != rounds {
		t.Errorf("finished at round %d, want %d", e.GetRound(), rounds)
	}
	agg := aggregates(t, f.watchEvents("alice", "full-disk"))
	for r := 1; r <= rounds; r++ {
		if _, ok := agg[r]; !ok {
			t.Errorf("no aggregates for round %d", r)
		}
	}
}

// TestDamagedRoundFilesResume (issue 16 items 4 and 7): between two
// restarts of the director, a running experiment's checkpoint.json is
// deleted, and later NaNs are written into its latest model (a well-formed
// safetensors file). The first restart resumes from the round the round
// files show complete (before: round 1 again); the second from the round
// before the poisoned one, which runs again (before: the NaN model was
// loaded without notice). The experiment finishes with every round and a
// finite model.
func TestDamagedRoundFilesResume(t *testing.T) {
	f, c, _ := slowSites(t)
	const rounds = 6
	f.submit("alice", writePlan(t, syntheticPlan("damaged-rounds", rounds, slowHyper, "deadline: 1m, min_reporting: 2")))
	e := f.waitState(c, "damaged-rounds", time.Minute, fxv1.ExperimentState_RUNNING)
	dir := filepath.Join(f.dataDir, "experiments", e.GetId(), "aggregator")
	completed := func() int {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, "checkpoint.json"))
		if err != nil {
			t.Fatal(err)
		}
		var cp struct{ Completed int }
		if err := json.Unmarshal(b, &cp); err != nil {
			t.Fatal(err)
		}
		return cp.Completed
	}
	// resumedAt is the round the aggregator resumed after, from the log
	// of the director's last start.
	resumedAt := func(start int) int {
		t.Helper()
		for _, line := range logLinesAfter(f.director.log(), start) {
			if strings.Contains(line, "resuming from checkpoint") {
				return atoi(logField(line, "completed_round"))
			}
		}
		t.Fatalf("no resume in the director's log after start %d", start)
		return 0
	}

	for i, damage := range []struct {
		name string
		// do damages the files after round done and returns the round
		// the resume must start after.
		do func(done int) (int, error)
	}{
		{"checkpoint.json deleted", func(done int) (int, error) {
			return done, os.Remove(filepath.Join(dir, "checkpoint.json"))
		}},
		{"NaN in the latest model", func(done int) (int, error) {
			path := filepath.Join(dir, "models", fmt.Sprintf("round-%06d.safetensors", done))
			m, meta, err := tensor.ReadFile(path)
			if err != nil {
				return 0, err
			}
			for _, x := range m {
				if x.DType == tensor.F32 {
					x.Float32s()[0] = float32(math.NaN())
					break
				}
			}
			return done - 1, tensor.WriteFile(path, m, meta)
		}},
	} {
		f.waitFor(2*time.Minute, "a round to complete", func() (bool, error) {
			e, err := getExp(c, "damaged-rounds")
			if err != nil {
				return false, err
			}
			if e.GetState() != fxv1.ExperimentState_RUNNING {
				t.Fatalf("experiment %s before the damage (%s)", e.GetState(), e.GetReason())
			}
			return e.GetRound() > int32(2*i+2), nil
		})
		f.director.stop(t)
		want, err := damage.do(completed())
		if err != nil {
			t.Fatal(err)
		}
		f.restartDirector()
		if got := resumedAt(i + 2); got != want {
			t.Errorf("%s: resumed after round %d, want %d", damage.name, got, want)
		}
	}
	e = f.waitState(c, "damaged-rounds", 3*time.Minute, fxv1.ExperimentState_FINISHED)
	if e.GetRound() != rounds {
		t.Errorf("finished at round %d, want %d", e.GetRound(), rounds)
	}
	out := filepath.Join(t.TempDir(), "last.safetensors")
	f.mustExp("alice", "model", "damaged-rounds", "--last", "-o", out)
	m, _, err := tensor.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range m {
		if err := x.CheckFinite(); err != nil {
			t.Fatalf("the final model: %v", err)
		}
	}
}
