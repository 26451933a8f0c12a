package store

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// filledStore writes a store of a few hundred kilobytes (many pages, a
// branch level) at path and closes it.
func filledStore(t *testing.T, path string) {
	t.Helper()
	s, err := OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	plan := strings.Repeat("# a plan line\n", 40)
	err = s.Update(func(tx Tx) error {
		for i := range 400 {
			id := fmt.Sprintf("exp%04d", i)
			if err := tx.PutExperiment(&Experiment{ID: id, Name: id, Owner: "alice", State: fxv1.ExperimentState_FINISHED, PlanYAML: plan}); err != nil {
				return err
			}
			if err := tx.PutParticipant(id, &Participant{Envoy: "site", State: fxv1.ParticipantState_COMPLETED}); err != nil {
				return err
			}
		}
		return tx.PutEnvoy(&Envoy{Name: "site"})
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestOpenBoltRefusesDamagedFiles: a truncated or garbled store is refused
// with a *DamagedError naming the file, never a panic or a fault (before,
// a truncated file crashed the director with SIGBUS, garbled pages with a
// panic). The damage is done the ways disks and people do it.
func TestOpenBoltRefusesDamagedFiles(t *testing.T) {
	const page = 4096
	damages := map[string]func(t *testing.T, path string){
		"truncated to half": func(t *testing.T, path string) {
			fi, _ := os.Stat(path)
			truncate(t, path, fi.Size()/2/page*page)
		},
		"truncated mid-page": func(t *testing.T, path string) {
			fi, _ := os.Stat(path)
			truncate(t, path, fi.Size()/2+100)
		},
		"truncated to its header": func(t *testing.T, path string) { truncate(t, path, 2*page) },
		"truncated to 100 bytes":  func(t *testing.T, path string) { truncate(t, path, 100) },
		"pages garbled after the header": func(t *testing.T, path string) {
			fi, _ := os.Stat(path)
			garble(t, path, 2*page, fi.Size()-2*page)
		},
		"one page garbled in the middle": func(t *testing.T, path string) {
			fi, _ := os.Stat(path)
			garble(t, path, fi.Size()/2/page*page, page)
		},
		"pages zeroed in the middle": func(t *testing.T, path string) {
			fi, _ := os.Stat(path)
			f, err := os.OpenFile(path, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt(make([]byte, 8*page), fi.Size()/3/page*page); err != nil {
				t.Fatal(err)
			}
		},
		"random bytes": func(t *testing.T, path string) {
			fi, _ := os.Stat(path)
			garble(t, path, 0, fi.Size())
		},
		"a record that is not JSON": func(t *testing.T, path string) {
			db, err := bolt.Open(path, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			if err := db.Update(func(tx *bolt.Tx) error {
				return tx.Bucket([]byte(bucketExperiments)).Put([]byte("exp0007"), []byte("\x00\x01garbage"))
			}); err != nil {
				t.Fatal(err)
			}
		},
	}
	for name, damage := range damages {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "director.db")
			filledStore(t, path)
			damage(t, path)
			for what, open := range map[string]func() error{
				"OpenBolt": func() error {
					s, err := OpenBolt(path)
					if err == nil {
						s.Close()
					}
					return err
				},
				"Verify": func() error { return Verify(path) },
			} {
				err := open()
				var de *DamagedError
				if !errors.As(err, &de) || de.Path != path || !strings.Contains(err.Error(), path) {
					t.Errorf("%s = %v, want a *DamagedError naming %s", what, err, path)
				}
			}
		})
	}
}

func truncate(t *testing.T, path string, size int64) {
	t.Helper()
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
}

func garble(t *testing.T, path string, off, n int64) {
	t.Helper()
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(uint64(off), uint64(n)))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// TestOpenBoltReportsANewStore: Created says whether the store was made
// now (no file, or an empty one), which the director needs to tell a lost
// store from a first start.
func TestOpenBoltReportsANewStore(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		name    string
		prepare func(path string) error
		created bool
	}{
		{"missing", func(string) error { return nil }, true},
		{"empty", func(p string) error { return os.WriteFile(p, nil, 0o600) }, true},
		{"existing", func(p string) error { filledStore(t, p); return nil }, false},
	} {
		path := filepath.Join(dir, c.name+".db")
		if err := c.prepare(path); err != nil {
			t.Fatal(err)
		}
		s, err := OpenBolt(path)
		if err != nil {
			t.Fatal(err)
		}
		if s.Created() != c.created {
			t.Errorf("%s: Created() = %v, want %v", c.name, s.Created(), c.created)
		}
		s.Close()
	}
}

// TestSnapshots: a snapshot is a consistent, openable copy; one is skipped
// when nothing changed; only the newest are kept.
func TestSnapshots(t *testing.T) {
	dir := t.TempDir()
	snapDir := filepath.Join(dir, "snapshots")
	s, err := OpenBolt(filepath.Join(dir, "director.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	at := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	var taken []string
	for i := range 5 {
		if err := s.Update(func(tx Tx) error {
			return tx.PutExperiment(&Experiment{ID: fmt.Sprintf("e%d", i), State: fxv1.ExperimentState_PENDING})
		}); err != nil {
			t.Fatal(err)
		}
		path, err := s.Snapshot(snapDir, at.Add(time.Duration(i)*time.Minute), 3)
		if err != nil || path == "" {
			t.Fatalf("snapshot %d: %q, %v", i, path, err)
		}
		taken = append(taken, path)
		if again, err := s.Snapshot(snapDir, at.Add(time.Duration(i)*time.Minute+time.Second), 3); err != nil || again != "" {
			t.Fatalf("a snapshot with nothing changed: %q, %v; want it skipped", again, err)
		}
	}
	snaps, err := Snapshots(snapDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 3 || snaps[0].Path != taken[4] || snaps[2].Path != taken[2] {
		t.Fatalf("snapshots = %+v, want the newest 3 of %v, newest first", snaps, taken)
	}
	if !snaps[0].Taken.Equal(at.Add(4 * time.Minute)) {
		t.Errorf("newest snapshot taken %v, want %v", snaps[0].Taken, at.Add(4*time.Minute))
	}
	if err := Verify(snaps[0].Path); err != nil {
		t.Fatal(err)
	}
	c, err := OpenBolt(snaps[1].Path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var n int
	if err := c.View(func(tx Tx) error {
		exps, err := tx.Experiments()
		n = len(exps)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if n != 4 {
		t.Errorf("the second-newest snapshot holds %d experiments, want 4", n)
	}
}
