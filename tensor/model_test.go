package tensor

import "testing"

// TestDigest: a model's digest depends on its tensors, not their order;
// any change of a name, dtype, shape or byte changes it.
func TestDigest(t *testing.T) {
	base := func() Model {
		return Model{FromFloat32("b", []int64{2, 2}, []float32{1, 2, 3, 4}), FromFloat32("a", []int64{3}, []float32{5, 6, 7})}
	}
	d := Digest(base())
	if r := base(); Digest(Model{r[1], r[0]}) != d {
		t.Error("the digest depends on the tensors' order")
	}
	for name, change := range map[string]func(Model){
		"name":  func(m Model) { m[0].Name = "c" },
		"shape": func(m Model) { m[0].Shape = []int64{4} },
		"dtype": func(m Model) { m[1].DType = I32 },
		"data":  func(m Model) { m[1].Data[5] ^= 1 },
	} {
		m := base()
		change(m)
		if Digest(m) == d {
			t.Errorf("changing a tensor's %s leaves the digest unchanged", name)
		}
	}
}
