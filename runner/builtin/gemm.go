package builtin

import (
	"runtime"
	"sync"
	"sync/atomic"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/gonum"
)

// gemmFunc computes C = alpha·op(A)·op(B) + beta·C on row-major matrices,
// where op(A) is m×k, op(B) is k×n and C is m×n; tA and tB say whether A and
// B are stored transposed. The network takes it as a field so the benchmark
// can measure a naive triple loop through the same training code.
type gemmFunc func(tA, tB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int)

// gemmRows is the height of the blocks of a tall C that parallelGemm hands
// to workers.
const gemmRows = 64

// gemmMinRows is the least height worth splitting a short C into two row
// blocks; shorter ones are split into column blocks.
const gemmMinRows = 8

// gemmParallelWork is the number of multiply-adds below which splitting C
// costs more in goroutine hand-offs than it gains.
const gemmParallelWork = 1 << 17

var blasImpl gonum.Implementation

func trans(t bool) blas.Transpose {
	if t {
		return blas.Trans
	}
	return blas.NoTrans
}

// gemmBlocks chooses how parallelGemm cuts an m×n C. When B is transposed
// gonum computes dot products of rows of A and B, and C is cut into 64×64
// blocks so each block's rows of B stay in cache. Otherwise its kernels run
// along rows of B and C and slow down on narrow blocks, so C is cut into
// full-width row blocks where possible, else into column halves.
func gemmBlocks(m, n int, tB bool) (rows, cols int) {
	switch {
	case tB:
		return min(m, gemmRows), min(n, gemmRows)
	case m >= 2*gemmRows:
		return gemmRows, n
	case m >= 2*gemmMinRows:
		return (m + 1) / 2, n
	case n >= 2*gemmRows:
		return m, (n + 1) / 2
	}
	return m, n
}

// parallelGemm multiplies with gonum's float32 kernels, cutting C into
// blocks shared by up to GOMAXPROCS goroutines. Gonum goes parallel only
// from four 64×64 blocks on, which leaves a core idle for the minibatch
// shapes of small networks (e.g. 64×128 outputs), and its 64-wide blocks
// shorten the vector loops of the non-transposed cases (see gemmBlocks). The
// blocks depend on the shape alone and each is one serial call,
// so results are bit-for-bit the same whatever the number of workers.
func parallelGemm(tA, tB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	br, bc := gemmBlocks(m, n, tB)
	bm, bn := (m+br-1)/br, (n+bc-1)/bc
	blocks := bm * bn
	if blocks < 2 || m*n*k < gemmParallelWork {
		blasImpl.Sgemm(trans(tA), trans(tB), m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
		return
	}
	block := func(t int) {
		i0, j0 := (t/bn)*br, (t%bn)*bc
		mi, nj := min(br, m-i0), min(bc, n-j0)
		var as, bs []float32
		if tA {
			as = a[i0:]
		} else {
			as = a[i0*lda:]
		}
		if tB {
			bs = b[j0*ldb:]
		} else {
			bs = b[j0:]
		}
		blasImpl.Sgemm(trans(tA), trans(tB), mi, nj, k, alpha, as, lda, bs, ldb, beta, c[i0*ldc+j0:], ldc)
	}
	workers := min(runtime.GOMAXPROCS(0), blocks)
	var next atomic.Int64
	work := func() {
		for t := int(next.Add(1) - 1); t < blocks; t = int(next.Add(1) - 1) {
			block(t)
		}
	}
	var wg sync.WaitGroup
	for range workers - 1 {
		wg.Go(work)
	}
	work()
	wg.Wait()
}

// naiveGemm is the textbook triple loop, single-threaded: the baseline the
// epoch benchmark compares parallelGemm against.
func naiveGemm(tA, tB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	// Element (i, l) of op(A) is a[i*ar+l*ac]; likewise for B.
	ar, ac := lda, 1
	if tA {
		ar, ac = 1, lda
	}
	br, bc := ldb, 1
	if tB {
		br, bc = 1, ldb
	}
	for i := range m {
		for j := range n {
			var s float32
			for l := range k {
				s += a[i*ar+l*ac] * b[l*br+j*bc]
			}
			if beta == 0 {
				c[i*ldc+j] = alpha * s
			} else {
				c[i*ldc+j] = alpha*s + beta*c[i*ldc+j]
			}
		}
	}
}
