package tensor

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"sort"
	"strings"
	"testing"
)

// halfValue computes the value of a binary16 bit pattern from the IEEE 754
// definition, in float64, independently of the conversion under test.
func halfValue(h uint16) float64 {
	sign := 1.0
	if h&0x8000 != 0 {
		sign = -1
	}
	exp := int(h>>10) & 0x1f
	mant := float64(h & 0x3ff)
	switch exp {
	case 0:
		return sign * mant * math.Pow(2, -24)
	case 0x1f:
		if mant == 0 {
			return math.Inf(int(sign))
		}
		return math.NaN()
	}
	return sign * (1 + mant/1024) * math.Pow(2, float64(exp-15))
}

// bf16Value is halfValue for bfloat16 (8 exponent bits, 7 mantissa bits).
func bf16Value(h uint16) float64 {
	sign := 1.0
	if h&0x8000 != 0 {
		sign = -1
	}
	exp := int(h>>7) & 0xff
	mant := float64(h & 0x7f)
	switch exp {
	case 0:
		return sign * mant * math.Pow(2, -133)
	case 0xff:
		if mant == 0 {
			return math.Inf(int(sign))
		}
		return math.NaN()
	}
	return sign * (1 + mant/128) * math.Pow(2, float64(exp-127))
}

func TestF16AllValuesRoundTrip(t *testing.T) {
	for i := range 1 << 16 {
		h := uint16(i)
		f := F16ToFloat32(h)
		want := halfValue(h)
		if math.IsNaN(want) {
			if !math.IsNaN(float64(f)) {
				t.Fatalf("F16ToFloat32(%#04x) = %v, want NaN", h, f)
			}
		} else if float64(f) != want || math.Signbit(float64(f)) != (h&0x8000 != 0) {
			t.Fatalf("F16ToFloat32(%#04x) = %v, want %v", h, f, want)
		}
		if back := Float32ToF16(f); back != h {
			t.Fatalf("Float32ToF16(F16ToFloat32(%#04x)) = %#04x", h, back)
		}
	}
}

func TestBF16AllValuesRoundTrip(t *testing.T) {
	for i := range 1 << 16 {
		h := uint16(i)
		f := BF16ToFloat32(h)
		want := bf16Value(h)
		if math.IsNaN(want) {
			if !math.IsNaN(float64(f)) {
				t.Fatalf("BF16ToFloat32(%#04x) = %v, want NaN", h, f)
			}
		} else if float64(f) != want {
			t.Fatalf("BF16ToFloat32(%#04x) = %v, want %v", h, f, want)
		}
		if back := Float32ToBF16(f); back != h {
			t.Fatalf("Float32ToBF16(BF16ToFloat32(%#04x)) = %#04x", h, back)
		}
	}
}

// nearest returns the code whose value (given by val over the sorted
// non-negative finite codes) is nearest to x ≥ 0, ties to the even code, or
// inf if x is at least max + half an ulp — IEEE round-to-nearest-even by
// brute force, in float64.
// vals[c] is the value of code c, for c = 0 .. the largest finite code.
func nearest(x float64, vals []float64, inf uint16, maxUlp float64) uint16 {
	top := vals[len(vals)-1]
	if x >= top+maxUlp/2 {
		return inf
	}
	i := sort.SearchFloat64s(vals, x)
	if i == len(vals) {
		return uint16(len(vals) - 1)
	}
	if i == 0 || vals[i] == x {
		return uint16(i)
	}
	lo, hi := uint16(i-1), uint16(i)
	dlo, dhi := x-vals[lo], vals[hi]-x
	switch {
	case dlo < dhi:
		return lo
	case dhi < dlo:
		return hi
	case lo%2 == 0:
		return lo
	}
	return hi
}

func TestFloat32ToHalfRounding(t *testing.T) {
	type format struct {
		name     string
		toHalf   func(float32) uint16
		toFloat  func(uint16) float32
		val      func(uint16) float64
		inf      uint16
		maxFinit uint16
		// float32 exponents (biased) spanning the format's range and a bit beyond.
		minExp, maxExp uint32
	}
	formats := []format{
		{"F16", Float32ToF16, F16ToFloat32, halfValue, 0x7c00, 0x7bff, 127 - 27, 127 + 17},
		{"BF16", Float32ToBF16, BF16ToFloat32, bf16Value, 0x7f80, 0x7f7f, 0, 254},
	}
	for _, f := range formats {
		t.Run(f.name, func(t *testing.T) {
			vals := make([]float64, f.maxFinit+1)
			for c := range vals {
				vals[c] = f.val(uint16(c))
			}
			maxUlp := vals[f.maxFinit] - vals[f.maxFinit-1]
			var inputs []float32
			// Every code, the midpoints between neighbours (exact in float32)
			// and the float32 values just either side of them.
			for i := 0; i+1 < len(vals); i++ {
				mid := float32((vals[i] + vals[i+1]) / 2)
				inputs = append(inputs, float32(vals[i]), mid, math.Nextafter32(mid, 0), math.Nextafter32(mid, float32(math.Inf(1))))
			}
			top := float32(vals[f.maxFinit] + maxUlp/2)
			inputs = append(inputs, top, math.Nextafter32(top, 0), math.MaxFloat32, math.SmallestNonzeroFloat32)
			rng := rand.New(rand.NewPCG(1, 2))
			for range 100000 {
				exp := f.minExp + rng.Uint32N(f.maxExp-f.minExp+1)
				inputs = append(inputs, math.Float32frombits(exp<<23|rng.Uint32N(1<<23)))
			}
			for _, x := range inputs {
				want := nearest(float64(x), vals, f.inf, maxUlp)
				if got := f.toHalf(x); got != want {
					t.Fatalf("%s(%g = %#08x) = %#04x (%g), want %#04x (%g)", f.name, x, math.Float32bits(x), got, f.val(got), want, f.val(want))
				}
				if got := f.toHalf(-x); got != want|0x8000 {
					t.Fatalf("%s(%g) = %#04x, want %#04x", f.name, -x, got, want|0x8000)
				}
			}
			for _, c := range []float32{float32(math.Inf(1)), float32(math.Inf(-1))} {
				want := f.inf
				if c < 0 {
					want |= 0x8000
				}
				if got := f.toHalf(c); got != want {
					t.Errorf("%s(%v) = %#04x, want %#04x", f.name, c, got, want)
				}
			}
			// NaNs whose payload sits only in bits the half format drops must stay NaN.
			for _, bits := range []uint32{0x7fc00000, 0x7f800001, 0xff800001, 0x7fffffff} {
				got := f.toHalf(math.Float32frombits(bits))
				if !math.IsNaN(float64(f.toFloat(got))) {
					t.Errorf("%s(NaN %#08x) = %#04x, not NaN", f.name, bits, got)
				}
			}
		})
	}
}

func TestFloatConversions(t *testing.T) {
	values := []float32{0, 1, -2.5, 65504, 1e-7, 3.140625}
	tests := []struct {
		dtype DType
		want  []float64 // values after a round trip through dtype, computed by hand
	}{
		{F32, []float64{0, 1, -2.5, 65504, float64(float32(1e-7)), 3.140625}},
		{F64, []float64{0, 1, -2.5, 65504, float64(float32(1e-7)), 3.140625}},
		// 1e-7 in half is the subnormal 2 × 2^-24 (1.19e-7): nearest code.
		{F16, []float64{0, 1, -2.5, 65504, 2 * math.Pow(2, -24), 3.140625}},
		// bfloat16 keeps 8 significant bits: 65504 → 65536, 3.140625 → 3.140625.
		{BF16, []float64{0, 1, -2.5, 65536, bf16Value(Float32ToBF16(1e-7)), 3.140625}},
	}
	for _, tc := range tests {
		t.Run(string(tc.dtype), func(t *testing.T) {
			src := FromFloat32("x", []int64{2, 3}, values)
			conv, err := ConvertFloat(src, tc.dtype)
			if err != nil {
				t.Fatal(err)
			}
			if conv.DType != tc.dtype || len(conv.Data) != 6*tc.dtype.Size() {
				t.Fatalf("converted tensor is %s with %d bytes", conv.DType, len(conv.Data))
			}
			got, err := conv.Float32Copy()
			if err != nil {
				t.Fatal(err)
			}
			for i, w := range tc.want {
				if float64(got[i]) != w {
					t.Errorf("element %d = %v, want %v", i, got[i], w)
				}
			}
		})
	}
	if _, err := New("i", I64, []int64{2}).Float32Copy(); err == nil {
		t.Error("Float32Copy of an I64 tensor succeeded")
	}
	if err := New("i", I32, []int64{2}).SetFloat32([]float32{1, 2}); err == nil {
		t.Error("SetFloat32 on an I32 tensor succeeded")
	}
	if err := New("f", F16, []int64{2}).SetFloat32([]float32{1}); err == nil {
		t.Error("SetFloat32 with too few values succeeded")
	}
}

func TestCheckFinite(t *testing.T) {
	tests := []struct {
		dtype DType
		bad   float32
	}{
		{F32, float32(math.NaN())}, {F32, float32(math.Inf(1))},
		{F64, float32(math.Inf(-1))}, {F16, float32(math.NaN())},
		{F16, 70000}, // overflows half: Inf
		{BF16, float32(math.Inf(1))},
	}
	for _, tc := range tests {
		x := New("x", tc.dtype, []int64{4})
		if err := x.CheckFinite(); err != nil {
			t.Fatalf("%s zeros: %v", tc.dtype, err)
		}
		if err := x.SetFloat32([]float32{1, 2, tc.bad, 4}); err != nil {
			t.Fatal(err)
		}
		err := x.CheckFinite()
		if err == nil {
			t.Errorf("%s with %v: CheckFinite passed", tc.dtype, tc.bad)
			continue
		}
		if want := "element 2"; !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %q does not name %q", tc.dtype, err, want)
		}
	}
}

// TestNonFiniteScreenMatchesExactScan checks the word-at-a-time screen
// against the element-at-a-time scan: every 16-bit pattern in every lane of
// the unrolled loop and of the word after it,
// and the exponent edges of F32 and F64 at positions on both sides of the
// screen's blocks and in unaligned tails.
func TestNonFiniteScreenMatchesExactScan(t *testing.T) {
	for _, d := range []DType{F16, BF16} {
		word := make([]byte, 40) // the unrolled loop's 32 bytes and one more word
		for h := range 1 << 16 {
			for lane := range len(word) / 2 {
				clear(word)
				binary.LittleEndian.PutUint16(word[2*lane:], uint16(h))
				_, _, want := firstNonFiniteScalar(word, d)
				if got := nonFiniteScreens[d].flags(word); got != want {
					t.Fatalf("%s pattern %#04x in lane %d: screen says %v, scan says %v", d, h, lane, got, want)
				}
			}
		}
	}

	edges := map[DType][]uint64{
		F32:  {0x7f800000, 0xff800000, 0x7fc00000, 0x7f800001, 0x7f7fffff, 0xff7fffff, 0x00800000, 0x80000001, 0x3f800000},
		F64:  {0x7ff0000000000000, 0xfff0000000000000, 0x7ff8000000000000, 0x7fefffffffffffff, 0x0010000000000000, 0x8000000000000001},
		F16:  {0x7c00, 0xfc00, 0x7e00, 0x7bff, 0xfbff, 0x0400},
		BF16: {0x7f80, 0xff80, 0x7fc0, 0x7f7f, 0xff7f, 0x0080},
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for d, values := range edges {
		size := d.Size()
		for _, elems := range []int{1, 3, 7, 4096 / size, 4096/size + 1, 3 * 4096 / size, 3*4096/size + 5} {
			for _, v := range values {
				for _, at := range []int{0, elems - 1, rng.IntN(elems), min(elems-1, 4096/size), max(0, min(elems-1, 4096/size-1))} {
					raw := make([]byte, elems*size)
					for i := range elems { // finite filler: ones
						putElem(raw[i*size:], d, map[DType]uint64{F32: 0x3f800000, F64: 0x3ff0000000000000, F16: 0x3c00, BF16: 0x3f80}[d])
					}
					putElem(raw[at*size:], d, v)
					gi, gv, gok := firstNonFinite(raw, d)
					wi, wv, wok := firstNonFiniteScalar(raw, d)
					if gi != wi || gok != wok || (gok && !(gv == wv || gv != gv && wv != wv)) {
						t.Fatalf("%s, %d elements, %#x at %d: got (%d, %v, %v), exact scan (%d, %v, %v)", d, elems, v, at, gi, gv, gok, wi, wv, wok)
					}
				}
			}
		}
	}
}

func putElem(b []byte, d DType, v uint64) {
	switch d.Size() {
	case 2:
		binary.LittleEndian.PutUint16(b, uint16(v))
	case 4:
		binary.LittleEndian.PutUint32(b, uint32(v))
	case 8:
		binary.LittleEndian.PutUint64(b, v)
	}
}

// TestCombineFloat32: the elementwise step of the low-precision dtypes
// computes f(a, dst) in float32 and rounds it back to dst's dtype, and
// refuses tensors of different sizes.
func TestCombineFloat32(t *testing.T) {
	for _, d := range []DType{F16, BF16, F64} {
		dst, a := New("x", d, []int64{3}), New("g", d, []int64{3})
		if err := dst.SetFloat32([]float32{0.5, -1, 4}); err != nil {
			t.Fatal(err)
		}
		if err := a.SetFloat32([]float32{1, 2, 3}); err != nil {
			t.Fatal(err)
		}
		if err := CombineFloat32(dst, a, func(a, d float32) float32 { return a + 2*d }); err != nil {
			t.Fatal(err)
		}
		got, _ := dst.Float32Copy()
		if want := []float32{2, 0, 11}; got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
			t.Errorf("%s: %v, want %v", d, got, want)
		}
	}
	if err := CombineFloat32(New("x", F16, []int64{3}), New("g", F16, []int64{4}), func(a, d float32) float32 { return a }); err == nil {
		t.Error("tensors of 3 and 4 elements combined")
	}
}
