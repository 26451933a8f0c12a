package director

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/fx-fl/fx/director/store"

	"github.com/fx-fl/fx/internal/testpg"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestPostgresStore runs a director on a PostgreSQL database (a real
// server, internal/testpg): experiments submitted, approved, run and
// finished; the state is in the database, not in data_dir; and after a
// restart on the same database every experiment is back as it was and the
// running one resumes.
func TestPostgresStore(t *testing.T) {
	srv := testpg.Start(t)
	dsn := srv.NewDatabase(t)
	f := newFed(t, func(c *Config) { c.PostgresDSN = dsn; c.ReviewPolicy = ReviewManual })
	ctx := ctxT(t)
	f.register("a", "fashion")
	f.register("b", "fashion")
	approve := func(id string) {
		t.Helper()
		_, err := f.admin().ApproveExperiment(ctx, &fxv1.ReviewExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: id}})
		must(t, err)
	}

	running := f.submitPlan("alice", planTwo)
	if running.GetState() != fxv1.ExperimentState_PENDING {
		t.Fatalf("submitted experiment is %v, want PENDING", running.GetState())
	}
	approve(running.Id)
	f.waitState(running.Id, fxv1.ExperimentState_OFFERED)
	for _, n := range []string{"a", "b"} {
		_, err := f.answer(n, running.Id, true)
		must(t, err)
	}
	f.waitState(running.Id, fxv1.ExperimentState_RUNNING)
	agg := f.launcher.agg(t, running.Id, 1)
	agg.completeRound(t)
	pending := f.submitPlan("bob", strings.Replace(planTwo, "name: fashion", "name: later", 1))

	list, err := f.researcher("alice").ListExperiments(ctx, &fxv1.ListExperimentsRequest{})
	must(t, err)
	if len(list.GetExperiments()) != 1 || list.GetExperiments()[0].GetId() != running.Id {
		t.Errorf("alice lists %v, want only her experiment %s", list.GetExperiments(), running.Id)
	}

	// The records are in the database, and data_dir has no store file.
	conn, err := pgx.Connect(ctx, dsn)
	must(t, err)
	defer conn.Close(context.Background())
	var rows int
	must(t, conn.QueryRow(ctx, "SELECT count(*) FROM fx_experiments").Scan(&rows))
	if rows != 2 {
		t.Errorf("fx_experiments has %d rows, want 2", rows)
	}
	if _, err := os.Stat(filepath.Join(f.dataDir, storeFile)); !os.IsNotExist(err) {
		t.Errorf("data_dir has %s (%v): the director used bbolt", storeFile, err)
	}
	if snaps, _ := os.ReadDir(filepath.Join(f.dataDir, snapshotsDir)); len(snaps) != 0 {
		t.Errorf("the director took bbolt snapshots with a PostgreSQL store: %d files", len(snaps))
	}

	before := map[string]*fxv1.Experiment{}
	for _, id := range []string{running.Id, pending.Id} {
		before[id] = f.get("", id)
	}
	f.restart()
	for id, b := range before {
		a := f.get("", id)
		// Liveness is not durable: compare stored fields only.
		for _, x := range []*fxv1.Experiment{a, b} {
			for _, p := range x.Participants {
				p.State = fxv1.ParticipantState_PARTICIPANT_STATE_UNSPECIFIED
			}
		}
		if !proto.Equal(a, b) {
			t.Errorf("experiment %s after restart:\n%v\nbefore:\n%v", id, a, b)
		}
	}
	agg2 := f.launcher.agg(t, running.Id, 1)
	agg2.completeRound(t)
	agg2.result <- nil
	f.waitState(running.Id, fxv1.ExperimentState_FINISHED)
	approve(pending.Id)
	f.waitState(pending.Id, fxv1.ExperimentState_OFFERED)
}

// TestRecoverRefusesPostgres: `fx director recover` restores bbolt
// snapshots only; for a PostgreSQL store it refuses, pointing at the
// database's own backups, without quoting the DSN's password and without
// touching data_dir.
func TestRecoverRefusesPostgres(t *testing.T) {
	dir := t.TempDir()
	must(t, os.MkdirAll(filepath.Join(dir, "experiments", "x"), 0o700))
	_, err := Recover(RecoverConfig{DataDir: dir, PostgresDSN: "postgres://fx:s3cret@db.example/fxstate"})
	if err == nil || !strings.Contains(err.Error(), "pg_restore") || !strings.Contains(err.Error(), `"fxstate" on db.example:5432`) || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("Recover with a PostgreSQL store = %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "experiments", "x")); err != nil {
		t.Errorf("Recover touched data_dir: %v", err)
	}
}

// TestStoreSettings: the store keys are checked, and each error names its
// key without quoting the DSN's password.
func TestStoreSettings(t *testing.T) {
	for _, tc := range []struct {
		name, kind, dsn, want string
	}{
		{"unknown kind", "sqlite", "", `store.kind: "sqlite": use bbolt`},
		{"postgres without a dsn", "postgres", "", "store.postgres.dsn: is required"},
		{"dsn with bbolt", "bbolt", "postgres://fx@db/fx", "store.postgres.dsn: is set, but store.kind is bbolt"},
		{"bad dsn", "postgres", "postgres://fx:s3cret@db:port/fx", "store.postgres.dsn: not a PostgreSQL connection string"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := DefaultSettings()
			s.Store.Kind, s.Store.Postgres.DSN = tc.kind, tc.dsn
			_, err := s.Config(nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "s3cret") {
				t.Errorf("Config() = %v, want an error with %q and no password", err, tc.want)
			}
		})
	}
	s := DefaultSettings()
	if s.Store.Kind != StoreBolt || s.PostgresDSN() != "" {
		t.Errorf("default store %q (dsn %q), want bbolt", s.Store.Kind, s.PostgresDSN())
	}
	s.Store.Kind, s.Store.Postgres.DSN = StorePostgres, "postgres://fx@db/fx"
	if s.PostgresDSN() != "postgres://fx@db/fx" {
		t.Errorf("PostgresDSN() = %q", s.PostgresDSN())
	}
}

// TestStandbyTakesOver: two directors on one database and one data_dir.
// The second stands by: it refuses calls UNAVAILABLE naming the leader's
// address, and /readyz says it is a standby. The leader's lock session is
// then cut (as when its host dies): the leader is deposed (its Run ends
// with ErrNotLeader, its aggregator stopped), and the standby leads,
// reloads the state and relaunches the running experiment's aggregator,
// which finishes it.
func TestStandbyTakesOver(t *testing.T) {
	srv := testpg.Start(t)
	dsn := srv.NewDatabase(t)
	f := newFed(t, func(c *Config) { c.PostgresDSN = dsn })
	ctx := ctxT(t)
	f.register("a", "fashion")
	f.register("b", "fashion")
	exp := f.submitPlan("alice", planTwo)
	f.waitState(exp.Id, fxv1.ExperimentState_OFFERED)
	for _, n := range []string{"a", "b"} {
		_, err := f.answer(n, exp.Id, true)
		must(t, err)
	}
	f.waitState(exp.Id, fxv1.ExperimentState_RUNNING)
	agg := f.launcher.agg(t, exp.Id, 1)
	agg.completeRound(t)

	// The standby: another director, its own launcher, the same files.
	cfg := f.config()
	standbyLauncher := newFakeLauncher()
	cfg.Launcher = standbyLauncher
	standby, err := New(cfg)
	must(t, err)
	sctx, stopStandby := context.WithCancel(context.Background())
	standbyDone := make(chan error, 1)
	go func() { standbyDone <- standby.Run(sctx) }()
	defer func() {
		stopStandby()
		if err := <-standbyDone; err != nil {
			t.Errorf("the standby's Run: %v", err)
		}
	}()
	leader := f.d
	leaderAddr := leader.Addr().String()
	f.addr = standby.Addr().String()
	f.mu.Lock()
	f.clients = map[string]fxv1.DirectorClient{}
	f.mu.Unlock()
	var refusal error
	eventually(t, "the standby to name the leader", func() bool {
		_, refusal = f.researcher("alice").GetExperiment(ctx, &fxv1.GetExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: exp.Id}})
		return code(refusal) == codes.Unavailable && strings.Contains(refusal.Error(), "the leader is at "+leaderAddr)
	})
	if err := standby.readiness(); err == nil || !strings.Contains(err.Error(), "standby") {
		t.Errorf("the standby's readiness = %v, want not ready, saying it is a standby", err)
	}

	// The leader's lock session dies; its process does not.
	conn, err := pgx.Connect(ctx, dsn)
	must(t, err)
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted")
	must(t, err)
	select {
	case err := <-f.done:
		if !errors.Is(err, store.ErrNotLeader) {
			t.Errorf("the deposed leader's Run = %v, want ErrNotLeader", err)
		}
		f.cancel()
		f.cancel = nil
	case <-time.After(waitTimeout):
		t.Fatal("the deposed leader still runs")
	}
	select {
	case <-agg.stopped:
	default:
		t.Error("the deposed leader's Run returned with its aggregator still running")
	}

	eventually(t, "the standby to lead", standby.leading.Load)
	got := f.get("alice", exp.Id)
	if got.GetState() != fxv1.ExperimentState_RUNNING || got.GetRound() != 2 {
		t.Fatalf("after the takeover the experiment is %s in round %d, want RUNNING in round 2 (round 1 completed before)", got.GetState(), got.GetRound())
	}
	if standby.readiness() != nil {
		t.Errorf("the new leader's readiness = %v", standby.readiness())
	}
	agg2 := standbyLauncher.agg(t, exp.Id, 1)
	agg2.result <- nil
	f.waitState(exp.Id, fxv1.ExperimentState_FINISHED)
}
