package secagg

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"unicode/utf8"
)

// The messages of the protocol are Go structs with a deterministic binary
// encoding: a 4-byte magic, a version and a type byte, then the fields in
// order, strings and lists prefixed by their uvarint length, integers and
// floats as big-endian 8 bytes, keys and shares at their fixed sizes. Lists
// are sorted by name and hold each name once, and decoding refuses anything
// else (trailing bytes included), so a message has exactly one encoding:
// equal messages are equal bytes, and UnmarshalBinary then MarshalBinary
// gives back the input. The transport (fx's gRPC services, once wired)
// carries the bytes as they are.

const (
	magic          = "fxsa"
	wireVersion    = 1
	maxIDLen       = 255
	maxParticipant = 1000 // far above the tens of sites fx federates; bounds decoding
	maxExperiment  = 1024
)

// Message types, the byte after the version.
const (
	typeAdvertise byte = iota + 1
	typeKeyList
	typeShares
	typeBundle
	typeUnmaskRequest
	typeUnmaskResponse
)

// AdvertiseKeys is round 0, participant → server: the participant's two
// fresh X25519 public keys of this round and its aggregation weight.
type AdvertiseKeys struct {
	Session Session
	From    string
	// Weight is the participant's public FedAvg weight (its sample count),
	// positive and finite; 1 for everyone gives the plain mean.
	Weight    float64
	CipherKey [32]byte // c^PK: agrees the keys that encrypt shares
	MaskKey   [32]byte // s^PK: agrees the pairwise mask seeds
}

// PeerKeys is one participant's advertisement as the server relays it.
type PeerKeys struct {
	ID        string
	Weight    float64
	CipherKey [32]byte
	MaskKey   [32]byte
}

// KeyList is round 1, server → every participant: the advertisements of U1,
// sorted by ID, and the round's public parameters, which each participant
// checks against its own configuration.
type KeyList struct {
	Session   Session
	Threshold int
	Range     float64
	Peers     []PeerKeys
}

// SealedShare is one participant's shares of s^SK and b for one peer,
// sealed with AES-256-GCM under their c-key, From, To and the session bound
// as associated data.
type SealedShare struct {
	From, To string
	Sealed   []byte // nonce ‖ ciphertext ‖ tag
}

// sealedSize is the fixed length of SealedShare.Sealed.
const sealedSize = gcmNonceSize + sharePlainSize + 16

// EncryptedShares is round 1, participant → server: a sealed share for
// every other member of U1, sorted by To, and the commitment to the
// participant's self-mask seed b.
type EncryptedShares struct {
	Session    Session
	From       string
	Commitment [32]byte
	Shares     []SealedShare
}

// ShareBundle is round 2, server → participant: the sealed shares addressed
// to it by every member of U2 (those whose EncryptedShares arrived), sorted
// by From. A participant masks against exactly these peers.
type ShareBundle struct {
	Session Session
	To      string
	Shares  []SealedShare
}

// UnmaskRequest is round 4, server → participants: U3, who sent a complete
// masked input (Survivors), and U2 \ U3 (Dropped), each sorted.
type UnmaskRequest struct {
	Session   Session
	Survivors []string
	Dropped   []string
}

// RevealedShare is a decrypted share of Of's secret, held by the responder.
type RevealedShare struct {
	Of    string
	Value [shareSize]byte
}

// UnmaskResponse is round 4, participant → server: its shares of each
// survivor's self-mask seed b and of each dropped participant's s^SK, each
// sorted by Of.
type UnmaskResponse struct {
	Session   Session
	From      string
	SelfMasks []RevealedShare // of the survivors' b
	MaskKeys  []RevealedShare // of the dropped participants' s^SK
}

// validateID refuses names the encoding or a reader of an error message
// would choke on.
func validateID(id string) error {
	if id == "" || len(id) > maxIDLen || !utf8.ValidString(id) {
		return fmt.Errorf("participant name %q: want 1 to %d bytes of UTF-8", id, maxIDLen)
	}
	return nil
}

type writer struct{ b []byte }

func (w *writer) raw(p []byte)      { w.b = append(w.b, p...) }
func (w *writer) u64(v uint64)      { w.b = binary.BigEndian.AppendUint64(w.b, v) }
func (w *writer) f64(v float64)     { w.u64(math.Float64bits(v)) }
func (w *writer) uvarint(v uint64)  { w.b = binary.AppendUvarint(w.b, v) }
func (w *writer) string(s string)   { w.uvarint(uint64(len(s))); w.b = append(w.b, s...) }
func (w *writer) header(t byte)     { w.b = append(append(w.b, magic...), wireVersion, t) }
func (w *writer) session(s Session) { w.raw(s.bytes()) }

type reader struct {
	b   []byte
	err error
}

var errShort = errors.New("message ends early")

func (r *reader) fail(err error) {
	if r.err == nil {
		r.err = err
	}
}

func (r *reader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b) {
		r.fail(errShort)
		return nil
	}
	p := r.b[:n]
	r.b = r.b[n:]
	return p
}

func (r *reader) u64() uint64 {
	p := r.take(8)
	if p == nil {
		return 0
	}
	return binary.BigEndian.Uint64(p)
}

func (r *reader) f64() float64 { return math.Float64frombits(r.u64()) }

func (r *reader) uvarint(limit uint64, what string) int {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail(fmt.Errorf("%s: bad length", what))
		return 0
	}
	if v > limit {
		r.fail(fmt.Errorf("%s: %d is more than %d", what, v, limit))
		return 0
	}
	r.b = r.b[n:]
	return int(v)
}

func (r *reader) string(limit int, what string) string {
	return string(r.take(r.uvarint(uint64(limit), what)))
}

func (r *reader) id(what string) string {
	s := r.string(maxIDLen, what)
	if r.err == nil {
		if err := validateID(s); err != nil {
			r.fail(fmt.Errorf("%s: %w", what, err))
		}
	}
	return s
}

func (r *reader) array32(dst *[32]byte) { copy(dst[:], r.take(32)) }

func (r *reader) header(t byte, name string) {
	p := r.take(len(magic) + 2)
	if r.err != nil {
		r.err = fmt.Errorf("%s: %w", name, r.err)
		return
	}
	if string(p[:len(magic)]) != magic || p[len(magic)] != wireVersion || p[len(magic)+1] != t {
		r.err = fmt.Errorf("not a secure-aggregation %s message (version %d)", name, wireVersion)
	}
}

func (r *reader) session() Session {
	return Session{Experiment: r.string(maxExperiment, "experiment"), Round: r.u64()}
}

// end finishes a decode: no error and no bytes left over.
func (r *reader) end(name string) error {
	if r.err == nil && len(r.b) != 0 {
		r.err = fmt.Errorf("%d bytes after the end", len(r.b))
	}
	if r.err != nil {
		return fmt.Errorf("decode %s: %w", name, r.err)
	}
	return nil
}

// sortedUnique reports whether names are strictly increasing, the canonical
// order of every list.
func sortedUnique(names []string) bool {
	for i := 1; i < len(names); i++ {
		if names[i-1] >= names[i] {
			return false
		}
	}
	return true
}

func checkList(names []string, what string) error {
	if len(names) > maxParticipant {
		return fmt.Errorf("%s: %d names, at most %d", what, len(names), maxParticipant)
	}
	for _, n := range names {
		if err := validateID(n); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
	}
	if !sortedUnique(names) {
		return fmt.Errorf("%s: names not sorted or repeated", what)
	}
	return nil
}

// MarshalBinary encodes the message; see the encoding's description above.
func (m *AdvertiseKeys) MarshalBinary() ([]byte, error) {
	if err := validateID(m.From); err != nil {
		return nil, err
	}
	var w writer
	w.header(typeAdvertise)
	w.session(m.Session)
	w.string(m.From)
	w.f64(m.Weight)
	w.raw(m.CipherKey[:])
	w.raw(m.MaskKey[:])
	return w.b, nil
}

// UnmarshalBinary decodes what MarshalBinary encoded, and nothing else.
func (m *AdvertiseKeys) UnmarshalBinary(b []byte) error {
	r := reader{b: b}
	r.header(typeAdvertise, "key advertisement")
	*m = AdvertiseKeys{Session: r.session(), From: r.id("sender"), Weight: r.f64()}
	r.array32(&m.CipherKey)
	r.array32(&m.MaskKey)
	return r.end("key advertisement")
}

func peerIDs(ps []PeerKeys) []string {
	ids := make([]string, len(ps))
	for i, p := range ps {
		ids[i] = p.ID
	}
	return ids
}

// MarshalBinary encodes the message; see the encoding's description above.
func (m *KeyList) MarshalBinary() ([]byte, error) {
	if err := checkList(peerIDs(m.Peers), "key list"); err != nil {
		return nil, err
	}
	var w writer
	w.header(typeKeyList)
	w.session(m.Session)
	w.u64(uint64(m.Threshold))
	w.f64(m.Range)
	w.uvarint(uint64(len(m.Peers)))
	for _, p := range m.Peers {
		w.string(p.ID)
		w.f64(p.Weight)
		w.raw(p.CipherKey[:])
		w.raw(p.MaskKey[:])
	}
	return w.b, nil
}

// UnmarshalBinary decodes what MarshalBinary encoded, and nothing else.
func (m *KeyList) UnmarshalBinary(b []byte) error {
	r := reader{b: b}
	r.header(typeKeyList, "key list")
	*m = KeyList{Session: r.session()}
	t := r.u64()
	if t > maxParticipant {
		r.fail(fmt.Errorf("threshold %d", t))
	}
	m.Threshold = int(t)
	m.Range = r.f64()
	n := r.uvarint(maxParticipant, "peers")
	for i := 0; i < n && r.err == nil; i++ {
		p := PeerKeys{ID: r.id("peer"), Weight: r.f64()}
		r.array32(&p.CipherKey)
		r.array32(&p.MaskKey)
		m.Peers = append(m.Peers, p)
	}
	if r.err == nil && !sortedUnique(peerIDs(m.Peers)) {
		r.fail(errors.New("peers not sorted or repeated"))
	}
	return r.end("key list")
}

func writeSealed(w *writer, ss []SealedShare) {
	w.uvarint(uint64(len(ss)))
	for _, s := range ss {
		w.string(s.From)
		w.string(s.To)
		w.raw(s.Sealed)
	}
}

func readSealed(r *reader) []SealedShare {
	n := r.uvarint(maxParticipant, "shares")
	var ss []SealedShare
	for i := 0; i < n && r.err == nil; i++ {
		s := SealedShare{From: r.id("share sender"), To: r.id("share recipient")}
		s.Sealed = slices.Clone(r.take(sealedSize))
		ss = append(ss, s)
	}
	return ss
}

func checkSealed(ss []SealedShare, key func(SealedShare) string, what string) error {
	names := make([]string, len(ss))
	for i, s := range ss {
		if len(s.Sealed) != sealedSize {
			return fmt.Errorf("%s: sealed share from %q to %q has %d bytes, want %d", what, s.From, s.To, len(s.Sealed), sealedSize)
		}
		names[i] = key(s)
	}
	return checkList(names, what)
}

// MarshalBinary encodes the message; see the encoding's description above.
func (m *EncryptedShares) MarshalBinary() ([]byte, error) {
	if err := validateID(m.From); err != nil {
		return nil, err
	}
	if err := checkSealed(m.Shares, func(s SealedShare) string { return s.To }, "encrypted shares"); err != nil {
		return nil, err
	}
	var w writer
	w.header(typeShares)
	w.session(m.Session)
	w.string(m.From)
	w.raw(m.Commitment[:])
	writeSealed(&w, m.Shares)
	return w.b, nil
}

// UnmarshalBinary decodes what MarshalBinary encoded, and nothing else.
func (m *EncryptedShares) UnmarshalBinary(b []byte) error {
	r := reader{b: b}
	r.header(typeShares, "encrypted shares")
	*m = EncryptedShares{Session: r.session(), From: r.id("sender")}
	r.array32(&m.Commitment)
	m.Shares = readSealed(&r)
	if r.err == nil {
		r.fail(checkSealed(m.Shares, func(s SealedShare) string { return s.To }, "recipients"))
	}
	return r.end("encrypted shares")
}

// MarshalBinary encodes the message; see the encoding's description above.
func (m *ShareBundle) MarshalBinary() ([]byte, error) {
	if err := validateID(m.To); err != nil {
		return nil, err
	}
	if err := checkSealed(m.Shares, func(s SealedShare) string { return s.From }, "share bundle"); err != nil {
		return nil, err
	}
	var w writer
	w.header(typeBundle)
	w.session(m.Session)
	w.string(m.To)
	writeSealed(&w, m.Shares)
	return w.b, nil
}

// UnmarshalBinary decodes what MarshalBinary encoded, and nothing else.
func (m *ShareBundle) UnmarshalBinary(b []byte) error {
	r := reader{b: b}
	r.header(typeBundle, "share bundle")
	*m = ShareBundle{Session: r.session(), To: r.id("recipient")}
	m.Shares = readSealed(&r)
	if r.err == nil {
		r.fail(checkSealed(m.Shares, func(s SealedShare) string { return s.From }, "senders"))
	}
	return r.end("share bundle")
}

func writeNames(w *writer, names []string) {
	w.uvarint(uint64(len(names)))
	for _, n := range names {
		w.string(n)
	}
}

func readNames(r *reader, what string) []string {
	n := r.uvarint(maxParticipant, what)
	var names []string
	for i := 0; i < n && r.err == nil; i++ {
		names = append(names, r.id(what))
	}
	if r.err == nil && !sortedUnique(names) {
		r.fail(fmt.Errorf("%s: names not sorted or repeated", what))
	}
	return names
}

// MarshalBinary encodes the message; see the encoding's description above.
func (m *UnmaskRequest) MarshalBinary() ([]byte, error) {
	if err := checkList(m.Survivors, "survivors"); err != nil {
		return nil, err
	}
	if err := checkList(m.Dropped, "dropped"); err != nil {
		return nil, err
	}
	var w writer
	w.header(typeUnmaskRequest)
	w.session(m.Session)
	writeNames(&w, m.Survivors)
	writeNames(&w, m.Dropped)
	return w.b, nil
}

// UnmarshalBinary decodes what MarshalBinary encoded, and nothing else.
func (m *UnmaskRequest) UnmarshalBinary(b []byte) error {
	r := reader{b: b}
	r.header(typeUnmaskRequest, "unmask request")
	*m = UnmaskRequest{Session: r.session()}
	m.Survivors = readNames(&r, "survivors")
	m.Dropped = readNames(&r, "dropped")
	return r.end("unmask request")
}

func revealedNames(rs []RevealedShare) []string {
	names := make([]string, len(rs))
	for i, s := range rs {
		names[i] = s.Of
	}
	return names
}

func writeRevealed(w *writer, rs []RevealedShare) {
	w.uvarint(uint64(len(rs)))
	for _, s := range rs {
		w.string(s.Of)
		w.raw(s.Value[:])
	}
}

func readRevealed(r *reader, what string) []RevealedShare {
	n := r.uvarint(maxParticipant, what)
	var rs []RevealedShare
	for i := 0; i < n && r.err == nil; i++ {
		s := RevealedShare{Of: r.id(what)}
		copy(s.Value[:], r.take(shareSize))
		rs = append(rs, s)
	}
	if r.err == nil && !sortedUnique(revealedNames(rs)) {
		r.fail(fmt.Errorf("%s: names not sorted or repeated", what))
	}
	return rs
}

// MarshalBinary encodes the message; see the encoding's description above.
func (m *UnmaskResponse) MarshalBinary() ([]byte, error) {
	if err := validateID(m.From); err != nil {
		return nil, err
	}
	if err := checkList(revealedNames(m.SelfMasks), "self-mask shares"); err != nil {
		return nil, err
	}
	if err := checkList(revealedNames(m.MaskKeys), "mask-key shares"); err != nil {
		return nil, err
	}
	var w writer
	w.header(typeUnmaskResponse)
	w.session(m.Session)
	w.string(m.From)
	writeRevealed(&w, m.SelfMasks)
	writeRevealed(&w, m.MaskKeys)
	return w.b, nil
}

// UnmarshalBinary decodes what MarshalBinary encoded, and nothing else.
func (m *UnmaskResponse) UnmarshalBinary(b []byte) error {
	r := reader{b: b}
	r.header(typeUnmaskResponse, "unmask response")
	*m = UnmaskResponse{Session: r.session(), From: r.id("sender")}
	m.SelfMasks = readRevealed(&r, "self-mask shares")
	m.MaskKeys = readRevealed(&r, "mask-key shares")
	return r.end("unmask response")
}
