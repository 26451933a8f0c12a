package secagg

import (
	"encoding"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/fx-fl/fx/tensor"
)

// wire sends a message through its binary encoding, as the transport will,
// and checks that the encoding is canonical.
func wire[T any, P interface {
	*T
	encoding.BinaryMarshaler
	encoding.BinaryUnmarshaler
}](t testing.TB, m P) P {
	t.Helper()
	b, err := m.MarshalBinary()
	if err != nil {
		t.Fatalf("marshal %T: %v", m, err)
	}
	out := P(new(T))
	if err := out.UnmarshalBinary(b); err != nil {
		t.Fatalf("unmarshal %T: %v", m, err)
	}
	if !reflect.DeepEqual(normalize(m), normalize(out)) {
		t.Fatalf("%T changed on the wire:\n%+v\n%+v", m, m, out)
	}
	return out
}

// normalize makes nil and empty slices compare equal.
func normalize(m any) string { return fmt.Sprintf("%+v", m) }

// fixture is one round with n participants over a layout.
type fixture struct {
	t       testing.TB
	session Session
	ids     []string
	weights []float64
	parts   map[string]*Participant
	server  *Server
	layout  tensor.Model
	inputs  map[string]tensor.Model
	maskers map[string]*Masker
}

func layoutOf(dt tensor.DType, sizes ...int64) tensor.Model {
	var m tensor.Model
	for i, n := range sizes {
		m = append(m, tensor.New(fmt.Sprintf("layer%d.weight", i), dt, []int64{n}))
	}
	return m
}

// newFixture makes participants site-00…, their random inputs in
// [−1.2R, 1.2R] (so clipping is exercised) and the server.
func newFixture(t testing.TB, n, threshold int, r float64, layout tensor.Model, seed uint64) *fixture {
	t.Helper()
	f := newParties(t, n, threshold, r, layout, seed)
	rng := rand.New(rand.NewPCG(seed, 2))
	for _, id := range f.ids {
		var m tensor.Model
		for _, l := range layout {
			vals := make([]float32, l.Elements())
			for j := range vals {
				vals[j] = float32((rng.Float64()*2.4 - 1.2) * r)
			}
			tt := tensor.New(l.Name, l.DType, l.Shape)
			if err := tt.SetFloat32(vals); err != nil {
				t.Fatal(err)
			}
			m = append(m, tt)
		}
		f.inputs[id] = m
	}
	return f
}

// newParties makes the participants and the server, without inputs.
func newParties(t testing.TB, n, threshold int, r float64, layout tensor.Model, seed uint64) *fixture {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	f := &fixture{t: t, session: Session{Experiment: "alice/study", Round: 7}, layout: layout,
		parts: map[string]*Participant{}, inputs: map[string]tensor.Model{}, maskers: map[string]*Masker{}}
	srv, err := NewServer(ServerConfig{Session: f.session, Threshold: threshold, Range: r, Layout: layout})
	if err != nil {
		t.Fatal(err)
	}
	f.server = srv
	for i := range n {
		id := fmt.Sprintf("site-%02d", i)
		w := float64(1 + rng.IntN(1000))
		p, err := NewParticipant(ParticipantConfig{Session: f.session, ID: id, Threshold: threshold, Range: r, Weight: w})
		if err != nil {
			t.Fatal(err)
		}
		f.ids, f.weights, f.parts[id] = append(f.ids, id), append(f.weights, w), p
	}
	return f
}

func (f *fixture) advertise(skip ...string) *KeyList {
	f.t.Helper()
	for _, id := range f.ids {
		if contains(skip, id) {
			continue
		}
		a, err := f.parts[id].Advertise()
		if err != nil {
			f.t.Fatal(err)
		}
		if err := f.server.Advertise(wire(f.t, a)); err != nil {
			f.t.Fatal(err)
		}
	}
	kl, err := f.server.KeyList()
	if err != nil {
		f.t.Fatal(err)
	}
	return wire(f.t, kl)
}

func (f *fixture) shareKeys(kl *KeyList, skip ...string) map[string]*ShareBundle {
	f.t.Helper()
	for _, p := range kl.Peers {
		if contains(skip, p.ID) {
			continue
		}
		e, err := f.parts[p.ID].ShareKeys(kl)
		if err != nil {
			f.t.Fatal(err)
		}
		if err := f.server.Shares(wire(f.t, e)); err != nil {
			f.t.Fatal(err)
		}
	}
	b, err := f.server.Bundles()
	if err != nil {
		f.t.Fatal(err)
	}
	for id := range b {
		b[id] = wire(f.t, b[id])
	}
	return b
}

// maskAndSend masks each participant's input in chunks of chunk elements
// (odd sizes test the PRG's seeking) and folds them into the server.
func (f *fixture) maskAndSend(bundles map[string]*ShareBundle, chunk int, skip ...string) {
	f.t.Helper()
	for id, b := range bundles {
		m, err := f.parts[id].Masker(b)
		if err != nil {
			f.t.Fatal(err)
		}
		f.maskers[id] = m
		if contains(skip, id) {
			continue
		}
		var buf []byte
		for ti, tt := range f.inputs[id] {
			size := tt.DType.Size()
			for off := 0; off < len(tt.Data)/size; off += chunk {
				end := min(off+chunk, len(tt.Data)/size)
				buf, err = m.MaskChunk(ti, int64(off), tt.Data[off*size:end*size], tt.DType, buf)
				if err != nil {
					f.t.Fatal(err)
				}
				if err := f.server.AddMaskedChunk(id, ti, int64(off), buf); err != nil {
					f.t.Fatal(err)
				}
			}
		}
		if err := f.server.InputDone(id); err != nil {
			f.t.Fatal(err)
		}
	}
}

// unmask asks everyone in U2 but skip to answer and returns the result.
func (f *fixture) unmask(skip ...string) (*Result, error) {
	f.t.Helper()
	req, err := f.server.UnmaskRequest()
	if err != nil {
		return nil, err
	}
	req = wire(f.t, req)
	for _, id := range append(append([]string{}, req.Survivors...), req.Dropped...) {
		if contains(skip, id) {
			continue
		}
		resp, err := f.parts[id].Unmask(req)
		if err != nil {
			f.t.Fatal(err)
		}
		if err := f.server.AddUnmaskResponse(wire(f.t, resp)); err != nil {
			f.t.Fatal(err)
		}
	}
	return f.server.Result()
}

// want is the weighted mean of the survivors' clipped inputs, in float64.
func (f *fixture) want(r float64, survivors []string) [][]float64 {
	out := make([][]float64, len(f.layout))
	total := 0.0
	for i, id := range f.ids {
		if contains(survivors, id) {
			total += f.weights[i]
		}
	}
	for ti, l := range f.layout {
		out[ti] = make([]float64, l.Elements())
		for i, id := range f.ids {
			if !contains(survivors, id) {
				continue
			}
			vals, _ := f.inputs[id][ti].Float32Copy()
			for j, v := range vals {
				out[ti][j] += f.weights[i] / total * max(-r, min(r, float64(v)))
			}
		}
	}
	return out
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// dtypeFloor is half the spacing of d's subnormals, the absolute error of
// rounding a tiny value to d.
func dtypeFloor(d tensor.DType) float64 {
	switch d {
	case tensor.F16:
		return 0x1p-25
	case tensor.BF16:
		return 0x1p-134
	case tensor.F32:
		return 0x1p-150
	}
	return 0
}

// dtypeEps is half a unit in the last place, relative, of rounding to d.
func dtypeEps(d tensor.DType) float64 {
	switch d {
	case tensor.F16:
		return 0x1p-11
	case tensor.BF16:
		return 0x1p-8
	case tensor.F32:
		return 0x1p-24
	}
	return 0
}

// checkMean compares the result with the plain weighted mean: the error
// bound is the fixed-point rounding of n inputs, scaled like the mean, plus
// rounding the mean to the output dtype.
func (f *fixture) checkMean(res *Result, r float64, survivors []string) {
	f.t.Helper()
	got, err := res.Model()
	if err != nil {
		f.t.Fatal(err)
	}
	want := f.want(r, survivors)
	fp, _ := newFixedPoint(r)
	total, all := 0.0, 0.0
	for i, id := range f.ids {
		all += f.weights[i]
		if contains(survivors, id) {
			total += f.weights[i]
		}
	}
	fixedErr := float64(len(survivors)) * fp.resolution() / 2 * all / total
	worst := 0.0
	for ti, tt := range got {
		for j, v := range float64s(tt) {
			w := want[ti][j]
			e := math.Abs(v - w)
			if tol := fixedErr + dtypeEps(tt.DType)*math.Abs(w) + dtypeFloor(tt.DType); e > tol {
				f.t.Fatalf("tensor %q element %d: got %v, want %v (error %g > %g)", tt.Name, j, v, w, e, tol)
			}
			worst = max(worst, e)
		}
	}
	f.t.Logf("worst error %.3g (fixed-point bound %.3g)", worst, fixedErr)
}

// float64s reads a float tensor exactly.
func float64s(t *tensor.Tensor) []float64 {
	if t.DType == tensor.F64 {
		return t.Float64s()
	}
	vals, _ := t.Float32Copy()
	out := make([]float64, len(vals))
	for i, v := range vals {
		out[i] = float64(v)
	}
	return out
}
