package privacy

import (
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math"

	"github.com/fx-fl/fx/internal/parallel"
	"github.com/fx-fl/fx/tensor"
)

// Release says what ClipAndNoise did to an update.
type Release struct {
	// Norm is the L2 norm of the update Δ = trained − global over every
	// float tensor, before clipping. It is computed from the site's data
	// without noise: log it at the site, never send it anywhere.
	Norm float64
	// Scale is min(1, C/Norm), the factor Δ was multiplied by.
	Scale float64
	// Std is the standard deviation of the noise added to each element, σ·C.
	Std float64
	// Elements is the number of float elements noised.
	Elements int64
	// Reset names the non-float tensors, which were set back to the global
	// model's values (see ClipAndNoise).
	Reset []string
}

// ClipAndNoise turns a model trained at the site into one whose update may
// leave it under differential privacy: with Δ = trained − global over all
// float tensors taken together, it writes
//
//	trained = global + Δ·min(1, clip/‖Δ‖₂) + N(0, (noise·clip)²)
//
// element by element back into trained, in each tensor's own dtype. clip is
// the L2 bound C on the whole update (so C is the sensitivity of what a site
// sends) and noise is the noise multiplier σ that the accountant charges.
//
// The standard deviation σ·C is per site. In client-level DP with FedAvg
// (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
// Models") the sum of the clipped updates needs noise σ·C in total: a site
// that adds it alone protects itself even from the aggregator, and the sum
// of n sites then carries σ·C·√n. Callers that rely on secure aggregation to
// hide single updates may pass σ/√n to share the noise; the ledger must then
// be charged with what protects the site, which is the caller's decision.
//
// Non-float tensors (step counters such as BatchNorm's num_batches_tracked)
// cannot be noised, and left as trained they would carry site data — the
// number of batches, hence the size of the dataset — out un-noised. They are
// set to the global model's values, so they carry nothing from the site, and
// named in Release.Reset.
//
// Memory: nothing beyond the two models and a few kilobytes per core; it
// reads every float tensor twice (the norm, then the write), both on every
// core, F32 and F64 in loops of their own. Noise comes from AES-256 in
// counter mode (keystream in gaussian.go), a cryptographically strong
// generator, keyed for each block of 65536 elements by sha256 of 32 bytes
// from crypto/rand drawn for the call and the block's place: without the
// seed its output cannot be told from random, and it is far faster than
// drawing every sample from the operating system. The Gaussian is
// math/rand/v2's ziggurat on that stream. Like Opacus and TF Privacy, it
// samples the Gaussian in floating point, which is subject to Mironov's
// 2012 attack on the low-order bits of floating-point noise; rounding the
// result to the tensor's dtype blurs those bits, most of all in F16 and
// BF16.
//
// On an error about the layout or the values of the inputs, trained is
// untouched. If a noisy value overflows its dtype (F16 tops out at 65504)
// the error says so and trained is half written: it must not be uploaded.
func ClipAndNoise(global, trained tensor.Model, clip, noise float64) (Release, error) {
	var seed [32]byte
	crand.Read(seed[:])
	return clipAndNoise(global, trained, clip, noise, seed)
}

// noiseBlock is how many elements one generator stream noises: the work is
// spread over every core a block at a time, each block drawing from its own
// keystream keyed by sha256(seed, tensor, block), so the noise does
// not depend on which worker took which block.
const noiseBlock = 1 << 16

// noiseRun is how many samples a worker draws before adding them: few
// enough that they stay in the cache.
const noiseRun = 1024

// block is a run of one float tensor's elements.
type block struct {
	tensor, index int // the tensor's position in trained, the block's in it
	lo, hi        int // element range
	size          int // bytes per element
}

// bytes is the block's part of data, a tensor of the block's dtype.
func (b block) bytes(data []byte) []byte {
	return data[b.lo*b.size : b.hi*b.size]
}

// blocks cuts trained's float tensors into noiseBlock runs.
func blocks(trained tensor.Model) []block {
	var out []block
	for i, t := range trained {
		if !t.DType.IsFloat() {
			continue
		}
		size := codecs[t.DType].size
		n := len(t.Data) / size
		for k, lo := 0, 0; lo < n; k, lo = k+1, lo+noiseBlock {
			out = append(out, block{tensor: i, index: k, lo: lo, hi: min(n, lo+noiseBlock), size: size})
		}
	}
	return out
}

func clipAndNoise(global, trained tensor.Model, clip, noise float64, seed [32]byte) (Release, error) {
	if !(clip > 0) || math.IsInf(clip, 1) {
		return Release{}, fmt.Errorf("clip norm %v: want a finite number > 0", clip)
	}
	if !(noise >= 0) || math.IsInf(noise, 1) {
		return Release{}, fmt.Errorf("noise multiplier %v: want a finite number ≥ 0", noise)
	}
	if err := trained.Validate(); err != nil {
		return Release{}, fmt.Errorf("trained model: %w", err)
	}
	if err := global.Validate(); err != nil {
		return Release{}, fmt.Errorf("global model: %w", err)
	}
	if err := global.Matches(trained); err != nil {
		return Release{}, fmt.Errorf("trained model does not match the global model: %w", err)
	}
	index := global.Index()
	work := blocks(trained)

	// The norm: each block's sum of squares, added in block order so that
	// the result does not depend on the scheduling.
	sums := make([]float64, len(work))
	parallel.Each(len(work), func() func(int) error {
		return func(i int) error {
			b := work[i]
			t := trained[b.tensor]
			sums[i] = sumSquares(t.DType, b.bytes(t.Data), b.bytes(index[t.Name].Data))
			return nil
		}
	})
	var rel Release
	var sumSq float64
	for i, ss := range sums {
		if math.IsNaN(ss) || math.IsInf(ss, 0) {
			return Release{}, fmt.Errorf("tensor %q: the update is not finite (NaN, Inf or beyond 1e154 in the trained or global model): fix the training before it can be released", trained[work[i].tensor].Name)
		}
		sumSq += ss
	}
	for _, b := range work {
		rel.Elements += int64(b.hi - b.lo)
	}
	rel.Norm = math.Sqrt(sumSq)
	rel.Scale = 1
	if rel.Norm > clip {
		rel.Scale = clip / rel.Norm
	}
	rel.Std = noise * clip

	// trained − (1−scale)·Δ is global + scale·Δ; written this way an update
	// within the bound (scale 1) keeps trained's values exactly.
	shrink := 1 - rel.Scale
	errs := make([]error, len(work))
	parallel.Each(len(work), func() func(int) error {
		var z []float64 // the noise of a run of noiseRun elements
		if rel.Std > 0 {
			z = make([]float64, noiseRun)
		}
		return func(i int) error {
			b := work[i]
			t := trained[b.tensor]
			td, gd := b.bytes(t.Data), b.bytes(index[t.Name].Data)
			var g *gaussian
			if z != nil {
				g = &gaussian{newKeystream(blockSeed(seed, b))}
			}
			for lo := 0; lo < b.hi-b.lo; lo += noiseRun {
				hi := min(b.hi-b.lo, lo+noiseRun)
				var noise []float64
				if g != nil {
					noise = z[:hi-lo]
					g.fill(noise, rel.Std)
				}
				if at, v, ok := clipNoise(t.DType, td[lo*b.size:hi*b.size], gd[lo*b.size:hi*b.size], shrink, noise); !ok {
					// Every block runs: the first overflow in the model's order is reported.
					errs[i] = fmt.Errorf("tensor %q element %d: the noisy value %g overflows %s: lower the clip norm or the noise multiplier; this model must not be uploaded", t.Name, b.lo+lo+at, v, t.DType)
					return nil
				}
			}
			return nil
		}
	})
	for _, err := range errs {
		if err != nil {
			return Release{}, err // the first in the model's order
		}
	}
	for _, t := range trained {
		if !t.DType.IsFloat() {
			copy(t.Data, index[t.Name].Data)
			rel.Reset = append(rel.Reset, t.Name)
		}
	}
	return rel, nil
}

// blockSeed keys block b's generator: sha256 of the call's seed and the
// block's place, so every block draws from a stream of its own.
func blockSeed(seed [32]byte, b block) [32]byte {
	var msg [48]byte
	copy(msg[:], seed[:])
	binary.LittleEndian.PutUint64(msg[32:], uint64(b.tensor))
	binary.LittleEndian.PutUint64(msg[40:], uint64(b.index))
	return sha256.Sum256(msg[:])
}

// sumSquares is Σ(t−g)² over two runs of elements of dtype d. F32 and F64,
// the dtypes of nearly every model, run on typed views of the bytes
// (tensor.View: tensors are aligned, and blocks cut them at whole
// elements), in loops the compiler keeps in registers; four partial sums let
// the additions overlap. Other dtypes, and bytes no view fits, go through
// the codec.
func sumSquares(d tensor.DType, t, g []byte) float64 {
	switch d {
	case tensor.F32:
		if tv, ok := tensor.View[float32](t); ok {
			if gv, ok := tensor.View[float32](g); ok {
				return sumSquaresOf(tv, gv)
			}
		}
	case tensor.F64:
		if tv, ok := tensor.View[float64](t); ok {
			if gv, ok := tensor.View[float64](g); ok {
				return sumSquaresOf(tv, gv)
			}
		}
	}
	c := codecs[d]
	var s float64
	for off := 0; off+c.size <= len(t); off += c.size {
		x := c.get(t[off:]) - c.get(g[off:])
		s += x * x
	}
	return s
}

func sumSquaresOf[T float32 | float64](t, g []T) float64 {
	var s [4]float64
	g = g[:len(t)]
	k := 0
	for ; k+4 <= len(t); k += 4 {
		t4, g4 := t[k:k+4:k+4], g[k:k+4:k+4]
		x0 := float64(t4[0]) - float64(g4[0])
		x1 := float64(t4[1]) - float64(g4[1])
		x2 := float64(t4[2]) - float64(g4[2])
		x3 := float64(t4[3]) - float64(g4[3])
		s[0] += x0 * x0
		s[1] += x1 * x1
		s[2] += x2 * x2
		s[3] += x3 * x3
	}
	for ; k < len(t); k++ {
		x := float64(t[k]) - float64(g[k])
		s[0] += x * x
	}
	return (s[0] + s[1]) + (s[2] + s[3])
}

// clipNoise writes t − shrink·(t−g) + noise over t, element by element
// (no noise if noise is nil, else one value per element). On a value its
// dtype cannot hold it stops and returns the element's index and the value,
// with ok false. As sumSquares, F32 and F64 run on typed views.
func clipNoise(d tensor.DType, t, g []byte, shrink float64, noise []float64) (at int, v float64, ok bool) {
	switch d {
	case tensor.F32:
		if tv, ok := tensor.View[float32](t); ok {
			if gv, ok := tensor.View[float32](g); ok {
				return clipNoiseOf(tv, gv, shrink, noise)
			}
		}
	case tensor.F64:
		if tv, ok := tensor.View[float64](t); ok {
			if gv, ok := tensor.View[float64](g); ok {
				return clipNoiseOf(tv, gv, shrink, noise)
			}
		}
	}
	c := codecs[d]
	for off := 0; off+c.size <= len(t); off += c.size {
		tv := c.get(t[off:])
		v := tv - shrink*(tv-c.get(g[off:]))
		if noise != nil {
			v += noise[off/c.size]
		}
		if !c.put(t[off:], v) {
			return off / c.size, v, false
		}
	}
	return 0, 0, true
}

// clipNoiseOf is clipNoise's loop for F32 and F64: the value is computed
// in float64 and stored in T, and overflows when it rounds to an infinity
// of T.
func clipNoiseOf[T float32 | float64](t, g []T, shrink float64, noise []float64) (at int, v float64, ok bool) {
	g = g[:len(t)]
	if noise != nil {
		noise = noise[:len(t)]
	}
	for k, tk := range t {
		tv := float64(tk)
		v := tv - shrink*(tv-float64(g[k]))
		if noise != nil {
			v += noise[k]
		}
		f := T(v)
		if math.IsInf(float64(f), 0) {
			return k, v, false
		}
		t[k] = f
	}
	return 0, 0, true
}

// codec reads and writes one little-endian element of a float dtype as a
// float64; put reports false when the value overflows the dtype.
type codec struct {
	size int
	get  func([]byte) float64
	put  func([]byte, float64) bool
}

var codecs = map[tensor.DType]codec{
	tensor.F64: {8,
		func(b []byte) float64 { return math.Float64frombits(binary.LittleEndian.Uint64(b)) },
		func(b []byte, v float64) bool {
			binary.LittleEndian.PutUint64(b, math.Float64bits(v))
			return !math.IsInf(v, 0)
		}},
	tensor.F32: {4,
		func(b []byte) float64 { return float64(math.Float32frombits(binary.LittleEndian.Uint32(b))) },
		func(b []byte, v float64) bool {
			f := float32(v)
			binary.LittleEndian.PutUint32(b, math.Float32bits(f))
			return !math.IsInf(float64(f), 0)
		}},
	tensor.F16: {2,
		func(b []byte) float64 { return float64(tensor.F16ToFloat32(binary.LittleEndian.Uint16(b))) },
		func(b []byte, v float64) bool {
			h := tensor.Float32ToF16(float32(v))
			binary.LittleEndian.PutUint16(b, h)
			return h&0x7c00 != 0x7c00
		}},
	tensor.BF16: {2,
		func(b []byte) float64 { return float64(tensor.BF16ToFloat32(binary.LittleEndian.Uint16(b))) },
		func(b []byte, v float64) bool {
			h := tensor.Float32ToBF16(float32(v))
			binary.LittleEndian.PutUint16(b, h)
			return h&0x7f80 != 0x7f80
		}},
}
