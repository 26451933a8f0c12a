package dataset

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// idxBytes encodes an IDX file of unsigned bytes.
func idxBytes(dims []uint32, data []byte) []byte {
	var b bytes.Buffer
	b.Write([]byte{0, 0, idxUnsignedByte, byte(len(dims))})
	for _, d := range dims {
		_ = binary.Write(&b, binary.BigEndian, d)
	}
	b.Write(data)
	return b.Bytes()
}

func gzipBytes(t *testing.T, raw []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	if _, err := zw.Write(raw); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// idxSet describes a small MNIST-style data set: n samples of rows×cols
// pixels. Pixel (i, 0) holds the sample's index modulo 256 and (i, 1) its
// index divided by 256, so tests can identify samples after sharding.
type idxSet struct {
	nTrain, nTest, rows, cols, classes int
}

func (s idxSet) images(n int) []byte {
	px := s.rows * s.cols
	data := make([]byte, n*px)
	for i := range n {
		data[i*px] = byte(i % 256)
		data[i*px+1] = byte(i / 256)
		for j := 2; j < px; j++ {
			data[i*px+j] = byte((i * j) % 256)
		}
	}
	return data
}

func (s idxSet) labels(n int) []byte {
	l := make([]byte, n)
	for i := range l {
		l[i] = byte((i * 7 / 3) % s.classes)
	}
	return l
}

// write stores the four files in dir, gzipped where gz says so (in the order
// train images, train labels, test images, test labels).
func (s idxSet) write(t *testing.T, dir string, gz [4]bool) {
	t.Helper()
	dims := func(n int) []uint32 { return []uint32{uint32(n), uint32(s.rows), uint32(s.cols)} }
	files := []struct {
		name string
		data []byte
	}{
		{"train-images-idx3-ubyte", idxBytes(dims(s.nTrain), s.images(s.nTrain))},
		{"train-labels-idx1-ubyte", idxBytes([]uint32{uint32(s.nTrain)}, s.labels(s.nTrain))},
		{"t10k-images-idx3-ubyte", idxBytes(dims(s.nTest), s.images(s.nTest))},
		{"t10k-labels-idx1-ubyte", idxBytes([]uint32{uint32(s.nTest)}, s.labels(s.nTest))},
	}
	for i, f := range files {
		if gz[i] {
			writeFile(t, filepath.Join(dir, f.name+".gz"), gzipBytes(t, f.data))
		} else {
			writeFile(t, filepath.Join(dir, f.name), f.data)
		}
	}
}

// sampleID recovers the index idxSet encoded in a sample's first two pixels.
func sampleID(x []float32, features, i int) int {
	lo := int(x[i*features]*255 + 0.5)
	hi := int(x[i*features+1]*255 + 0.5)
	return hi*256 + lo
}

func TestLoadIDX(t *testing.T) {
	set := idxSet{nTrain: 50, nTest: 20, rows: 4, cols: 3, classes: 5}
	tests := []struct {
		name string
		gz   [4]bool
	}{
		{"plain", [4]bool{}},
		{"gzip", [4]bool{true, true, true, true}},
		{"mixed", [4]bool{true, false, false, true}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			set.write(t, dir, tc.gz)
			d, err := Load(Config{Kind: KindIDX, Path: dir})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(d.SampleShape, []int64{4, 3}) || d.Features() != 12 {
				t.Errorf("sample shape %v (%d features), want [4 3] (12)", d.SampleShape, d.Features())
			}
			if d.Train.N != 50 || d.Valid.N != 20 || d.Classes != 5 {
				t.Errorf("got %d train, %d valid, %d classes; want 50, 20, 5", d.Train.N, d.Valid.N, d.Classes)
			}
			raw := set.images(set.nTrain)
			for i, v := range d.Train.X {
				if want := float32(raw[i]) / 255; v != want {
					t.Fatalf("pixel %d = %v, want %v", i, v, want)
				}
			}
			for i, y := range d.Valid.Y {
				if want := int32(set.labels(set.nTest)[i]); y != want {
					t.Fatalf("label %d = %d, want %d", i, y, want)
				}
			}
			if !strings.Contains(d.String(), "50 training and 20 validation samples of shape [4 3], 5 classes") {
				t.Errorf("summary %q lacks the counts", d.String())
			}
		})
	}
}

func TestLoadIDXPixelRange(t *testing.T) {
	dir := t.TempDir()
	set := idxSet{nTrain: 6, nTest: 4, rows: 2, cols: 2, classes: 3}
	set.write(t, dir, [4]bool{})
	all := make([]byte, 6*4)
	for i := range all {
		all[i] = byte(i * 23)
	}
	all[0], all[1] = 0, 255
	writeFile(t, filepath.Join(dir, "train-images-idx3-ubyte"), idxBytes([]uint32{6, 2, 2}, all))
	d, err := LoadIDX(Config{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	if d.Train.X[0] != 0 || d.Train.X[1] != 1 {
		t.Errorf("pixels 0 and 255 became %v and %v, want 0 and 1", d.Train.X[0], d.Train.X[1])
	}
	for _, v := range d.Train.X {
		if v < 0 || v > 1 {
			t.Fatalf("pixel %v outside [0, 1]", v)
		}
	}
}

func TestLoadIDXErrors(t *testing.T) {
	set := idxSet{nTrain: 10, nTest: 4, rows: 2, cols: 2, classes: 3}
	good := idxBytes([]uint32{10, 2, 2}, set.images(10))
	tests := []struct {
		name string
		file string // replaced in the good set ("" removes nothing, see remove)
		data []byte
		gz   bool
		// remove deletes file instead of replacing it.
		remove bool
		want   []string
	}{
		{name: "missing labels", file: "train-labels-idx1-ubyte", remove: true,
			want: []string{"train-labels-idx1-ubyte", "neither"}},
		{name: "bad magic", file: "train-images-idx3-ubyte", data: append([]byte{1, 2, 8, 3}, good[4:]...),
			want: []string{"train-images-idx3-ubyte", "bad magic"}},
		{name: "not bytes", file: "train-images-idx3-ubyte", data: append([]byte{0, 0, 0x0d, 3}, good[4:]...),
			want: []string{"train-images-idx3-ubyte", "0x0d"}},
		{name: "truncated data", file: "train-images-idx3-ubyte", data: good[:len(good)-5],
			want: []string{"train-images-idx3-ubyte", "truncated", "announces 40 data bytes, found 35"}},
		{name: "truncated header", file: "train-images-idx3-ubyte", data: good[:9],
			want: []string{"train-images-idx3-ubyte", "truncated", "header"}},
		{name: "truncated gzip", file: "train-images-idx3-ubyte", gz: true, data: gzipBytes(t, good)[:30],
			want: []string{"train-images-idx3-ubyte.gz", "truncated"}},
		{name: "trailing bytes", file: "t10k-labels-idx1-ubyte", data: idxBytes([]uint32{4}, []byte{0, 1, 2, 0, 9}),
			want: []string{"t10k-labels-idx1-ubyte", "trailing"}},
		{name: "count mismatch", file: "train-labels-idx1-ubyte", data: idxBytes([]uint32{9}, set.labels(9)),
			want: []string{"train-images-idx3-ubyte", "10 images", "train-labels-idx1-ubyte", "9 labels"}},
		{name: "labels with two dimensions", file: "train-labels-idx1-ubyte", data: idxBytes([]uint32{10, 1}, set.labels(10)),
			want: []string{"train-labels-idx1-ubyte", "labels need 1 dimension"}},
		{name: "shape differs between train and test", file: "t10k-images-idx3-ubyte", data: idxBytes([]uint32{4, 1, 4}, set.images(4)),
			want: []string{"[2 2]", "[1 4]"}},
		{name: "empty file", file: "train-images-idx3-ubyte", data: []byte{},
			want: []string{"train-images-idx3-ubyte", "truncated"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			set.write(t, dir, [4]bool{})
			path := filepath.Join(dir, tc.file)
			switch {
			case tc.remove:
				if err := os.Remove(path); err != nil {
					t.Fatal(err)
				}
			case tc.gz:
				if err := os.Remove(path); err != nil {
					t.Fatal(err)
				}
				writeFile(t, path+".gz", tc.data)
			default:
				writeFile(t, path, tc.data)
			}
			_, err := LoadIDX(Config{Path: dir})
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestLoadIDXMissingDirectory(t *testing.T) {
	_, err := LoadIDX(Config{Path: filepath.Join(t.TempDir(), "nope")})
	if err == nil || !strings.Contains(err.Error(), "train-images-idx3-ubyte") {
		t.Fatalf("error %v does not name the missing file", err)
	}
}
