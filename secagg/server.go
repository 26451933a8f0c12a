package secagg

import (
	"crypto/ecdh"
	"encoding/binary"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"

	"github.com/fx-fl/fx/internal/parallel"
	"github.com/fx-fl/fx/tensor"
)

// ServerConfig is the aggregator's side of one round.
type ServerConfig struct {
	Session   Session
	Threshold int     // t, as in ParticipantConfig
	Range     float64 // R, as in ParticipantConfig
	// Layout is the float tensors the participants sum, in the order that
	// numbers them (MaskChunk's tensorIndex); only names, dtypes and shapes
	// are used. The mean comes back in these dtypes.
	Layout tensor.Model
}

// Server runs the aggregator's side of one round. Its phases follow the
// protocol, each closed by the call that produces the next message:
//
//	s.Advertise(adv) for each participant; keys, _ := s.KeyList()  // U1, to all
//	s.Shares(enc) for each; bundles, _ := s.Bundles()             // U2, each its bundle
//	s.AddMaskedChunk(id, t, off, masked) …; s.InputDone(id)        // folds into Σ mod 2^32
//	req, _ := s.UnmaskRequest()                                   // U3 and U2\U3, to all
//	s.AddUnmaskResponse(resp) for each; res, _ := s.Result()      // at least t
//	res.MeanChunk(…) or res.Model()
//
// Memory is the running sum, 4 bytes per element, plus per participant its
// progress through the layout; masks are made a block at a time.
type Server struct {
	cfg   ServerConfig
	fp    fixedPoint
	elems []int64 // per tensor
	base  []int64 // per tensor: index of its element 0 among all, for lock striping

	mu        sync.Mutex
	phase     int
	adverts   map[string]*AdvertiseKeys
	keys      *KeyList
	index     map[string]int
	shares    map[string]*EncryptedShares
	u2        []string
	progress  map[string][]int64 // next element expected, per tensor
	done      map[string]bool
	request   *UnmaskRequest
	responses map[string]*UnmaskResponse

	gate    sync.RWMutex // read-held by folds, write-held to close the inputs
	sums    [][]uint32
	stripes [lockStripes]paddedMutex
}

const (
	phaseAdvertise = iota
	phaseShares
	phaseInputs
	phaseUnmask
	phaseDone
)

var phaseNames = []string{"collecting key advertisements", "collecting encrypted shares", "collecting masked inputs", "collecting unmask responses", "closed"}

const (
	lockBlock   = 1 << 16 // elements per fold lock
	lockStripes = 64
)

// paddedMutex keeps each stripe on its own cache line.
type paddedMutex struct {
	sync.Mutex
	_ [64 - 8]byte
}

// NewServer checks the configuration and allocates the zero sum.
func NewServer(cfg ServerConfig) (*Server, error) {
	if err := checkParams(cfg.Threshold, cfg.Range, 1); err != nil {
		return nil, fmt.Errorf("secure aggregation: %w", err)
	}
	if err := cfg.Session.validate(); err != nil {
		return nil, fmt.Errorf("secure aggregation: %w", err)
	}
	if len(cfg.Layout) == 0 {
		return nil, fmt.Errorf("secure aggregation: empty layout")
	}
	fp, _ := newFixedPoint(cfg.Range)
	s := &Server{cfg: cfg, fp: fp, adverts: map[string]*AdvertiseKeys{}}
	var base int64
	for _, t := range cfg.Layout {
		if !t.DType.IsFloat() {
			return nil, fmt.Errorf("secure aggregation: tensor %q is %s: only float tensors are summed; leave the others out of the layout", t.Name, t.DType)
		}
		if _, err := tensor.CheckShape(t.DType, t.Shape); err != nil {
			return nil, fmt.Errorf("secure aggregation: tensor %q: %w", t.Name, err)
		}
		n := t.Elements()
		s.elems = append(s.elems, n)
		s.base = append(s.base, base)
		s.sums = append(s.sums, make([]uint32, n))
		base += n
	}
	return s, nil
}

func (s *Server) errorf(format string, args ...any) error {
	return fmt.Errorf("secure aggregation: %s: %s", s.cfg.Session, fmt.Sprintf(format, args...))
}

func (s *Server) in(phase int, what string) error {
	if s.phase != phase {
		return s.errorf("%s, but the round is %s", what, phaseNames[s.phase])
	}
	return nil
}

func (s *Server) checkSession(got Session, what, from string) error {
	if got != s.cfg.Session {
		return s.errorf("%s from %q is for %s: replayed or misrouted", what, from, got)
	}
	return nil
}

// Advertise records a participant's keys (round 0).
func (s *Server) Advertise(a *AdvertiseKeys) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.in(phaseAdvertise, fmt.Sprintf("key advertisement from %q", a.From)); err != nil {
		return err
	}
	if err := s.checkSession(a.Session, "key advertisement", a.From); err != nil {
		return err
	}
	if err := validateID(a.From); err != nil {
		return s.errorf("key advertisement: %v", err)
	}
	if !(a.Weight > 0) || math.IsInf(a.Weight, 0) {
		return s.errorf("key advertisement from %q: weight %v, want a positive finite number", a.From, a.Weight)
	}
	if _, dup := s.adverts[a.From]; dup {
		return s.errorf("%q advertised its keys twice", a.From)
	}
	if len(s.adverts) == maxParticipant {
		return s.errorf("more than %d participants", maxParticipant)
	}
	s.adverts[a.From] = a
	return nil
}

// KeyList closes round 0 and returns U1's keys for every participant; it
// needs at least t advertisements.
func (s *Server) KeyList() (*KeyList, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.keys != nil {
		return s.keys, nil
	}
	if len(s.adverts) < s.cfg.Threshold {
		return nil, s.errorf("%d participants advertised keys, fewer than the threshold %d", len(s.adverts), s.cfg.Threshold)
	}
	kl := &KeyList{Session: s.cfg.Session, Threshold: s.cfg.Threshold, Range: s.cfg.Range}
	for _, a := range s.adverts {
		kl.Peers = append(kl.Peers, PeerKeys{ID: a.From, Weight: a.Weight, CipherKey: a.CipherKey, MaskKey: a.MaskKey})
	}
	slices.SortFunc(kl.Peers, func(a, b PeerKeys) int { return strings.Compare(a.ID, b.ID) })
	s.index = make(map[string]int, len(kl.Peers))
	for i, p := range kl.Peers {
		s.index[p.ID] = i
	}
	s.keys, s.shares, s.phase = kl, map[string]*EncryptedShares{}, phaseShares
	return kl, nil
}

// Shares records a participant's sealed shares (round 1): one for every
// other member of U1.
func (s *Server) Shares(e *EncryptedShares) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.in(phaseShares, fmt.Sprintf("encrypted shares from %q", e.From)); err != nil {
		return err
	}
	if err := s.checkSession(e.Session, "encrypted shares", e.From); err != nil {
		return err
	}
	if _, ok := s.index[e.From]; !ok {
		return s.errorf("encrypted shares from %q, who is not in the key list", e.From)
	}
	if _, dup := s.shares[e.From]; dup {
		return s.errorf("%q sent its encrypted shares twice", e.From)
	}
	if err := checkSealed(e.Shares, func(x SealedShare) string { return x.To }, "encrypted shares"); err != nil {
		return s.errorf("encrypted shares from %q: %v", e.From, err)
	}
	var to []string
	for _, x := range e.Shares {
		if x.From != e.From {
			return s.errorf("encrypted shares from %q hold a share marked as from %q", e.From, x.From)
		}
		to = append(to, x.To)
	}
	others := slices.DeleteFunc(peerIDs(s.keys.Peers), func(id string) bool { return id == e.From })
	if !slices.Equal(to, others) {
		return s.errorf("encrypted shares from %q are addressed to %v, want every other participant %v", e.From, to, others)
	}
	s.shares[e.From] = e
	return nil
}

// Bundles closes round 1: U2 is who sent shares, at least t of them, and
// each member gets the shares the others sealed to it.
func (s *Server) Bundles() (map[string]*ShareBundle, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.in(phaseShares, "closing the shares"); err != nil {
		return nil, err
	}
	if len(s.shares) < s.cfg.Threshold {
		return nil, s.errorf("%d participants sent encrypted shares, fewer than the threshold %d", len(s.shares), s.cfg.Threshold)
	}
	for id := range s.shares {
		s.u2 = append(s.u2, id)
	}
	slices.Sort(s.u2)
	out := make(map[string]*ShareBundle, len(s.u2))
	for _, v := range s.u2 {
		out[v] = &ShareBundle{Session: s.cfg.Session, To: v}
	}
	for _, u := range s.u2 { // sorted, so each bundle is sorted by sender
		for _, x := range s.shares[u].Shares {
			if b, ok := out[x.To]; ok {
				b.Shares = append(b.Shares, x)
			}
		}
	}
	s.progress = make(map[string][]int64, len(s.u2))
	for _, v := range s.u2 {
		s.progress[v] = make([]int64, len(s.elems))
	}
	s.done = map[string]bool{}
	s.phase = phaseInputs
	return out, nil
}

// AddMaskedChunk folds a masked chunk (MaskChunk's output: little-endian
// uint32, 4 bytes per element) of participant from into the sum, mod 2^32.
// Each participant's chunks of a tensor come in order, each starting where
// the last ended, so an upload that breaks can resume where it stopped.
// Fold only what you will count: a participant whose input is left
// incomplete fails the round (see UnmaskRequest), so stage an upload and
// fold it once whole, as tensor.Accumulator does.
func (s *Server) AddMaskedChunk(from string, tensorIndex int, elemOffset int64, masked []byte) error {
	s.gate.RLock()
	defer s.gate.RUnlock()
	s.mu.Lock()
	if err := s.in(phaseInputs, fmt.Sprintf("masked chunk from %q", from)); err != nil {
		s.mu.Unlock()
		return err
	}
	prog, ok := s.progress[from]
	if !ok {
		s.mu.Unlock()
		return s.errorf("masked chunk from %q, who did not send shares", from)
	}
	if s.done[from] {
		s.mu.Unlock()
		return s.errorf("masked chunk from %q after its input was complete", from)
	}
	if tensorIndex < 0 || tensorIndex >= len(s.elems) {
		s.mu.Unlock()
		return s.errorf("masked chunk from %q for tensor %d: the layout has %d", from, tensorIndex, len(s.elems))
	}
	n := int64(len(masked) / 4)
	if len(masked)%4 != 0 || elemOffset != prog[tensorIndex] || elemOffset+n > s.elems[tensorIndex] {
		s.mu.Unlock()
		return s.errorf("masked chunk from %q for tensor %q: %d bytes at element %d, want whole 4-byte elements from element %d within its %d", from, s.cfg.Layout[tensorIndex].Name, len(masked), elemOffset, prog[tensorIndex], s.elems[tensorIndex])
	}
	prog[tensorIndex] += n
	s.mu.Unlock()

	sum := s.sums[tensorIndex][elemOffset : elemOffset+n]
	for lo := int64(0); lo < n; {
		g := s.base[tensorIndex] + elemOffset + lo
		hi := min(n, lo+lockBlock-g%lockBlock)
		m := &s.stripes[(g/lockBlock)%lockStripes]
		m.Lock()
		d, src := sum[lo:hi], masked[4*lo:4*hi]
		if w, ok := tensor.View[uint32](src); ok {
			for i, v := range w[:len(d)] {
				d[i] += v
			}
		} else {
			for i := range d {
				d[i] += binary.LittleEndian.Uint32(src[4*i:])
			}
		}
		m.Unlock()
		lo = hi
	}
	return nil
}

// InputDone marks participant from's masked input complete: it is in U3.
func (s *Server) InputDone(from string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.in(phaseInputs, fmt.Sprintf("input of %q completed", from)); err != nil {
		return err
	}
	prog, ok := s.progress[from]
	if !ok {
		return s.errorf("input of %q completed, who did not send shares", from)
	}
	for i, p := range prog {
		if p != s.elems[i] {
			return s.errorf("input of %q is incomplete: tensor %q has %d of %d elements", from, s.cfg.Layout[i].Name, p, s.elems[i])
		}
	}
	s.done[from] = true
	return nil
}

// UnmaskRequest closes the inputs (waiting for folds under way) and names
// the survivors U3, whose input is complete, and the dropped U2 \ U3. It
// fails if fewer than t survived, or if a participant's input is partly in
// the sum: neither can be unmasked without revealing something.
func (s *Server) UnmaskRequest() (*UnmaskRequest, error) {
	s.gate.Lock()
	defer s.gate.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.request != nil {
		return s.request, nil
	}
	if err := s.in(phaseInputs, "closing the inputs"); err != nil {
		return nil, err
	}
	req := &UnmaskRequest{Session: s.cfg.Session}
	for _, v := range s.u2 {
		if s.done[v] {
			req.Survivors = append(req.Survivors, v)
			continue
		}
		for i, p := range s.progress[v] {
			if p != 0 {
				s.phase = phaseDone
				return nil, s.errorf("the masked input of %q is incomplete (tensor %q has %d of %d elements) and already in the sum: the round cannot be unmasked", v, s.cfg.Layout[i].Name, p, s.elems[i])
			}
		}
		req.Dropped = append(req.Dropped, v)
	}
	if len(req.Survivors) < s.cfg.Threshold {
		s.phase = phaseDone
		return nil, s.errorf("%d participants sent their masked input (%s), fewer than the threshold %d: the round cannot close securely", len(req.Survivors), strings.Join(req.Survivors, ", "), s.cfg.Threshold)
	}
	s.request, s.responses, s.phase = req, map[string]*UnmaskResponse{}, phaseUnmask
	return req, nil
}

// AddUnmaskResponse records a participant's shares (round 4).
func (s *Server) AddUnmaskResponse(r *UnmaskResponse) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.in(phaseUnmask, fmt.Sprintf("unmask response from %q", r.From)); err != nil {
		return err
	}
	if err := s.checkSession(r.Session, "unmask response", r.From); err != nil {
		return err
	}
	if _, ok := s.progress[r.From]; !ok {
		return s.errorf("unmask response from %q, who did not send shares", r.From)
	}
	if _, dup := s.responses[r.From]; dup {
		return s.errorf("%q answered the unmask request twice", r.From)
	}
	if got := revealedNames(r.SelfMasks); !slices.Equal(got, s.request.Survivors) {
		return s.errorf("unmask response from %q has self-mask shares of %v, want the survivors %v", r.From, got, s.request.Survivors)
	}
	if got := revealedNames(r.MaskKeys); !slices.Equal(got, s.request.Dropped) {
		return s.errorf("unmask response from %q has mask-key shares of %v, want the dropped %v", r.From, got, s.request.Dropped)
	}
	s.responses[r.From] = r
	return nil
}

// Result closes the round: with shares from at least t responders it
// reconstructs every survivor's self-mask seed and every dropped
// participant's mask key, checks each against its commitment or public key
// (a corrupt share is an error naming whose secret it garbled), and returns
// the Result that removes the masks.
func (s *Server) Result() (*Result, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.in(phaseUnmask, "closing the unmasking"); err != nil {
		return nil, err
	}
	var from []string
	for id := range s.responses {
		from = append(from, id)
	}
	slices.Sort(from)
	if len(from) < s.cfg.Threshold {
		return nil, s.errorf("%d participants answered the unmask request (%s), fewer than the threshold %d: the masks cannot be removed", len(from), strings.Join(from, ", "), s.cfg.Threshold)
	}
	xs := make([]int, len(from))
	for i, id := range from {
		xs[i] = s.index[id] + 1
	}
	shares := func(of string, pick func(*UnmaskResponse) []RevealedShare) [][]byte {
		ys := make([][]byte, len(from))
		for i, id := range from {
			rs := pick(s.responses[id])
			j, _ := slices.BinarySearchFunc(rs, of, func(r RevealedShare, of string) int { return strings.Compare(r.Of, of) })
			ys[i] = rs[j].Value[:]
		}
		return ys
	}
	res := &Result{s: s}
	w1, w3 := 0.0, 0.0
	for _, p := range s.keys.Peers {
		w1 += p.Weight
	}
	for _, u := range s.request.Survivors {
		w3 += s.keys.Peers[s.index[u]].Weight
		seed, err := combineShares(xs, shares(u, func(r *UnmaskResponse) []RevealedShare { return r.SelfMasks }))
		if err == nil && commitSeed(seed, s.cfg.Session, u) != s.shares[u].Commitment {
			err = fmt.Errorf("it does not match %q's commitment", u)
		}
		if err != nil {
			return nil, s.errorf("reconstructing the self-mask seed of %q from the shares of %s: %v: one of those shares is corrupt", u, strings.Join(from, ", "), err)
		}
		key, err := selfMaskKey(seed, s.cfg.Session, u)
		if err != nil {
			return nil, s.errorf("self mask of %q: %v", u, err)
		}
		st, err := newStream(key, true)
		if err != nil {
			return nil, s.errorf("self mask of %q: %v", u, err)
		}
		res.streams = append(res.streams, st)
	}
	for _, v := range s.request.Dropped {
		raw, err := combineShares(xs, shares(v, func(r *UnmaskResponse) []RevealedShare { return r.MaskKeys }))
		var sk *ecdh.PrivateKey
		if err == nil {
			sk, err = ecdh.X25519().NewPrivateKey(raw)
		}
		if err == nil && !slices.Equal(sk.PublicKey().Bytes(), s.keys.Peers[s.index[v]].MaskKey[:]) {
			err = fmt.Errorf("it does not match %q's advertised public key", v)
		}
		if err != nil {
			return nil, s.errorf("reconstructing the mask key of %q from the shares of %s: %v: one of those shares is corrupt", v, strings.Join(from, ", "), err)
		}
		for _, u := range s.request.Survivors {
			key, err := agree(sk, s.keys.Peers[s.index[u]].MaskKey[:], labelPairMask, s.cfg.Session, u, v)
			if err != nil {
				return nil, s.errorf("pairwise mask of %q and %q: %v", u, v, err)
			}
			// u added the pair's mask if its name is lower, so take it off.
			st, err := newStream(key, u < v)
			if err != nil {
				return nil, s.errorf("pairwise mask of %q and %q: %v", u, v, err)
			}
			res.streams = append(res.streams, st)
		}
	}
	res.scale = w1 / w3
	res.weight = w3
	s.phase = phaseDone
	return res, nil
}

// Result removes the masks from the closed round's sum, chunk by chunk, and
// decodes the survivors' weighted mean. It is safe for concurrent use.
type Result struct {
	s       *Server
	streams []stream // the survivors' self masks, then pairwise masks with the dropped
	scale   float64  // W(U1) / W(U3): each input was weighted by w / W(U1)
	weight  float64
}

// TotalWeight is the survivors' total weight, the FedAvg denominator.
func (r *Result) TotalWeight() float64 { return r.weight }

// Survivors are the participants whose inputs the mean holds.
func (r *Result) Survivors() []string { return slices.Clone(r.s.request.Survivors) }

// MeanChunk writes the mean of elements elemOffset… of tensor tensorIndex
// into dst, len(dst)/dtype.Size() elements of dtype, little-endian: the
// weighted mean of the survivors' clipped inputs, within the fixed-point
// precision (see the package documentation).
func (r *Result) MeanChunk(tensorIndex int, elemOffset int64, dst []byte, dtype tensor.DType) error {
	s := r.s
	if s.sums == nil {
		return s.errorf("mean chunk: the sum was released")
	}
	size := dtype.Size()
	if !dtype.IsFloat() || tensorIndex < 0 || tensorIndex >= len(s.elems) || len(dst)%size != 0 ||
		elemOffset < 0 || elemOffset+int64(len(dst)/size) > s.elems[tensorIndex] {
		return s.errorf("mean chunk: %d bytes of %s at element %d of tensor %d is not within the layout", len(dst), dtype, elemOffset, tensorIndex)
	}
	n := len(dst) / size
	unit := s.fp.unit(r.scale)
	wp := wordPool.Get().(*[]uint32)
	defer wordPool.Put(wp)
	for lo := 0; lo < n; lo += maskBlock {
		hi := min(lo+maskBlock, n)
		w := (*wp)[:hi-lo]
		off := elemOffset + int64(lo)
		copy(w, s.sums[tensorIndex][off:])
		applyStreams(w, r.streams, tensorIndex, off)
		out := dst[lo*size:]
		switch dtype {
		case tensor.F32:
			for i, v := range w {
				binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(float32(decode(v, unit))))
			}
		case tensor.F64:
			for i, v := range w {
				binary.LittleEndian.PutUint64(out[8*i:], math.Float64bits(decode(v, unit)))
			}
		case tensor.F16:
			for i, v := range w {
				binary.LittleEndian.PutUint16(out[2*i:], tensor.Float32ToF16(float32(decode(v, unit))))
			}
		case tensor.BF16:
			for i, v := range w {
				binary.LittleEndian.PutUint16(out[2*i:], tensor.Float32ToBF16(float32(decode(v, unit))))
			}
		}
	}
	return nil
}

// Release gives the sum's memory back once the mean has been read: a
// caller that keeps the Server or the Result (a record of the round) need
// not keep a model's worth of words with it. Call it after the last
// MeanChunk or Model has returned; they fail from then on.
func (r *Result) Release() {
	s := r.s
	s.gate.Lock()
	defer s.gate.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sums = nil
}

// Model returns the mean as tensors of the layout, unmasked a chunk at a
// time on all cores.
func (r *Result) Model() (tensor.Model, error) {
	const chunk = 1 << 18
	type job struct {
		t   int
		off int64
		dst []byte
	}
	out := make(tensor.Model, len(r.s.cfg.Layout))
	var jobs []job
	for i, l := range r.s.cfg.Layout {
		t := tensor.New(l.Name, l.DType, slices.Clone(l.Shape))
		out[i] = t
		size := int64(l.DType.Size())
		for off := int64(0); off < r.s.elems[i]; off += chunk {
			end := min(off+chunk, r.s.elems[i])
			jobs = append(jobs, job{i, off, t.Data[off*size : end*size]})
		}
	}
	err := parallel.Each(len(jobs), func() func(int) error {
		return func(k int) error {
			j := jobs[k]
			return r.MeanChunk(j.t, j.off, j.dst, out[j.t].DType)
		}
	})
	return out, err
}
