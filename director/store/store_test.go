package store

import (
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// The store's contract is checked once, by testStore, against each
// implementation: TestBolt, TestMem here, TestPostgres in postgres_test.go.

// backend makes stores of one implementation for the suite.
type backend struct {
	// fresh makes a new, empty place for a store and returns what opens
	// the store there; opening again after Close reopens the same data.
	// Every store it opens is closed when the test ends.
	fresh func(t *testing.T) func(t *testing.T) Store
	// durable says a store's data survives Close (not Mem's).
	durable bool
}

func TestBolt(t *testing.T) {
	testStore(t, backend{durable: true, fresh: func(t *testing.T) func(t *testing.T) Store {
		path := filepath.Join(t.TempDir(), "fx.db")
		return func(t *testing.T) Store {
			s, err := OpenBolt(path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = s.Close() })
			return s
		}
	}})
}

func TestMem(t *testing.T) {
	testStore(t, backend{fresh: func(*testing.T) func(t *testing.T) Store {
		return func(*testing.T) Store { return NewMem() }
	}})
}

// testStore runs the store suite against b.
func testStore(t *testing.T, b backend) {
	open := func(t *testing.T) Store { return b.fresh(t)(t) }
	t.Run("Records", func(t *testing.T) { testRecords(t, open(t)) })
	t.Run("NotFound", func(t *testing.T) { testNotFound(t, open(t)) })
	t.Run("Order", func(t *testing.T) { testOrder(t, open(t)) })
	t.Run("DeleteExperiment", func(t *testing.T) { testDeleteExperiment(t, open(t)) })
	t.Run("Rollback", func(t *testing.T) { testRollback(t, open(t)) })
	t.Run("ViewIsReadOnly", func(t *testing.T) { testViewIsReadOnly(t, open(t)) })
	t.Run("ConcurrentUpdates", func(t *testing.T) { testConcurrentUpdates(t, open(t)) })
	t.Run("Batch", func(t *testing.T) { testBatch(t, b) })
	if b.durable {
		t.Run("Reopen", func(t *testing.T) { testReopen(t, b.fresh(t)) })
	}
}

var testNow = time.Date(2026, 1, 2, 3, 4, 5, 600, time.UTC)

func update(t *testing.T, s Store, fn func(Tx) error) {
	t.Helper()
	if err := s.Update(fn); err != nil {
		t.Fatal(err)
	}
}

func view(t *testing.T, s Store, fn func(Tx) error) {
	t.Helper()
	if err := s.View(fn); err != nil {
		t.Fatal(err)
	}
}

func same(t *testing.T, what string, got, want any) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s = %+v, want %+v", what, got, want)
	}
}

// fullExperiment has every field set, with text that a store must keep
// byte for byte (a NUL, which PostgreSQL's jsonb would refuse, and
// characters beyond ASCII).
func fullExperiment(id string) *Experiment {
	return &Experiment{
		ID: id, Name: "n-" + id, Owner: "alice", State: fxv1.ExperimentState_RUNNING,
		Reason: "a site said \"no\x00\" — ünïcödé ✓", PlanYAML: "name: x\nrounds: 3\n",
		ArchiveSize: 1 << 40, ArchiveSHA256: strings.Repeat("ab", 32),
		CreatedAt: testNow, UpdatedAt: testNow.Add(time.Second),
		ApprovedAt: testNow.Add(2 * time.Second), AnswerBy: testNow.Add(time.Hour), Rounds: 3,
	}
}

// testRecords writes, reads, lists and overwrites each kind of record.
func testRecords(t *testing.T, s Store) {
	exp := fullExperiment("e1")
	part := &Participant{Envoy: "site-1", State: fxv1.ParticipantState_TRAINING, Reason: "r", UpdatedAt: testNow, Registered: &Samples{Train: 100, Valid: 10}}
	env := &Envoy{Name: "site-1", Shard: []byte{0, 1, 2, 255}, MaxExperiments: 2, Version: "v1", RegisteredAt: testNow}
	pos := MetricPosition{Round: 2, Sequence: 9}
	update(t, s, func(tx Tx) error {
		return errors.Join(tx.PutExperiment(exp), tx.PutParticipant("e1", part), tx.PutEnvoy(env), tx.PutMetricPosition("e1", pos))
	})
	check := func() {
		t.Helper()
		view(t, s, func(tx Tx) error {
			e, err := tx.Experiment("e1")
			if err != nil {
				return err
			}
			same(t, "experiment", e, exp)
			exps, err := tx.Experiments()
			same(t, "experiments", exps, []*Experiment{exp})
			parts, err2 := tx.Participants("e1")
			same(t, "participants", parts, []*Participant{part})
			en, err3 := tx.Envoy("site-1")
			same(t, "envoy", en, env)
			envs, err4 := tx.Envoys()
			same(t, "envoys", envs, []*Envoy{env})
			p, err5 := tx.MetricPosition("e1")
			same(t, "metric position", p, pos)
			return errors.Join(err, err2, err3, err4, err5)
		})
	}
	check()

	// A put of an existing key replaces the record.
	exp.State, exp.Reason = fxv1.ExperimentState_FINISHED, ""
	part.State, part.Registered = fxv1.ParticipantState_COMPLETED, nil
	env.Version = "v2"
	pos = MetricPosition{Round: 3, Sequence: 14}
	update(t, s, func(tx Tx) error {
		return errors.Join(tx.PutExperiment(exp), tx.PutParticipant("e1", part), tx.PutEnvoy(env), tx.PutMetricPosition("e1", pos))
	})
	check()

	// Records with keys a store cannot hold are refused.
	err := s.Update(func(tx Tx) error { return tx.PutExperiment(&Experiment{ID: "a/b"}) })
	if err == nil {
		t.Error("experiment id with '/' accepted")
	}
	if err := s.Update(func(tx Tx) error { return tx.PutEnvoy(&Envoy{}) }); err == nil {
		t.Error("envoy without a name accepted")
	}
	if err := s.Update(func(tx Tx) error { return tx.PutParticipant("e1", &Participant{}) }); err == nil {
		t.Error("participant without an envoy accepted")
	}
}

// testNotFound: a missing record is ErrNotFound, wrapped with what was
// missing; a missing metric position is the zero position.
func testNotFound(t *testing.T, s Store) {
	view(t, s, func(tx Tx) error {
		_, err := tx.Experiment("nope")
		if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `experiment "nope"`) {
			t.Errorf("Experiment(nope) = %v, want ErrNotFound naming it", err)
		}
		_, err = tx.Envoy("nobody")
		if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `envoy "nobody"`) {
			t.Errorf("Envoy(nobody) = %v, want ErrNotFound naming it", err)
		}
		if pos, err := tx.MetricPosition("nope"); err != nil || pos != (MetricPosition{}) {
			t.Errorf("MetricPosition(nope) = %+v, %v; want zero, nil", pos, err)
		}
		if exps, err := tx.Experiments(); err != nil || len(exps) != 0 {
			t.Errorf("Experiments() of an empty store = %+v, %v", exps, err)
		}
		if parts, err := tx.Participants("nope"); err != nil || len(parts) != 0 {
			t.Errorf("Participants(nope) = %+v, %v", parts, err)
		}
		return nil
	})
}

// testOrder: listings come in the order of the keys' bytes, whatever the
// order of writing (and whatever a database's collation would say).
func testOrder(t *testing.T, s Store) {
	ids := []string{"b", "a-1", "é", "B", "a", "a.2", "Z9", "10", "9"}
	want := []string{"10", "9", "B", "Z9", "a", "a-1", "a.2", "b", "é"}
	update(t, s, func(tx Tx) error {
		for _, id := range ids {
			if err := errors.Join(
				tx.PutExperiment(&Experiment{ID: id}),
				tx.PutEnvoy(&Envoy{Name: id}),
				tx.PutParticipant("x", &Participant{Envoy: id}),
			); err != nil {
				return err
			}
		}
		return nil
	})
	view(t, s, func(tx Tx) error {
		exps, err := tx.Experiments()
		envs, err2 := tx.Envoys()
		parts, err3 := tx.Participants("x")
		var gotE, gotV, gotP []string
		for i := range exps {
			gotE = append(gotE, exps[i].ID)
		}
		for i := range envs {
			gotV = append(gotV, envs[i].Name)
		}
		for i := range parts {
			gotP = append(gotP, parts[i].Envoy)
		}
		same(t, "experiment order", gotE, want)
		same(t, "envoy order", gotV, want)
		same(t, "participant order", gotP, want)
		return errors.Join(err, err2, err3)
	})
}

// testDeleteExperiment: deleting an experiment takes its participants and
// metric position, and nothing of an experiment whose id it prefixes.
func testDeleteExperiment(t *testing.T, s Store) {
	update(t, s, func(tx Tx) error {
		return errors.Join(
			tx.PutExperiment(fullExperiment("a")), tx.PutExperiment(fullExperiment("ab")),
			tx.PutParticipant("a", &Participant{Envoy: "e1"}), tx.PutParticipant("a", &Participant{Envoy: "e2"}),
			tx.PutParticipant("ab", &Participant{Envoy: "e1"}),
			tx.PutMetricPosition("a", MetricPosition{Round: 1, Sequence: 3}), tx.PutMetricPosition("ab", MetricPosition{Round: 2}),
			tx.PutEnvoy(&Envoy{Name: "e1"}),
		)
	})
	update(t, s, func(tx Tx) error { return tx.DeleteExperiment("a") })
	// Deleting what is not there is no error.
	update(t, s, func(tx Tx) error { return tx.DeleteExperiment("a") })
	view(t, s, func(tx Tx) error {
		if _, err := tx.Experiment("a"); !errors.Is(err, ErrNotFound) {
			t.Errorf("deleted experiment: %v", err)
		}
		if parts, err := tx.Participants("a"); err != nil || len(parts) != 0 {
			t.Errorf("participants of the deleted experiment: %+v, %v", parts, err)
		}
		if pos, err := tx.MetricPosition("a"); err != nil || pos != (MetricPosition{}) {
			t.Errorf("metric position of the deleted experiment: %+v, %v", pos, err)
		}
		if _, err := tx.Experiment("ab"); err != nil {
			t.Errorf("experiment ab: %v", err)
		}
		if parts, err := tx.Participants("ab"); err != nil || len(parts) != 1 {
			t.Errorf("participants of ab: %+v, %v", parts, err)
		}
		if pos, err := tx.MetricPosition("ab"); err != nil || pos.Round != 2 {
			t.Errorf("metric position of ab: %+v, %v", pos, err)
		}
		if _, err := tx.Envoy("e1"); err != nil {
			t.Errorf("envoy e1: %v", err)
		}
		return nil
	})
}

// testRollback: an Update whose function fails changes nothing, and its
// writes are not seen afterwards, not even by itself on a retry.
func testRollback(t *testing.T, s Store) {
	update(t, s, func(tx Tx) error {
		return errors.Join(tx.PutExperiment(fullExperiment("a")), tx.PutParticipant("a", &Participant{Envoy: "e1"}))
	})
	boom := errors.New("boom")
	err := s.Update(func(tx Tx) error {
		if err := errors.Join(
			tx.PutExperiment(&Experiment{ID: "c"}),
			tx.PutEnvoy(&Envoy{Name: "e9"}),
			tx.PutMetricPosition("a", MetricPosition{Round: 7}),
			tx.DeleteExperiment("a"),
		); err != nil {
			return err
		}
		// The transaction sees its own writes.
		if _, err := tx.Experiment("c"); err != nil {
			return err
		}
		if _, err := tx.Experiment("a"); !errors.Is(err, ErrNotFound) {
			return fmt.Errorf("a inside the transaction that deleted it: %v", err)
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Update = %v, want boom", err)
	}
	view(t, s, func(tx Tx) error {
		if _, err := tx.Experiment("c"); !errors.Is(err, ErrNotFound) {
			t.Errorf("experiment c after rollback: %v, want ErrNotFound", err)
		}
		if _, err := tx.Envoy("e9"); !errors.Is(err, ErrNotFound) {
			t.Errorf("envoy e9 after rollback: %v, want ErrNotFound", err)
		}
		e, err := tx.Experiment("a")
		if err != nil {
			return fmt.Errorf("experiment a after the rolled-back delete: %w", err)
		}
		same(t, "experiment a", e, fullExperiment("a"))
		if parts, err := tx.Participants("a"); err != nil || len(parts) != 1 {
			t.Errorf("participants of a after rollback: %+v, %v", parts, err)
		}
		if pos, err := tx.MetricPosition("a"); err != nil || pos != (MetricPosition{}) {
			t.Errorf("metric position of a after rollback: %+v, %v", pos, err)
		}
		return nil
	})
}

func testViewIsReadOnly(t *testing.T, s Store) {
	if err := s.View(func(tx Tx) error { return tx.PutEnvoy(&Envoy{Name: "x"}) }); err == nil {
		t.Error("write in View succeeded")
	}
	if err := s.View(func(tx Tx) error { return tx.DeleteExperiment("x") }); err == nil {
		t.Error("delete in View succeeded")
	}
	view(t, s, func(tx Tx) error {
		if _, err := tx.Envoy("x"); !errors.Is(err, ErrNotFound) {
			t.Errorf("envoy written in a View: %v", err)
		}
		return nil
	})
}

// testConcurrentUpdates: Updates that read a record and write it changed,
// run from many goroutines at once, lose no update: each increment of a
// counter is counted once.
func testConcurrentUpdates(t *testing.T, s Store) {
	const workers, each = 8, 10
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				err := s.Update(func(tx Tx) error {
					pos, err := tx.MetricPosition("x")
					if err != nil {
						return err
					}
					pos.Sequence++
					return tx.PutMetricPosition("x", pos)
				})
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	view(t, s, func(tx Tx) error {
		pos, err := tx.MetricPosition("x")
		if pos.Sequence != workers*each {
			t.Errorf("counter = %d after %d increments: updates were lost", pos.Sequence, workers*each)
		}
		return err
	})
}

// testBatch: concurrent batched writes are all committed (and survive a
// reopen, for a durable store), and a failing one commits nothing of its
// own.
func testBatch(t *testing.T, b backend) {
	open := b.fresh(t)
	s := open(t)
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
	if b.durable {
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		s = open(t)
	}
	view(t, s, func(tx Tx) error {
		envoys, err := tx.Envoys()
		if len(envoys) != n {
			t.Errorf("%d envoys stored, want the %d committed ones and not the failed one", len(envoys), n)
		}
		return err
	})
}

// testReopen: what was committed is there after Close and a new open.
func testReopen(t *testing.T, open func(t *testing.T) Store) {
	s := open(t)
	update(t, s, func(tx Tx) error {
		return errors.Join(
			tx.PutExperiment(fullExperiment("x")),
			tx.PutParticipant("x", &Participant{Envoy: "e1", State: fxv1.ParticipantState_ACCEPTED}),
			tx.PutEnvoy(&Envoy{Name: "e1", Shard: []byte{7}}),
			tx.PutMetricPosition("x", MetricPosition{Round: 1, Sequence: 4}),
		)
	})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t)
	view(t, s, func(tx Tx) error {
		e, err := tx.Experiment("x")
		if err != nil {
			return err
		}
		same(t, "experiment after reopen", e, fullExperiment("x"))
		parts, err := tx.Participants("x")
		if err != nil || len(parts) != 1 || parts[0].State != fxv1.ParticipantState_ACCEPTED {
			t.Errorf("participants after reopen: %+v, %v", parts, err)
		}
		env, err := tx.Envoy("e1")
		if err != nil || string(env.Shard) != "\x07" {
			t.Errorf("envoy after reopen: %+v, %v", env, err)
		}
		pos, err := tx.MetricPosition("x")
		same(t, "metric position after reopen", pos, MetricPosition{Round: 1, Sequence: 4})
		return err
	})
}
