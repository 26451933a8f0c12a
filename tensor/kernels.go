package tensor

import (
	"encoding/binary"
	"fmt"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
)

// Aggregation is bound by memory bandwidth, not arithmetic: averaging ten
// 100 MB updates reads 1 GB and does two flops per 4-byte load. The kernels
// here are therefore organised around memory traffic:
//
//   - One pass: WeightedSum walks dst once, block by block; within a block it
//     folds every source before moving on, so the block of dst stays in cache
//     and each source byte is read from memory exactly once. The naive form,
//     one full pass over dst per source, moves dst through memory N times.
//   - Parallel: blocks are handed out to GOMAXPROCS workers through an atomic
//     counter, so a worker slowed by another process on a shared machine just
//     takes fewer blocks.
//   - Plain Go that compiles well: inner loops re-slice their operands to a
//     common length so the compiler drops bounds checks, and are unrolled by
//     four (by eight in the single-source loops).

// blockElems is the number of elements per block: 32 Ki float32 = 128 KiB of
// dst, which stays in L2 while the sources stream through, and is large enough
// that handing out a block costs nothing measurable.
const blockElems = 1 << 15

// minParallel is the size below which kernels run on the calling goroutine:
// under it, starting workers costs more than the work.
const minParallel = 1 << 17

// float is the element type of the kernels' working precision.
type float interface{ ~float32 | ~float64 }

// parallelBlocks calls fn on consecutive [lo, hi) ranges of at most block
// elements covering [0, n), on up to GOMAXPROCS goroutines.
func parallelBlocks(n, block int, fn func(lo, hi int)) {
	parallelBlocksWork(n, block, n, fn)
}

// parallelBlocksWork is parallelBlocks for kernels doing more than one
// element's worth of work per element: work (in element-visits) decides
// whether going parallel pays.
func parallelBlocksWork(n, block, work int, fn func(lo, hi int)) {
	if n <= 0 {
		return
	}
	blocks := (n + block - 1) / block
	workers := min(runtime.GOMAXPROCS(0), blocks)
	if work < minParallel || workers <= 1 {
		for lo := 0; lo < n; lo += block {
			fn(lo, min(lo+block, n))
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	take := func() {
		for {
			b := int(next.Add(1) - 1)
			if b >= blocks {
				return
			}
			lo := b * block
			fn(lo, min(lo+block, n))
		}
	}
	wg.Add(workers - 1)
	for range workers - 1 {
		go func() {
			defer wg.Done()
			take()
		}()
	}
	take()
	wg.Wait()
}

// WeightedSum sets dst[j] = Σ_i weights[i]·srcs[i][j] in one blocked, parallel
// pass. Every source must have len(dst) elements; with no sources dst is zeroed.
// Mismatched lengths are a programming error and panic, as an index out of
// range would.
func WeightedSum(dst []float32, srcs [][]float32, weights []float32) {
	weightedSum(dst, srcs, weights)
}

func weightedSum[T float](dst []T, srcs [][]T, weights []T) {
	if len(srcs) != len(weights) {
		panic(fmt.Sprintf("tensor.WeightedSum: %d sources, %d weights", len(srcs), len(weights)))
	}
	for i, s := range srcs {
		if len(s) != len(dst) {
			panic(fmt.Sprintf("tensor.WeightedSum: source %d has %d elements, dst %d", i, len(s), len(dst)))
		}
	}
	parallelBlocks(len(dst), blockElems, func(lo, hi int) {
		weightedSumBlock(dst[lo:hi], srcs, weights, lo, hi)
	})
}

// weightedSumBlock folds all sources into one block of dst, four sources per
// sweep so each element of dst is loaded and stored once per four sources.
func weightedSumBlock[T float](d []T, srcs [][]T, w []T, lo, hi int) {
	i := 0
	switch len(srcs) {
	case 0:
		clear(d)
		return
	case 1:
		scaleTo(d, srcs[0][lo:hi], w[0])
		i = 1
	case 2:
		sum2(d, srcs[0][lo:hi], srcs[1][lo:hi], w[0], w[1])
		i = 2
	case 3:
		sum3(d, srcs[0][lo:hi], srcs[1][lo:hi], srcs[2][lo:hi], w[0], w[1], w[2])
		i = 3
	default:
		sum4(d, srcs[0][lo:hi], srcs[1][lo:hi], srcs[2][lo:hi], srcs[3][lo:hi], w[0], w[1], w[2], w[3])
		i = 4
	}
	for ; i+4 <= len(srcs); i += 4 {
		acc4(d, srcs[i][lo:hi], srcs[i+1][lo:hi], srcs[i+2][lo:hi], srcs[i+3][lo:hi], w[i], w[i+1], w[i+2], w[i+3])
	}
	for ; i < len(srcs); i++ {
		axpy(d, srcs[i][lo:hi], w[i])
	}
}

// The loops below walk their operands by re-slicing them (d = d[8:]) under a
// loop condition that checks every length: that is the form in which the
// compiler proves all indexing in range and emits no bounds checks inside the
// loop (check with -gcflags=-d=ssa/check_bce).

// scaleTo sets d = a·s.
func scaleTo[T float](d, s []T, a T) {
	for len(d) >= 8 && len(s) >= 8 {
		dd, ss := d[:8:8], s[:8:8]
		dd[0], dd[1], dd[2], dd[3] = a*ss[0], a*ss[1], a*ss[2], a*ss[3]
		dd[4], dd[5], dd[6], dd[7] = a*ss[4], a*ss[5], a*ss[6], a*ss[7]
		d, s = d[8:], s[8:]
	}
	s = s[:len(d)]
	for i := range d {
		d[i] = a * s[i]
	}
}

func sum2[T float](d, s0, s1 []T, w0, w1 T) {
	for len(d) >= 4 && len(s0) >= 4 && len(s1) >= 4 {
		dd, a, b := d[:4:4], s0[:4:4], s1[:4:4]
		dd[0] = w0*a[0] + w1*b[0]
		dd[1] = w0*a[1] + w1*b[1]
		dd[2] = w0*a[2] + w1*b[2]
		dd[3] = w0*a[3] + w1*b[3]
		d, s0, s1 = d[4:], s0[4:], s1[4:]
	}
	s0, s1 = s0[:len(d)], s1[:len(d)]
	for i := range d {
		d[i] = w0*s0[i] + w1*s1[i]
	}
}

func sum3[T float](d, s0, s1, s2 []T, w0, w1, w2 T) {
	for len(d) >= 4 && len(s0) >= 4 && len(s1) >= 4 && len(s2) >= 4 {
		dd, a, b, c := d[:4:4], s0[:4:4], s1[:4:4], s2[:4:4]
		dd[0] = w0*a[0] + w1*b[0] + w2*c[0]
		dd[1] = w0*a[1] + w1*b[1] + w2*c[1]
		dd[2] = w0*a[2] + w1*b[2] + w2*c[2]
		dd[3] = w0*a[3] + w1*b[3] + w2*c[3]
		d, s0, s1, s2 = d[4:], s0[4:], s1[4:], s2[4:]
	}
	s0, s1, s2 = s0[:len(d)], s1[:len(d)], s2[:len(d)]
	for i := range d {
		d[i] = w0*s0[i] + w1*s1[i] + w2*s2[i]
	}
}

func sum4[T float](d, s0, s1, s2, s3 []T, w0, w1, w2, w3 T) {
	for len(d) >= 4 && len(s0) >= 4 && len(s1) >= 4 && len(s2) >= 4 && len(s3) >= 4 {
		dd, a, b, c, e := d[:4:4], s0[:4:4], s1[:4:4], s2[:4:4], s3[:4:4]
		dd[0] = w0*a[0] + w1*b[0] + w2*c[0] + w3*e[0]
		dd[1] = w0*a[1] + w1*b[1] + w2*c[1] + w3*e[1]
		dd[2] = w0*a[2] + w1*b[2] + w2*c[2] + w3*e[2]
		dd[3] = w0*a[3] + w1*b[3] + w2*c[3] + w3*e[3]
		d, s0, s1, s2, s3 = d[4:], s0[4:], s1[4:], s2[4:], s3[4:]
	}
	s0, s1, s2, s3 = s0[:len(d)], s1[:len(d)], s2[:len(d)], s3[:len(d)]
	for i := range d {
		d[i] = w0*s0[i] + w1*s1[i] + w2*s2[i] + w3*s3[i]
	}
}

func acc4[T float](d, s0, s1, s2, s3 []T, w0, w1, w2, w3 T) {
	for len(d) >= 4 && len(s0) >= 4 && len(s1) >= 4 && len(s2) >= 4 && len(s3) >= 4 {
		dd, a, b, c, e := d[:4:4], s0[:4:4], s1[:4:4], s2[:4:4], s3[:4:4]
		dd[0] += w0*a[0] + w1*b[0] + w2*c[0] + w3*e[0]
		dd[1] += w0*a[1] + w1*b[1] + w2*c[1] + w3*e[1]
		dd[2] += w0*a[2] + w1*b[2] + w2*c[2] + w3*e[2]
		dd[3] += w0*a[3] + w1*b[3] + w2*c[3] + w3*e[3]
		d, s0, s1, s2, s3 = d[4:], s0[4:], s1[4:], s2[4:], s3[4:]
	}
	s0, s1, s2, s3 = s0[:len(d)], s1[:len(d)], s2[:len(d)], s3[:len(d)]
	for i := range d {
		d[i] += w0*s0[i] + w1*s1[i] + w2*s2[i] + w3*s3[i]
	}
}

// Axpy adds a·src to dst element-wise (dst += a·src): how one streamed update
// is folded into a running sum. It panics if the lengths differ.
func Axpy(dst, src []float32, a float32) {
	if len(src) != len(dst) {
		panic(fmt.Sprintf("tensor.Axpy: src has %d elements, dst %d", len(src), len(dst)))
	}
	parallelBlocks(len(dst), blockElems, func(lo, hi int) { axpy(dst[lo:hi], src[lo:hi], a) })
}

func axpy[T float](d, s []T, a T) {
	for len(d) >= 8 && len(s) >= 8 {
		dd, ss := d[:8:8], s[:8:8]
		dd[0] += a * ss[0]
		dd[1] += a * ss[1]
		dd[2] += a * ss[2]
		dd[3] += a * ss[3]
		dd[4] += a * ss[4]
		dd[5] += a * ss[5]
		dd[6] += a * ss[6]
		dd[7] += a * ss[7]
		d, s = d[8:], s[8:]
	}
	s = s[:len(d)]
	for i := range d {
		d[i] += a * s[i]
	}
}

// AxpyBytes is Axpy with src given as little-endian float32 bytes, as a chunk
// arrives off the wire: no conversion copy is made. len(src) must be
// 4·len(dst). It works for any alignment of src and on any host byte order.
func AxpyBytes(dst []float32, src []byte, a float32) {
	if len(src) != 4*len(dst) {
		panic(fmt.Sprintf("tensor.AxpyBytes: %d bytes for %d float32 elements", len(src), len(dst)))
	}
	parallelBlocks(len(dst), blockElems, func(lo, hi int) { axpyF32Bytes(dst[lo:hi], src[4*lo:4*hi], a) })
}

// axpyF32Bytes adds a·src, src raw little-endian float32. When src happens to
// be 4-byte aligned on a little-endian host it is used in place as []float32;
// otherwise each element is assembled from bytes, which the compiler turns
// into one unaligned 32-bit load.
func axpyF32Bytes[T float](d []T, raw []byte, a T) {
	if hostLittleEndian && aligned(raw, 4) {
		if d32, ok := any(d).([]float32); ok {
			axpy(d32, bytesAs[float32](raw), float32(a))
			return
		}
	}
	for len(d) >= 4 && len(raw) >= 16 {
		r, dd := raw[:16:16], d[:4:4]
		dd[0] += a * T(math.Float32frombits(binary.LittleEndian.Uint32(r[0:4])))
		dd[1] += a * T(math.Float32frombits(binary.LittleEndian.Uint32(r[4:8])))
		dd[2] += a * T(math.Float32frombits(binary.LittleEndian.Uint32(r[8:12])))
		dd[3] += a * T(math.Float32frombits(binary.LittleEndian.Uint32(r[12:16])))
		d, raw = d[4:], raw[16:]
	}
	for i := range d {
		d[i] += a * T(math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:])))
	}
}

// axpyRaw adds a·src to d, src being len(d) raw little-endian elements of the
// float dtype dt. It is the one place where chunks of any float dtype meet the
// working precision T.
func axpyRaw[T float](d []T, raw []byte, dt DType, a T) {
	switch dt {
	case F32:
		axpyF32Bytes(d, raw, a)
	case F64:
		if d64, ok := any(d).([]float64); ok && hostLittleEndian && aligned(raw, 8) {
			axpy(d64, bytesAs[float64](raw), float64(a))
			return
		}
		raw = raw[:8*len(d)]
		for i := range d {
			d[i] += a * T(math.Float64frombits(binary.LittleEndian.Uint64(raw[8*i:])))
		}
	case F16:
		raw = raw[:2*len(d)]
		for i := range d {
			d[i] += a * T(f16ToFloat32Fast(binary.LittleEndian.Uint16(raw[2*i:])))
		}
	case BF16:
		raw = raw[:2*len(d)]
		for i := range d {
			d[i] += a * T(BF16ToFloat32(binary.LittleEndian.Uint16(raw[2*i:])))
		}
	default:
		panic(fmt.Sprintf("tensor: axpy over non-float dtype %s", dt))
	}
}

// f16ToFloat32Fast inlines the common case (normal numbers) of F16ToFloat32.
func f16ToFloat32Fast(h uint16) float32 {
	if e := h & 0x7c00; e != 0 && e != 0x7c00 {
		return math.Float32frombits(uint32(h&0x8000)<<16 | (uint32(h&0x7fff)+(127-15)<<10)<<13)
	}
	return F16ToFloat32(h)
}

// Scale multiplies dst by a in place.
func Scale(dst []float32, a float32) {
	parallelBlocks(len(dst), blockElems, func(lo, hi int) { scaleTo(dst[lo:hi], dst[lo:hi], a) })
}
