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
// pixels. Pixel (i, 0) holds the sample's id modulo 256 and (i, 1) its id
// divided by 256, so tests can identify samples after sharding: the
// training file's samples have ids from 0, the test file's from testID.
type idxSet struct {
	nTrain, nTest, rows, cols, classes int
}

const testID = 30000

func (s idxSet) images(n int) []byte { return s.imagesFrom(0, n) }

func (s idxSet) imagesFrom(first, n int) []byte {
	px := s.rows * s.cols
	data := make([]byte, n*px)
	for i := range n {
		id := first + i
		data[i*px] = byte(id % 256)
		data[i*px+1] = byte(id / 256)
		for j := 2; j < px; j++ {
			data[i*px+j] = byte((id * j) % 256)
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
		{"t10k-images-idx3-ubyte", idxBytes(dims(s.nTest), s.imagesFrom(testID, s.nTest))},
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

// TestLoadIDX: the t10k files are the test split, whole; a fifth of the
// training files, drawn with the seed, is the validation split and the
// rest the training split; pixels and labels arrive intact.
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
			if d.Train.N != 40 || d.Valid.N != 10 || d.Test.N != 20 || d.Classes != 5 {
				t.Errorf("got %d train, %d valid, %d test, %d classes; want 40, 10, 20, 5", d.Train.N, d.Valid.N, d.Test.N, d.Classes)
			}
			f := d.Features()
			seen := map[int]string{}
			for _, sp := range []struct {
				name  string
				split *Split
				first int
				n     int
			}{{"train", &d.Train, 0, set.nTrain}, {"valid", &d.Valid, 0, set.nTrain}, {"test", &d.Test, testID, set.nTest}} {
				raw, labels := set.imagesFrom(sp.first, sp.n), set.labels(sp.n)
				for r := range sp.split.N {
					id := sampleID(sp.split.X, f, r)
					if was, dup := seen[id]; dup {
						t.Fatalf("sample %d is in %s and %s", id, was, sp.name)
					}
					seen[id] = sp.name
					i := id - sp.first
					if i < 0 || i >= sp.n {
						t.Fatalf("%s holds sample %d, which is not from its file", sp.name, id)
					}
					for j := range f {
						if want := float32(raw[i*f+j]) / 255; sp.split.X[r*f+j] != want {
							t.Fatalf("%s sample %d pixel %d = %v, want %v", sp.name, id, j, sp.split.X[r*f+j], want)
						}
					}
					if want := int32(labels[i]); sp.split.Y[r] != want {
						t.Fatalf("%s sample %d has label %d, want %d", sp.name, id, sp.split.Y[r], want)
					}
				}
			}
			if len(seen) != set.nTrain+set.nTest {
				t.Errorf("the splits hold %d samples, want all %d", len(seen), set.nTrain+set.nTest)
			}
			if !strings.Contains(d.String(), "40 training, 10 validation and 20 test samples of shape [4 3], 5 classes") {
				t.Errorf("summary %q lacks the counts", d.String())
			}

			// Another seed holds out other samples; valid_fraction sets how many.
			other, err := Load(Config{Kind: KindIDX, Path: dir, Seed: 2, ValidFraction: 0.5})
			if err != nil {
				t.Fatal(err)
			}
			if other.Train.N != 25 || other.Valid.N != 25 || slices.Equal(other.Valid.Y[:10], d.Valid.Y) && slices.Equal(other.Valid.X[:10*f], d.Valid.X) {
				t.Errorf("seed 2, valid_fraction 0.5: %d train, %d valid, want 25 and 25 and another draw", other.Train.N, other.Valid.N)
			}
		})
	}
}

// LoadTest reads the test split alone, whole whatever the shard, with the
// class count of the whole data set.
func TestLoadTest(t *testing.T) {
	set := idxSet{nTrain: 50, nTest: 20, rows: 2, cols: 2, classes: 5}
	dir := t.TempDir()
	set.write(t, dir, [4]bool{true, true, true, true})
	d, err := LoadTest(Config{Kind: KindIDX, Path: dir, Shard: "2/3", DirichletAlpha: 0.5})
	if err != nil {
		t.Fatal(err)
	}
	whole, err := Load(Config{Kind: KindIDX, Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	if d.Train.N != 0 || d.Valid.N != 0 || !slices.Equal(d.Test.X, whole.Test.X) || !slices.Equal(d.Test.Y, whole.Test.Y) || d.Classes != 5 || !slices.Equal(d.SampleShape, []int64{2, 2}) {
		t.Errorf("LoadTest: %d train, %d valid, %d test, %d classes, shape %v; want only the whole test split", d.Train.N, d.Valid.N, d.Test.N, d.Classes, d.SampleShape)
	}
	syn := Config{Kind: KindSynthetic, TrainSamples: 100, ValidSamples: 30, Seed: 3, Shard: "1/2"}
	d, err = LoadTest(syn)
	if err != nil {
		t.Fatal(err)
	}
	syn.Shard = ""
	all, err := Load(syn)
	if err != nil {
		t.Fatal(err)
	}
	if d.Test.N != 30 || !slices.Equal(d.Test.X, all.Test.X) {
		t.Errorf("synthetic LoadTest: %d test samples, want the whole data set's 30", d.Test.N)
	}
	if _, err := LoadTest(Config{Kind: KindCSV, Path: filepath.Join(dir, "x.csv")}); err == nil || !strings.Contains(err.Error(), "no test split") {
		t.Errorf("LoadTest of a CSV data set: %v", err)
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
	// Sample 0, which holds pixels 0 and 255, is in one of the two splits.
	px := slices.Concat(d.Train.X, d.Valid.X)
	if !slices.Contains(px, 0) || !slices.Contains(px, 1) {
		t.Errorf("pixels 0 and 255 are not 0 and 1 among %v", px)
	}
	for _, v := range px {
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
		{name: "shape differs between train and test", file: "t10k-images-idx3-ubyte", data: idxBytes([]uint32{4, 1, 4}, set.imagesFrom(testID, 4)),
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
