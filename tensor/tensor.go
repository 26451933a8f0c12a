// Package tensor holds named tensors as they travel through fx: in memory, in
// safetensors files at rest, and as header-plus-chunk frames on the wire.
//
// A tensor's data is kept as raw little-endian bytes, the layout of both the
// safetensors format and the wire protocol, so moving a tensor between disk and
// network never converts it. Typed views (Float32s) are provided for the
// arithmetic that needs them.
//
// The package also holds the arithmetic of aggregation, because it is where
// the bytes are:
//
//   - kernels (WeightedSum, Axpy, AxpyBytes, Scale): blocked, parallel,
//     single-pass loops over float32 data, see kernels.go;
//   - whole-model algorithms: FedAvg, Median, TrimmedMean, and the server
//     optimisers FedAdam, FedYogi, FedAdagrad (Optimizer);
//   - Accumulator, which folds uploads into a running weighted sum chunk by
//     chunk as they stream in, staging each upload so a rejected one leaves
//     the sum untouched;
//   - Encoder and Decoder, which turn models into fxv1.TensorFrame streams and
//     back, or hand each chunk to an Accumulator.
//
// Memory, per round of N updates of a model of size M: FedAvg over in-memory
// updates and Median/TrimmedMean hold N×M; the Accumulator holds about M plus
// one M-sized stage per upload in flight (on disk with a spill directory);
// an Optimizer holds two working-precision (float32 or float64) copies, m and v.
package tensor

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"unicode/utf8"
	"unsafe"
)

// DType is an element type. The names match the safetensors format.
type DType string

// The element types fx reads and writes.
const (
	F32  DType = "F32"
	F64  DType = "F64"
	F16  DType = "F16"
	BF16 DType = "BF16"
	I64  DType = "I64"
	I32  DType = "I32"
	U8   DType = "U8"
)

// Size is the width of one element in bytes, or 0 for an unknown dtype.
func (d DType) Size() int {
	switch d {
	case F64, I64:
		return 8
	case F32, I32:
		return 4
	case F16, BF16:
		return 2
	case U8:
		return 1
	}
	return 0
}

// Valid reports whether d is one of the element types fx knows.
func (d DType) Valid() bool { return d.Size() > 0 }

// IsFloat reports whether d is a floating-point type (the ones aggregation works on).
func (d DType) IsFloat() bool { return d == F32 || d == F64 || d == F16 || d == BF16 }

// Tensor is a named n-dimensional array whose Data holds its elements as
// little-endian bytes in row-major order.
type Tensor struct {
	Name  string
	DType DType
	Shape []int64
	Data  []byte
}

// Elements is the product of the shape (1 for a scalar).
func (t *Tensor) Elements() int64 { return Elements(t.Shape) }

// Elements is the product of a shape (1 for a scalar, the empty shape). It
// does not check for overflow; shapes from outside go through CheckShape first.
func Elements(shape []int64) int64 {
	n := int64(1)
	for _, d := range shape {
		n *= d
	}
	return n
}

// ByteSize is the number of bytes a tensor of this dtype and shape occupies.
func ByteSize(d DType, shape []int64) int64 { return Elements(shape) * int64(d.Size()) }

// MaxTensorBytes bounds the size of one tensor. Shapes read from files or the
// wire are checked against it before anything is allocated, so a header that
// claims an absurd shape is an error rather than an overflow or a crash.
const MaxTensorBytes = 1 << 46

// CheckShape returns the byte size of a tensor of dtype d and the given shape,
// or an error if the dtype is unknown, a dimension is negative, or the size
// overflows MaxTensorBytes.
func CheckShape(d DType, shape []int64) (int64, error) {
	size := int64(d.Size())
	if size == 0 {
		return 0, fmt.Errorf("unknown dtype %q", d)
	}
	for _, dim := range shape {
		if dim < 0 {
			return 0, fmt.Errorf("negative dimension in shape %v", shape)
		}
	}
	for _, dim := range shape {
		if dim == 0 {
			return 0, nil
		}
	}
	for _, dim := range shape {
		if size > MaxTensorBytes/dim {
			return 0, fmt.Errorf("shape %v of %s is larger than %d bytes", shape, d, int64(MaxTensorBytes))
		}
		size *= dim
	}
	return size, nil
}

// Validate checks that the name, dtype, shape and data length agree.
func (t *Tensor) Validate() error {
	if err := ValidateName(t.Name); err != nil {
		return err
	}
	want, err := CheckShape(t.DType, t.Shape)
	if err != nil {
		return fmt.Errorf("tensor %q: %w", t.Name, err)
	}
	if int64(len(t.Data)) != want {
		return fmt.Errorf("tensor %q: %s%v needs %d bytes, has %d", t.Name, t.DType, t.Shape, want, len(t.Data))
	}
	return nil
}

// ValidateName refuses names that are empty, too long, not UTF-8 (JSON, and
// so safetensors, would silently rewrite them) or hold control characters.
func ValidateName(name string) error {
	if name == "" {
		return errors.New("tensor name is empty")
	}
	if len(name) > 512 {
		return fmt.Errorf("tensor name %.40q... is longer than 512 bytes", name)
	}
	if !utf8.ValidString(name) {
		return fmt.Errorf("tensor name %q is not valid UTF-8", name)
	}
	if strings.ContainsFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return fmt.Errorf("tensor name %q holds control characters", name)
	}
	return nil
}

// SameLayout reports whether two tensors agree in name, dtype and shape.
func SameLayout(a, b *Tensor) bool {
	return a.Name == b.Name && a.DType == b.DType && slices.Equal(a.Shape, b.Shape)
}

// hostLittleEndian is true on the machines Go's typed views can alias directly.
var hostLittleEndian = func() bool {
	x := uint16(1)
	return *(*byte)(unsafe.Pointer(&x)) == 1
}()

// Float32s returns the data of an F32 tensor as a []float32 that shares its
// memory. It panics if the dtype is not F32; on big-endian hosts it panics too,
// since fx's in-memory layout is little-endian.
func (t *Tensor) Float32s() []float32 {
	if t.DType != F32 {
		panic(fmt.Sprintf("tensor %q is %s, not F32", t.Name, t.DType))
	}
	return bytesAs[float32](t.Data)
}

// Float64s is Float32s for F64 tensors.
func (t *Tensor) Float64s() []float64 {
	if t.DType != F64 {
		panic(fmt.Sprintf("tensor %q is %s, not F64", t.Name, t.DType))
	}
	return bytesAs[float64](t.Data)
}

// asBytes is bytesAs's inverse: v's memory as little-endian bytes, shared,
// not copied.
func asBytes[T float32 | float64](v []T) []byte {
	if !hostLittleEndian {
		panic("tensor: typed views need a little-endian host")
	}
	if len(v) == 0 {
		return nil
	}
	var zero T
	return unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(v))), len(v)*int(unsafe.Sizeof(zero)))
}

// bytesAs reinterprets b as a slice of T. Tensors made by New (and so by every
// reader in this package) are 8-byte aligned; a hand-built Tensor whose Data is
// not aligned for T panics rather than handing out a misaligned slice.
func bytesAs[T float32 | float64](b []byte) []T {
	if !hostLittleEndian {
		panic("tensor: typed views need a little-endian host")
	}
	var zero T
	size := int(unsafe.Sizeof(zero))
	v, ok := View[T](b)
	if !ok && len(b) >= size {
		panic(fmt.Sprintf("tensor: data is not %d-byte aligned; allocate tensors with New", size))
	}
	return v
}

// View is b's memory as little-endian elements of T, shared, not copied:
// what lets loops over tensor data run on typed values instead of decoding
// bytes. ok is false, and the caller decodes the bytes itself, when the host
// is big-endian or b does not start on a multiple of T's size (a slice of a
// tensor made by New, cut at a multiple of T's size, always does). Bytes
// past the last whole element are left out.
func View[T uint32 | float32 | float64](b []byte) (v []T, ok bool) {
	var zero T
	size := int(unsafe.Sizeof(zero))
	if !hostLittleEndian || !aligned(b, size) {
		return nil, false
	}
	n := len(b) / size
	if n == 0 {
		return nil, true
	}
	return unsafe.Slice((*T)(unsafe.Pointer(unsafe.SliceData(b))), n), true
}

// aligned reports whether b starts on a multiple of align bytes.
func aligned(b []byte, align int) bool {
	return uintptr(unsafe.Pointer(unsafe.SliceData(b)))%uintptr(align) == 0
}

// alignedBytes allocates n zeroed bytes on an 8-byte boundary.
func alignedBytes(n int64) []byte {
	if n <= 0 {
		return nil
	}
	words := make([]uint64, (n+7)/8)
	return unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(words))), n)
}

// FromFloat32 builds an F32 tensor that copies values.
func FromFloat32(name string, shape []int64, values []float32) *Tensor {
	t := New(name, F32, shape)
	copy(t.Float32s(), values)
	return t
}

// ViewFloat32 wraps values as an F32 tensor without copying them: the
// tensor's Data is their memory. For large read-only arrays (a site's data
// set) that are written out once; values must outlive the tensor.
func ViewFloat32(name string, shape []int64, values []float32) *Tensor {
	return &Tensor{Name: name, DType: F32, Shape: slices.Clone(shape), Data: asBytes(values)}
}

// New allocates a zeroed tensor. The backing array is 8-byte aligned so typed
// views are always valid.
func New(name string, d DType, shape []int64) *Tensor {
	return &Tensor{Name: name, DType: d, Shape: slices.Clone(shape), Data: alignedBytes(ByteSize(d, shape))}
}

// Clone returns a deep copy.
func (t *Tensor) Clone() *Tensor {
	c := New(t.Name, t.DType, t.Shape)
	copy(c.Data, t.Data)
	return c
}

// CheckFinite returns an error naming the first NaN or Inf element of a float
// tensor. Integer tensors are always finite.
func (t *Tensor) CheckFinite() error {
	if i, v, ok := firstNonFinite(t.Data, t.DType); ok {
		return fmt.Errorf("tensor %q element %d is %v: %w", t.Name, i, v, ErrNonFinite)
	}
	return nil
}

// ErrNonFinite is wrapped by the errors that report a NaN or Inf value.
var ErrNonFinite = errors.New("non-finite value")

// CheckFiniteRaw is CheckFinite for raw little-endian elements of dtype d, as
// they arrive in a chunk; firstElem numbers the elements in the error.
func CheckFiniteRaw(raw []byte, d DType, firstElem int64) error {
	if i, v, ok := firstNonFinite(raw, d); ok {
		return fmt.Errorf("element %d is %v: %w", firstElem+int64(i), v, ErrNonFinite)
	}
	return nil
}

// firstNonFinite finds the first NaN or Inf by its exponent bits, which is
// exact for every float format and needs no conversion. Every upload passes
// through it, so it screens eight bytes at a time (see nonFiniteScreen) and
// looks at single elements only in a block the screen flagged.
func firstNonFinite(raw []byte, d DType) (int, float64, bool) {
	screen, ok := nonFiniteScreens[d]
	if !ok {
		return 0, 0, false
	}
	const block = 4 << 10
	for off := 0; off < len(raw); off += block {
		b := raw[off:min(off+block, len(raw))]
		if !screen.flags(b) {
			continue
		}
		if i, v, ok := firstNonFiniteScalar(b, d); ok {
			return off/d.Size() + i, v, true
		}
	}
	return 0, 0, false
}

// nonFiniteScreen tests the elements packed in a 64-bit word at once. Masked
// to its exponent bits, an element's exponent is all ones (NaN or Inf)
// exactly when adding the exponent's lowest bit carries into the element's
// sign bit; no element's sum can carry into its neighbour.
type nonFiniteScreen struct {
	exponent uint64 // each element's exponent bits
	lowest   uint64 // each element's lowest exponent bit
	sign     uint64 // each element's sign bit
}

var nonFiniteScreens = map[DType]nonFiniteScreen{
	F32:  {0x7f800000_7f800000, 0x00800000_00800000, 0x80000000_80000000},
	F64:  {0x7ff00000_00000000, 0x00100000_00000000, 0x80000000_00000000},
	F16:  {0x7c00_7c00_7c00_7c00, 0x0400_0400_0400_0400, 0x8000_8000_8000_8000},
	BF16: {0x7f80_7f80_7f80_7f80, 0x0080_0080_0080_0080, 0x8000_8000_8000_8000},
}

// flags reports whether b may hold a NaN or Inf: false means it holds none.
func (s nonFiniteScreen) flags(b []byte) bool {
	var acc uint64
	i := 0
	for ; i+32 <= len(b); i += 32 {
		w := b[i : i+32 : i+32]
		acc |= (binary.LittleEndian.Uint64(w[0:])&s.exponent + s.lowest) |
			(binary.LittleEndian.Uint64(w[8:])&s.exponent + s.lowest) |
			(binary.LittleEndian.Uint64(w[16:])&s.exponent + s.lowest) |
			(binary.LittleEndian.Uint64(w[24:])&s.exponent + s.lowest)
	}
	for ; i+8 <= len(b); i += 8 {
		acc |= binary.LittleEndian.Uint64(b[i:])&s.exponent + s.lowest
	}
	return acc&s.sign != 0 || i < len(b) // a tail is left to the exact scan
}

// firstNonFiniteScalar is the exact scan, one element at a time.
func firstNonFiniteScalar(raw []byte, d DType) (int, float64, bool) {
	switch d {
	case F32:
		for i := 0; i+4 <= len(raw); i += 4 {
			if b := binary.LittleEndian.Uint32(raw[i:]); b&0x7f800000 == 0x7f800000 {
				return i / 4, float64(math.Float32frombits(b)), true
			}
		}
	case F64:
		for i := 0; i+8 <= len(raw); i += 8 {
			if b := binary.LittleEndian.Uint64(raw[i:]); b&0x7ff0000000000000 == 0x7ff0000000000000 {
				return i / 8, math.Float64frombits(b), true
			}
		}
	case F16:
		for i := 0; i+2 <= len(raw); i += 2 {
			if h := binary.LittleEndian.Uint16(raw[i:]); h&0x7c00 == 0x7c00 {
				return i / 2, float64(F16ToFloat32(h)), true
			}
		}
	case BF16:
		for i := 0; i+2 <= len(raw); i += 2 {
			if h := binary.LittleEndian.Uint16(raw[i:]); h&0x7f80 == 0x7f80 {
				return i / 2, float64(BF16ToFloat32(h)), true
			}
		}
	}
	return 0, 0, false
}
