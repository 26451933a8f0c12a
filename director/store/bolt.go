package store

import (
	"bytes"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Bolt is a Store in one bbolt file. bbolt commits each Update with an
// fsync, so a transition the director acknowledged survives a crash.
type Bolt struct {
	db *bolt.DB
}

// OpenBolt opens (creating if needed) the store at path. It fails after a
// short wait, rather than hanging, when another process holds the file: two
// directors on one data directory would corrupt each other's view.
func OpenBolt(path string) (*Bolt, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("open store %s: another process (a second director?) holds it", path)
		}
		return nil, fmt.Errorf("open store %s: %w", path, err)
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
	return &Bolt{db: db}, nil
}

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

func (k boltKV) get(bucket, key string) []byte {
	v := k.tx.Bucket([]byte(bucket)).Get([]byte(key))
	if v == nil {
		return nil
	}
	// bbolt's slices are valid only during the transaction.
	return bytes.Clone(v)
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
