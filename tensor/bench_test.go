package tensor

import (
	"testing"
	"time"
)

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
