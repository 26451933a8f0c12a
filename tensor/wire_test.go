package tensor

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

func hdrFrame(name string, dt fxv1.DType, shape ...int64) *fxv1.TensorFrame {
	return &fxv1.TensorFrame{Frame: &fxv1.TensorFrame_Header{Header: &fxv1.TensorHeader{Name: name, Dtype: dt, Shape: shape}}}
}

func dataFrame(b []byte) *fxv1.TensorFrame {
	return &fxv1.TensorFrame{Frame: &fxv1.TensorFrame_Data{Data: b}}
}

func wireModel(rng *rand.Rand) Model {
	big := New("big", F32, []int64{5, MaxChunk / 8}) // 2.5 MiB: chunks of 1, 1 and 0.5 MiB
	for i := range big.Data {
		big.Data[i] = byte(rng.Uint32())
	}
	m := testModel()
	return append(m, big)
}

func TestDTypeProto(t *testing.T) {
	for _, d := range []DType{F32, F64, F16, BF16, I32, I64, U8} {
		p, err := DTypeToProto(d)
		if err != nil {
			t.Fatal(err)
		}
		// The enum names spell the dtype: DTYPE_F32 and so on.
		if p.String() != "DTYPE_"+string(d) {
			t.Errorf("%s maps to %v", d, p)
		}
		back, err := DTypeFromProto(p)
		if err != nil || back != d {
			t.Errorf("%v maps back to %q, %v", p, back, err)
		}
	}
	if _, err := DTypeToProto("Q4"); err == nil {
		t.Error("unknown dtype converted")
	}
	for _, p := range []fxv1.DType{fxv1.DType_DTYPE_UNSPECIFIED, 99} {
		if _, err := DTypeFromProto(p); err == nil {
			t.Errorf("%v converted", p)
		}
	}
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(31, 32))
	m := wireModel(rng)
	var frames []*fxv1.TensorFrame
	enc := NewEncoder(func(f *fxv1.TensorFrame) error {
		frames = append(frames, f)
		return nil
	})
	if err := enc.EncodeModel(m); err != nil {
		t.Fatal(err)
	}
	// Name order; the frame layout follows from the sizes: big is 2.5 MiB.
	type frame struct {
		header string
		data   int
	}
	want := []frame{
		{"a.mask", 0}, {"", 3},
		{"b.weight", 0}, {"", 8},
		{"big", 0}, {"", MaxChunk}, {"", MaxChunk}, {"", MaxChunk / 2},
		{"c.steps", 0}, {"", 8},
		{"d.empty", 0},
		{"e.half", 0}, {"", 4},
	}
	if len(frames) != len(want) {
		t.Fatalf("%d frames, want %d", len(frames), len(want))
	}
	for i, w := range want {
		f := frames[i]
		if w.header != "" && f.GetHeader().GetName() != w.header || w.header == "" && len(f.GetData()) != w.data {
			t.Errorf("frame %d = header %q / %d data bytes, want %+v", i, f.GetHeader().GetName(), len(f.GetData()), w)
		}
	}
	if s := frames[4].GetHeader().GetShape(); !slices.Equal(s, []int64{5, MaxChunk / 8}) || frames[4].GetHeader().GetDtype() != fxv1.DType_DTYPE_F32 {
		t.Errorf("big header = %v", frames[4].GetHeader())
	}

	sorted := m.Clone()
	sorted.Sort()
	for _, layout := range []Model{nil, m} {
		dec := NewDecoder(DecoderConfig{Layout: layout})
		for _, f := range frames {
			if err := dec.Decode(f); err != nil {
				t.Fatal(err)
			}
		}
		got, err := dec.Finish()
		if err != nil {
			t.Fatal(err)
		}
		assertModelsEqual(t, got, sorted)
	}

	// The same through a safetensors stream that is never loaded whole.
	var file bytes.Buffer
	if err := Write(&file, m, nil); err != nil {
		t.Fatal(err)
	}
	var fromFile []*fxv1.TensorFrame
	enc = NewEncoder(func(f *fxv1.TensorFrame) error {
		// The encoder reuses its chunk buffer: keep a copy.
		if d, ok := f.GetFrame().(*fxv1.TensorFrame_Data); ok {
			f = dataFrame(bytes.Clone(d.Data))
		}
		fromFile = append(fromFile, f)
		return nil
	})
	if err := enc.EncodeSafetensors(onlyReader{bytes.NewReader(file.Bytes())}); err != nil {
		t.Fatal(err)
	}
	dec := NewDecoder(DecoderConfig{Layout: m})
	for _, f := range fromFile {
		if err := dec.Decode(f); err != nil {
			t.Fatal(err)
		}
	}
	got, err := dec.Finish()
	if err != nil {
		t.Fatal(err)
	}
	assertModelsEqual(t, got, sorted)
	if err := NewEncoder(func(*fxv1.TensorFrame) error { return nil }).EncodeSafetensors(bytes.NewReader(append(file.Bytes(), 0))); err == nil || !strings.Contains(err.Error(), "trailing garbage") {
		t.Errorf("trailing byte: err = %v", err)
	}
}

func TestDecoderChunksAtAnySplit(t *testing.T) {
	rng := rand.New(rand.NewPCG(33, 34))
	m := Model{
		FromFloat32("f", []int64{101}, randFloats(rng, 101)),
		New("d", F64, []int64{13}),
		New("h", BF16, []int64{9}),
	}
	for i := range m[1].Data {
		m[1].Data[i] = byte(i * 7)
	}
	for _, split := range []int{1, 3, 5, 7, 8, 64, 1000} {
		rebuilt := map[string][]byte{}
		kept := map[string][][]byte{}
		calls := 0
		dec := NewDecoder(DecoderConfig{Layout: m, OnChunk: func(h *Tensor, off int64, data []byte) error {
			calls++
			size := h.DType.Size()
			if len(data)%size != 0 {
				t.Fatalf("split %d: chunk of %d bytes for %s", split, len(data), h.DType)
			}
			buf := rebuilt[h.Name]
			if int64(len(buf)) != off*int64(size) {
				t.Fatalf("split %d: tensor %s chunk at element %d, have %d bytes", split, h.Name, off, len(buf))
			}
			rebuilt[h.Name] = append(buf, data...)
			kept[h.Name] = append(kept[h.Name], data) // valid while the frame is
			return nil
		}})
		for _, tn := range m {
			p, _ := DTypeToProto(tn.DType)
			if err := dec.Decode(hdrFrame(tn.Name, p, tn.Shape...)); err != nil {
				t.Fatal(err)
			}
			for off := 0; off < len(tn.Data); off += split {
				if err := dec.Decode(dataFrame(tn.Data[off:min(off+split, len(tn.Data))])); err != nil {
					t.Fatal(err)
				}
			}
		}
		got, err := dec.Finish()
		if err != nil || got != nil {
			t.Fatalf("split %d: Finish = %v, %v", split, got, err)
		}
		for _, tn := range m {
			if !bytes.Equal(rebuilt[tn.Name], tn.Data) {
				t.Errorf("split %d: tensor %s reassembled wrongly", split, tn.Name)
			}
			if !bytes.Equal(bytes.Join(kept[tn.Name], nil), tn.Data) {
				t.Errorf("split %d: tensor %s's chunks changed after they were handed over", split, tn.Name)
			}
		}
		if calls == 0 {
			t.Errorf("split %d: no chunks delivered", split)
		}
	}
}

func TestDecoderIntoAccumulator(t *testing.T) {
	rng := rand.New(rand.NewPCG(35, 36))
	updates, values := makeUpdates(rng, 3, 5000)
	acc, err := NewAccumulator(AccumulatorConfig{Layout: updates[0], MaxTotalWeight: testMaxWeight})
	if err != nil {
		t.Fatal(err)
	}
	for i, u := range updates {
		up, err := acc.Begin()
		if err != nil {
			t.Fatal(err)
		}
		dec := NewDecoder(DecoderConfig{Layout: updates[0], OnChunk: func(h *Tensor, off int64, data []byte) error {
			return up.AddChunk(h.Name, off, data, h.DType)
		}})
		enc := NewEncoder(dec.Decode)
		if err := enc.EncodeModel(u); err != nil {
			t.Fatal(err)
		}
		if _, err := dec.Finish(); err != nil {
			t.Fatal(err)
		}
		if err := up.Commit(float64(i + 1)); err != nil {
			t.Fatal(err)
		}
	}
	mean, err := acc.Mean()
	if err != nil {
		t.Fatal(err)
	}
	checkAgainst(t, mean, values, func(col []float64) float64 {
		return (col[0] + 2*col[1] + 3*col[2]) / 6
	})
}

func TestDecoderRejects(t *testing.T) {
	f32 := fxv1.DType_DTYPE_F32
	layout := Model{New("w", F32, []int64{2}), New("b", F32, []int64{1})}
	tests := []struct {
		name   string
		layout Model
		max    int64
		frames []*fxv1.TensorFrame
		want   string // in the error from Decode or Finish
	}{
		{"data before header", nil, 0, []*fxv1.TensorFrame{dataFrame([]byte{1})}, "before any tensor header"},
		{"empty frame", nil, 0, []*fxv1.TensorFrame{{}}, "neither a header nor data"},
		{"too many bytes", nil, 0, []*fxv1.TensorFrame{hdrFrame("w", f32, 1), dataFrame(make([]byte, 5))}, "more than its 4 bytes"},
		{"too many frames", nil, 0, []*fxv1.TensorFrame{hdrFrame("w", f32, 1), dataFrame(make([]byte, 4)), dataFrame(make([]byte, 1))}, "more than its 4 bytes"},
		{"too few bytes, next header", nil, 0, []*fxv1.TensorFrame{hdrFrame("w", f32, 2), dataFrame(make([]byte, 4)), hdrFrame("b", f32, 1)}, `"w" ended after 4 of its 8 bytes`},
		{"too few bytes at end", nil, 0, []*fxv1.TensorFrame{hdrFrame("w", f32, 2), dataFrame(make([]byte, 7))}, "ended after 7 of its 8 bytes"},
		{"chunk over limit", nil, 0, []*fxv1.TensorFrame{hdrFrame("w", f32, MaxChunk), dataFrame(make([]byte, MaxChunk+1))}, "over the 1048576-byte limit"},
		{"unspecified dtype", nil, 0, []*fxv1.TensorFrame{hdrFrame("w", fxv1.DType_DTYPE_UNSPECIFIED, 1)}, "unknown dtype"},
		{"unknown dtype", nil, 0, []*fxv1.TensorFrame{hdrFrame("w", 42, 1)}, "unknown dtype"},
		{"negative dimension", nil, 0, []*fxv1.TensorFrame{hdrFrame("w", f32, 2, -1)}, "negative dimension"},
		{"bad name", nil, 0, []*fxv1.TensorFrame{hdrFrame("", f32, 1)}, "name is empty"},
		{"over MaxBytes", nil, 6, []*fxv1.TensorFrame{hdrFrame("w", f32, 1), dataFrame(make([]byte, 4)), hdrFrame("b", f32, 1)}, "over the 6-byte limit"},
		{"duplicate", nil, 0, []*fxv1.TensorFrame{hdrFrame("w", f32), dataFrame(make([]byte, 4)), hdrFrame("w", f32)}, `"w" appears twice`},
		{"unknown name", layout, 0, []*fxv1.TensorFrame{hdrFrame("x", f32, 2)}, `unknown tensor "x"`},
		{"wrong dtype", layout, 0, []*fxv1.TensorFrame{hdrFrame("w", fxv1.DType_DTYPE_F16, 2)}, "is F16[2], want F32[2]"},
		{"wrong shape", layout, 0, []*fxv1.TensorFrame{hdrFrame("w", f32, 1, 2)}, "is F32[1 2], want F32[2]"},
		{"missing", layout, 0, []*fxv1.TensorFrame{hdrFrame("w", f32, 2), dataFrame(make([]byte, 8))}, `tensor "b" is missing`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dec := NewDecoder(DecoderConfig{Layout: tc.layout, MaxBytes: tc.max})
			var err error
			for _, f := range tc.frames {
				if err = dec.Decode(f); err != nil {
					break
				}
			}
			if err == nil {
				_, err = dec.Finish()
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.want)
			}
			// Sticky: the decoder keeps refusing.
			if err2 := dec.Decode(hdrFrame("z", f32)); err2 == nil {
				t.Error("decoder accepted a frame after an error")
			}
			if _, err2 := dec.Finish(); err2 == nil {
				t.Error("Finish succeeded after an error")
			}
		})
	}

	boom := errors.New("boom")
	dec := NewDecoder(DecoderConfig{OnChunk: func(*Tensor, int64, []byte) error { return boom }})
	dec.Decode(hdrFrame("w", f32, 1))
	if err := dec.Decode(dataFrame(make([]byte, 4))); !errors.Is(err, boom) {
		t.Errorf("callback error = %v, want boom", err)
	}
}

func TestEncoderRejectsAndPropagates(t *testing.T) {
	sent := 0
	enc := NewEncoder(func(*fxv1.TensorFrame) error { sent++; return nil })
	bad := New("w", F32, []int64{2})
	bad.Data = bad.Data[:3]
	if err := enc.EncodeModel(Model{New("ok", U8, []int64{1}), bad}); err == nil {
		t.Error("encoded an invalid model")
	}
	if sent != 0 {
		t.Errorf("%d frames sent for an invalid model, want none", sent)
	}
	if err := enc.EncodeFrom("w", F32, []int64{2}, bytes.NewReader(make([]byte, 5))); err == nil || !strings.Contains(err.Error(), "unexpected EOF") {
		t.Errorf("short reader: err = %v", err)
	}
	broken := errors.New("stream broken")
	enc = NewEncoder(func(*fxv1.TensorFrame) error { return broken })
	if err := enc.EncodeTensor(New("w", F32, []int64{1})); !errors.Is(err, broken) {
		t.Errorf("send error = %v, want it wrapped", err)
	}
}

func TestSendReceiveModel(t *testing.T) {
	m := testModel()
	var frames []*fxv1.TensorFrame
	if err := SendModel(m, func(f *fxv1.TensorFrame) error { frames = append(frames, f); return nil }); err != nil {
		t.Fatal(err)
	}
	feed := func(frames []*fxv1.TensorFrame, end error) func() (*fxv1.TensorFrame, error) {
		return func() (*fxv1.TensorFrame, error) {
			if len(frames) == 0 {
				return nil, end
			}
			f := frames[0]
			frames = frames[1:]
			return f, nil
		}
	}
	got, err := ReceiveModel(feed(frames, io.EOF))
	if err != nil {
		t.Fatal(err)
	}
	want := m.Clone()
	want.Sort()
	assertModelsEqual(t, got, want)

	broken := errors.New("connection reset")
	if _, err := ReceiveModel(feed(frames[:3], broken)); !errors.Is(err, broken) {
		t.Errorf("broken stream: err = %v, want it wrapped", err)
	}
	// Cut short between frames: the decoder notices the incomplete tensor.
	if _, err := ReceiveModel(feed(frames[:3], io.EOF)); err == nil || !strings.Contains(err.Error(), "ended after") {
		t.Errorf("truncated stream: err = %v", err)
	}
	// Against a layout, a stream missing a tensor is refused at the end.
	if _, err := Receive(DecoderConfig{Layout: m}, feed(frames[:2], io.EOF)); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("stream missing tensors: err = %v", err)
	}
}

// TestDecoderReusesBuffers: an assembling decoder fills the buffers of the
// model it is told to reuse where a tensor's name, dtype and size match,
// and allocates where they do not.
func TestDecoderReusesBuffers(t *testing.T) {
	rng := rand.New(rand.NewPCG(35, 36))
	next := Model{FromFloat32("f", []int64{300}, randFloats(rng, 300)), FromFloat32("g", []int64{7}, randFloats(rng, 7))}
	old := Model{New("f", F32, []int64{300}), New("g", F32, []int64{8})}
	dec := NewDecoder(DecoderConfig{Reuse: old})
	if err := SendModel(next, dec.Decode); err != nil {
		t.Fatal(err)
	}
	got, err := dec.Finish()
	if err != nil {
		t.Fatal(err)
	}
	if &got[0].Data[0] != &old[0].Data[0] {
		t.Error("tensor f, the same in both models, was not decoded into the old buffer")
	}
	if &got[1].Data[0] == &old[1].Data[0] {
		t.Error("tensor g, of another size, was decoded into the old buffer")
	}
	for i := range next {
		if !bytes.Equal(got[i].Data, next[i].Data) {
			t.Errorf("tensor %s decoded wrongly", next[i].Name)
		}
	}
}

// TestResumeAnywhere: a receiver that got any prefix of a model's stream
// gets the whole model from a sender resuming at its position, whether the
// sender encodes from memory or streams a safetensors file.
func TestResumeAnywhere(t *testing.T) {
	rng := rand.New(rand.NewPCG(37, 38))
	m := Model{
		FromFloat32("a", []int64{MaxChunk/4 + 100}, randFloats(rng, MaxChunk/4+100)), // two frames
		New("b", F32, []int64{0}), // no data frame
		FromFloat32("c", []int64{33}, randFloats(rng, 33)),
	}
	var file bytes.Buffer
	if err := Write(&file, m, nil); err != nil {
		t.Fatal(err)
	}
	var frames []*fxv1.TensorFrame
	if err := SendModel(m, func(f *fxv1.TensorFrame) error { frames = append(frames, f); return nil }); err != nil {
		t.Fatal(err)
	}
	for k := range len(frames) + 1 {
		for _, from := range []string{"memory", "file"} {
			dec := NewDecoder(DecoderConfig{})
			for _, f := range frames[:k] {
				if err := dec.Decode(f); err != nil {
					t.Fatal(err)
				}
			}
			e := NewEncoder(dec.Decode)
			e.ResumeAt(dec.Position())
			var err error
			if from == "memory" {
				err = e.EncodeModel(m)
			} else {
				err = e.EncodeSafetensors(bytes.NewReader(file.Bytes()))
			}
			if err != nil {
				t.Fatalf("resumed after %d frames from %s: %v", k, from, err)
			}
			got, err := dec.Finish()
			if err != nil {
				t.Fatalf("resumed after %d frames from %s: %v", k, from, err)
			}
			for _, want := range m {
				if g := got.Get(want.Name); g == nil || !bytes.Equal(g.Data, want.Data) {
					t.Errorf("resumed after %d frames from %s: tensor %s differs", k, from, want.Name)
				}
			}
		}
	}
}
