package secagg

import (
	"crypto/ecdh"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"math"
	"slices"
	"sync"

	"github.com/fx-fl/fx/tensor"
)

// ParticipantConfig is one site's part in one round.
type ParticipantConfig struct {
	Session Session
	// ID is the participant's name: its collaborator name, the CN of its
	// certificate. Names order the participants (which of a pair adds and
	// which subtracts their mask) and give their Shamir x-coordinates.
	ID string
	// Threshold t is how many participants must survive, and answer the
	// unmasking, for the round to close; t−1 colluding participants learn
	// nothing from the shares they hold. It comes from the plan, not from
	// the server, and the participant refuses a key list that says otherwise.
	Threshold int
	// Range R clips every value to [−R, R] before fixed-point encoding.
	Range float64
	// Weight is the participant's public FedAvg weight (sample count); see
	// AdvertiseKeys.Weight.
	Weight float64
}

// Participant runs one site's side of one round:
//
//	adv, _ := p.Advertise()                 // round 0 → server
//	shares, _ := p.ShareKeys(keyList)       // round 1 → server
//	m, _ := p.Masker(bundle)                // round 2: masks against U2
//	for each chunk: masked, _ := m.MaskChunk(t, off, raw, dtype, buf) → server
//	resp, _ := p.Unmask(request)            // round 4 → server
//
// Each step refuses to run out of order, and every message is checked
// against the session, the sender and the recipient it should carry.
// A Participant is for one round: keys are fresh each round.
type Participant struct {
	cfg ParticipantConfig
	fp  fixedPoint

	mu       sync.Mutex
	step     int // the next call the participant accepts
	cKey     *ecdh.PrivateKey
	sKey     *ecdh.PrivateKey
	keys     *KeyList
	index    map[string]int // U1 name → position
	weight   float64        // this participant's share of U1's total weight
	peers    []string       // U2, self included, once the bundle arrived
	held     map[string][2][shareSize]byte
	reveals  map[string]revealKind // per peer, what this participant disclosed
	selfSeed []byte                // b
}

// revealKind is which of a peer's secrets a participant disclosed a share of.
type revealKind int

const (
	revealSelfMask revealKind = iota + 1 // b: the peer's input was counted
	revealMaskKey                        // s^SK: the peer dropped
)

func (k revealKind) String() string {
	if k == revealSelfMask {
		return "self-mask seed b"
	}
	return "mask key s^SK"
}

const (
	stepAdvertise = iota
	stepShare
	stepMask
	stepUnmask
)

var stepNames = []string{"Advertise", "ShareKeys", "Masker", "Unmask"}

func checkParams(threshold int, r, weight float64) error {
	if threshold < 2 {
		return fmt.Errorf("threshold %d: want at least 2 (with 1 the server could unmask one participant's input)", threshold)
	}
	if _, err := newFixedPoint(r); err != nil {
		return err
	}
	if !(weight > 0) || math.IsInf(weight, 0) {
		return fmt.Errorf("weight %v: want a positive finite number", weight)
	}
	return nil
}

// NewParticipant checks the configuration.
func NewParticipant(cfg ParticipantConfig) (*Participant, error) {
	if err := validateID(cfg.ID); err != nil {
		return nil, fmt.Errorf("secure aggregation: %w", err)
	}
	if err := cfg.Session.validate(); err != nil {
		return nil, fmt.Errorf("secure aggregation: participant %q: %w", cfg.ID, err)
	}
	if err := checkParams(cfg.Threshold, cfg.Range, cfg.Weight); err != nil {
		return nil, fmt.Errorf("secure aggregation: participant %q: %w", cfg.ID, err)
	}
	fp, _ := newFixedPoint(cfg.Range)
	return &Participant{cfg: cfg, fp: fp, reveals: map[string]revealKind{}}, nil
}

func (p *Participant) errorf(format string, args ...any) error {
	return fmt.Errorf("secure aggregation: participant %q, %s: %s", p.cfg.ID, p.cfg.Session, fmt.Sprintf(format, args...))
}

func (p *Participant) at(step int) error {
	if p.step != step {
		return p.errorf("%s called, but the next step is %s", stepNames[step], stepNames[min(p.step, len(stepNames)-1)])
	}
	return nil
}

// checkSession refuses a message of another round or experiment: replayed,
// or routed to the wrong place.
func (p *Participant) checkSession(s Session, what string) error {
	if s != p.cfg.Session {
		return p.errorf("%s is for %s: replayed or misrouted", what, s)
	}
	return nil
}

// Advertise makes the round's two key pairs and returns their public halves.
func (p *Participant) Advertise() (*AdvertiseKeys, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.at(stepAdvertise); err != nil {
		return nil, err
	}
	c, err := newKeyPair()
	if err != nil {
		return nil, p.errorf("key pair: %v", err)
	}
	s, err := newKeyPair()
	if err != nil {
		return nil, p.errorf("key pair: %v", err)
	}
	p.cKey, p.sKey = c, s
	m := &AdvertiseKeys{Session: p.cfg.Session, From: p.cfg.ID, Weight: p.cfg.Weight}
	copy(m.CipherKey[:], c.PublicKey().Bytes())
	copy(m.MaskKey[:], s.PublicKey().Bytes())
	p.step = stepShare
	return m, nil
}

// ShareKeys checks the server's key list (this round, the plan's threshold
// and range, at least t participants, this participant's keys as it sent
// them, no key twice), draws the self-mask seed b, and seals to every other
// member of U1 its shares of s^SK and b.
func (p *Participant) ShareKeys(keys *KeyList) (*EncryptedShares, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.at(stepShare); err != nil {
		return nil, err
	}
	if err := p.checkSession(keys.Session, "the key list"); err != nil {
		return nil, err
	}
	if keys.Threshold != p.cfg.Threshold || keys.Range != p.cfg.Range {
		return nil, p.errorf("the key list says threshold %d and range %v, the plan says %d and %v", keys.Threshold, keys.Range, p.cfg.Threshold, p.cfg.Range)
	}
	if err := checkList(peerIDs(keys.Peers), "key list"); err != nil {
		return nil, p.errorf("%v", err)
	}
	if len(keys.Peers) < p.cfg.Threshold {
		return nil, p.errorf("the key list has %d participants, fewer than the threshold %d", len(keys.Peers), p.cfg.Threshold)
	}
	seen := map[[32]byte]string{}
	index := make(map[string]int, len(keys.Peers))
	total := 0.0
	for i, k := range keys.Peers {
		for _, key := range [][32]byte{k.CipherKey, k.MaskKey} {
			if other, dup := seen[key]; dup {
				return nil, p.errorf("the key list repeats a public key (%q and %q)", other, k.ID)
			}
			seen[key] = k.ID
		}
		if !(k.Weight > 0) || math.IsInf(k.Weight, 0) {
			return nil, p.errorf("the key list gives %q weight %v", k.ID, k.Weight)
		}
		index[k.ID] = i
		total += k.Weight
	}
	me, ok := index[p.cfg.ID]
	if !ok {
		return nil, p.errorf("the key list leaves this participant out")
	}
	mine := keys.Peers[me]
	if mine.Weight != p.cfg.Weight || !slices.Equal(mine.CipherKey[:], p.cKey.PublicKey().Bytes()) || !slices.Equal(mine.MaskKey[:], p.sKey.PublicKey().Bytes()) {
		return nil, p.errorf("the key list does not hold this participant's keys and weight as it advertised them")
	}

	seed := make([]byte, secretSize)
	rand.Read(seed)
	n, t := len(keys.Peers), p.cfg.Threshold
	sShares, err := splitSecret(p.sKey.Bytes(), t, n)
	if err != nil {
		return nil, p.errorf("%v", err)
	}
	bShares, err := splitSecret(seed, t, n)
	if err != nil {
		return nil, p.errorf("%v", err)
	}
	out := &EncryptedShares{Session: p.cfg.Session, From: p.cfg.ID, Commitment: commitSeed(seed, p.cfg.Session, p.cfg.ID)}
	for i, k := range keys.Peers {
		if i == me {
			continue
		}
		key, err := agree(p.cKey, k.CipherKey[:], labelShareKey, p.cfg.Session, p.cfg.ID, k.ID)
		if err != nil {
			return nil, p.errorf("with %q: %v", k.ID, err)
		}
		sealed, err := seal(key, append(slices.Clone(sShares[i]), bShares[i]...), shareAD(p.cfg.Session, p.cfg.ID, k.ID))
		if err != nil {
			return nil, p.errorf("sealing the share for %q: %v", k.ID, err)
		}
		out.Shares = append(out.Shares, SealedShare{From: p.cfg.ID, To: k.ID, Sealed: sealed})
	}
	var own [2][shareSize]byte
	copy(own[0][:], sShares[me])
	copy(own[1][:], bShares[me])
	p.held = map[string][2][shareSize]byte{p.cfg.ID: own}
	p.keys, p.index, p.weight = keys, index, p.cfg.Weight/total
	p.selfSeed = seed
	p.step = stepMask
	return out, nil
}

// Masker checks and opens the shares sealed to this participant by the
// members of U2, and returns the Masker of its input: masked against exactly
// those peers, since only their masks the server can remove if they drop.
// A share that fails to open is an error naming its sender: tampered with,
// or sealed for another round, experiment or recipient.
func (p *Participant) Masker(bundle *ShareBundle) (*Masker, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.at(stepMask); err != nil {
		return nil, err
	}
	if err := p.checkSession(bundle.Session, "the share bundle"); err != nil {
		return nil, err
	}
	if bundle.To != p.cfg.ID {
		return nil, p.errorf("the share bundle is addressed to %q", bundle.To)
	}
	if err := checkSealed(bundle.Shares, func(s SealedShare) string { return s.From }, "share bundle"); err != nil {
		return nil, p.errorf("%v", err)
	}
	peers := []string{p.cfg.ID}
	for _, s := range bundle.Shares {
		i, ok := p.index[s.From]
		if !ok || s.From == p.cfg.ID {
			return nil, p.errorf("the share bundle holds a share from %q, who is not another participant of the key list", s.From)
		}
		if s.To != p.cfg.ID {
			return nil, p.errorf("the share from %q is addressed to %q", s.From, s.To)
		}
		key, err := agree(p.cKey, p.keys.Peers[i].CipherKey[:], labelShareKey, p.cfg.Session, s.From, p.cfg.ID)
		if err != nil {
			return nil, p.errorf("with %q: %v", s.From, err)
		}
		plain, err := open(key, s.Sealed, shareAD(p.cfg.Session, s.From, p.cfg.ID))
		if err != nil {
			return nil, p.errorf("the share from %q to %q fails authentication: tampered with, or sealed for another round, experiment, sender or recipient (%v)", s.From, p.cfg.ID, err)
		}
		var h [2][shareSize]byte
		copy(h[0][:], plain[:shareSize])
		copy(h[1][:], plain[shareSize:])
		p.held[s.From] = h
		peers = append(peers, s.From)
	}
	slices.Sort(peers)
	if len(peers) < p.cfg.Threshold {
		return nil, p.errorf("%d participants sent their shares, fewer than the threshold %d", len(peers), p.cfg.Threshold)
	}
	m := &Masker{fp: p.fp, weight: p.weight}
	key, err := selfMaskKey(p.selfSeed, p.cfg.Session, p.cfg.ID)
	if err != nil {
		return nil, p.errorf("self mask: %v", err)
	}
	st, err := newStream(key, false)
	if err != nil {
		return nil, p.errorf("self mask: %v", err)
	}
	m.streams = append(m.streams, st)
	for _, v := range peers {
		if v == p.cfg.ID {
			continue
		}
		key, err := agree(p.sKey, p.keys.Peers[p.index[v]].MaskKey[:], labelPairMask, p.cfg.Session, p.cfg.ID, v)
		if err != nil {
			return nil, p.errorf("pairwise mask with %q: %v", v, err)
		}
		// The lower name adds the pair's mask, the higher subtracts it.
		st, err := newStream(key, p.cfg.ID > v)
		if err != nil {
			return nil, p.errorf("pairwise mask with %q: %v", v, err)
		}
		m.streams = append(m.streams, st)
	}
	p.peers = peers
	p.step = stepUnmask
	return m, nil
}

// Masker masks one participant's input chunk by chunk. MaskChunk may be
// called concurrently for different chunks. Mask each element once: two
// different values masked at the same position would give the server their
// difference, so a Masker is for one update (a resent chunk of the same
// update is the same bytes, which is harmless).
type Masker struct {
	fp      fixedPoint
	weight  float64
	streams []stream // the self mask, then the pairwise masks
}

// Streams is how many PRG streams make a chunk's mask: the self mask and
// one per other member of U2, so |U2| in all.
func (m *Masker) Streams() int { return len(m.streams) }

var wordPool = sync.Pool{New: func() any { b := make([]uint32, maskBlock); return &b }}

// MaskChunk encodes the elements of raw (dtype, little-endian; elements
// elemOffset… of the tensor at tensorIndex in the round's agreed layout),
// clipped and weighted, in fixed point, adds the masks, and appends the
// result to dst[:0] as little-endian uint32, 4 bytes per element whatever
// the dtype. A NaN or Inf is an error naming the element.
func (m *Masker) MaskChunk(tensorIndex int, elemOffset int64, raw []byte, dtype tensor.DType, dst []byte) ([]byte, error) {
	size := dtype.Size()
	if !dtype.IsFloat() {
		return nil, fmt.Errorf("secure aggregation: tensor %d is %s: only float tensors are summed", tensorIndex, dtype)
	}
	if tensorIndex < 0 || elemOffset < 0 || len(raw)%size != 0 {
		return nil, fmt.Errorf("secure aggregation: chunk of tensor %d at element %d: %d bytes is not whole %s elements at a valid position", tensorIndex, elemOffset, len(raw), dtype)
	}
	n := len(raw) / size
	dst = slices.Grow(dst[:0], 4*n)[:4*n]
	wp := wordPool.Get().(*[]uint32)
	defer wordPool.Put(wp)
	for lo := 0; lo < n; lo += maskBlock {
		hi := min(lo+maskBlock, n)
		w := (*wp)[:hi-lo]
		if err := m.fp.encode(w, raw[lo*size:hi*size], dtype, m.weight, elemOffset+int64(lo)); err != nil {
			return nil, fmt.Errorf("secure aggregation: tensor %d: %w", tensorIndex, err)
		}
		applyStreams(w, m.streams, tensorIndex, elemOffset+int64(lo))
		out := dst[4*lo : 4*hi]
		if o, ok := tensor.View[uint32](out); ok {
			copy(o, w)
		} else {
			for i, v := range w {
				binary.LittleEndian.PutUint32(out[4*i:], v)
			}
		}
	}
	return dst, nil
}

// Unmask answers the server's unmask request: this participant's shares of
// the self-mask seed b of every survivor and of the mask key s^SK of every
// dropped participant. It checks that the two lists split U2 exactly as this
// participant saw it and that at least t survived, and it never discloses
// both secrets of one peer: once it has given a share of one of them, in
// this or an earlier request, a request for the other is refused, since the
// two together would unmask that peer's input. A repeated identical request
// gets the same answer.
func (p *Participant) Unmask(req *UnmaskRequest) (*UnmaskResponse, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.at(stepUnmask); err != nil {
		return nil, err
	}
	if err := p.checkSession(req.Session, "the unmask request"); err != nil {
		return nil, err
	}
	if err := checkList(req.Survivors, "survivors"); err != nil {
		return nil, p.errorf("unmask request: %v", err)
	}
	if err := checkList(req.Dropped, "dropped"); err != nil {
		return nil, p.errorf("unmask request: %v", err)
	}
	all := slices.Concat(req.Survivors, req.Dropped)
	slices.Sort(all)
	if !slices.Equal(all, p.peers) {
		return nil, p.errorf("the unmask request's survivors %v and dropped %v are not a split of the participants that sent shares, %v", req.Survivors, req.Dropped, p.peers)
	}
	if len(req.Survivors) < p.cfg.Threshold {
		return nil, p.errorf("the unmask request names %d survivors, fewer than the threshold %d: refusing to help unmask fewer inputs", len(req.Survivors), p.cfg.Threshold)
	}
	want := make(map[string]revealKind, len(all))
	for _, v := range req.Survivors {
		want[v] = revealSelfMask
	}
	for _, v := range req.Dropped {
		want[v] = revealMaskKey
	}
	for _, v := range all {
		if had, ok := p.reveals[v]; ok && had != want[v] {
			return nil, p.errorf("refusing to disclose a share of %q's %s: a share of its %s was already disclosed, and the two together would unmask its input", v, want[v], had)
		}
	}
	resp := &UnmaskResponse{Session: p.cfg.Session, From: p.cfg.ID}
	for _, v := range all {
		p.reveals[v] = want[v]
		h := p.held[v]
		if want[v] == revealSelfMask {
			resp.SelfMasks = append(resp.SelfMasks, RevealedShare{Of: v, Value: h[1]})
		} else {
			resp.MaskKeys = append(resp.MaskKeys, RevealedShare{Of: v, Value: h[0]})
		}
	}
	return resp, nil
}
