package tensor

import (
	"errors"
	"fmt"
	"io"
	"slices"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// On the wire a model is a sequence of fxv1.TensorFrame messages: for each
// tensor one header frame (name, dtype, shape), then data frames of at most
// MaxChunk bytes holding its little-endian elements, whose lengths add up to
// exactly the tensor's byte size (no data frame for an empty tensor). No
// message comes near gRPC's 4 MiB default limit, and a receiver can fold each
// chunk into an Accumulator as it arrives instead of holding whole uploads.

// MaxChunk is the largest data frame, 1 MiB.
const MaxChunk = 1 << 20

// DTypeToProto converts a dtype to its wire enum.
func DTypeToProto(d DType) (fxv1.DType, error) {
	switch d {
	case F32:
		return fxv1.DType_DTYPE_F32, nil
	case F64:
		return fxv1.DType_DTYPE_F64, nil
	case F16:
		return fxv1.DType_DTYPE_F16, nil
	case BF16:
		return fxv1.DType_DTYPE_BF16, nil
	case I32:
		return fxv1.DType_DTYPE_I32, nil
	case I64:
		return fxv1.DType_DTYPE_I64, nil
	case U8:
		return fxv1.DType_DTYPE_U8, nil
	}
	return fxv1.DType_DTYPE_UNSPECIFIED, fmt.Errorf("unknown dtype %q", d)
}

// DTypeFromProto converts a wire enum to a dtype; DTYPE_UNSPECIFIED and
// values this build does not know are errors.
func DTypeFromProto(p fxv1.DType) (DType, error) {
	switch p {
	case fxv1.DType_DTYPE_F32:
		return F32, nil
	case fxv1.DType_DTYPE_F64:
		return F64, nil
	case fxv1.DType_DTYPE_F16:
		return F16, nil
	case fxv1.DType_DTYPE_BF16:
		return BF16, nil
	case fxv1.DType_DTYPE_I32:
		return I32, nil
	case fxv1.DType_DTYPE_I64:
		return I64, nil
	case fxv1.DType_DTYPE_U8:
		return U8, nil
	}
	return "", fmt.Errorf("unknown dtype %v", p)
}

// HeaderToProto describes t (its data is not looked at) as a wire header.
func HeaderToProto(t *Tensor) (*fxv1.TensorHeader, error) {
	dt, err := DTypeToProto(t.DType)
	if err != nil {
		return nil, fmt.Errorf("tensor %q: %w", t.Name, err)
	}
	return &fxv1.TensorHeader{Name: t.Name, Dtype: dt, Shape: slices.Clone(t.Shape)}, nil
}

// HeaderFromProto checks a wire header (name, dtype, shape, size) and returns
// it as a Tensor without data.
func HeaderFromProto(h *fxv1.TensorHeader) (*Tensor, error) {
	if err := ValidateName(h.GetName()); err != nil {
		return nil, err
	}
	dt, err := DTypeFromProto(h.GetDtype())
	if err != nil {
		return nil, fmt.Errorf("tensor %q: %w", h.GetName(), err)
	}
	if _, err := CheckShape(dt, h.GetShape()); err != nil {
		return nil, fmt.Errorf("tensor %q: %w", h.GetName(), err)
	}
	shape := slices.Clone(h.GetShape())
	if shape == nil {
		shape = []int64{}
	}
	return &Tensor{Name: h.GetName(), DType: dt, Shape: shape}, nil
}

// Encoder writes tensors as frames through a send function, typically a gRPC
// stream's Send.
//
// Data frames of in-memory tensors are slices of the tensors' own memory:
// nothing is copied, so the tensors must not change until the encoding call
// returns (gRPC serialises a message before Send returns). Only EncodeFrom,
// whose data comes from a reader, needs a buffer: one chunk, allocated once
// and reused, so send must be done with a frame when it returns — true of a
// gRPC stream unless a stats handler that keeps messages is installed.
type Encoder struct {
	send func(*fxv1.TensorFrame) error
	buf  []byte
	skip Position // what the receiver has already (ResumeAt)
}

// Position is how far a receiver got in a model's frame stream: the tensor
// headers it received and the data bytes of all tensors together. A stream
// is a function of the model alone, so a download that broke can go on from
// where it stopped: the sender leaves out what comes before the position
// (Encoder.ResumeAt) and the receiver's Decoder carries on.
type Position struct {
	Tensors int
	Bytes   int64
}

// ResumeAt makes the encoder leave out what a receiver at p has received:
// the first p.Tensors headers and the first p.Bytes of data (a frame that
// straddles p is cut). A p no Decoder could be at yields a stream the
// receiver refuses.
func (e *Encoder) ResumeAt(p Position) { e.skip = p }

// emit sends a frame unless the receiver has it (see ResumeAt).
func (e *Encoder) emit(f *fxv1.TensorFrame) error {
	switch x := f.GetFrame().(type) {
	case *fxv1.TensorFrame_Header:
		if e.skip.Tensors > 0 {
			e.skip.Tensors--
			return nil
		}
	case *fxv1.TensorFrame_Data:
		if e.skip.Bytes > 0 {
			n := min(e.skip.Bytes, int64(len(x.Data)))
			e.skip.Bytes -= n
			if n == int64(len(x.Data)) {
				return nil
			}
			f = &fxv1.TensorFrame{Frame: &fxv1.TensorFrame_Data{Data: x.Data[n:]}}
		}
	}
	return e.send(f)
}

// NewEncoder returns an Encoder that emits frames through send.
func NewEncoder(send func(*fxv1.TensorFrame) error) *Encoder {
	return &Encoder{send: send}
}

// EncodeModel sends every tensor of m in name order (the order safetensors
// files use). The whole model is validated first, so an invalid one sends
// nothing.
func (e *Encoder) EncodeModel(m Model) error {
	if err := m.Validate(); err != nil {
		return fmt.Errorf("encode model: %w", err)
	}
	order := slices.Clone(m)
	order.Sort()
	for _, t := range order {
		if err := e.encode(t); err != nil {
			return err
		}
	}
	return nil
}

// EncodeTensor sends one tensor: its header, then its data in chunks.
func (e *Encoder) EncodeTensor(t *Tensor) error {
	if err := t.Validate(); err != nil {
		return fmt.Errorf("encode: %w", err)
	}
	return e.encode(t)
}

func (e *Encoder) encode(t *Tensor) error {
	if err := e.sendHeader(t); err != nil {
		return err
	}
	for off := 0; off < len(t.Data); off += MaxChunk {
		end := min(off+MaxChunk, len(t.Data))
		if err := e.emit(&fxv1.TensorFrame{Frame: &fxv1.TensorFrame_Data{Data: t.Data[off:end:end]}}); err != nil {
			return fmt.Errorf("send tensor %q: %w", t.Name, err)
		}
	}
	return nil
}

func (e *Encoder) sendHeader(t *Tensor) error {
	h, err := HeaderToProto(t)
	if err != nil {
		return err
	}
	if err := e.emit(&fxv1.TensorFrame{Frame: &fxv1.TensorFrame_Header{Header: h}}); err != nil {
		return fmt.Errorf("send header of tensor %q: %w", t.Name, err)
	}
	return nil
}

// EncodeFrom sends a tensor whose data is read from r (exactly the size its
// dtype and shape imply), one chunk at a time: how a model is served from a
// file without loading it.
func (e *Encoder) EncodeFrom(name string, dtype DType, shape []int64, r io.Reader) error {
	t := &Tensor{Name: name, DType: dtype, Shape: shape}
	if err := ValidateName(name); err != nil {
		return fmt.Errorf("encode: %w", err)
	}
	size, err := CheckShape(dtype, shape)
	if err != nil {
		return fmt.Errorf("encode tensor %q: %w", name, err)
	}
	if err := e.sendHeader(t); err != nil {
		return err
	}
	if e.buf == nil && size > 0 {
		e.buf = make([]byte, MaxChunk)
	}
	for left := size; left > 0; {
		chunk := e.buf[:min(left, MaxChunk)]
		if _, err := io.ReadFull(r, chunk); err != nil {
			return fmt.Errorf("encode tensor %q: read data: %w", name, noEOF(err))
		}
		if err := e.emit(&fxv1.TensorFrame{Frame: &fxv1.TensorFrame_Data{Data: chunk}}); err != nil {
			return fmt.Errorf("send tensor %q: %w", name, err)
		}
		left -= int64(len(chunk))
	}
	return nil
}

// EncodeSafetensors streams a safetensors file's tensors from r, in the
// order of their data, holding one chunk in memory whatever the model's size.
func (e *Encoder) EncodeSafetensors(r io.Reader) error {
	h, err := ReadHeader(r)
	if err != nil {
		return err
	}
	return e.EncodeTensors(r, h)
}

// EncodeTensors is EncodeSafetensors for a caller that read the header
// from r already (to announce the model's size first, say).
func (e *Encoder) EncodeTensors(r io.Reader, h *Header) error {
	for _, ti := range h.Tensors {
		if err := e.EncodeFrom(ti.Name, ti.DType, ti.Shape, r); err != nil {
			return err
		}
	}
	var one [1]byte
	if n, _ := io.ReadFull(r, one[:]); n > 0 {
		return fmt.Errorf("safetensors: trailing garbage after the %d data bytes the header describes", h.DataSize)
	}
	return nil
}

// ChunkFunc receives one chunk of a tensor as a Decoder reads it: header
// describes the tensor (its Data is nil), data holds whole elements starting
// at element elemOffset. data is part of the frame's own Data (or, for an
// element split across frames, a slice of its own): it stays valid as long
// as the frame's Data does, so a receiver whose frames are fresh (each gRPC
// message is) may keep it without a copy. An error stops the decoder and is
// returned from Decode.
type ChunkFunc func(header *Tensor, elemOffset int64, data []byte) error

// DecoderConfig configures a Decoder.
type DecoderConfig struct {
	// Layout, if set, is the model the stream must carry: every tensor in it,
	// with the same dtypes and shapes, each once, and no other.
	Layout Model
	// OnChunk, if set, receives the data chunk by chunk and the decoder keeps
	// nothing; otherwise the decoder assembles the tensors and Finish returns
	// them.
	OnChunk ChunkFunc
	// Reuse, if set, is a model the caller no longer needs (the last
	// round's): an assembling decoder fills the buffer of its tensor of
	// the same name, dtype and size instead of allocating one, which spares
	// the garbage and the page faults of a fresh model-sized allocation.
	// Its data is overwritten even if decoding fails.
	Reuse Model
	// MaxBytes, if positive, bounds the total data the headers may announce.
	// Without a Layout, it is what stops a sender from making an assembling
	// decoder allocate whatever its headers claim.
	MaxBytes int64
}

// Decoder consumes a frame sequence one frame at a time and refuses any
// deviation from the protocol with an error naming it: data before a header,
// more or fewer bytes than a header implies, a frame over MaxChunk, unknown
// dtypes, negative dimensions, and, against a Layout, unknown, mistyped,
// misshapen, repeated or missing tensors. Errors are sticky: after one, every
// call returns it.
//
// Frames may split data anywhere, even inside an element; OnChunk still sees
// whole elements (the few bytes of a split element are carried over and
// delivered as a chunk of one element).
type Decoder struct {
	cfg    DecoderConfig
	layout map[string]*Tensor
	seen   map[string]bool
	total  int64
	err    error

	cur     *Tensor // tensor being received (assembling: with its Data)
	curSize int64
	got     int64 // bytes of cur received
	carry   [8]byte
	carryN  int
	model   Model
	// received is the data bytes of all tensors so far (Position).
	received int64
}

// Position is how far the decoder got: a sender resuming from it
// (Encoder.ResumeAt) continues the stream where it broke. Meaningful
// while Decode has returned no error.
func (d *Decoder) Position() Position {
	return Position{Tensors: len(d.seen), Bytes: d.received}
}

// NewDecoder returns a Decoder for cfg.
func NewDecoder(cfg DecoderConfig) *Decoder {
	d := &Decoder{cfg: cfg, seen: map[string]bool{}}
	if cfg.Layout != nil {
		d.layout = cfg.Layout.Index()
	}
	return d
}

// Decode consumes one frame.
func (d *Decoder) Decode(f *fxv1.TensorFrame) error {
	if d.err != nil {
		return d.err
	}
	var err error
	switch fr := f.GetFrame().(type) {
	case *fxv1.TensorFrame_Header:
		err = d.header(fr.Header)
	case *fxv1.TensorFrame_Data:
		err = d.data(fr.Data)
	default:
		err = errors.New("frame holds neither a header nor data")
	}
	if err != nil {
		d.err = fmt.Errorf("tensor stream: %w", err)
	}
	return d.err
}

func (d *Decoder) header(h *fxv1.TensorHeader) error {
	if err := d.endTensor(); err != nil {
		return err
	}
	if h == nil {
		return errors.New("empty tensor header")
	}
	t, err := HeaderFromProto(h)
	if err != nil {
		return err
	}
	if d.seen[t.Name] {
		return fmt.Errorf("tensor %q appears twice", t.Name)
	}
	d.seen[t.Name] = true
	if d.layout != nil {
		ref := d.layout[t.Name]
		if ref == nil {
			return fmt.Errorf("unknown tensor %q", t.Name)
		}
		if !SameLayout(ref, t) {
			return fmt.Errorf("tensor %q is %s%v, want %s%v", t.Name, t.DType, t.Shape, ref.DType, ref.Shape)
		}
	}
	size := ByteSize(t.DType, t.Shape) // checked by HeaderFromProto
	d.total += size
	if d.cfg.MaxBytes > 0 && d.total > d.cfg.MaxBytes {
		return fmt.Errorf("tensor %q brings the stream to %d bytes, over the %d-byte limit", t.Name, d.total, d.cfg.MaxBytes)
	}
	d.cur, d.curSize, d.got, d.carryN = t, size, 0, 0
	if d.cfg.OnChunk == nil {
		if old := d.cfg.Reuse.Get(t.Name); old != nil && old.DType == t.DType && int64(len(old.Data)) == size {
			t.Data = old.Data
		} else {
			t.Data = alignedBytes(size)
		}
		d.model = append(d.model, t)
	}
	return nil
}

// endTensor checks that the current tensor got all its bytes.
func (d *Decoder) endTensor() error {
	if d.cur != nil && d.got != d.curSize {
		return fmt.Errorf("tensor %q ended after %d of its %d bytes", d.cur.Name, d.got, d.curSize)
	}
	d.cur = nil
	return nil
}

func (d *Decoder) data(b []byte) error {
	if d.cur == nil {
		if len(d.seen) == 0 {
			return errors.New("data frame before any tensor header")
		}
		return errors.New("data frame after a complete tensor, before the next header")
	}
	if len(b) > MaxChunk {
		return fmt.Errorf("tensor %q: data frame of %d bytes is over the %d-byte limit", d.cur.Name, len(b), MaxChunk)
	}
	if int64(len(b)) > d.curSize-d.got {
		return fmt.Errorf("tensor %q: data frames carry more than its %d bytes", d.cur.Name, d.curSize)
	}
	d.received += int64(len(b))
	if d.cfg.OnChunk == nil {
		copy(d.cur.Data[d.got:], b)
		d.got += int64(len(b))
		return nil
	}
	size := d.cur.DType.Size()
	elem := (d.got - int64(d.carryN)) / int64(size)
	d.got += int64(len(b))
	if d.carryN > 0 {
		need := size - d.carryN
		if len(b) < need {
			d.carryN += copy(d.carry[d.carryN:], b)
			return nil
		}
		copy(d.carry[d.carryN:size], b[:need])
		d.carryN = 0
		if err := d.cfg.OnChunk(d.cur, elem, slices.Clone(d.carry[:size])); err != nil {
			return err
		}
		elem++
		b = b[need:]
	}
	whole := len(b) / size * size
	if whole > 0 {
		if err := d.cfg.OnChunk(d.cur, elem, b[:whole]); err != nil {
			return err
		}
	}
	d.carryN = copy(d.carry[:], b[whole:])
	return nil
}

// Finish checks that the stream ended cleanly — the last tensor complete and,
// with a Layout, no tensor missing — and returns the assembled model (nil when
// chunks went to OnChunk), in the order the tensors arrived.
func (d *Decoder) Finish() (Model, error) {
	if d.err != nil {
		return nil, d.err
	}
	if err := d.endTensor(); err != nil {
		d.err = fmt.Errorf("tensor stream: %w", err)
		return nil, d.err
	}
	for _, t := range d.cfg.Layout {
		if !d.seen[t.Name] {
			d.err = fmt.Errorf("tensor stream: tensor %q is missing", t.Name)
			return nil, d.err
		}
	}
	return d.model, nil
}

// SendModel sends m through send: EncodeModel on a new Encoder.
func SendModel(m Model, send func(*fxv1.TensorFrame) error) error {
	return NewEncoder(send).EncodeModel(m)
}

// ReceiveModel assembles the model carried by the frames recv returns until
// it returns io.EOF (as a gRPC stream's Recv does at the end).
func ReceiveModel(recv func() (*fxv1.TensorFrame, error)) (Model, error) {
	return Receive(DecoderConfig{}, recv)
}

// Receive feeds the frames recv returns, until io.EOF, to a Decoder built from
// cfg and returns what Finish does: the assembled model, or nil when cfg sends
// the chunks to OnChunk. Any other error from recv is returned wrapped.
func Receive(cfg DecoderConfig, recv func() (*fxv1.TensorFrame, error)) (Model, error) {
	d := NewDecoder(cfg)
	for {
		f, err := recv()
		if errors.Is(err, io.EOF) {
			return d.Finish()
		}
		if err != nil {
			return nil, fmt.Errorf("tensor stream: receive: %w", err)
		}
		if err := d.Decode(f); err != nil {
			return nil, err
		}
	}
}
