package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
)

// bbolt's file header, as go.etcd.io/bbolt/internal/common lays it out: two
// meta pages (0 and 1), each a 16-byte page header followed by the meta.
const (
	boltMagic          = 0xED0CDAED
	boltVersion        = 2
	pageHeaderSize     = 16
	metaChecksumOffset = 56 // the checksum covers the meta's first 56 bytes
	noFreelist         = ^uint64(0)
)

type boltMeta struct {
	pageSize             uint32
	root, freelist, pgid uint64
	txid                 uint64
}

// checkHeader reads the meta pages of a bbolt file with plain reads and
// checks that the file holds every page the newest valid meta counts, and
// the root and free-list pages it points to. bolt.Open reads those pages
// through its memory map, where a short file is a fault, not an error.
// An empty file passes: bbolt makes a new store in it.
func checkHeader(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || fi.Size() == 0 {
		return err
	}
	m0, err0 := readMeta(f, 0)
	pageSize := int64(4096)
	if err0 == nil {
		pageSize = int64(m0.pageSize)
	}
	m1, err1 := readMeta(f, pageSize)
	if err0 != nil && err1 != nil {
		// Maybe page 0 is garbled and the page size not the default:
		// bbolt tries every size from 1 KiB for the second meta.
		for size := int64(1024); size <= 16<<20 && err1 != nil; size *= 2 {
			if m1, err1 = readMeta(f, size); err1 == nil {
				pageSize = int64(m1.pageSize)
			}
		}
	}
	var m boltMeta
	switch {
	case err0 != nil && err1 != nil:
		return fmt.Errorf("neither of its two headers is valid (%v; %v)", err0, err1)
	case err0 != nil:
		m = m1
	case err1 != nil || m0.txid >= m1.txid:
		m = m0
	default:
		m = m1
	}
	if need := int64(m.pgid) * pageSize; fi.Size() < need || m.pgid < 2 {
		return fmt.Errorf("truncated: the file has %d bytes, its header counts %d", fi.Size(), need)
	}
	if m.root >= m.pgid || (m.freelist != noFreelist && m.freelist >= m.pgid) {
		return fmt.Errorf("its header points past its end (root page %d, free-list page %d, %d pages)", m.root, m.freelist, m.pgid)
	}
	if m.freelist != noFreelist {
		var h [pageHeaderSize]byte
		if _, err := f.ReadAt(h[:], int64(m.freelist)*pageSize); err != nil {
			return fmt.Errorf("free list: %w", err)
		}
		if overflow := uint64(binary.LittleEndian.Uint32(h[12:])); m.freelist+overflow >= m.pgid {
			return fmt.Errorf("its free list (page %d, %d more) runs past its end (%d pages)", m.freelist, overflow, m.pgid)
		}
	}
	return nil
}

// readMeta reads and validates the meta of the page at off.
func readMeta(f *os.File, off int64) (boltMeta, error) {
	var b [pageHeaderSize + 64]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		if errors.Is(err, io.EOF) {
			return boltMeta{}, fmt.Errorf("header at byte %d: the file ends before it", off)
		}
		return boltMeta{}, err
	}
	meta := b[pageHeaderSize:]
	le := binary.LittleEndian
	switch {
	case le.Uint32(meta[0:]) != boltMagic:
		return boltMeta{}, fmt.Errorf("header at byte %d: not a bbolt header", off)
	case le.Uint32(meta[4:]) != boltVersion:
		return boltMeta{}, fmt.Errorf("header at byte %d: bbolt version %d, not %d", off, le.Uint32(meta[4:]), boltVersion)
	}
	h := fnv.New64a()
	h.Write(meta[:metaChecksumOffset])
	if h.Sum64() != le.Uint64(meta[metaChecksumOffset:]) {
		return boltMeta{}, fmt.Errorf("header at byte %d: checksum mismatch", off)
	}
	return boltMeta{
		pageSize: le.Uint32(meta[8:]),
		root:     le.Uint64(meta[16:]),
		freelist: le.Uint64(meta[32:]),
		pgid:     le.Uint64(meta[40:]),
		txid:     le.Uint64(meta[48:]),
	}, nil
}
