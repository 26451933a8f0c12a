package director

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/director/store"
	"github.com/fx-fl/fx/internal/atomicfile"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// The store is one file; a damaged disk, a bad copy or an operator's
// mistake can take it while the archives and models under data_dir stay.
// The director therefore keeps consistent snapshots of the store beside it
// (periodically, at every start and at every clean stop), refuses to start
// on a store it cannot trust, and Recover brings back the newest good
// snapshot, reconciled with the experiment directories on disk.

const (
	storeFile    = "director.db"
	snapshotsDir = "snapshots"
	orphanedDir  = "orphaned"
)

func storePath(dataDir string) string { return filepath.Join(dataDir, storeFile) }

// openStore opens the store cfg names: the PostgreSQL database of
// PostgresDSN, or the bbolt store in DataDir. A damaged bbolt store is
// refused with what to do.
func openStore(cfg Config) (store.Store, error) {
	if cfg.PostgresDSN != "" {
		st, err := store.OpenPostgres(context.Background(), cfg.PostgresDSN)
		if err != nil {
			return nil, fmt.Errorf("store.postgres.dsn: %w", err)
		}
		cfg.Logger.Named("director").Info("state kept in PostgreSQL; the director takes no snapshots of it: back the database up with pg_dump or point-in-time recovery", "database", st.Target())
		return st, nil
	}
	st, err := store.OpenBolt(storePath(cfg.DataDir))
	var de *store.DamagedError
	if errors.As(err, &de) {
		return nil, fmt.Errorf("%w. The director cannot start on it: run `fx director recover --data-dir %s`, which sets the damaged file aside and restores %s", err, cfg.DataDir, newestSnapshot(cfg.DataDir))
	}
	return st, err
}

// newestSnapshot describes, for a message, what Recover would restore.
func newestSnapshot(dataDir string) string {
	dir := filepath.Join(dataDir, snapshotsDir)
	snaps, err := store.Snapshots(dir)
	if err != nil || len(snaps) == 0 {
		return "the newest good snapshot from " + dir + " (there is none yet)"
	}
	return fmt.Sprintf("the newest good snapshot from %s (the newest was taken %s)", dir, snaps[0].Taken.Format(time.RFC3339))
}

// checkStoreMatches refuses a store that knows none of the experiment
// directories in the data directory: an emptied or lost director.db, or
// another data directory's, would otherwise be taken as the truth, and
// every experiment here, running ones included, forgotten while its files
// stay on disk. A store that knows some of them is let through with a
// warning for the others: a crash between writing an archive and its
// record, or between removing a record and its files, leaves such a
// directory.
func (d *Director) checkStoreMatches() error {
	dirs, err := experimentDirs(d.cfg.DataDir)
	if err != nil {
		return err
	}
	unknown := unknownDirs(dirs, func(id string) bool { return d.exps[id] != nil })
	switch {
	case len(unknown) == 0:
		return nil
	case len(unknown) < len(dirs):
		d.log.Warn("experiment directories without a record (left by a crash during a submission or a removal; `fx director recover` moves them aside)", "directories", unknown)
		return nil
	}
	what := "holds no experiment"
	if len(d.exps) > 0 {
		what = fmt.Sprintf("records %d experiments, none of them", len(d.exps))
	}
	if d.cfg.PostgresDSN != "" {
		db, _ := store.PostgresTarget(d.cfg.PostgresDSN)
		return fmt.Errorf("the %s %s, but %s holds %d experiment directories (%s): the database is new, emptied or another federation's, and starting would forget those experiments. Point store.postgres.dsn at this director's database, or restore it from its backup (pg_restore, point-in-time recovery); to start a new federation instead, move %s away",
			db, what, filepath.Join(d.cfg.DataDir, "experiments"), len(unknown), listShort(unknown), filepath.Join(d.cfg.DataDir, "experiments"))
	}
	return fmt.Errorf("the store %s %s, but %s holds %d experiment directories (%s): the store is new, emptied or another data directory's, and starting would forget those experiments. Run `fx director recover --data-dir %s` to restore %s and reconcile it with them; to start a new federation instead, move %s away",
		storePath(d.cfg.DataDir), what, filepath.Join(d.cfg.DataDir, "experiments"), len(unknown), listShort(unknown), d.cfg.DataDir, newestSnapshot(d.cfg.DataDir), filepath.Join(d.cfg.DataDir, "experiments"))
}

// unknownDirs are the experiment directories whose id known does not know.
func unknownDirs(dirs []string, known func(id string) bool) []string {
	var out []string
	for _, id := range dirs {
		if !known(id) {
			out = append(out, id)
		}
	}
	return out
}

// experimentDirs lists the experiment directories under data_dir, by id.
func experimentDirs(dataDir string) ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(dataDir, "experiments"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

func listShort(ids []string) string {
	if len(ids) > 5 {
		return strings.Join(ids[:5], ", ") + fmt.Sprintf(" and %d more", len(ids)-5)
	}
	return strings.Join(ids, ", ")
}

// snapshotter is the part of a store that can copy itself; the bbolt store
// is one, the test stores are not, and neither is PostgreSQL's: a database
// is backed up with its own tools.
type snapshotter interface {
	Snapshot(dir string, now time.Time, keep int) (string, error)
}

// snapshot copies the store into data_dir/snapshots, unless nothing changed
// since the last copy.
func (d *Director) snapshot() {
	s, ok := backing(d.store).(snapshotter)
	if !ok || d.cfg.SnapshotsKept <= 0 {
		return
	}
	path, err := s.Snapshot(filepath.Join(d.cfg.DataDir, snapshotsDir), d.clock.Now(), d.cfg.SnapshotsKept)
	if err != nil {
		d.log.Error("cannot snapshot the store; `fx director recover` would restore an older snapshot", "error", err)
		return
	}
	if path != "" {
		d.log.Debug("store snapshot taken", "path", path)
	}
}

// snapshotLoop snapshots the store every SnapshotInterval until ctx ends.
func (d *Director) snapshotLoop(ctx context.Context) {
	if _, ok := backing(d.store).(snapshotter); !ok || d.cfg.SnapshotInterval <= 0 {
		return
	}
	d.every(ctx, d.cfg.SnapshotInterval, d.snapshot)
}

// RecoverConfig says what Recover works on.
type RecoverConfig struct {
	// DataDir is the director's data_dir.
	DataDir string
	// PostgresDSN is the director's PostgreSQL store, if it has one:
	// Recover then refuses, for it restores bbolt snapshots only.
	PostgresDSN string
	// StartEmpty allows recovering without a good snapshot: the store
	// starts empty and every experiment directory is set aside.
	StartEmpty bool
	// Now is the clock; time.Now when nil.
	Now    func() time.Time
	Logger hclog.Logger
}

// Recovery is what Recover did, for the operator.
type Recovery struct {
	// Restored is the snapshot that became the store, or "" when the
	// store was kept (it was intact and matched the data directory).
	Restored string
	// SetAside is where the replaced store went, if anywhere.
	SetAside string
	// StartedEmpty says that no snapshot was good and the store started
	// empty (RecoverConfig.StartEmpty).
	StartedEmpty bool
	// Actions say, one line each, what was done to reconcile the store
	// with the experiment directories.
	Actions []string
}

// Recover makes data_dir startable again after its bbolt store was damaged,
// lost or replaced: it sets the store aside and restores the newest
// snapshot that passes store.Verify (an intact store that matches the data
// directory is kept), then reconciles the records with the experiment
// directories. A snapshot is older than the store it replaces, so:
//
//   - a directory without a record (submitted after the snapshot) is moved
//     to data_dir/orphaned: its owner is not known, so it must be submitted
//     again;
//   - a record without its directory is deleted if the experiment had
//     ended (it was removed after the snapshot), and failed otherwise;
//   - an experiment recorded as not yet started whose aggregator has a
//     checkpoint started after the snapshot: it becomes RUNNING again with
//     the participants its aggregator recorded, and resumes.
//
// Running experiments resume from their checkpoints as after any restart.
// No file is deleted. The director must be stopped.
func Recover(cfg RecoverConfig) (*Recovery, error) {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.PostgresDSN != "" {
		db, err := store.PostgresTarget(cfg.PostgresDSN)
		if err != nil {
			return nil, fmt.Errorf("store.postgres.dsn: %w", err)
		}
		return nil, fmt.Errorf("this director keeps its state in the %s (store.kind postgres), and `fx director recover` restores only the bbolt store's snapshots (data_dir/snapshots): restore the database from its backup with PostgreSQL's tools (pg_restore of a pg_dump, or point-in-time recovery), then start the director", db)
	}
	dbPath := storePath(cfg.DataDir)
	if inUse, err := store.InUse(dbPath); err != nil {
		return nil, err
	} else if inUse {
		return nil, fmt.Errorf("%s is open in another process: stop the director on %s first", dbPath, cfg.DataDir)
	}
	dirs, err := experimentDirs(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	rec := &Recovery{}
	why, err := storeProblem(dbPath, dirs)
	if err != nil {
		return nil, err
	}
	if why != "" {
		cfg.Logger.Warn("the store cannot be used", "path", dbPath, "problem", why)
		if err := restoreSnapshot(cfg, rec, why); err != nil {
			return nil, err
		}
	}
	st, err := store.OpenBolt(dbPath)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	if err := reconcile(cfg, st, dirs, rec); err != nil {
		return rec, err
	}
	return rec, nil
}

// storeProblem says why the store at path cannot be used as it is, or ""
// when it can.
func storeProblem(path string, dirs []string) (string, error) {
	haveDirs := len(dirs) > 0
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if !haveDirs {
			return "", nil
		}
		return "it is missing", nil
	case err != nil:
		return "", err
	case fi.Size() == 0:
		return "it is empty (0 bytes)", nil
	}
	if err := store.Verify(path); err != nil {
		var de *store.DamagedError
		if errors.As(err, &de) {
			return de.Err.Error(), nil
		}
		return "", err
	}
	if !haveDirs {
		return "", nil
	}
	st, err := store.OpenBolt(path)
	if err != nil {
		return "", err
	}
	defer st.Close()
	known := map[string]bool{}
	err = st.View(func(tx store.Tx) error {
		exps, err := tx.Experiments()
		for _, e := range exps {
			known[e.ID] = true
		}
		return err
	})
	if err != nil {
		return "", err
	}
	if len(unknownDirs(dirs, func(id string) bool { return known[id] })) == len(dirs) {
		return "it knows none of the experiment directories in the data directory", nil
	}
	return "", nil
}

// restoreSnapshot sets the store aside and copies the newest good snapshot
// in its place.
func restoreSnapshot(cfg RecoverConfig, rec *Recovery, why string) error {
	dbPath := storePath(cfg.DataDir)
	snaps, err := store.Snapshots(filepath.Join(cfg.DataDir, snapshotsDir))
	if err != nil {
		return err
	}
	var good string
	for _, s := range snaps {
		if err := store.Verify(s.Path); err != nil {
			cfg.Logger.Warn("snapshot unusable; trying an older one", "path", s.Path, "error", err)
			rec.Actions = append(rec.Actions, fmt.Sprintf("skipped snapshot %s: %v", s.Path, err))
			continue
		}
		good = s.Path
		break
	}
	if good == "" && !cfg.StartEmpty {
		return fmt.Errorf("the store %s cannot be used (%s) and %s holds no good snapshot to restore: run again with --start-empty to start with an empty store, setting every experiment directory aside under %s (nothing is deleted)",
			dbPath, why, filepath.Join(cfg.DataDir, snapshotsDir), filepath.Join(cfg.DataDir, orphanedDir))
	}
	if _, err := os.Stat(dbPath); err == nil {
		rec.SetAside = fmt.Sprintf("%s.set-aside-%s", dbPath, cfg.Now().UTC().Format("20060102T150405Z"))
		if err := os.Rename(dbPath, rec.SetAside); err != nil {
			return fmt.Errorf("set the store aside: %w", err)
		}
	}
	if good == "" {
		rec.StartedEmpty = true
		return nil
	}
	src, err := os.Open(good)
	if err != nil {
		return err
	}
	defer src.Close()
	if err := atomicfile.Stream(dbPath, func(w io.Writer) error {
		_, err := io.Copy(w, src)
		return err
	}); err != nil {
		return fmt.Errorf("restore %s: %w", good, err)
	}
	rec.Restored = good
	return nil
}

// reconcile brings the store's records in line with the experiment
// directories; see Recover.
func reconcile(cfg RecoverConfig, st store.Store, dirs []string, rec *Recovery) error {
	now := cfg.Now().UTC()
	expDir := func(id string) string { return filepath.Join(cfg.DataDir, "experiments", id) }
	return st.Update(func(tx store.Tx) error {
		exps, err := tx.Experiments()
		if err != nil {
			return err
		}
		known := map[string]bool{}
		for _, e := range exps {
			known[e.ID] = true
			label := fmt.Sprintf("experiment %s (%s/%s, %s)", e.ID, e.Owner, e.Name, e.State)
			if !slices.Contains(dirs, e.ID) {
				if e.Ended() {
					if err := tx.DeleteExperiment(e.ID); err != nil {
						return err
					}
					rec.Actions = append(rec.Actions, label+": its directory is gone (removed after the snapshot): record deleted")
					continue
				}
				e.State, e.Reason, e.UpdatedAt = fxv1.ExperimentState_FAILED, "its files under "+expDir(e.ID)+" were missing when the store was recovered", now
				if err := tx.PutExperiment(e); err != nil {
					return err
				}
				rec.Actions = append(rec.Actions, label+": its directory is missing: now FAILED")
				continue
			}
			if started(e.State) {
				continue
			}
			participants, err := aggregator.Participants(filepath.Join(expDir(e.ID), "aggregator"))
			if err != nil || len(participants) == 0 {
				continue // never started, or nothing says with whom
			}
			if err := resumeStarted(tx, e, participants, now); err != nil {
				return err
			}
			rec.Actions = append(rec.Actions, fmt.Sprintf("%s: its aggregator started after the snapshot: RUNNING again with %s", label, strings.Join(participants, ", ")))
		}
		for _, id := range dirs {
			if known[id] {
				continue
			}
			to := filepath.Join(cfg.DataDir, orphanedDir, id)
			if err := os.MkdirAll(filepath.Dir(to), 0o700); err != nil {
				return err
			}
			if err := os.Rename(expDir(id), to); err != nil {
				return fmt.Errorf("set aside %s: %w", expDir(id), err)
			}
			rec.Actions = append(rec.Actions, fmt.Sprintf("experiment directory %s has no record (submitted after the snapshot): moved to %s; its owner must submit it again", id, to))
		}
		return nil
	})
}

// started reports whether an experiment in state s has had an aggregator.
func started(s fxv1.ExperimentState) bool {
	switch s {
	case fxv1.ExperimentState_PENDING, fxv1.ExperimentState_QUEUED, fxv1.ExperimentState_OFFERED:
		return false
	}
	return true
}

// resumeStarted records an experiment whose aggregator ran after the
// snapshot as RUNNING with the participants the aggregator recorded.
func resumeStarted(tx store.Tx, e *store.Experiment, participants []string, now time.Time) error {
	e.State, e.Reason, e.UpdatedAt = fxv1.ExperimentState_RUNNING, "", now
	if err := tx.PutExperiment(e); err != nil {
		return err
	}
	parts, err := tx.Participants(e.ID)
	if err != nil {
		return err
	}
	have := map[string]*store.Participant{}
	for _, p := range parts {
		have[p.Envoy] = p
	}
	for _, name := range participants {
		p := have[name]
		if p == nil {
			p = &store.Participant{Envoy: name}
		}
		p.State, p.Reason, p.UpdatedAt = fxv1.ParticipantState_TRAINING, "", now
		if err := tx.PutParticipant(e.ID, p); err != nil {
			return err
		}
	}
	return nil
}
