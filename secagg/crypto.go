package secagg

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
)

// Session names one round of one experiment. Every key derived in the round
// and every share's associated data is bound to it, so nothing made for one
// round or experiment is accepted in another.
type Session struct {
	Experiment string
	Round      uint64
}

func (s Session) String() string { return fmt.Sprintf("experiment %q round %d", s.Experiment, s.Round) }

func (s Session) validate() error {
	if s.Experiment == "" || len(s.Experiment) > maxExperiment {
		return fmt.Errorf("session: experiment id of %d bytes, want 1 to %d", len(s.Experiment), maxExperiment)
	}
	return nil
}

// bytes is the session's canonical encoding, as used in key derivation and
// associated data.
func (s Session) bytes() []byte {
	var w writer
	w.string(s.Experiment)
	w.u64(s.Round)
	return w.b
}

// Labels keep the keys of different purposes apart even when they come from
// the same secret.
const (
	labelShareKey  = "fx secagg v1 share encryption"
	labelPairMask  = "fx secagg v1 pairwise mask"
	labelSelfMask  = "fx secagg v1 self mask"
	labelShareAD   = "fx secagg v1 share"
	labelBCommit   = "fx secagg v1 self-mask commitment"
	keySize        = 32
	gcmNonceSize   = 12
	sharePlainSize = 2 * shareSize // the s^SK share, then the b share
)

// pairInfo is HKDF's info for a key that peers a and b share: the label, the
// session and the two names in order, so that both ends derive the same key
// and no other pair, round or experiment does.
func pairInfo(label string, s Session, a, b string) string {
	if b < a {
		a, b = b, a
	}
	var w writer
	w.string(label)
	w.raw(s.bytes())
	w.string(a)
	w.string(b)
	return string(w.b)
}

// agree runs X25519 and HKDF-SHA256 to a 32-byte key for the pair (a, b).
func agree(priv *ecdh.PrivateKey, peerPub []byte, label string, s Session, a, b string) ([]byte, error) {
	pub, err := ecdh.X25519().NewPublicKey(peerPub)
	if err != nil {
		return nil, fmt.Errorf("public key: %w", err)
	}
	secret, err := priv.ECDH(pub) // refuses low-order points (an all-zero secret)
	if err != nil {
		return nil, fmt.Errorf("key agreement: %w", err)
	}
	return hkdf.Key(sha256.New, secret, nil, pairInfo(label, s, a, b), keySize)
}

// selfMaskKey derives the PRG key of a participant's self mask from its seed b.
func selfMaskKey(seed []byte, s Session, id string) ([]byte, error) {
	var w writer
	w.string(labelSelfMask)
	w.raw(s.bytes())
	w.string(id)
	return hkdf.Key(sha256.New, seed, nil, string(w.b), keySize)
}

// commitSeed is the commitment to b that the participant publishes with its
// shares, so that the server can tell a correctly reconstructed seed from
// one a corrupt share garbled. b is 256 uniform bits, so the hash hides it.
func commitSeed(seed []byte, s Session, id string) [32]byte {
	var w writer
	w.string(labelBCommit)
	w.raw(s.bytes())
	w.string(id)
	w.raw(seed)
	return sha256.Sum256(w.b)
}

// shareAD is the associated data of the share sent from → to: a tampered
// header, or a ciphertext moved to another round, experiment, sender or
// recipient, fails authentication.
func shareAD(s Session, from, to string) []byte {
	var w writer
	w.string(labelShareAD)
	w.raw(s.bytes())
	w.string(from)
	w.string(to)
	return w.b
}

func newGCM(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// seal encrypts plain under key with a random nonce, which it prepends.
// Each key encrypts two messages (one per direction) in a round, so random
// nonces are far from any collision bound.
func seal(key, plain, ad []byte) ([]byte, error) {
	aead, err := newGCM(key)
	if err != nil {
		return nil, err
	}
	out := make([]byte, gcmNonceSize, gcmNonceSize+len(plain)+aead.Overhead())
	rand.Read(out)
	return aead.Seal(out, out, plain, ad), nil
}

func open(key, sealed, ad []byte) ([]byte, error) {
	aead, err := newGCM(key)
	if err != nil {
		return nil, err
	}
	if len(sealed) < gcmNonceSize+aead.Overhead() {
		return nil, fmt.Errorf("%d bytes is too short for a sealed share", len(sealed))
	}
	return aead.Open(nil, sealed[:gcmNonceSize], sealed[gcmNonceSize:], ad)
}

// newKeyPair makes an X25519 key pair from crypto/rand.
func newKeyPair() (*ecdh.PrivateKey, error) {
	return ecdh.X25519().GenerateKey(rand.Reader)
}
