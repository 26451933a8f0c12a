package secagg

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/fx-fl/fx/tensor"
)

// fixedPoint encodes clipped, weighted floats as integers mod 2^32 (see the
// package documentation, "Fixed point").
type fixedPoint struct {
	r        float64 // values are clipped to [−r, r]
	fracBits int     // f: one unit is 2^-f
}

// maxRange is the largest clipping range: it leaves f ≥ 0.
const maxRange = 1 << 30

// newFixedPoint picks the most fractional bits f for which r·2^f ≤ 2^30.
func newFixedPoint(r float64) (fixedPoint, error) {
	if !(r >= 0x1p-60 && r <= maxRange) {
		return fixedPoint{}, fmt.Errorf("range %v: want a clipping bound R in [2^-60, 2^30]", r)
	}
	frac, k := math.Frexp(r) // r = frac·2^k, frac in [0.5, 1)
	if frac == 0.5 {
		k-- // r = 2^(k−1) exactly
	}
	return fixedPoint{r: r, fracBits: 30 - k}, nil
}

// resolution is one unit of the encoding, 2^-f.
func (fp fixedPoint) resolution() float64 { return math.Ldexp(1, -fp.fracBits) }

// encode writes round(weight·clip(x)·2^f) of each element of raw (dtype d)
// into dst as a two's-complement uint32. weight is the participant's share of
// the round's total weight, in (0, 1]. Non-finite values are an error, as
// anywhere in fx; firstElem numbers the elements in that error.
func (fp fixedPoint) encode(dst []uint32, raw []byte, d tensor.DType, weight float64, firstElem int64) error {
	s := weight * math.Ldexp(1, fp.fracBits)
	r := fp.r
	ok := true
	switch d {
	case tensor.F32:
		for i := range dst {
			dst[i], ok = quantize(float64(math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))), r, s, ok)
		}
	case tensor.F64:
		for i := range dst {
			dst[i], ok = quantize(math.Float64frombits(binary.LittleEndian.Uint64(raw[8*i:])), r, s, ok)
		}
	case tensor.F16:
		for i := range dst {
			dst[i], ok = quantize(float64(tensor.F16ToFloat32(binary.LittleEndian.Uint16(raw[2*i:]))), r, s, ok)
		}
	case tensor.BF16:
		for i := range dst {
			dst[i], ok = quantize(float64(tensor.BF16ToFloat32(binary.LittleEndian.Uint16(raw[2*i:]))), r, s, ok)
		}
	default:
		return fmt.Errorf("dtype %s: secure aggregation sums float tensors (F32, F64, F16, BF16) only", d)
	}
	if !ok {
		return tensor.CheckFiniteRaw(raw, d, firstElem)
	}
	return nil
}

// quantize is one element of encode, small enough to inline; ok turns false
// (and stays so) at a non-finite value, which encode then locates.
func quantize(v, r, s float64, ok bool) (uint32, bool) {
	if v-v != 0 { // NaN or ±Inf
		return 0, false
	}
	v = max(-r, min(r, v)) * s
	if v >= 0 {
		return uint32(int32(v + 0.5)), ok
	}
	return uint32(int32(v - 0.5)), ok
}

// unit is the value of one step of the sum times scale: 2^-f·scale.
func (fp fixedPoint) unit(scale float64) float64 { return math.Ldexp(scale, -fp.fracBits) }

// decode turns a sum mod 2^32 back into a float: its two's-complement value
// times unit.
func decode(v uint32, unit float64) float64 { return float64(int32(v)) * unit }
