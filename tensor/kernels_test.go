package tensor

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"
)

func randFloats(rng *rand.Rand, n int) []float32 {
	out := make([]float32, n)
	for i := range out {
		out[i] = float32(rng.NormFloat64())
	}
	return out
}

// closeTo compares float32 results with float64 expectations, allowing the
// rounding of a few float32 operations relative to the magnitude of the terms.
func closeTo(got float32, want, scale float64) bool {
	return math.Abs(float64(got)-want) <= 1e-5*scale+1e-30
}

// Sizes exercise the unrolled loops' tails, block boundaries and the parallel path.
var kernelSizes = []int{0, 1, 3, 7, 8, 9, 33, blockElems - 1, blockElems + 5, minParallel + 13}

func TestWeightedSum(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, n := range kernelSizes {
		for _, nsrc := range []int{0, 1, 2, 3, 4, 5, 9} {
			srcs := make([][]float32, nsrc)
			weights := make([]float32, nsrc)
			for i := range srcs {
				srcs[i] = randFloats(rng, n)
				weights[i] = float32(rng.Float64() * 3)
			}
			dst := make([]float32, n)
			for i := range dst {
				dst[i] = 99 // must be overwritten, not added to
			}
			WeightedSum(dst, srcs, weights)
			for j := range n {
				var want, scale float64
				for i := range srcs {
					want += float64(weights[i]) * float64(srcs[i][j])
					scale += math.Abs(float64(weights[i]) * float64(srcs[i][j]))
				}
				if !closeTo(dst[j], want, scale) {
					t.Fatalf("n=%d sources=%d: dst[%d] = %v, want %v", n, nsrc, j, dst[j], want)
				}
			}
		}
	}
}

func TestWeightedSumPanicsOnMismatch(t *testing.T) {
	tests := []struct {
		name    string
		dst     []float32
		srcs    [][]float32
		weights []float32
	}{
		{"short source", make([]float32, 4), [][]float32{make([]float32, 3)}, []float32{1}},
		{"weights", make([]float32, 4), [][]float32{make([]float32, 4)}, []float32{1, 2}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Error("no panic")
				}
			}()
			WeightedSum(tc.dst, tc.srcs, tc.weights)
		})
	}
}

func TestAxpyAndScale(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for _, n := range kernelSizes {
		dst := randFloats(rng, n)
		src := randFloats(rng, n)
		a := float32(rng.Float64()*4 - 2)
		orig := append([]float32(nil), dst...)

		Axpy(dst, src, a)
		for j := range n {
			want := float64(orig[j]) + float64(a)*float64(src[j])
			if !closeTo(dst[j], want, math.Abs(float64(orig[j]))+math.Abs(float64(a*src[j]))) {
				t.Fatalf("Axpy n=%d: dst[%d] = %v, want %v", n, j, dst[j], want)
			}
		}

		// AxpyBytes from aligned and from misaligned bytes must agree with Axpy exactly.
		raw := make([]byte, 4*n+1)
		for i, v := range src {
			binary.LittleEndian.PutUint32(raw[1+4*i:], math.Float32bits(v))
		}
		for _, off := range []int{0, 1} {
			b := raw[off : off+4*n]
			if off == 0 {
				b = make([]byte, 4*n)
				copy(b, raw[1:])
			}
			got := append([]float32(nil), orig...)
			AxpyBytes(got, b, a)
			for j := range n {
				if got[j] != dst[j] {
					t.Fatalf("AxpyBytes n=%d offset %d: dst[%d] = %v, Axpy gave %v", n, off, j, got[j], dst[j])
				}
			}
		}

		Scale(dst, 0.5)
		for j := range n {
			want := (float64(orig[j]) + float64(a)*float64(src[j])) * 0.5
			if !closeTo(dst[j], want, math.Abs(float64(orig[j]))+math.Abs(float64(a*src[j]))) {
				t.Fatalf("Scale n=%d: dst[%d] = %v, want %v", n, j, dst[j], want)
			}
		}
	}
}

func TestAxpyRawDTypes(t *testing.T) {
	values := []float32{1, -0.5, 3, 0.25, 1024, -7, 0.125, 2, 6}
	for _, dt := range []DType{F32, F64, F16, BF16} {
		src := FromFloat32("s", []int64{int64(len(values))}, values)
		conv, err := ConvertFloat(src, dt)
		if err != nil {
			t.Fatal(err)
		}
		dst := make([]float32, len(values))
		for i := range dst {
			dst[i] = 1
		}
		axpyRaw(dst, conv.Data, dt, 2)
		dst64 := make([]float64, len(values))
		axpyRaw(dst64, conv.Data, dt, 2)
		for i, v := range values {
			// All values are exact in every format, so the result is exact.
			if want := 1 + 2*float64(v); float64(dst[i]) != want || dst64[i] != 2*float64(v) {
				t.Errorf("%s: element %d = %v / %v, want %v / %v", dt, i, dst[i], dst64[i], want, 2*float64(v))
			}
		}
	}
}
