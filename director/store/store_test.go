package store

import (
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

type opener func(t *testing.T, path string) Store

func implementations() map[string]opener {
	return map[string]opener{
		"bolt": func(t *testing.T, path string) Store {
			s, err := OpenBolt(path)
			if err != nil {
				t.Fatal(err)
			}
			return s
		},
		"mem": func(t *testing.T, _ string) Store { return NewMem() },
	}
}

func TestStore(t *testing.T) {
	for name, open := range implementations() {
		t.Run(name, func(t *testing.T) {
			s := open(t, filepath.Join(t.TempDir(), "fx.db"))
			defer s.Close()
			now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

			err := s.Update(func(tx Tx) error {
				for _, id := range []string{"b", "a"} {
					if err := tx.PutExperiment(&Experiment{ID: id, Name: "n" + id, Owner: "alice", State: fxv1.ExperimentState_PENDING, CreatedAt: now}); err != nil {
						return err
					}
				}
				if err := tx.PutParticipant("a", &Participant{Envoy: "e1", State: fxv1.ParticipantState_INVITED}); err != nil {
					return err
				}
				if err := tx.PutParticipant("a", &Participant{Envoy: "e2", State: fxv1.ParticipantState_ACCEPTED}); err != nil {
					return err
				}
				if err := tx.PutParticipant("ab", &Participant{Envoy: "e1", State: fxv1.ParticipantState_INVITED}); err != nil {
					return err
				}
				if err := tx.PutEnvoy(&Envoy{Name: "e1", Shard: []byte{1, 2}, RegisteredAt: now}); err != nil {
					return err
				}
				return tx.PutMetricPosition("a", MetricPosition{Round: 2, Sequence: 9})
			})
			if err != nil {
				t.Fatal(err)
			}

			// A failed transaction changes nothing.
			boom := errors.New("boom")
			err = s.Update(func(tx Tx) error {
				if err := tx.PutExperiment(&Experiment{ID: "c"}); err != nil {
					return err
				}
				if err := tx.DeleteExperiment("a"); err != nil {
					return err
				}
				return boom
			})
			if !errors.Is(err, boom) {
				t.Fatalf("Update = %v, want boom", err)
			}

			err = s.View(func(tx Tx) error {
				exps, err := tx.Experiments()
				if err != nil {
					return err
				}
				if len(exps) != 2 || exps[0].ID != "a" || exps[1].ID != "b" {
					t.Errorf("experiments = %+v, want a, b", exps)
				}
				if !exps[0].CreatedAt.Equal(now) {
					t.Errorf("created_at = %v, want %v", exps[0].CreatedAt, now)
				}
				if _, err := tx.Experiment("c"); !errors.Is(err, ErrNotFound) {
					t.Errorf("experiment c after rollback: %v, want ErrNotFound", err)
				}
				parts, err := tx.Participants("a")
				if err != nil {
					return err
				}
				if len(parts) != 2 || parts[0].Envoy != "e1" || parts[1].State != fxv1.ParticipantState_ACCEPTED {
					t.Errorf("participants(a) = %+v", parts)
				}
				pos, err := tx.MetricPosition("a")
				if err != nil {
					return err
				}
				if pos != (MetricPosition{Round: 2, Sequence: 9}) {
					t.Errorf("metric position = %+v", pos)
				}
				e, err := tx.Envoy("e1")
				if err != nil {
					return err
				}
				if string(e.Shard) != "\x01\x02" {
					t.Errorf("envoy shard = %v", e.Shard)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}

			// Deleting an experiment takes its participants and metric
			// position, and nothing of an experiment whose id it prefixes.
			if err := s.Update(func(tx Tx) error { return tx.DeleteExperiment("a") }); err != nil {
				t.Fatal(err)
			}
			err = s.View(func(tx Tx) error {
				if _, err := tx.Experiment("a"); !errors.Is(err, ErrNotFound) {
					t.Errorf("deleted experiment: %v", err)
				}
				if parts, _ := tx.Participants("a"); len(parts) != 0 {
					t.Errorf("participants of deleted experiment: %+v", parts)
				}
				if parts, _ := tx.Participants("ab"); len(parts) != 1 {
					t.Errorf("participants of ab: %+v", parts)
				}
				if pos, _ := tx.MetricPosition("a"); pos != (MetricPosition{}) {
					t.Errorf("metric position of deleted experiment: %+v", pos)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}

			if err := s.View(func(tx Tx) error { return tx.PutEnvoy(&Envoy{Name: "x"}) }); err == nil {
				t.Error("write in View succeeded")
			}
		})
	}
}

func TestBoltSurvivesReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fx.db")
	s, err := OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(func(tx Tx) error {
		return tx.PutExperiment(&Experiment{ID: "x", State: fxv1.ExperimentState_RUNNING})
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var got *Experiment
	if err := s.View(func(tx Tx) (err error) { got, err = tx.Experiment("x"); return err }); err != nil {
		t.Fatal(err)
	}
	if got.State != fxv1.ExperimentState_RUNNING {
		t.Errorf("state after reopen = %v", got.State)
	}
}

// TestBatch: concurrent batched writes are all committed (and survive a
// reopen, for bolt), and a failing one commits nothing of its own.
func TestBatch(t *testing.T) {
	for name, open := range implementations() {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "fx.db")
			s := open(t, path)
			const n = 50
			errs := make(chan error, n+1)
			for i := range n {
				go func() {
					errs <- s.Batch(func(tx Tx) error { return tx.PutEnvoy(&Envoy{Name: fmt.Sprintf("e%02d", i)}) })
				}()
			}
			boom := errors.New("boom")
			go func() {
				errs <- s.Batch(func(tx Tx) error {
					if err := tx.PutEnvoy(&Envoy{Name: "failed"}); err != nil {
						return err
					}
					return boom
				})
			}()
			failed := 0
			for range n + 1 {
				if err := <-errs; errors.Is(err, boom) {
					failed++
				} else if err != nil {
					t.Fatal(err)
				}
			}
			if failed != 1 {
				t.Fatalf("%d batches reported the failure, want 1", failed)
			}
			if name == "bolt" {
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
				s = open(t, path)
			}
			defer s.Close()
			var envoys []*Envoy
			if err := s.View(func(tx Tx) error {
				var err error
				envoys, err = tx.Envoys()
				return err
			}); err != nil {
				t.Fatal(err)
			}
			if len(envoys) != n {
				t.Fatalf("%d envoys stored, want the %d committed ones and not the failed one", len(envoys), n)
			}
		})
	}
}
