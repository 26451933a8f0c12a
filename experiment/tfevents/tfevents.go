// Package tfevents writes and reads TensorBoard event files, so that an
// experiment's metrics can be drawn by `tensorboard --logdir DIR`, the viewer
// most researchers already use, without fx depending on TensorFlow or
// TensorBoard: the format is small, stable and documented, and writing it
// takes the standard library and protowire.
//
// An event file is a sequence of TFRecords. Each record is
//
//	uint64 length            little endian
//	uint32 masked CRC32C     of the 8 length bytes, little endian
//	length bytes of data
//	uint32 masked CRC32C     of the data, little endian
//
// where a masked CRC is ((crc >> 15) | (crc << 17)) + 0xa282ead8, and the
// data is a serialized tensorflow.Event message. The first event of a file
// carries only file_version "brain.Event:2", which is how TensorBoard
// recognises the format; every other event here carries a Summary of scalar
// values (tensorflow.Summary.Value.simple_value), which TensorBoard's scalar
// dashboard draws as one curve per tag and run against the event's step.
//
// Only the fields fx writes are modelled:
//
//	message Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//	message Summary { repeated Value value = 1; }
//	message Value   { string tag = 1; float simple_value = 2; }
//
// The reader is fx's own check of the writer (every CRC verified, every
// field decoded); it skips the fields it does not model, so it reads files
// other writers made too.
package tfevents

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
)

// FileVersion is the file_version of an event file's first event.
const FileVersion = "brain.Event:2"

// FilePrefix starts every event file's name; TensorBoard reads the files
// whose names contain "tfevents".
const FilePrefix = "events.out.tfevents."

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// MaskedCRC is the CRC32C of b, masked as TFRecord stores it. The mask keeps
// a CRC of data that itself holds CRCs from being trivially predictable.
func MaskedCRC(b []byte) uint32 {
	crc := crc32.Checksum(b, castagnoli)
	return ((crc >> 15) | (crc << 17)) + 0xa282ead8
}

// ErrCorrupt is matched by the errors Reader returns for a record whose CRC
// does not match.
var ErrCorrupt = errors.New("corrupt TFRecord")

// AppendRecord appends data framed as one TFRecord to b.
func AppendRecord(b, data []byte) []byte {
	var head [8]byte
	binary.LittleEndian.PutUint64(head[:], uint64(len(data)))
	b = append(b, head[:]...)
	b = binary.LittleEndian.AppendUint32(b, MaskedCRC(head[:]))
	b = append(b, data...)
	return binary.LittleEndian.AppendUint32(b, MaskedCRC(data))
}

// Value is one scalar of a summary.
type Value struct {
	Tag   string
	Value float32
}

// Event is one event of a file: the header (FileVersion set) or a summary of
// scalars at a step.
type Event struct {
	// WallTime is when the values were measured; TensorBoard shows it as
	// the "relative" and "wall" axes.
	WallTime    time.Time
	Step        int64
	FileVersion string
	Values      []Value
}

// Marshal encodes e as a tensorflow.Event.
func (e *Event) Marshal() []byte {
	var b []byte
	b = protowire.AppendTag(b, 1, protowire.Fixed64Type)
	b = protowire.AppendFixed64(b, math.Float64bits(wallSeconds(e.WallTime)))
	if e.Step != 0 {
		b = protowire.AppendTag(b, 2, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(e.Step))
	}
	if e.FileVersion != "" {
		b = protowire.AppendTag(b, 3, protowire.BytesType)
		b = protowire.AppendString(b, e.FileVersion)
	}
	if len(e.Values) > 0 {
		var summary []byte
		for _, v := range e.Values {
			var value []byte
			value = protowire.AppendTag(value, 1, protowire.BytesType)
			value = protowire.AppendString(value, v.Tag)
			value = protowire.AppendTag(value, 2, protowire.Fixed32Type)
			value = protowire.AppendFixed32(value, math.Float32bits(v.Value))
			summary = protowire.AppendTag(summary, 1, protowire.BytesType)
			summary = protowire.AppendBytes(summary, value)
		}
		b = protowire.AppendTag(b, 5, protowire.BytesType)
		b = protowire.AppendBytes(b, summary)
	}
	return b
}

// wallSeconds is t in seconds since the epoch, as Event.wall_time holds it
// (a double: to about a microsecond today).
func wallSeconds(t time.Time) float64 {
	return float64(t.Unix()) + float64(t.Nanosecond())/1e9
}

// ParseEvent decodes a tensorflow.Event, keeping the fields Event models.
func ParseEvent(b []byte) (Event, error) {
	var e Event
	err := eachField(b, func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error {
		switch {
		case num == 1 && typ == protowire.Fixed64Type:
			f := math.Float64frombits(x)
			sec, frac := math.Modf(f)
			e.WallTime = time.Unix(int64(sec), int64(math.Round(frac*1e9)))
		case num == 2 && typ == protowire.VarintType:
			e.Step = int64(x)
		case num == 3 && typ == protowire.BytesType:
			e.FileVersion = string(v)
		case num == 5 && typ == protowire.BytesType:
			return eachField(v, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
				if num != 1 || typ != protowire.BytesType {
					return nil
				}
				var val Value
				simple := false
				err := eachField(v, func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error {
					switch {
					case num == 1 && typ == protowire.BytesType:
						val.Tag = string(v)
					case num == 2 && typ == protowire.Fixed32Type:
						val.Value = math.Float32frombits(uint32(x))
						simple = true
					}
					return nil
				})
				if err != nil {
					return err
				}
				if simple {
					e.Values = append(e.Values, val)
				}
				return nil
			})
		}
		return nil
	})
	return e, err
}

// eachField calls f for every field of the message b: v holds a bytes
// field's contents, x a numeric field's value.
func eachField(b []byte, f func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return fmt.Errorf("tensorflow.Event: %w", protowire.ParseError(n))
		}
		b = b[n:]
		var v []byte
		var x uint64
		switch typ {
		case protowire.VarintType:
			x, n = protowire.ConsumeVarint(b)
		case protowire.Fixed32Type:
			var x32 uint32
			x32, n = protowire.ConsumeFixed32(b)
			x = uint64(x32)
		case protowire.Fixed64Type:
			x, n = protowire.ConsumeFixed64(b)
		case protowire.BytesType:
			v, n = protowire.ConsumeBytes(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return fmt.Errorf("tensorflow.Event field %d: %w", num, protowire.ParseError(n))
		}
		b = b[n:]
		if err := f(num, typ, v, x); err != nil {
			return err
		}
	}
	return nil
}

// Writer writes one event file. It buffers: Flush makes what was written so
// far visible to a TensorBoard that is reading the file.
type Writer struct {
	w    *bufio.Writer
	f    *os.File // nil when writing to a caller's io.Writer
	path string
	buf  []byte
}

// NewWriter starts an event file on w with its header event, stamped now.
func NewWriter(w io.Writer, now time.Time) (*Writer, error) {
	tw := &Writer{w: bufio.NewWriter(w)}
	if err := tw.Write(Event{WallTime: now, FileVersion: FileVersion}); err != nil {
		return nil, err
	}
	return tw, nil
}

// Create makes a new event file in dir (created if need be), named
// events.out.tfevents.<unix seconds>.<hostname> as TensorBoard's own writers
// name theirs. It never replaces a file: should the name be taken (two files
// started in the same second), ".1", ".2", ... is appended.
func Create(dir string, now time.Time) (*Writer, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "localhost"
	}
	host = strings.NewReplacer("/", "_", string(filepath.Separator), "_").Replace(host)
	base := fmt.Sprintf("%s%d.%s", FilePrefix, now.Unix(), host)
	for i := 0; ; i++ {
		path := filepath.Join(dir, base)
		if i > 0 {
			path = fmt.Sprintf("%s.%d", path, i)
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if errors.Is(err, os.ErrExist) && i < 1000 {
			continue
		}
		if err != nil {
			return nil, err
		}
		w, err := NewWriter(f, now)
		if err != nil {
			f.Close()
			return nil, err
		}
		w.f, w.path = f, path
		return w, nil
	}
}

// Path is the file Create made; "" for a Writer on a caller's io.Writer.
func (w *Writer) Path() string { return w.path }

// Write appends one event.
func (w *Writer) Write(e Event) error {
	w.buf = AppendRecord(w.buf[:0], e.Marshal())
	_, err := w.w.Write(w.buf)
	return err
}

// Scalars appends the values measured at step and wall time t, as one event.
func (w *Writer) Scalars(step int64, t time.Time, values ...Value) error {
	return w.Write(Event{WallTime: t, Step: step, Values: values})
}

// Flush hands the buffered events to the file.
func (w *Writer) Flush() error { return w.w.Flush() }

// Close flushes and, for a file Create made, closes it.
func (w *Writer) Close() error {
	err := w.w.Flush()
	if w.f != nil {
		if cerr := w.f.Close(); err == nil {
			err = cerr
		}
	}
	return err
}

// Reader reads TFRecords and checks their CRCs.
type Reader struct {
	r *bufio.Reader
}

// NewReader reads the records of r.
func NewReader(r io.Reader) *Reader { return &Reader{r: bufio.NewReader(r)} }

// maxRecord bounds a record's length, so a corrupt length cannot make the
// reader allocate without limit (fx's events are a few hundred bytes).
const maxRecord = 64 << 20

// Next returns the next record's data: io.EOF after the last whole record,
// io.ErrUnexpectedEOF for a file cut inside a record (as one being written
// may be), and an error matching ErrCorrupt for a CRC that does not match.
func (r *Reader) Next() ([]byte, error) {
	var head [12]byte
	if _, err := io.ReadFull(r.r, head[:]); err != nil {
		return nil, err
	}
	if got, want := binary.LittleEndian.Uint32(head[8:]), MaskedCRC(head[:8]); got != want {
		return nil, fmt.Errorf("%w: length CRC %#08x, want %#08x", ErrCorrupt, got, want)
	}
	n := binary.LittleEndian.Uint64(head[:8])
	if n > maxRecord {
		return nil, fmt.Errorf("%w: a record of %d bytes", ErrCorrupt, n)
	}
	data := make([]byte, n+4)
	if _, err := io.ReadFull(r.r, data); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	data, crc := data[:n], binary.LittleEndian.Uint32(data[n:])
	if want := MaskedCRC(data); crc != want {
		return nil, fmt.Errorf("%w: data CRC %#08x, want %#08x", ErrCorrupt, crc, want)
	}
	return data, nil
}

// ReadFile reads every event of an event file, checking that the first is
// the file_version header.
func ReadFile(path string) ([]Event, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := NewReader(f)
	var events []Event
	for i := 0; ; i++ {
		data, err := r.Next()
		if errors.Is(err, io.EOF) {
			return events, nil
		}
		if err != nil {
			return events, fmt.Errorf("%s: record %d: %w", path, i, err)
		}
		e, err := ParseEvent(data)
		if err != nil {
			return events, fmt.Errorf("%s: record %d: %w", path, i, err)
		}
		if i == 0 && e.FileVersion != FileVersion {
			return nil, fmt.Errorf("%s: the first event has file_version %q, not %q", path, e.FileVersion, FileVersion)
		}
		events = append(events, e)
	}
}
