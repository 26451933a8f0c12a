package tensor

import (
	"encoding/binary"
	"fmt"
	"math"
)

// Half-precision tensors (F16, BF16) are stored as they came, and widened to
// float32 only where arithmetic needs it: aggregation keeps its running sums in
// float32, then rounds back once, so an F16 model loses no more precision per
// round than a single rounding.

// F16ToFloat32 widens an IEEE 754 binary16 value. Every half value, subnormals,
// infinities and NaN payloads included, is exactly representable in float32,
// so this conversion is exact and Float32ToF16 inverts it bit for bit.
func F16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch exp {
	case 0:
		if mant == 0 {
			return math.Float32frombits(sign)
		}
		// Subnormal: mant × 2^-24. Normalise so the leading 1 becomes implicit.
		e := uint32(127 - 14)
		for mant&0x400 == 0 {
			mant <<= 1
			e--
		}
		return math.Float32frombits(sign | e<<23 | (mant&0x3ff)<<13)
	case 0x1f:
		// Infinity (mant 0) or NaN, whose payload moves to the top of the float32 mantissa.
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
}

// Float32ToF16 narrows to binary16 with round-to-nearest-even: values beyond
// the half range become ±Inf, tiny ones become subnormals or ±0, and NaN stays
// NaN (keeping the top payload bits, forced non-zero so it cannot turn into Inf).
func Float32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	if exp == 0xff {
		if mant == 0 {
			return sign | 0x7c00
		}
		m := uint16(mant >> 13)
		if m == 0 {
			m = 0x200
		}
		return sign | 0x7c00 | m
	}
	e := exp - 127 + 15 // biased half exponent
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		// Result is a half subnormal (or rounds up to the smallest normal,
		// whose encoding the carry produces by itself). The value in units of
		// 2^-24 is m >> shift with the implicit bit restored.
		shift := uint32(14 - e)
		if shift > 24 {
			return sign // below half of the smallest subnormal: rounds to zero
		}
		m := mant | 0x800000
		q := m >> shift
		rem := m & (1<<shift - 1)
		halfway := uint32(1) << (shift - 1)
		if rem > halfway || (rem == halfway && q&1 == 1) {
			q++
		}
		return sign | uint16(q)
	}
	q := uint32(e)<<10 | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && q&1 == 1) {
		q++ // a carry out of the mantissa bumps the exponent, up to Inf: both correct
	}
	return sign | uint16(q)
}

// BF16ToFloat32 widens a bfloat16 value, which is the top half of a float32; exact.
func BF16ToFloat32(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// Float32ToBF16 narrows to bfloat16 with round-to-nearest-even; NaN stays NaN
// with its top payload bits (forced non-zero).
func Float32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		h := uint16(b >> 16)
		if h&0x7f == 0 {
			h |= 0x40
		}
		return h
	}
	return uint16((b + 0x7fff + (b>>16)&1) >> 16)
}

// DecodeFloat32 widens (or, for F64, rounds) len(dst) little-endian elements of
// float dtype d from raw into dst. raw must hold exactly len(dst) elements.
func DecodeFloat32(dst []float32, raw []byte, d DType) error {
	if !d.IsFloat() {
		return fmt.Errorf("decode %s as float32: not a float dtype", d)
	}
	if len(raw) != len(dst)*d.Size() {
		return fmt.Errorf("decode %s as float32: %d bytes for %d elements", d, len(raw), len(dst))
	}
	switch d {
	case F32:
		for i := range dst {
			dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
		}
	case F64:
		for i := range dst {
			dst[i] = float32(math.Float64frombits(binary.LittleEndian.Uint64(raw[8*i:])))
		}
	case F16:
		for i := range dst {
			dst[i] = F16ToFloat32(binary.LittleEndian.Uint16(raw[2*i:]))
		}
	case BF16:
		for i := range dst {
			dst[i] = BF16ToFloat32(binary.LittleEndian.Uint16(raw[2*i:]))
		}
	}
	return nil
}

// EncodeFloat32 is the inverse of DecodeFloat32: it writes src as little-endian
// elements of float dtype d into dst, rounding to nearest even for F16/BF16.
func EncodeFloat32(dst []byte, src []float32, d DType) error {
	if !d.IsFloat() {
		return fmt.Errorf("encode float32 as %s: not a float dtype", d)
	}
	if len(dst) != len(src)*d.Size() {
		return fmt.Errorf("encode float32 as %s: %d bytes for %d elements", d, len(dst), len(src))
	}
	switch d {
	case F32:
		for i, v := range src {
			binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(v))
		}
	case F64:
		for i, v := range src {
			binary.LittleEndian.PutUint64(dst[8*i:], math.Float64bits(float64(v)))
		}
	case F16:
		for i, v := range src {
			binary.LittleEndian.PutUint16(dst[2*i:], Float32ToF16(v))
		}
	case BF16:
		for i, v := range src {
			binary.LittleEndian.PutUint16(dst[2*i:], Float32ToBF16(v))
		}
	}
	return nil
}

// Float32Copy returns the elements of a float tensor of any float dtype as a
// new []float32 (F64 values are rounded to nearest).
func (t *Tensor) Float32Copy() ([]float32, error) {
	if !t.DType.IsFloat() {
		return nil, fmt.Errorf("tensor %q is %s, not a float dtype", t.Name, t.DType)
	}
	out := make([]float32, len(t.Data)/t.DType.Size())
	if err := DecodeFloat32(out, t.Data, t.DType); err != nil {
		return nil, fmt.Errorf("tensor %q: %w", t.Name, err)
	}
	return out, nil
}

// SetFloat32 stores values into a float tensor, converting to its dtype with
// round-to-nearest-even. values must have exactly t.Elements() entries.
func (t *Tensor) SetFloat32(values []float32) error {
	if !t.DType.IsFloat() {
		return fmt.Errorf("tensor %q is %s, not a float dtype", t.Name, t.DType)
	}
	if err := EncodeFloat32(t.Data, values, t.DType); err != nil {
		return fmt.Errorf("tensor %q: %w", t.Name, err)
	}
	return nil
}

// CombineFloat32 sets each element of dst to f(a's element, dst's
// element), computed in float32 and rounded back to dst's dtype: the
// elementwise steps of the server optimisers and of asynchronous updates
// for the dtypes without a typed view (F16, BF16), whose callers run F32
// (and F64) in loops of their own. dst and a must share a layout.
func CombineFloat32(dst, a *Tensor, f func(a, d float32) float32) error {
	ds, err := dst.Float32Copy()
	if err != nil {
		return err
	}
	as, err := a.Float32Copy()
	if err != nil {
		return err
	}
	if len(as) != len(ds) {
		return fmt.Errorf("tensor %q has %d elements, %q %d", dst.Name, len(ds), a.Name, len(as))
	}
	for i, d := range ds {
		ds[i] = f(as[i], d)
	}
	return dst.SetFloat32(ds)
}

// ConvertFloat returns a copy of a float tensor with dtype d. It goes through
// float32: widening is exact, narrowing rounds to nearest even (F64 to F16 or
// BF16 rounds twice, which can differ from one direct rounding in the last
// bit); converting to the tensor's own dtype is a plain copy.
func ConvertFloat(t *Tensor, d DType) (*Tensor, error) {
	if !d.IsFloat() {
		return nil, fmt.Errorf("convert tensor %q to %s: not a float dtype", t.Name, d)
	}
	if t.DType == d {
		return t.Clone(), nil
	}
	vals, err := t.Float32Copy()
	if err != nil {
		return nil, err
	}
	out := New(t.Name, d, t.Shape)
	if err := out.SetFloat32(vals); err != nil {
		return nil, err
	}
	return out, nil
}
