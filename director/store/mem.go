package store

import (
	"maps"
	"slices"
	"strings"
	"sync"
)

// Mem is an in-memory Store for tests. It keeps bbolt's semantics that
// matter to the director: Update is all-or-nothing (it works on a copy and
// swaps it in on success), and records are serialised, so a caller cannot
// change a stored record by mutating what it wrote or read.
type Mem struct {
	mu      sync.RWMutex
	buckets map[string]map[string][]byte
	closed  bool
}

// NewMem returns an empty in-memory store.
func NewMem() *Mem {
	m := &Mem{buckets: map[string]map[string][]byte{}}
	for _, b := range allBuckets {
		m.buckets[b] = map[string][]byte{}
	}
	return m
}

// View implements Store.
func (m *Mem) View(fn func(Tx) error) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return errClosed
	}
	return fn(tx{kv: memKV{buckets: m.buckets, readOnly: true}})
}

// Update implements Store.
func (m *Mem) Update(fn func(Tx) error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errClosed
	}
	work := make(map[string]map[string][]byte, len(m.buckets))
	for name, b := range m.buckets {
		work[name] = maps.Clone(b)
	}
	if err := fn(tx{kv: memKV{buckets: work}}); err != nil {
		return err
	}
	m.buckets = work
	return nil
}

// Batch implements Store: each call is its own Update.
func (m *Mem) Batch(fn func(Tx) error) error { return m.Update(fn) }

// Close implements Store.
func (m *Mem) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	return nil
}

type memError string

func (e memError) Error() string { return string(e) }

const (
	errClosed   = memError("store is closed")
	errReadOnly = memError("write in a read-only transaction")
)

type memKV struct {
	buckets  map[string]map[string][]byte
	readOnly bool
}

func (k memKV) get(bucket, key string) ([]byte, error) {
	v, ok := k.buckets[bucket][key]
	if !ok {
		return nil, nil
	}
	return slices.Clone(v), nil
}

func (k memKV) put(bucket, key string, val []byte) error {
	if k.readOnly {
		return errReadOnly
	}
	k.buckets[bucket][key] = slices.Clone(val)
	return nil
}

func (k memKV) del(bucket, key string) error {
	if k.readOnly {
		return errReadOnly
	}
	delete(k.buckets[bucket], key)
	return nil
}

func (k memKV) scan(bucket, prefix string, fn func(string, []byte) error) error {
	keys := slices.Sorted(maps.Keys(k.buckets[bucket]))
	for _, key := range keys {
		if !strings.HasPrefix(key, prefix) {
			continue
		}
		if err := fn(key, slices.Clone(k.buckets[bucket][key])); err != nil {
			return err
		}
	}
	return nil
}
