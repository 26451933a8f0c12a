package store

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime/debug"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Bolt is a Store in one bbolt file. bbolt commits each Update with an
// fsync, so a transition the director acknowledged survives a crash.
type Bolt struct {
	db   *bolt.DB
	path string
	// created is set when the file was missing or empty and OpenBolt made
	// a new store in it.
	created bool
	// snapshotTx is the transaction id of the last snapshot; see Snapshot.
	snapshotTx int
}

// DamagedError is returned (wrapped) when a store file cannot be used: it is
// truncated, its pages are garbled, or its records do not decode. The
// director stops on it; `fx director recover` restores a snapshot.
type DamagedError struct {
	Path string
	Err  error
}

func (e *DamagedError) Error() string {
	return fmt.Sprintf("the store %s is damaged: %v", e.Path, e.Err)
}

func (e *DamagedError) Unwrap() error { return e.Err }

// OpenBolt opens (creating if needed) the store at path. It fails after a
// short wait, rather than hanging, when another process holds the file: two
// directors on one data directory would corrupt each other's view.
//
// The file is checked before it is used (see Verify), so a damaged one
// gives a *DamagedError naming it instead of a crash at the first read of a
// bad page.
func OpenBolt(path string) (*Bolt, error) {
	created := false
	switch fi, err := os.Stat(path); {
	case errors.Is(err, fs.ErrNotExist):
		created = true
	case err != nil:
		return nil, fmt.Errorf("open store %s: %w", path, err)
	default:
		created = fi.Size() == 0
	}
	db, err := openVerified(path, false)
	if err != nil {
		return nil, err
	}
	err = db.Update(func(btx *bolt.Tx) error {
		for _, b := range allBuckets {
			if _, err := btx.CreateBucketIfNotExists([]byte(b)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	if err := decodeAll(path, db); err != nil {
		_ = db.Close()
		return nil, err
	}
	return &Bolt{db: db, path: path, created: created}, nil
}

// Verify checks the store file at path without changing it, as OpenBolt
// does before it uses one: every page reachable from the file's header is
// read, bbolt's consistency check is run, and every record must decode. It
// returns a *DamagedError (wrapped) when the file cannot be used.
func Verify(path string) error {
	db, err := openVerified(path, true)
	if err != nil {
		return err
	}
	defer db.Close()
	return decodeAll(path, db)
}

// openVerified opens path with bbolt and checks it. bbolt maps the file
// into memory and trusts its page numbers: a truncated file makes it touch
// memory past the end of the mapping (SIGBUS), a garbled page makes it
// panic. Every access to the file's pages here runs under guard, which
// turns both into errors, and the size and structure are checked before
// anyone else reads a page.
func openVerified(path string, readOnly bool) (*bolt.DB, error) {
	damaged := func(err error) error { return &DamagedError{Path: path, Err: err} }
	if err := checkHeader(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, damaged(err)
	}
	var db *bolt.DB
	err := guard(func() error {
		var err error
		db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second, ReadOnly: readOnly})
		return err
	})
	if errors.Is(err, bolt.ErrTimeout) {
		return nil, fmt.Errorf("open store %s: another process (a second director?) holds it", path)
	}
	var pe *panicError
	if errors.As(err, &pe) || errors.Is(err, bolt.ErrInvalid) || errors.Is(err, bolt.ErrVersionMismatch) || errors.Is(err, bolt.ErrChecksum) {
		// checkHeader makes a panic inside bolt.Open unlikely; one would
		// leave the file open (and locked) in this process.
		return nil, damaged(err)
	}
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	if err := checkPages(path, db); err != nil {
		_ = db.Close()
		return nil, damaged(err)
	}
	return db, nil
}

// checkPages makes sure that reading db cannot fault: the file holds every
// page its header counts, every page reachable from the root can be read,
// and bbolt's own check finds the tree and free list consistent.
func checkPages(path string, db *bolt.DB) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	return db.View(func(tx *bolt.Tx) error {
		if size := tx.Size(); fi.Size() < size {
			return fmt.Errorf("truncated: the file has %d bytes, its header counts %d", fi.Size(), size)
		}
		if err := guard(func() error { return walk(tx) }); err != nil {
			return err
		}
		// bbolt's check runs in a goroutine of its own, where a fault
		// could not be caught; walk has read every page it will.
		var errs []error
		for err := range tx.Check() {
			if len(errs) < 5 {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	})
}

// walk reads every key and value of every bucket, nested ones included.
func walk(tx *bolt.Tx) error {
	var bucket func(b *bolt.Bucket) error
	bucket = func(b *bolt.Bucket) error {
		_ = b.Stats() // visits every page of the bucket, branch pages included
		return b.ForEach(func(k, v []byte) error {
			if v == nil {
				if nested := b.Bucket(k); nested != nil {
					return bucket(nested)
				}
			}
			return nil
		})
	}
	return tx.ForEach(func(_ []byte, b *bolt.Bucket) error { return bucket(b) })
}

// decodeAll decodes every record, as the director's start-up does.
func decodeAll(path string, db *bolt.DB) error {
	err := db.View(func(btx *bolt.Tx) error {
		for _, b := range allBuckets {
			if btx.Bucket([]byte(b)) == nil {
				return fmt.Errorf("bucket %q is missing", b)
			}
		}
		t := tx{kv: boltKV{btx}}
		exps, err := t.Experiments()
		if err != nil {
			return err
		}
		for _, e := range exps {
			if _, err := t.Participants(e.ID); err != nil {
				return err
			}
			if _, err := t.MetricPosition(e.ID); err != nil {
				return err
			}
		}
		_, err = t.Envoys()
		return err
	})
	if err != nil {
		return &DamagedError{Path: path, Err: err}
	}
	return nil
}

type panicError struct{ v any }

func (p *panicError) Error() string { return fmt.Sprintf("unreadable (%v)", p.v) }

// guard runs fn, turning a panic, or a memory fault in fn's goroutine
// (reading a page past the end of a truncated file), into an error.
func guard(fn func() error) (err error) {
	old := debug.SetPanicOnFault(true)
	defer debug.SetPanicOnFault(old)
	defer func() {
		if r := recover(); r != nil {
			err = &panicError{r}
		}
	}()
	return fn()
}

// Path is the store's file.
func (s *Bolt) Path() string { return s.path }

// Created reports whether OpenBolt found no store (no file, or an empty
// one) and made a new one: the director checks that a data directory that
// already holds experiments did not just lose its store.
func (s *Bolt) Created() bool { return s.created }

// View implements Store.
func (s *Bolt) View(fn func(Tx) error) error {
	return s.db.View(func(btx *bolt.Tx) error { return fn(tx{kv: boltKV{btx}}) })
}

// Update implements Store.
func (s *Bolt) Update(fn func(Tx) error) error {
	return s.db.Update(func(btx *bolt.Tx) error { return fn(tx{kv: boltKV{btx}}) })
}

// Batch implements Store with bbolt's Batch, which gathers the calls made
// within a few milliseconds into one commit and one fsync.
func (s *Bolt) Batch(fn func(Tx) error) error {
	return s.db.Batch(func(btx *bolt.Tx) error { return fn(tx{kv: boltKV{btx}}) })
}

// Close implements Store.
func (s *Bolt) Close() error { return s.db.Close() }

type boltKV struct{ tx *bolt.Tx }

func (k boltKV) get(bucket, key string) ([]byte, error) {
	v := k.tx.Bucket([]byte(bucket)).Get([]byte(key))
	if v == nil {
		return nil, nil
	}
	// bbolt's slices are valid only during the transaction.
	return bytes.Clone(v), nil
}

func (k boltKV) put(bucket, key string, val []byte) error {
	return k.tx.Bucket([]byte(bucket)).Put([]byte(key), val)
}

func (k boltKV) del(bucket, key string) error {
	return k.tx.Bucket([]byte(bucket)).Delete([]byte(key))
}

func (k boltKV) scan(bucket, prefix string, fn func(string, []byte) error) error {
	c := k.tx.Bucket([]byte(bucket)).Cursor()
	p := []byte(prefix)
	for key, val := c.Seek(p); key != nil && bytes.HasPrefix(key, p); key, val = c.Next() {
		if err := fn(string(key), bytes.Clone(val)); err != nil {
			return err
		}
	}
	return nil
}
