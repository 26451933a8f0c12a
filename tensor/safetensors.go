package tensor

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"unicode/utf8"
)

// The safetensors format (https://github.com/huggingface/safetensors), which
// PyTorch, numpy and most of the Python ecosystem read and write:
//
//	8 bytes    N, the length of the header, little-endian unsigned
//	N bytes    a JSON object: for every tensor
//	           "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}
//	           and optionally "__metadata__": {"key": "value", ...} (strings only)
//	rest       the tensors' data, little-endian, row-major; offsets count from
//	           the start of this section, and the tensors cover it exactly
//	           (no gaps, no overlaps, nothing after)
//
// The readers here refuse anything else with an error that names the problem:
// a file is often the first thing fx reads from a researcher or a site.

// MaxHeaderSize is the largest JSON header accepted (as in the reference
// implementation): enough for hundreds of thousands of tensors, and a bound on
// what a hostile length field can make a reader allocate.
const MaxHeaderSize = 100 << 20

// metadataKey is the header key of the free-form string map.
const metadataKey = "__metadata__"

// TensorInfo describes one tensor of a safetensors file without its data.
type TensorInfo struct {
	Name  string
	DType DType
	Shape []int64
	// Begin and End are the byte offsets of the data, from the start of the
	// data section.
	Begin, End int64
}

// Header is the parsed header of a safetensors file.
type Header struct {
	// Tensors in the order of their data in the file.
	Tensors []TensorInfo
	// Metadata is the "__metadata__" map, nil if the file has none.
	Metadata map[string]string
	// DataOffset is where the data section starts in the file (8 + header length).
	DataOffset int64
	// DataSize is the length of the data section.
	DataSize int64
}

// Layout returns the tensors as a Model without data: the layout that
// NewAccumulator, NewOptimizer or a Decoder can check updates against.
func (h *Header) Layout() Model {
	m := make(Model, len(h.Tensors))
	for i, ti := range h.Tensors {
		m[i] = &Tensor{Name: ti.Name, DType: ti.DType, Shape: slices.Clone(ti.Shape)}
	}
	return m
}

// ReadHeader reads the length and the header of a safetensors stream, leaving
// r at the start of the data section.
func ReadHeader(r io.Reader) (*Header, error) {
	return readHeader(r, -1)
}

// readHeader reads the header; fileSize, if known (≥ 0), bounds the length
// field before anything is allocated.
func readHeader(r io.Reader, fileSize int64) (*Header, error) {
	var lenBuf [8]byte
	if _, err := io.ReadFull(r, lenBuf[:]); err != nil {
		return nil, fmt.Errorf("safetensors: read header length: %w", noEOF(err))
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n > MaxHeaderSize {
		return nil, fmt.Errorf("safetensors: header too large: %d bytes, the limit is %d", n, MaxHeaderSize)
	}
	if n < 2 {
		return nil, fmt.Errorf("safetensors: header length %d is too small for a JSON object", n)
	}
	if fileSize >= 0 && int64(n) > fileSize-8 {
		return nil, fmt.Errorf("safetensors: header length %d runs past the end of the %d-byte file", n, fileSize)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, fmt.Errorf("safetensors: read %d-byte header: %w", n, noEOF(err))
	}
	h, err := parseHeader(buf)
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	h.DataOffset = 8 + int64(n)
	return h, nil
}

// noEOF turns a clean EOF into ErrUnexpectedEOF: wherever the readers stop
// early, the file is truncated.
func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// headerEntry is one tensor in the JSON header. Pointers tell a missing field
// from a zero one.
type headerEntry struct {
	DType       *string  `json:"dtype"`
	Shape       *[]int64 `json:"shape"`
	DataOffsets *[]int64 `json:"data_offsets"`
}

// parseHeader decodes and checks the JSON header. It walks the top-level
// object token by token so that a repeated key is an error rather than a
// silent overwrite.
func parseHeader(buf []byte) (*Header, error) {
	if !utf8.Valid(buf) {
		return nil, errors.New("header is not valid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(buf))
	dec.DisallowUnknownFields()
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, errors.New("header is not a JSON object")
	}
	h := &Header{}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, jsonErr(err)
		}
		name := tok.(string) // object keys are always strings
		if seen[name] {
			return nil, fmt.Errorf("header lists %q twice", name)
		}
		seen[name] = true
		if name == metadataKey {
			var md map[string]string
			if err := dec.Decode(&md); err != nil {
				return nil, fmt.Errorf("header %s must map strings to strings: %w", metadataKey, jsonErr(err))
			}
			if md == nil {
				md = map[string]string{}
			}
			h.Metadata = md
			continue
		}
		var e headerEntry
		if err := dec.Decode(&e); err != nil {
			return nil, fmt.Errorf("header entry for tensor %q: %w", name, jsonErr(err))
		}
		ti, err := e.info(name)
		if err != nil {
			return nil, err
		}
		h.Tensors = append(h.Tensors, ti)
	}
	if _, err := dec.Token(); err != nil {
		return nil, jsonErr(err)
	}
	if rest := buf[dec.InputOffset():]; len(bytes.TrimLeft(rest, " \t\r\n")) != 0 {
		return nil, fmt.Errorf("header has %d bytes of garbage after the JSON object", len(bytes.TrimLeft(rest, " \t\r\n")))
	}
	size, err := checkOffsets(h.Tensors)
	if err != nil {
		return nil, err
	}
	h.DataSize = size
	return h, nil
}

// jsonErr describes a JSON decoding error of the header; the decoder reports
// a truncated document as a bare EOF.
func jsonErr(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("header JSON ends early: %w", io.ErrUnexpectedEOF)
	}
	return fmt.Errorf("header JSON: %w", err)
}

// info checks one header entry on its own.
func (e *headerEntry) info(name string) (TensorInfo, error) {
	if err := ValidateName(name); err != nil {
		return TensorInfo{}, err
	}
	switch {
	case e.DType == nil:
		return TensorInfo{}, fmt.Errorf("tensor %q has no dtype", name)
	case e.Shape == nil:
		return TensorInfo{}, fmt.Errorf("tensor %q has no shape", name)
	case e.DataOffsets == nil:
		return TensorInfo{}, fmt.Errorf("tensor %q has no data_offsets", name)
	}
	ti := TensorInfo{Name: name, DType: DType(*e.DType), Shape: *e.Shape}
	if ti.Shape == nil {
		ti.Shape = []int64{}
	}
	if !ti.DType.Valid() {
		return TensorInfo{}, fmt.Errorf("tensor %q has unknown dtype %q (fx reads F32, F64, F16, BF16, I64, I32, U8)", name, *e.DType)
	}
	size, err := CheckShape(ti.DType, ti.Shape)
	if err != nil {
		return TensorInfo{}, fmt.Errorf("tensor %q: %w", name, err)
	}
	offs := *e.DataOffsets
	if len(offs) != 2 {
		return TensorInfo{}, fmt.Errorf("tensor %q: data_offsets has %d numbers, want 2", name, len(offs))
	}
	ti.Begin, ti.End = offs[0], offs[1]
	if ti.Begin < 0 || ti.End < ti.Begin {
		return TensorInfo{}, fmt.Errorf("tensor %q: data_offsets [%d, %d] are not a byte range", name, ti.Begin, ti.End)
	}
	if ti.End-ti.Begin != size {
		return TensorInfo{}, fmt.Errorf("tensor %q: size mismatch: %s%v needs %d bytes, data_offsets [%d, %d] give %d", name, ti.DType, ti.Shape, size, ti.Begin, ti.End, ti.End-ti.Begin)
	}
	return ti, nil
}

// checkOffsets sorts tensors by data offset and checks that they tile the
// data section from 0 with no gap or overlap; it returns the section's size.
func checkOffsets(ts []TensorInfo) (int64, error) {
	slices.SortStableFunc(ts, func(a, b TensorInfo) int {
		if a.Begin != b.Begin {
			return cmpInt64(a.Begin, b.Begin)
		}
		return cmpInt64(a.End, b.End)
	})
	var at int64
	for i, t := range ts {
		switch {
		case t.Begin < at:
			return 0, fmt.Errorf("tensor %q: data_offsets [%d, %d] overlap tensor %q, which ends at %d", t.Name, t.Begin, t.End, ts[i-1].Name, at)
		case t.Begin > at:
			return 0, fmt.Errorf("tensor %q: data_offsets [%d, %d] leave a gap of %d bytes after offset %d", t.Name, t.Begin, t.End, t.Begin-at, at)
		}
		at = t.End
	}
	return at, nil
}

func cmpInt64(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// ReadHeaderFile reads the header of a safetensors file and checks that the
// file's size agrees with it, without reading the data.
func ReadHeaderFile(path string) (*Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	defer f.Close()
	h, _, err := readHeaderSized(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return h, nil
}

// readHeaderSized reads the header of an open file and checks the file's size
// against it.
func readHeaderSized(f *os.File) (*Header, int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, 0, fmt.Errorf("safetensors: %w", err)
	}
	h, err := readHeader(f, fi.Size())
	if err != nil {
		return nil, 0, err
	}
	if err := checkDataSize(h, fi.Size()-h.DataOffset); err != nil {
		return nil, 0, err
	}
	return h, fi.Size(), nil
}

// checkDataSize compares the bytes available after the header with what the
// header's offsets need.
func checkDataSize(h *Header, have int64) error {
	switch {
	case have < h.DataSize:
		return fmt.Errorf("safetensors: data_offsets out of range: the header needs %d data bytes, the file has %d", h.DataSize, have)
	case have > h.DataSize:
		return fmt.Errorf("safetensors: %d bytes of trailing garbage after the %d data bytes the header describes", have-h.DataSize, h.DataSize)
	}
	return nil
}

// Read reads a whole safetensors stream: the tensors, in the order of their
// data, and the metadata (nil if absent). It refuses a stream with anything
// after the last tensor.
//
// When r can tell how much it holds (a file, or anything with a Len method
// such as bytes.Reader), sizes are checked before any tensor is allocated.
// Otherwise large tensors are read into buffers that grow as data actually
// arrives, so a header that promises more than the stream delivers costs an
// error, not an allocation of whatever it claimed.
func Read(r io.Reader) (Model, map[string]string, error) {
	var h *Header
	var err error
	known := false
	switch src := r.(type) {
	case *os.File:
		if fi, serr := src.Stat(); serr == nil && fi.Mode().IsRegular() {
			pos, perr := src.Seek(0, io.SeekCurrent)
			if perr == nil {
				h, err = readHeader(src, fi.Size()-pos)
				if err == nil {
					err = checkDataSize(h, fi.Size()-pos-h.DataOffset)
				}
				if err != nil {
					return nil, nil, err
				}
				known = true
			}
		}
	case interface{ Len() int }:
		n := int64(src.Len())
		if h, err = readHeader(r, n); err != nil {
			return nil, nil, err
		}
		if err := checkDataSize(h, n-h.DataOffset); err != nil {
			return nil, nil, err
		}
		known = true
	}
	if h == nil {
		if h, err = readHeader(r, -1); err != nil {
			return nil, nil, err
		}
	}
	m, err := readData(r, h, known, nil)
	if err != nil {
		return nil, nil, err
	}
	if !known {
		var one [1]byte
		if n, _ := io.ReadFull(r, one[:]); n > 0 {
			return nil, nil, fmt.Errorf("safetensors: trailing garbage after the %d data bytes the header describes", h.DataSize)
		}
	}
	return m, h.Metadata, nil
}

// growStep is the size up to which a tensor of a stream of unknown length is
// allocated outright; beyond it, its buffer doubles as data arrives.
const growStep = 16 << 20

// readData reads the tensors of h from r, positioned at the data section,
// into the buffers of reuse's tensors of the same name, dtype and size
// where it has them (see ReadFileReusing), else into new ones.
func readData(r io.Reader, h *Header, sizeKnown bool, reuse Model) (Model, error) {
	m := make(Model, 0, len(h.Tensors))
	for _, ti := range h.Tensors {
		n := ti.End - ti.Begin
		var data []byte
		if old := reuse.Get(ti.Name); sizeKnown && old != nil && old.DType == ti.DType && int64(len(old.Data)) == n {
			data, old.Data = old.Data, nil
			if _, err := io.ReadFull(r, data); err != nil {
				return nil, fmt.Errorf("safetensors: tensor %q: data_offsets out of range or file truncated: %w", ti.Name, noEOF(err))
			}
		} else if sizeKnown || n <= growStep {
			data = alignedBytes(n)
			if _, err := io.ReadFull(r, data); err != nil {
				return nil, fmt.Errorf("safetensors: tensor %q: data_offsets out of range or file truncated: %w", ti.Name, noEOF(err))
			}
		} else {
			var err error
			if data, err = readGrowing(r, n); err != nil {
				return nil, fmt.Errorf("safetensors: tensor %q: data_offsets out of range or file truncated: %w", ti.Name, err)
			}
		}
		m = append(m, &Tensor{Name: ti.Name, DType: ti.DType, Shape: ti.Shape, Data: data})
	}
	return m, nil
}

// readGrowing reads exactly n bytes into an aligned buffer that doubles as the
// bytes arrive, so memory follows the data rather than the claim.
func readGrowing(r io.Reader, n int64) ([]byte, error) {
	buf := alignedBytes(growStep)
	var have int64
	for {
		got, err := io.ReadFull(r, buf[have:])
		have += int64(got)
		if err != nil {
			return nil, fmt.Errorf("got %d of %d bytes: %w", have, n, noEOF(err))
		}
		if have == n {
			return buf, nil
		}
		next := alignedBytes(min(n, 2*int64(len(buf))))
		copy(next, buf)
		buf = next
	}
}

// ReadFile reads a safetensors file; see Read.
func ReadFile(path string) (Model, map[string]string, error) {
	return ReadFileReusing(path, nil)
}

// ReadFileReusing is ReadFile into the memory of reuse, a model the caller
// no longer needs: each tensor of the file goes into the buffer of reuse's
// tensor of the same name, dtype and size, which gives it up (its Data
// becomes nil); the others get new memory. The tensors returned are new.
func ReadFileReusing(path string, reuse Model) (Model, map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("safetensors: %w", err)
	}
	defer f.Close()
	h, _, err := readHeaderSized(f)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	m, err := readData(bufio.NewReaderSize(f, 1<<20), h, true, reuse)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return m, h.Metadata, nil
}

// Write writes m and metadata as safetensors to w. The header is computed
// first, then the tensors are streamed in name order straight from their
// memory (nothing is copied), the header padded with spaces so the data
// starts 8-byte aligned. m is validated first and is not reordered.
func Write(w io.Writer, m Model, metadata map[string]string) error {
	header, order, err := encodeHeader(m, metadata)
	if err != nil {
		return err
	}
	var lenBuf [8]byte
	binary.LittleEndian.PutUint64(lenBuf[:], uint64(len(header)))
	if _, err := w.Write(lenBuf[:]); err != nil {
		return fmt.Errorf("safetensors: write header: %w", err)
	}
	if _, err := w.Write(header); err != nil {
		return fmt.Errorf("safetensors: write header: %w", err)
	}
	for _, t := range order {
		if _, err := w.Write(t.Data); err != nil {
			return fmt.Errorf("safetensors: write tensor %q: %w", t.Name, err)
		}
	}
	return nil
}

// encodeHeader builds the padded JSON header and the tensors in name order.
func encodeHeader(m Model, metadata map[string]string) ([]byte, Model, error) {
	if err := m.Validate(); err != nil {
		return nil, nil, fmt.Errorf("safetensors: %w", err)
	}
	for k, v := range metadata {
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			return nil, nil, fmt.Errorf("safetensors: metadata %q is not valid UTF-8", k)
		}
	}
	order := slices.Clone(m)
	order.Sort()
	entries := make(map[string]any, len(order)+1)
	var at int64
	for _, t := range order {
		if t.Name == metadataKey {
			return nil, nil, fmt.Errorf("safetensors: a tensor cannot be named %q", metadataKey)
		}
		shape := t.Shape
		if shape == nil {
			shape = []int64{}
		}
		n := int64(len(t.Data))
		dt := string(t.DType)
		entries[t.Name] = headerEntry{DType: &dt, Shape: &shape, DataOffsets: &[]int64{at, at + n}}
		at += n
	}
	if len(metadata) > 0 {
		entries[metadataKey] = metadata
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(entries); err != nil {
		return nil, nil, fmt.Errorf("safetensors: encode header: %w", err)
	}
	header := bytes.TrimRight(buf.Bytes(), "\n")
	if pad := (8 - len(header)%8) % 8; pad > 0 {
		header = append(header, strings.Repeat(" ", pad)...)
	}
	if len(header) > MaxHeaderSize {
		return nil, nil, fmt.Errorf("safetensors: header of %d bytes exceeds the %d-byte limit readers enforce", len(header), MaxHeaderSize)
	}
	return header, order, nil
}

// WriteFile writes m and metadata to path atomically: into a temporary file
// in the same directory, flushed to disk, then renamed over path, and the
// directory synced. A crash leaves either the old file or the new one, never a
// torn one (a stray ".<name>.tmp-*" file at worst). The file is readable by
// its owner only: models can carry information about the data they were
// trained on.
func WriteFile(path string, m Model, metadata map[string]string) error {
	return writeFile(path, m, metadata, true)
}

// WriteScratchFile writes m like WriteFile, atomically and private to its
// owner, but without flushing it to disk: for files that need not survive a
// crash, such as the models a site hands its task runner every round. The
// fsyncs WriteFile pays for durability would cost more than the write
// itself, and the page cache serves the reader anyway.
func WriteScratchFile(path string, m Model, metadata map[string]string) error {
	return writeFile(path, m, metadata, false)
}

func writeFile(path string, m Model, metadata map[string]string, durable bool) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	if err := Write(bw, m, metadata); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("safetensors: write %s: %w", path, err)
	}
	if durable {
		if err := f.Sync(); err != nil {
			return fmt.Errorf("safetensors: sync %s: %w", tmp, err)
		}
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("safetensors: close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	if !durable {
		return nil
	}
	return syncDir(dir)
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("safetensors: sync directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("safetensors: sync directory %s: %w", dir, err)
	}
	return nil
}
