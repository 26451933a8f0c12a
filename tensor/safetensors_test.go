package tensor

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// rawFile assembles a safetensors file by hand from a header string and data.
func rawFile(header string, data []byte) []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, uint64(len(header)))
	b.WriteString(header)
	b.Write(data)
	return b.Bytes()
}

// onlyReader hides every method but Read, so Read cannot learn the size.
type onlyReader struct{ r io.Reader }

func (o onlyReader) Read(p []byte) (int, error) { return o.r.Read(p) }

func testModel() Model {
	u8 := New("a.mask", U8, []int64{3})
	copy(u8.Data, []byte{7, 8, 9})
	f32 := FromFloat32("b.weight", []int64{2}, []float32{1, 2})
	i64 := New("c.steps", I64, []int64{}) // scalar
	binary.LittleEndian.PutUint64(i64.Data, 42)
	empty := New("d.empty", F32, []int64{0, 3})
	f16 := New("e.half", F16, []int64{2})
	binary.LittleEndian.PutUint16(f16.Data, 0x3c00)     // 1.0
	binary.LittleEndian.PutUint16(f16.Data[2:], 0xc000) // -2.0
	// Out of name order on purpose: the writer sorts.
	return Model{f32, i64, u8, f16, empty}
}

func TestSafetensorsWriteLayout(t *testing.T) {
	var buf bytes.Buffer
	if err := Write(&buf, testModel(), map[string]string{"format": "pt", "<&>": "x"}); err != nil {
		t.Fatal(err)
	}
	file := buf.Bytes()
	n := binary.LittleEndian.Uint64(file)
	if n%8 != 0 {
		t.Errorf("header length %d is not a multiple of 8", n)
	}
	header := file[8 : 8+n]
	if header[0] != '{' || len(bytes.TrimRight(header, " ")) != len(bytes.TrimSpace(header)) {
		t.Errorf("header %q should be a JSON object padded with spaces", header)
	}
	var parsed map[string]json.RawMessage
	if err := json.Unmarshal(header, &parsed); err != nil {
		t.Fatal(err)
	}
	var md map[string]string
	json.Unmarshal(parsed["__metadata__"], &md)
	if md["format"] != "pt" || md["<&>"] != "x" {
		t.Errorf("metadata = %v", md)
	}
	// In name order: a.mask (3 bytes), b.weight (8), c.steps (8), d.empty (0), e.half (4).
	wantOffsets := map[string][2]int64{
		"a.mask": {0, 3}, "b.weight": {3, 11}, "c.steps": {11, 19}, "d.empty": {19, 19}, "e.half": {19, 23},
	}
	for name, want := range wantOffsets {
		var e struct {
			DType       string   `json:"dtype"`
			Shape       []int64  `json:"shape"`
			DataOffsets [2]int64 `json:"data_offsets"`
		}
		if err := json.Unmarshal(parsed[name], &e); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if e.DataOffsets != want {
			t.Errorf("%s: data_offsets %v, want %v", name, e.DataOffsets, want)
		}
		if e.Shape == nil {
			t.Errorf("%s: shape is null, want a list", name)
		}
	}
	wantData := []byte{7, 8, 9, 0, 0, 0x80, 0x3f, 0, 0, 0, 0x40, 42, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x3c, 0x00, 0xc0}
	if data := file[8+n:]; !bytes.Equal(data, wantData) {
		t.Errorf("data section = % x, want % x", data, wantData)
	}
}

func TestSafetensorsRoundTrip(t *testing.T) {
	tests := []struct {
		name     string
		model    Model
		metadata map[string]string
	}{
		{"mixed dtypes and metadata", testModel(), map[string]string{"format": "pt", "round": "3"}},
		{"no metadata", Model{FromFloat32("w", []int64{2, 2}, []float32{1, 2, 3, 4})}, nil},
		{"empty model", Model{}, map[string]string{"only": "metadata"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := Write(&buf, tc.model, tc.metadata); err != nil {
				t.Fatal(err)
			}
			want := tc.model.Clone()
			want.Sort()
			readers := map[string]func() (Model, map[string]string, error){
				"bytes.Reader": func() (Model, map[string]string, error) { return Read(bytes.NewReader(buf.Bytes())) },
				"plain reader": func() (Model, map[string]string, error) {
					return Read(onlyReader{bytes.NewReader(buf.Bytes())})
				},
				"file": func() (Model, map[string]string, error) {
					path := filepath.Join(t.TempDir(), "m.safetensors")
					if err := WriteFile(path, tc.model, tc.metadata); err != nil {
						t.Fatal(err)
					}
					return ReadFile(path)
				},
			}
			for rname, read := range readers {
				got, md, err := read()
				if err != nil {
					t.Fatalf("%s: %v", rname, err)
				}
				assertModelsEqual(t, got, want)
				if len(md) != len(tc.metadata) {
					t.Errorf("%s: metadata %v, want %v", rname, md, tc.metadata)
				}
				for k, v := range tc.metadata {
					if md[k] != v {
						t.Errorf("%s: metadata[%q] = %q, want %q", rname, k, md[k], v)
					}
				}
			}
		})
	}
}

func assertModelsEqual(t *testing.T, got, want Model) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d tensors, want %d", len(got), len(want))
	}
	for i := range want {
		g, w := got[i], want[i]
		if g.Name != w.Name || g.DType != w.DType || !slices.Equal(g.Shape, w.Shape) || !bytes.Equal(g.Data, w.Data) {
			t.Errorf("tensor %d = %s %s%v % x, want %s %s%v % x", i, g.Name, g.DType, g.Shape, g.Data, w.Name, w.DType, w.Shape, w.Data)
		}
	}
}

func TestSafetensorsReadHandMade(t *testing.T) {
	// As a Python writer would lay it out: metadata first, 8-aligned with spaces.
	header := `{"__metadata__":{"format":"pt"},"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"n":{"dtype":"I32","shape":[1],"data_offsets":[4,8]}}`
	header += strings.Repeat(" ", (8-len(header)%8)%8)
	file := rawFile(header, []byte{0x00, 0x3c, 0x00, 0xc0, 5, 0, 0, 0})
	m, md, err := Read(bytes.NewReader(file))
	if err != nil {
		t.Fatal(err)
	}
	if md["format"] != "pt" {
		t.Errorf("metadata = %v", md)
	}
	w := m.Get("w")
	vals, err := w.Float32Copy()
	if err != nil || !slices.Equal(vals, []float32{1, -2}) {
		t.Errorf("w = %v (%v), want [1 -2]", vals, err)
	}
	if n := m.Get("n"); n == nil || binary.LittleEndian.Uint32(n.Data) != 5 {
		t.Errorf("n = %v, want 5", n)
	}
	h, err := ReadHeader(bytes.NewReader(file))
	if err != nil {
		t.Fatal(err)
	}
	if h.DataOffset != int64(8+len(header)) || h.DataSize != 8 || len(h.Tensors) != 2 || h.Tensors[0].Name != "w" {
		t.Errorf("header = %+v", h)
	}
	if layout := h.Layout(); layout.Get("n").DType != I32 || layout.Get("n").Data != nil {
		t.Errorf("layout = %v", layout)
	}
}

func TestSafetensorsRejectsMalformed(t *testing.T) {
	f32 := func(name, shape, offs string) string {
		return `"` + name + `":{"dtype":"F32","shape":` + shape + `,"data_offsets":` + offs + `}`
	}
	eight := make([]byte, 8)
	tests := []struct {
		name string
		file []byte
		want string // in the error
	}{
		{"empty file", nil, "header length"},
		{"header too large", binary.LittleEndian.AppendUint64(nil, MaxHeaderSize+1), "header too large"},
		{"header past end", append(binary.LittleEndian.AppendUint64(nil, 64), "{}"...), "header"},
		{"not json", rawFile(`{"a":`, nil), "header JSON"},
		{"json array", rawFile(`[1,2]`, nil), "not a JSON object"},
		{"garbage after object", rawFile(`{} x`, nil), "garbage after the JSON object"},
		{"unknown dtype", rawFile(`{"a":{"dtype":"I8","shape":[1],"data_offsets":[0,1]}}`, []byte{1}), `unknown dtype "I8"`},
		{"negative dim", rawFile(`{`+f32("a", "[-1]", "[0,0]")+`}`, nil), "negative dimension"},
		{"huge shape", rawFile(`{`+f32("a", "[4294967296,4294967296]", "[0,0]")+`}`, nil), "larger than"},
		{"missing offsets", rawFile(`{"a":{"dtype":"F32","shape":[1]}}`, eight), "no data_offsets"},
		{"unknown field", rawFile(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}`, eight[:4]), "unknown field"},
		{"three offsets", rawFile(`{`+f32("a", "[1]", "[0,4,8]")+`}`, eight[:4]), "want 2"},
		{"reversed offsets", rawFile(`{`+f32("a", "[0]", "[4,0]")+`}`, eight[:4]), "not a byte range"},
		{"size mismatch", rawFile(`{`+f32("a", "[2]", "[0,4]")+`}`, eight[:4]), "size mismatch"},
		{"overlap", rawFile(`{`+f32("a", "[1]", "[0,4]")+`,`+f32("b", "[1]", "[2,6]")+`}`, eight[:6]), "overlap"},
		{"gap", rawFile(`{`+f32("a", "[1]", "[0,4]")+`,`+f32("b", "[1]", "[8,12]")+`}`, make([]byte, 12)), "gap"},
		{"out of range", rawFile(`{`+f32("a", "[2]", "[0,8]")+`}`, eight[:4]), "out of range"},
		{"trailing garbage", rawFile(`{`+f32("a", "[1]", "[0,4]")+`}`, eight[:5]), "trailing garbage"},
		{"duplicate tensor", rawFile(`{`+f32("a", "[1]", "[0,4]")+`,`+f32("a", "[1]", "[4,8]")+`}`, eight), "twice"},
		{"metadata not strings", rawFile(`{"__metadata__":{"k":1}}`, nil), "strings to strings"},
		{"control character in name", rawFile(`{`+f32("a\\u0001", "[1]", "[0,4]")+`}`, eight[:4]), "control characters"},
		{"invalid utf-8", rawFile("{\"\xff\":{}}", nil), "UTF-8"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "bad.safetensors")
			if err := os.WriteFile(path, tc.file, 0o600); err != nil {
				t.Fatal(err)
			}
			reads := map[string]func() error{
				"Read bytes": func() error { _, _, err := Read(bytes.NewReader(tc.file)); return err },
				"Read stream": func() error {
					_, _, err := Read(onlyReader{bytes.NewReader(tc.file)})
					return err
				},
				"ReadFile":       func() error { _, _, err := ReadFile(path); return err },
				"ReadHeaderFile": func() error { _, err := ReadHeaderFile(path); return err },
			}
			for rname, read := range reads {
				err := read()
				if err == nil {
					t.Errorf("%s accepted the file", rname)
					continue
				}
				// A stream cannot tell a short data section from a wrong offset
				// until it runs out: it reports truncation instead.
				want := tc.want
				if rname == "Read stream" && tc.name == "out of range" {
					want = "truncated"
				}
				if !strings.Contains(err.Error(), want) {
					t.Errorf("%s: error %q does not mention %q", rname, err, want)
				}
			}
		})
	}
}

func TestSafetensorsStreamClaimingHugeTensor(t *testing.T) {
	// A header that claims 1 TiB followed by 100 bytes must fail on the
	// missing data, not try to allocate what the header claims.
	file := rawFile(`{"a":{"dtype":"U8","shape":[1099511627776],"data_offsets":[0,1099511627776]}}`, make([]byte, 100))
	_, _, err := Read(onlyReader{bytes.NewReader(file)})
	if err == nil || !strings.Contains(err.Error(), "got 100 of") {
		t.Fatalf("err = %v, want a truncation error", err)
	}
}

func TestSafetensorsWriteRejects(t *testing.T) {
	bad := New("w", F32, []int64{2})
	bad.Data = bad.Data[:4]
	tests := []struct {
		name  string
		model Model
		md    map[string]string
		want  string
	}{
		{"data length", Model{bad}, nil, "needs 8 bytes"},
		{"duplicate", Model{New("a", U8, []int64{1}), New("a", U8, []int64{1})}, nil, "twice"},
		{"reserved name", Model{New("__metadata__", U8, []int64{1})}, nil, "cannot be named"},
		{"bad metadata", Model{}, map[string]string{"k": "\xff"}, "UTF-8"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := Write(io.Discard, tc.model, tc.md); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "model.safetensors")
	first := Model{FromFloat32("w", []int64{1}, []float32{1})}
	if err := WriteFile(path, first, nil); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("file mode %v, want 0600", perm)
	}
	// A write that fails leaves the previous file and no temporary behind.
	bad := New("w", F32, []int64{2})
	bad.Data = nil
	if err := WriteFile(path, Model{bad}, nil); err == nil {
		t.Fatal("writing an invalid model succeeded")
	}
	got, _, err := ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	assertModelsEqual(t, got, first)
	// A successful write replaces it.
	second := Model{FromFloat32("v", []int64{2}, []float32{3, 4})}
	if err := WriteFile(path, second, map[string]string{"r": "2"}); err != nil {
		t.Fatal(err)
	}
	got, md, err := ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	assertModelsEqual(t, got, second)
	if md["r"] != "2" {
		t.Errorf("metadata = %v", md)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only the model", len(entries))
	}
	if _, _, err := ReadFile(filepath.Join(dir, "missing")); err == nil {
		t.Error("reading a missing file succeeded")
	}
}

// TestReadFileReusing: a tensor of the file goes into the buffer of the
// reused model's tensor of the same name, dtype and size, which gives it
// up; a tensor without such a match gets new memory.
func TestReadFileReusing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "m.safetensors")
	want := Model{FromFloat32("a", []int64{3}, []float32{1, 2, 3}), FromFloat32("b", []int64{2}, []float32{4, 5})}
	if err := WriteFile(path, want, nil); err != nil {
		t.Fatal(err)
	}
	reuse := Model{FromFloat32("a", []int64{3}, []float32{9, 9, 9}), FromFloat32("b", []int64{3}, []float32{9, 9, 9})}
	bufA, bufB := &reuse[0].Data[0], &reuse[1].Data[0]
	got, _, err := ReadFileReusing(path, reuse)
	if err != nil {
		t.Fatal(err)
	}
	if err := want.Matches(got); err != nil || !slices.Equal(got[0].Float32s(), want[0].Float32s()) || !slices.Equal(got[1].Float32s(), want[1].Float32s()) {
		t.Fatalf("read %v, want %v (%v)", got, want, err)
	}
	if &got[0].Data[0] != bufA || reuse[0].Data != nil {
		t.Error("tensor a was not read into the reused buffer, or the reused tensor kept it")
	}
	if &got[1].Data[0] == bufB || reuse[1].Data == nil {
		t.Error("tensor b was read into a buffer of another size")
	}
}
