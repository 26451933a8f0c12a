package dataset

import (
	"bufio"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
)

// The four files of an MNIST-style data set. Each is looked up under the
// names listed, plain or with ".gz" (some mirrors use a dot before "idx").
var (
	idxTrainImages = []string{"train-images-idx3-ubyte", "train-images.idx3-ubyte"}
	idxTrainLabels = []string{"train-labels-idx1-ubyte", "train-labels.idx1-ubyte"}
	idxTestImages  = []string{"t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"}
	idxTestLabels  = []string{"t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"}
)

// idxUnsignedByte is the IDX type code of uint8 elements, the only one the
// MNIST family uses.
const idxUnsignedByte = 0x08

// maxIDXElements bounds what a header may announce, so a corrupt header
// fails with a message instead of an enormous allocation.
const maxIDXElements = 1 << 31

// LoadIDX loads an MNIST-format data set (MNIST, Fashion-MNIST, KMNIST...)
// from the directory c.Path: a c.ValidFraction share of the train-* files,
// chosen at random with c.Seed, becomes the validation split and the rest
// the training split; the t10k-* files become the test split, kept for a
// final evaluation. Files may be plain or gzip; the magic bytes decide, not
// the name. Pixels are scaled to [0, 1]. Classes is one more than the
// largest label in either file, so every shard of the same data set agrees
// on it.
func LoadIDX(c Config) (*Dataset, error) {
	if c.Kind == "" {
		c.Kind = KindIDX
	}
	if c.Kind != KindIDX {
		return nil, fmt.Errorf("dataset: LoadIDX given kind %q", c.Kind)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	c = c.withDefaults()
	all, shape, err := loadIDXPair(c.Path, idxTrainImages, idxTrainLabels)
	if err != nil {
		return nil, err
	}
	test, tshape, err := loadIDXPair(c.Path, idxTestImages, idxTestLabels)
	if err != nil {
		return nil, err
	}
	if !slices.Equal(shape, tshape) {
		return nil, fmt.Errorf("dataset: idx %s: training images are %v but test images are %v", c.Path, shape, tshape)
	}
	if all.N < 2 {
		return nil, fmt.Errorf("dataset: idx %s: %d training images, need at least 2 to hold out a validation split", c.Path, all.N)
	}
	features := 1
	for _, s := range shape {
		features *= int(s)
	}
	train, valid := holdOut(&all, features, c.ValidFraction, c.Seed)
	d := &Dataset{
		Train:       train,
		Valid:       valid,
		Test:        test,
		SampleShape: shape,
		Classes:     idxClasses(all.Y, test.Y),
		Description: fmt.Sprintf("IDX images from %s (%g of the training images held out for validation, seed %d; the t10k images for testing)", c.Path, c.ValidFraction, c.Seed),
	}
	if err := d.Validate(); err != nil {
		return nil, fmt.Errorf("%w, in %s", err, c.Path)
	}
	return shardAsConfigured(d, c)
}

// idxClasses is one more than the largest label.
func idxClasses(labels ...[]int32) int {
	classes := 0
	for _, ys := range labels {
		for _, y := range ys {
			classes = max(classes, int(y)+1)
		}
	}
	return classes
}

// LoadTest loads the test split alone of the data set c names, whole:
// c's shard and skew do not apply, and Train and Valid are empty. It is
// for the final evaluation of a model away from the sites (fx quickstart's,
// a researcher's), and reads no more than it needs: for IDX the t10k files
// and the training labels (for the class count). CSV data sets have no
// test split.
func LoadTest(c Config) (*Dataset, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	c.Shard, c.DirichletAlpha = "", 0
	switch c.Kind {
	case KindSynthetic:
		d, err := LoadSynthetic(c)
		if err != nil {
			return nil, err
		}
		d.Train, d.Valid = Split{}, Split{}
		return d, nil
	case KindIDX:
		test, shape, err := loadIDXPair(c.Path, idxTestImages, idxTestLabels)
		if err != nil {
			return nil, err
		}
		labelsPath, err := findIDX(c.Path, idxTrainLabels)
		if err != nil {
			return nil, err
		}
		_, trainLabels, err := readIDXFile(labelsPath)
		if err != nil {
			return nil, err
		}
		classes := idxClasses(test.Y)
		for _, y := range trainLabels {
			classes = max(classes, int(y)+1)
		}
		return &Dataset{Test: test, SampleShape: shape, Classes: classes, Description: fmt.Sprintf("the IDX test images from %s", c.Path)}, nil
	}
	return nil, fmt.Errorf("dataset: a %s data set has no test split: keep the test data in a file of its own", c.Kind)
}

// loadIDXPair reads an images file and its labels file into a Split.
func loadIDXPair(dir string, imageNames, labelNames []string) (Split, []int64, error) {
	imgPath, err := findIDX(dir, imageNames)
	if err != nil {
		return Split{}, nil, err
	}
	lblPath, err := findIDX(dir, labelNames)
	if err != nil {
		return Split{}, nil, err
	}
	imgDims, pixels, err := readIDXFile(imgPath)
	if err != nil {
		return Split{}, nil, err
	}
	if len(imgDims) < 2 {
		return Split{}, nil, fmt.Errorf("dataset: idx %s: images need at least 2 dimensions, header has %d", imgPath, len(imgDims))
	}
	lblDims, labels, err := readIDXFile(lblPath)
	if err != nil {
		return Split{}, nil, err
	}
	if len(lblDims) != 1 {
		return Split{}, nil, fmt.Errorf("dataset: idx %s: labels need 1 dimension, header has %d", lblPath, len(lblDims))
	}
	n := imgDims[0]
	if lblDims[0] != n {
		return Split{}, nil, fmt.Errorf("dataset: idx: %s holds %d images but %s holds %d labels", imgPath, n, lblPath, lblDims[0])
	}
	s := Split{X: make([]float32, len(pixels)), Y: make([]int32, n), N: int(n)}
	for i, p := range pixels {
		s.X[i] = float32(p) / 255
	}
	for i, l := range labels {
		s.Y[i] = int32(l)
	}
	return s, slices.Clone(imgDims[1:]), nil
}

// findIDX returns the first of the names, plain or gzip-suffixed, that
// exists in dir.
func findIDX(dir string, names []string) (string, error) {
	for _, name := range names {
		for _, candidate := range []string{name, name + ".gz"} {
			p := filepath.Join(dir, candidate)
			if _, err := os.Stat(p); err == nil {
				return p, nil
			} else if !errors.Is(err, os.ErrNotExist) {
				return "", fmt.Errorf("dataset: idx: %w", err)
			}
		}
	}
	return "", fmt.Errorf("dataset: idx: %s: neither %s nor %s.gz exists", dir, names[0], names[0])
}

// readIDXFile reads one IDX file of unsigned bytes, gunzipping it when it
// starts with the gzip magic bytes. It checks the header and that the file
// holds exactly the elements the header announces.
func readIDXFile(path string) (dims []int64, data []byte, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("dataset: idx: %w", err)
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 1<<16)
	var r io.Reader = br
	if magic, _ := br.Peek(2); len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, nil, fmt.Errorf("dataset: idx %s: bad gzip stream: %w", path, err)
		}
		defer zr.Close()
		r = zr
	}
	dims, data, err = readIDX(r)
	if err != nil {
		return nil, nil, fmt.Errorf("dataset: idx %s: %w", path, err)
	}
	return dims, data, nil
}

// readIDX parses an IDX stream: two zero bytes, a type code, the number of
// dimensions, the big-endian uint32 dimensions, then the elements.
func readIDX(r io.Reader) (dims []int64, data []byte, err error) {
	var magic [4]byte
	if n, err := io.ReadFull(r, magic[:]); err != nil {
		return nil, nil, fmt.Errorf("truncated: %d of 4 magic bytes: %w", n, err)
	}
	if magic[0] != 0 || magic[1] != 0 {
		return nil, nil, fmt.Errorf("bad magic % x: not an IDX file", magic)
	}
	if magic[2] != idxUnsignedByte {
		return nil, nil, fmt.Errorf("element type 0x%02x is not supported (want 0x08, unsigned byte)", magic[2])
	}
	nd := int(magic[3])
	if nd == 0 {
		return nil, nil, errors.New("header has 0 dimensions")
	}
	hdr := make([]byte, 4*nd)
	if n, err := io.ReadFull(r, hdr); err != nil {
		return nil, nil, fmt.Errorf("truncated: %d of %d header bytes: %w", n, len(hdr), err)
	}
	total := int64(1)
	dims = make([]int64, nd)
	for i := range dims {
		dims[i] = int64(binary.BigEndian.Uint32(hdr[4*i:]))
		total *= dims[i]
		if total > maxIDXElements {
			return nil, nil, fmt.Errorf("header dimensions %v announce more than %d elements", dims[:i+1], int64(maxIDXElements))
		}
	}
	data = make([]byte, total)
	if n, err := io.ReadFull(r, data); err != nil {
		return nil, nil, fmt.Errorf("truncated: header %v announces %d data bytes, found %d: %w", dims, total, n, err)
	}
	// Reading on to the end also makes gzip verify its checksum.
	var extra [1]byte
	switch n, err := io.ReadFull(r, extra[:]); {
	case n > 0:
		return nil, nil, fmt.Errorf("trailing bytes after the %d data bytes header %v announces", total, dims)
	case err != io.EOF:
		return nil, nil, fmt.Errorf("after the data: %w", err)
	}
	return dims, data, nil
}
