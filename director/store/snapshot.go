package store

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/fx-fl/fx/internal/atomicfile"
)

// Snapshot file names: the time in a fixed-width form, so that names sort
// as times do.
const (
	snapshotPrefix     = "director-"
	snapshotSuffix     = ".db"
	snapshotTimeLayout = "20060102T150405.000000000Z"
)

// Snapshot writes a consistent copy of the store into dir (bbolt copies it
// inside one read transaction, while writers go on) and deletes all but
// the newest keep copies. It returns the copy's path, or "" when nothing
// was committed since the last snapshot this Bolt took, which it skips.
// The copy is written to a temporary file, synced and renamed into place,
// so a crash leaves no partial snapshot under a snapshot's name. Calls
// must not overlap.
func (s *Bolt) Snapshot(dir string, now time.Time, keep int) (string, error) {
	var path string
	err := s.db.View(func(tx *bolt.Tx) error {
		if tx.ID() == s.snapshotTx {
			return nil
		}
		path = filepath.Join(dir, snapshotPrefix+now.UTC().Format(snapshotTimeLayout)+snapshotSuffix)
		if err := atomicfile.Stream(path, func(w io.Writer) error {
			_, err := tx.WriteTo(w)
			return err
		}); err != nil {
			return fmt.Errorf("snapshot of %s: %w", s.path, err)
		}
		s.snapshotTx = tx.ID()
		return nil
	})
	if err != nil || path == "" {
		return "", err
	}
	snaps, err := Snapshots(dir)
	if err != nil {
		return path, err
	}
	for _, old := range snaps[min(keep, len(snaps)):] {
		if err := os.Remove(old.Path); err != nil {
			return path, fmt.Errorf("delete old snapshot: %w", err)
		}
	}
	return path, nil
}

// SnapshotFile is one snapshot in a snapshot directory.
type SnapshotFile struct {
	Path string
	// Taken is when it was taken, from its name.
	Taken time.Time
}

// Snapshots lists the snapshots in dir, newest first; none if dir does
// not exist.
func Snapshots(dir string) ([]SnapshotFile, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []SnapshotFile
	for _, e := range entries {
		stamp, ok := strings.CutPrefix(e.Name(), snapshotPrefix)
		stamp, ok2 := strings.CutSuffix(stamp, snapshotSuffix)
		if !ok || !ok2 || !e.Type().IsRegular() {
			continue
		}
		t, err := time.Parse(snapshotTimeLayout, stamp)
		if err != nil {
			continue
		}
		out = append(out, SnapshotFile{Path: filepath.Join(dir, e.Name()), Taken: t})
	}
	slices.SortFunc(out, func(a, b SnapshotFile) int { return b.Taken.Compare(a.Taken) })
	return out, nil
}
