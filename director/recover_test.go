package director

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/director/store"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// storeDamages are what issue 16 saw done to director.db: each must stop
// the director with a message naming the file and `fx director recover`,
// and recovery must bring the running experiment back.
var storeDamages = map[string]func(t *testing.T, path string){
	// Before: SIGBUS ("unexpected fault address") with a stack trace.
	"truncated": func(t *testing.T, path string) {
		fi, err := os.Stat(path)
		must(t, err)
		must(t, os.Truncate(path, fi.Size()/2))
	},
	// Before: a panic in bbolt.
	"garbled": func(t *testing.T, path string) {
		fi, err := os.Stat(path)
		must(t, err)
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		must(t, err)
		defer f.Close()
		junk := []byte(strings.Repeat("\xde\xad\xbe\xef", int(fi.Size()-8192)/4))
		_, err = f.WriteAt(junk, 8192)
		must(t, err)
	},
	// Before: the director started with no experiment and forgot the
	// running one while its files stayed on disk.
	"emptied": func(t *testing.T, path string) { must(t, os.Truncate(path, 0)) },
	"deleted": func(t *testing.T, path string) { must(t, os.Remove(path)) },
	// Another data directory's store, copied over this one's.
	"replaced": func(t *testing.T, path string) {
		other, err := store.OpenBolt(path + ".other")
		must(t, err)
		must(t, other.Update(func(tx store.Tx) error {
			return tx.PutExperiment(&store.Experiment{ID: "elsewhere", Name: "elsewhere", Owner: "bob", State: fxv1.ExperimentState_FINISHED,
				PlanYAML: "name: elsewhere\nrounds: 1\nrunner: {kind: builtin, model: mlp}\n"})
		}))
		must(t, other.Close())
		must(t, os.Rename(path+".other", path))
	},
}

// TestDamagedStoreStopsTheDirectorAndRecovers (issue 16 items 2 and 3).
func TestDamagedStoreStopsTheDirectorAndRecovers(t *testing.T) {
	for name, damage := range storeDamages {
		t.Run(name, func(t *testing.T) {
			f := newFed(t, nil)
			e, agg := f.running("alice")
			agg.completeRound(t)
			f.stop() // a clean stop snapshots the store
			dbPath := filepath.Join(f.dataDir, "director.db")
			damage(t, dbPath)

			cfg := f.config()
			_, err := New(cfg)
			cfg.Listener.Close()
			if err == nil {
				t.Fatal("the director started on a damaged store")
			}
			for _, want := range []string{dbPath, "fx director recover --data-dir " + f.dataDir} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not say %q", err, want)
				}
			}
			if name == "emptied" || name == "deleted" || name == "replaced" {
				if !strings.Contains(err.Error(), e.Id) {
					t.Errorf("error %q does not name the experiment directory %s", err, e.Id)
				}
			}

			rec, err := Recover(RecoverConfig{DataDir: f.dataDir})
			if err != nil {
				t.Fatalf("Recover: %v", err)
			}
			if rec.Restored == "" {
				t.Fatalf("Recover restored no snapshot: %+v", rec)
			}
			if name != "deleted" && rec.SetAside == "" {
				t.Errorf("the damaged store was not set aside: %+v", rec)
			} else if name != "deleted" {
				if _, err := os.Stat(rec.SetAside); err != nil {
					t.Errorf("set-aside store: %v", err)
				}
			}

			f.restart() // the first director stopped already; this starts one
			if got := f.get("", e.Id); got.GetState() != fxv1.ExperimentState_RUNNING || got.GetRound() != 2 {
				t.Fatalf("after recovery: %v round %d, want RUNNING in round 2", got.GetState(), got.GetRound())
			}
			again := f.launcher.agg(t, e.Id, 1)
			if again.spec.Dir != agg.spec.Dir {
				t.Errorf("relaunched in %s, was %s", again.spec.Dir, agg.spec.Dir)
			}
		})
	}
}

// TestRecoverNeedsASnapshotOrStartEmpty: without a good snapshot Recover
// changes nothing unless told to start empty, and then deletes nothing.
func TestRecoverNeedsASnapshotOrStartEmpty(t *testing.T) {
	f := newFed(t, func(c *Config) { c.SnapshotsKept = -1 })
	e, _ := f.running("alice")
	f.stop()
	dbPath := filepath.Join(f.dataDir, "director.db")
	must(t, os.Truncate(dbPath, 0))
	if _, err := Recover(RecoverConfig{DataDir: f.dataDir}); err == nil || !strings.Contains(err.Error(), "--start-empty") {
		t.Fatalf("Recover without snapshots = %v, want an error pointing to --start-empty", err)
	}
	if fi, err := os.Stat(dbPath); err != nil || fi.Size() != 0 {
		t.Fatalf("a refused recovery changed the store: %v, %v", fi, err)
	}
	rec, err := Recover(RecoverConfig{DataDir: f.dataDir, StartEmpty: true})
	if err != nil {
		t.Fatal(err)
	}
	moved := filepath.Join(f.dataDir, "orphaned", e.Id, "archive")
	if _, err := os.Stat(moved); err != nil {
		t.Fatalf("the experiment's files were not set aside (%v): %+v", err, rec)
	}
	f.restart() // an empty store and no experiment directory: a fresh start
}

// TestRecoverReconciles restores a snapshot that is older than the data
// directory and checks each way the two can disagree.
func TestRecoverReconciles(t *testing.T) {
	dataDir := t.TempDir()
	at := time.Date(2026, 4, 1, 10, 0, 0, 0, time.UTC)
	must(t, os.MkdirAll(filepath.Join(dataDir, "snapshots"), 0o700))
	snap, err := store.OpenBolt(filepath.Join(dataDir, "snapshots", "director-"+at.Format("20060102T150405.000000000Z")+".db"))
	must(t, err)
	recs := map[string]fxv1.ExperimentState{
		"running":   fxv1.ExperimentState_RUNNING,  // as recorded: kept
		"removed":   fxv1.ExperimentState_FINISHED, // directory gone: removed after the snapshot
		"lost":      fxv1.ExperimentState_PENDING,  // directory gone, not ended
		"started":   fxv1.ExperimentState_OFFERED,  // started after the snapshot
		"unstarted": fxv1.ExperimentState_QUEUED,   // still waiting
	}
	must(t, snap.Update(func(tx store.Tx) error {
		for id, st := range recs {
			if err := tx.PutExperiment(&store.Experiment{ID: id, Name: id, Owner: "alice", State: st, CreatedAt: at}); err != nil {
				return err
			}
		}
		return tx.PutParticipant("started", &store.Participant{Envoy: "a", State: fxv1.ParticipantState_ACCEPTED})
	}))
	must(t, snap.Close())
	for _, id := range []string{"running", "started", "unstarted", "newer"} {
		must(t, os.MkdirAll(filepath.Join(dataDir, "experiments", id), 0o700))
		must(t, os.WriteFile(filepath.Join(dataDir, "experiments", id, "archive"), []byte("zip"), 0o600))
	}
	// "started" completed a round with a and b after the snapshot.
	agg := filepath.Join(dataDir, "experiments", "started", "aggregator")
	must(t, os.MkdirAll(filepath.Dir(aggregator.RoundPath(agg, 1)), 0o700))
	round, _ := json.Marshal(aggregator.RoundSummary{Round: 1, Reported: []string{"b"}, Missing: []string{"a"}})
	must(t, os.WriteFile(aggregator.RoundPath(agg, 1), round, 0o600))
	must(t, os.WriteFile(filepath.Join(agg, "checkpoint.json"), []byte(`{"experiment_id": "started", "completed": 1}`), 0o600))
	must(t, os.WriteFile(filepath.Join(dataDir, "director.db"), []byte("not a database at all, and long enough to be read as one"), 0o600))

	rec, err := Recover(RecoverConfig{DataDir: dataDir, Now: func() time.Time { return at.Add(time.Hour) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("recovery: %+v", rec)

	st, err := store.OpenBolt(filepath.Join(dataDir, "director.db"))
	must(t, err)
	defer st.Close()
	got := map[string]*store.Experiment{}
	var started []*store.Participant
	must(t, st.View(func(tx store.Tx) error {
		exps, err := tx.Experiments()
		for _, e := range exps {
			got[e.ID] = e
		}
		if err != nil {
			return err
		}
		started, err = tx.Participants("started")
		return err
	}))
	want := map[string]fxv1.ExperimentState{
		"running":   fxv1.ExperimentState_RUNNING,
		"lost":      fxv1.ExperimentState_FAILED,
		"started":   fxv1.ExperimentState_RUNNING,
		"unstarted": fxv1.ExperimentState_QUEUED,
	}
	if len(got) != len(want) {
		t.Errorf("records after recovery: %v, want %v", keys(got), want)
	}
	for id, st := range want {
		if got[id] == nil || got[id].State != st {
			t.Errorf("experiment %s after recovery: %+v, want %s", id, got[id], st)
		}
	}
	if len(started) != 2 || started[0].State != fxv1.ParticipantState_TRAINING || started[1].State != fxv1.ParticipantState_TRAINING {
		t.Errorf("participants of the experiment that started after the snapshot: %+v, want a and b TRAINING", started)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "orphaned", "newer", "archive")); err != nil {
		t.Errorf("the directory without a record was not set aside: %v", err)
	}
	if len(rec.Actions) != 4 {
		t.Errorf("%d actions reported, want 4 (removed, lost, started, newer): %q", len(rec.Actions), rec.Actions)
	}
	if _, err := os.Stat(rec.SetAside); err != nil {
		t.Errorf("the damaged store was not kept: %v", err)
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestSnapshotsArePeriodic: the store is copied at start, every
// snapshot_interval in which it changed, and at a clean stop.
func TestSnapshotsArePeriodic(t *testing.T) {
	f := newFed(t, func(c *Config) { c.SnapshotInterval = time.Minute })
	dir := filepath.Join(f.dataDir, "snapshots")
	count := func() int {
		snaps, err := store.Snapshots(dir)
		must(t, err)
		return len(snaps)
	}
	if n := count(); n != 1 {
		t.Fatalf("%d snapshots after start, want 1", n)
	}
	f.register("a", "fashion") // a change
	f.clock.Advance(time.Minute)
	eventually(t, "a periodic snapshot", func() bool { return count() == 2 })
	f.register("b", "fashion")
	f.clock.Advance(time.Second) // the stop's snapshot gets a name of its own
	f.stop()
	if n := count(); n != 3 {
		t.Fatalf("%d snapshots after a clean stop, want 3", n)
	}
}
