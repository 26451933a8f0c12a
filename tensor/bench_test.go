package tensor

import (
	"math"
	"runtime"
	"sync"
	"testing"
	"time"
)

// BenchmarkFedAvg measures the aggregation kernel on a realistic round: 10
// updates of 25 M float32 parameters (100 MB each, 1.1 GB of traffic per
// average). In one run it times three implementations on the same data:
//
//   - package:   WeightedSum
//   - reference: a plain single-pass blocked parallel kernel, written here
//   - naive:     one full pass over dst per update, on one goroutine
//
// and reports each one's throughput (bytes read + written per second) and
// the ratios package/reference (the goal is ≥ 0.8: the package's unrolled,
// source-fused loops must not lose to the obvious blocked code) and
// package/naive. Run with: go test -run '^$' -bench FedAvg -benchtime 3x ./tensor
func BenchmarkFedAvg(b *testing.B) {
	if testing.Short() {
		b.Skip("allocates 1.1 GB")
	}
	const updates, n = 10, 25_000_000
	srcs := make([][]float32, updates)
	weights := make([]float32, updates)
	for i := range srcs {
		srcs[i] = make([]float32, n)
		for j := range srcs[i] {
			srcs[i][j] = float32(j%1000) * float32(i+1) * 1e-3
		}
		weights[i] = float32(i+1) / 55
	}
	dst := make([]float32, n)
	clear(dst) // touch every page before timing
	bytes := float64((updates + 1) * n * 4)

	var tPkg, tRef, tNaive time.Duration
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		WeightedSum(dst, srcs, weights)
		t1 := time.Now()
		refWeightedSum(dst, srcs, weights)
		t2 := time.Now()
		naiveWeightedSum(dst, srcs, weights)
		t3 := time.Now()
		tPkg += t1.Sub(t0)
		tRef += t2.Sub(t1)
		tNaive += t3.Sub(t2)
	}
	b.StopTimer()

	// A spot check that the package computed what the others did.
	want := naiveAt(srcs, weights, n/2+7)
	WeightedSum(dst, srcs, weights)
	if got := dst[n/2+7]; math.Abs(float64(got)-want) > 1e-4*math.Abs(want)+1e-6 {
		b.Fatalf("WeightedSum gave %v, want %v", got, want)
	}

	gbps := func(d time.Duration) float64 { return bytes * float64(b.N) / d.Seconds() / 1e9 }
	b.ReportMetric(gbps(tPkg), "package-GB/s")
	b.ReportMetric(gbps(tRef), "reference-GB/s")
	b.ReportMetric(gbps(tNaive), "naive-GB/s")
	b.ReportMetric(tRef.Seconds()/tPkg.Seconds(), "package/reference")
	b.ReportMetric(tNaive.Seconds()/tPkg.Seconds(), "package/naive")
}

// refWeightedSum is the reference: blocked so each dst block stays in cache
// while all sources are folded in, split statically over GOMAXPROCS
// goroutines, with the simplest inner loops.
func refWeightedSum(dst []float32, srcs [][]float32, w []float32) {
	const block = 1 << 14
	workers := runtime.GOMAXPROCS(0)
	per := (len(dst) + workers - 1) / workers
	var wg sync.WaitGroup
	for k := range workers {
		lo, hi := k*per, min((k+1)*per, len(dst))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := lo; b < hi; b += block {
				e := min(b+block, hi)
				d := dst[b:e]
				s0 := srcs[0][b:e]
				for j := range d {
					d[j] = w[0] * s0[j]
				}
				for i := 1; i < len(srcs); i++ {
					s := srcs[i][b:e]
					for j := range d {
						d[j] += w[i] * s[j]
					}
				}
			}
		}()
	}
	wg.Wait()
}

// naiveWeightedSum is what one writes first: a full pass per update.
func naiveWeightedSum(dst []float32, srcs [][]float32, w []float32) {
	clear(dst)
	for i, s := range srcs {
		for j := range dst {
			dst[j] += w[i] * s[j]
		}
	}
}

func naiveAt(srcs [][]float32, w []float32, j int) float64 {
	var s float64
	for i := range srcs {
		s += float64(w[i]) * float64(srcs[i][j])
	}
	return s
}

// BenchmarkAxpyBytes measures folding a 1 MiB wire chunk into a running sum,
// the Accumulator's inner step, from aligned and from misaligned bytes.
func BenchmarkAxpyBytes(b *testing.B) {
	const n = MaxChunk / 4
	dst := make([]float32, n)
	raw := make([]byte, MaxChunk+1)
	for _, c := range []struct {
		name string
		src  []byte
	}{{"aligned", raw[:MaxChunk]}, {"misaligned", raw[1:]}} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(MaxChunk)
			for range b.N {
				axpyF32Bytes(dst, c.src, 0.5)
			}
		})
	}
}

// BenchmarkCheckFinite measures the NaN/Inf check every upload passes
// through, on 4 MiB of float32, against the element-at-a-time scan in the
// same run (go test -run '^$' -bench CheckFinite ./tensor).
func BenchmarkCheckFinite(b *testing.B) {
	raw := New("x", F32, []int64{1 << 20})
	for i, v := range raw.Float32s() {
		raw.Float32s()[i] = v + float32(i%1000)*1e-3
	}
	rate := func(check func([]byte, DType) (int, float64, bool)) float64 {
		start := time.Now()
		for range 20 {
			if _, _, bad := check(raw.Data, F32); bad {
				b.Fatal("finite data flagged")
			}
		}
		return 20 * float64(len(raw.Data)) / time.Since(start).Seconds() / 1e9
	}
	var screened, scalar float64
	for range b.N {
		screened += rate(firstNonFinite)
		scalar += rate(firstNonFiniteScalar)
	}
	b.ReportMetric(screened/float64(b.N), "GB/s")
	b.ReportMetric(scalar/float64(b.N), "scalar_GB/s")
	b.ReportMetric(screened/scalar, "x_scalar")
}
