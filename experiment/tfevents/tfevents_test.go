package tfevents

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
)

// TestMaskedCRC checks the CRC32C against the published check values and the
// mask against its definition, computed here independently of MaskedCRC.
func TestMaskedCRC(t *testing.T) {
	for _, c := range []struct {
		data []byte
		crc  uint32
	}{
		{[]byte("123456789"), 0xe3069283},            // the CRC catalogue's check value for CRC-32C
		{make([]byte, 32), 0x8a9136aa},               // RFC 3720, B.4: 32 bytes of zeros
		{bytes.Repeat([]byte{0xff}, 32), 0x62a8ab43}, // RFC 3720, B.4: 32 bytes of ones
	} {
		rot := c.crc>>15 | c.crc<<17
		want := uint32(uint64(rot)+0xa282ead8) & 0xffffffff
		if got := MaskedCRC(c.data); got != want {
			t.Errorf("MaskedCRC(%q) = %#08x, want %#08x (CRC32C %#08x)", c.data, got, want, c.crc)
		}
	}
}

// TestRecordFraming reads a written file back byte by byte: the length, its
// masked CRC, the data and its masked CRC, for every record.
func TestRecordFraming(t *testing.T) {
	var buf bytes.Buffer
	now := time.Unix(1700000000, 250_000_000)
	w, err := NewWriter(&buf, now)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Scalars(3, now.Add(time.Second), Value{"train/loss", 0.5}, Value{"train/accuracy", 0.75}); err != nil {
		t.Fatal(err)
	}
	if buf.Len() != 0 {
		t.Errorf("%d bytes reached the file before Flush", buf.Len())
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	b := buf.Bytes()
	var records [][]byte
	for len(b) > 0 {
		if len(b) < 12 {
			t.Fatalf("%d stray bytes at the end", len(b))
		}
		n := binary.LittleEndian.Uint64(b[:8])
		if got, want := binary.LittleEndian.Uint32(b[8:12]), MaskedCRC(b[:8]); got != want {
			t.Fatalf("length CRC %#x, want %#x", got, want)
		}
		if uint64(len(b)) < 12+n+4 {
			t.Fatalf("record of %d bytes, %d left", n, len(b)-12)
		}
		data := b[12 : 12+n]
		if got, want := binary.LittleEndian.Uint32(b[12+n:]), MaskedCRC(data); got != want {
			t.Fatalf("data CRC %#x, want %#x", got, want)
		}
		records = append(records, data)
		b = b[12+n+4:]
	}
	if len(records) != 2 {
		t.Fatalf("%d records, want 2", len(records))
	}
	// The header event, by hand: wall_time (field 1, fixed64) then
	// file_version (field 3, bytes).
	want := []byte{1<<3 | 1}
	want = binary.LittleEndian.AppendUint64(want, math.Float64bits(1700000000.25))
	want = append(want, 3<<3|2, byte(len(FileVersion)))
	want = append(want, FileVersion...)
	if !bytes.Equal(records[0], want) {
		t.Errorf("header event\n% x\nwant\n% x", records[0], want)
	}
	e, err := ParseEvent(records[1])
	if err != nil {
		t.Fatal(err)
	}
	if e.Step != 3 || !e.WallTime.Equal(now.Add(time.Second)) || len(e.Values) != 2 ||
		e.Values[0] != (Value{"train/loss", 0.5}) || e.Values[1] != (Value{"train/accuracy", 0.75}) {
		t.Errorf("event = %+v", e)
	}
}

func TestReaderRefusesCorruptRecords(t *testing.T) {
	var buf bytes.Buffer
	w, err := NewWriter(&buf, time.Unix(1, 0))
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Scalars(1, time.Unix(2, 0), Value{"a", 1}); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	good := buf.Bytes()
	headerLen := 12 + int(binary.LittleEndian.Uint64(good)) + 4

	read := func(b []byte) error {
		r := NewReader(bytes.NewReader(b))
		for {
			if _, err := r.Next(); err != nil {
				if errors.Is(err, io.EOF) {
					return nil
				}
				return err
			}
		}
	}
	if err := read(good); err != nil {
		t.Fatalf("the good file: %v", err)
	}
	flip := func(i int) []byte {
		b := bytes.Clone(good)
		b[i] ^= 0x01
		return b
	}
	for name, c := range map[string]struct {
		b    []byte
		want error
	}{
		"length":          {flip(headerLen), ErrCorrupt},
		"length CRC":      {flip(headerLen + 8), ErrCorrupt},
		"data":            {flip(headerLen + 14), ErrCorrupt},
		"data CRC":        {flip(len(good) - 1), ErrCorrupt},
		"cut in the data": {good[:len(good)-6], io.ErrUnexpectedEOF},
		"cut in the head": {good[:headerLen+5], io.ErrUnexpectedEOF},
	} {
		if err := read(c.b); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", name, err, c.want)
		}
	}
}

func TestParseEventSkipsUnknownFields(t *testing.T) {
	e := Event{WallTime: time.Unix(5, 0), Step: -2, Values: []Value{{"x", -1.5}}}
	b := e.Marshal()
	// source_metadata (field 10, a message) and a varint field 99, as other
	// writers may add.
	b = append(b, 10<<3|2, 2, 0x0a, 0x00)
	b = protowire.AppendTag(b, 99, protowire.VarintType)
	b = protowire.AppendVarint(b, 300)
	got, err := ParseEvent(b)
	if err != nil {
		t.Fatal(err)
	}
	if got.Step != -2 || len(got.Values) != 1 || got.Values[0] != (Value{"x", -1.5}) || !got.WallTime.Equal(time.Unix(5, 0)) {
		t.Errorf("got %+v", got)
	}
	if _, err := ParseEvent([]byte{1<<3 | 1, 0, 0}); err == nil {
		t.Error("a truncated wall_time parsed")
	}
}

func TestCreate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run")
	now := time.Unix(1700000123, 0)
	var paths []string
	for range 2 {
		w, err := Create(dir, now)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Scalars(1, now, Value{"m", 2}); err != nil {
			t.Fatal(err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, w.Path())
	}
	host, _ := os.Hostname()
	if want := filepath.Join(dir, "events.out.tfevents.1700000123."+host); paths[0] != want {
		t.Errorf("first file %s, want %s", paths[0], want)
	}
	if paths[1] != paths[0]+".1" {
		t.Errorf("second file in the same second %s, want %s.1", paths[1], paths[0])
	}
	for _, p := range paths {
		events, err := ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if len(events) != 2 || events[0].FileVersion != FileVersion || events[1].Values[0] != (Value{"m", 2}) {
			t.Errorf("%s: %+v", p, events)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "events.out.tfevents.1.x"), AppendRecord(nil, []byte("not an event")), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadFile(filepath.Join(dir, "events.out.tfevents.1.x")); err == nil || !strings.Contains(err.Error(), "record 0") {
		t.Errorf("a file without the header: %v", err)
	}
}

// TestAnotherReaderReadsTheFiles reads files this package wrote with a
// reader that shares no code with it (testdata/read_events.py, run by
// Debian's python3): TensorBoard's own EventAccumulator where TensorBoard is
// installed, else TFRecord framing and CRC32C written in Python from their
// definitions and the events decoded by Google's protobuf runtime against
// tensorflow.Event's schema.
func TestAnotherReaderReadsTheFiles(t *testing.T) {
	const python = "/usr/bin/python3"
	if _, err := os.Stat(python); err != nil {
		t.Skipf("no %s", python)
	}
	if err := exec.Command(python, "-c", "import google.protobuf").Run(); err != nil {
		t.Skipf("%s has no google.protobuf (Debian's python3-protobuf): %v", python, err)
	}
	logdir := t.TempDir()
	t0 := time.Unix(1700000000, 0)
	type point struct {
		run, tag string
		step     int64
		value    float32
	}
	var want []point
	for _, run := range []string{"aggregate", filepath.Join("sites", "site-1")} {
		w, err := Create(filepath.Join(logdir, run), t0)
		if err != nil {
			t.Fatal(err)
		}
		for step := int64(1); step <= 3; step++ {
			acc, loss := float32(0.5+0.1*float64(step)), float32(2.0/float64(step))
			if run != "aggregate" {
				acc -= 0.01
			}
			if err := w.Scalars(step, t0.Add(time.Duration(step)*time.Second),
				Value{"train/accuracy", acc}, Value{"train/loss", loss}); err != nil {
				t.Fatal(err)
			}
			want = append(want, point{filepath.ToSlash(run), "train/accuracy", step, acc}, point{filepath.ToSlash(run), "train/loss", step, loss})
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	for _, mode := range []string{"", "manual"} {
		cmd := exec.Command(python, filepath.Join("testdata", "read_events.py"), logdir)
		cmd.Env = append(os.Environ(), "FX_TFEVENTS_READER="+mode)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("read_events.py: %v\n%s", err, stderr.String())
		}
		var got struct {
			Reader  string                             `json:"reader"`
			Scalars map[string]map[string][][3]float64 `json:"scalars"`
		}
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("read_events.py printed %q: %v", out, err)
		}
		t.Logf("read by %s", got.Reader)
		n := 0
		for _, tags := range got.Scalars {
			for _, points := range tags {
				n += len(points)
			}
		}
		if n != len(want) {
			t.Errorf("%s read %d scalars, want %d: %v", got.Reader, n, len(want), got.Scalars)
		}
		for _, p := range want {
			points := got.Scalars[p.run][p.tag]
			if len(points) != 3 {
				t.Errorf("%s: run %s tag %s: %v", got.Reader, p.run, p.tag, points)
				continue
			}
			pt := points[p.step-1]
			if int64(pt[0]) != p.step || float32(pt[1]) != p.value || pt[2] != float64(t0.Unix()+p.step) {
				t.Errorf("%s: run %s tag %s step %d: [step value wall_time] = %v, want value %v", got.Reader, p.run, p.tag, p.step, pt, p.value)
			}
		}
	}
}
