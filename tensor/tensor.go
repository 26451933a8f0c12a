// Package tensor holds named tensors as they travel through fx: in memory, in
// safetensors files at rest, and as header-plus-chunk frames on the wire.
//
// A tensor's data is kept as raw little-endian bytes, the layout of both the
// safetensors format and the wire protocol, so moving a tensor between disk and
// network never converts it. Typed views (Float32s) are provided for the
// arithmetic that needs them.
package tensor

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
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

// Elements is the product of a shape (1 for a scalar, the empty shape).
func Elements(shape []int64) int64 {
	n := int64(1)
	for _, d := range shape {
		n *= d
	}
	return n
}

// ByteSize is the number of bytes a tensor of this dtype and shape occupies.
func ByteSize(d DType, shape []int64) int64 { return Elements(shape) * int64(d.Size()) }

// Validate checks that the name, dtype, shape and data length agree.
func (t *Tensor) Validate() error {
	if err := ValidateName(t.Name); err != nil {
		return err
	}
	if !t.DType.Valid() {
		return fmt.Errorf("tensor %q: unknown dtype %q", t.Name, t.DType)
	}
	for _, d := range t.Shape {
		if d < 0 {
			return fmt.Errorf("tensor %q: negative dimension in shape %v", t.Name, t.Shape)
		}
	}
	if want := ByteSize(t.DType, t.Shape); int64(len(t.Data)) != want {
		return fmt.Errorf("tensor %q: %s%v needs %d bytes, has %d", t.Name, t.DType, t.Shape, want, len(t.Data))
	}
	return nil
}

// ValidateName refuses names that are empty, too long or hold control characters.
func ValidateName(name string) error {
	if name == "" {
		return errors.New("tensor name is empty")
	}
	if len(name) > 512 {
		return fmt.Errorf("tensor name %.40q... is longer than 512 bytes", name)
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

func bytesAs[T float32 | float64](b []byte) []T {
	if !hostLittleEndian {
		panic("tensor: typed views need a little-endian host")
	}
	var zero T
	n := len(b) / int(unsafe.Sizeof(zero))
	if n == 0 {
		return nil
	}
	return unsafe.Slice((*T)(unsafe.Pointer(unsafe.SliceData(b))), n)
}

// FromFloat32 builds an F32 tensor that copies values.
func FromFloat32(name string, shape []int64, values []float32) *Tensor {
	t := New(name, F32, shape)
	copy(t.Float32s(), values)
	return t
}

// New allocates a zeroed tensor. The backing array is 8-byte aligned so typed
// views are always valid.
func New(name string, d DType, shape []int64) *Tensor {
	n := ByteSize(d, shape)
	words := make([]uint64, (n+7)/8)
	var data []byte
	if n > 0 {
		data = unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(words))), n)
	}
	return &Tensor{Name: name, DType: d, Shape: slices.Clone(shape), Data: data}
}

// Clone returns a deep copy.
func (t *Tensor) Clone() *Tensor {
	c := New(t.Name, t.DType, t.Shape)
	copy(c.Data, t.Data)
	return c
}

// CheckFinite returns an error naming the first NaN or Inf element of a float tensor.
func (t *Tensor) CheckFinite() error {
	switch t.DType {
	case F32:
		for i, v := range t.Float32s() {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				return fmt.Errorf("tensor %q element %d is %v", t.Name, i, v)
			}
		}
	case F64:
		for i, v := range t.Float64s() {
			if math.IsNaN(v) || math.IsInf(v, 0) {
				return fmt.Errorf("tensor %q element %d is %v", t.Name, i, v)
			}
		}
	}
	return nil
}
