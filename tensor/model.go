package tensor

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
)

// Model is a set of named tensors: a model's weights, an update, or optimiser
// state. Its order is the order tensors are written and streamed in; Sort puts
// it in name order, which is how safetensors files and the wire list them.
type Model []*Tensor

// Get returns the tensor with the given name, or nil.
func (m Model) Get(name string) *Tensor {
	for _, t := range m {
		if t.Name == name {
			return t
		}
	}
	return nil
}

// Index maps names to tensors, for lookups in models too large for Get's scan.
// If a name repeats, the first tensor wins.
func (m Model) Index() map[string]*Tensor {
	idx := make(map[string]*Tensor, len(m))
	for _, t := range m {
		if _, dup := idx[t.Name]; !dup {
			idx[t.Name] = t
		}
	}
	return idx
}

// Sort orders the tensors by name.
func (m Model) Sort() {
	slices.SortFunc(m, func(a, b *Tensor) int { return strings.Compare(a.Name, b.Name) })
}

// Bytes is the total size of the tensors' data.
func (m Model) Bytes() int64 {
	var n int64
	for _, t := range m {
		n += int64(len(t.Data))
	}
	return n
}

// Clone returns a deep copy.
func (m Model) Clone() Model {
	c := make(Model, len(m))
	for i, t := range m {
		c[i] = t.Clone()
	}
	return c
}

// Validate checks every tensor and that no name repeats.
func (m Model) Validate() error {
	seen := make(map[string]bool, len(m))
	for _, t := range m {
		if err := t.Validate(); err != nil {
			return err
		}
		if seen[t.Name] {
			return fmt.Errorf("tensor %q appears twice", t.Name)
		}
		seen[t.Name] = true
	}
	return nil
}

// Matches reports, as an error that names the first difference, whether other
// has exactly the tensors of m with the same dtypes and shapes.
func (m Model) Matches(other Model) error {
	index := m.Index()
	seen := make(map[string]bool, len(other))
	for _, t := range other {
		ref := index[t.Name]
		if ref == nil {
			return fmt.Errorf("unknown tensor %q", t.Name)
		}
		if seen[t.Name] {
			return fmt.Errorf("tensor %q appears twice", t.Name)
		}
		seen[t.Name] = true
		if !SameLayout(ref, t) {
			return fmt.Errorf("tensor %q is %s%v, want %s%v", t.Name, t.DType, t.Shape, ref.DType, ref.Shape)
		}
	}
	if len(other) != len(m) {
		for _, t := range m {
			if !seen[t.Name] {
				return fmt.Errorf("tensor %q is missing", t.Name)
			}
		}
		return fmt.Errorf("model has %d tensors, want %d", len(other), len(m))
	}
	return nil
}

// Digest is a model's content digest: SHA-256, in hex, over each tensor's
// name, dtype, shape and data, in name order. Two models have the same
// digest when they hold the same tensors, whatever file they came from
// (a safetensors file's metadata and padding do not count).
func Digest(m Model) string {
	h := sha256.New()
	order := slices.Clone(m)
	order.Sort()
	var buf [8]byte
	for _, t := range order {
		h.Write([]byte(t.Name))
		h.Write([]byte{0})
		h.Write([]byte(t.DType))
		h.Write([]byte{0})
		binary.LittleEndian.PutUint64(buf[:], uint64(len(t.Shape)))
		h.Write(buf[:])
		for _, d := range t.Shape {
			binary.LittleEndian.PutUint64(buf[:], uint64(d))
			h.Write(buf[:])
		}
		binary.LittleEndian.PutUint64(buf[:], uint64(len(t.Data)))
		h.Write(buf[:])
		h.Write(t.Data)
	}
	return hex.EncodeToString(h.Sum(nil))
}
