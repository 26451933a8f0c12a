package secagg

import (
	"bytes"
	"encoding"
	"strings"
	"testing"

	"github.com/fx-fl/fx/tensor"
)

type message interface {
	encoding.BinaryMarshaler
	encoding.BinaryUnmarshaler
}

// roundMessages runs a small round and returns one message of each type.
func roundMessages(t *testing.T) []message {
	f := newFixture(t, 3, 2, 1, layoutOf(tensor.F32, 10), 11)
	a, _ := f.parts["site-00"].Advertise()
	if err := f.server.Advertise(a); err != nil {
		t.Fatal(err)
	}
	for _, id := range f.ids[1:] {
		b, _ := f.parts[id].Advertise()
		_ = f.server.Advertise(b)
	}
	kl, _ := f.server.KeyList()
	var enc *EncryptedShares
	for _, id := range f.ids {
		e, err := f.parts[id].ShareKeys(kl)
		if err != nil {
			t.Fatal(err)
		}
		enc = e
		_ = f.server.Shares(e)
	}
	bundles, _ := f.server.Bundles()
	f.maskAndSend(bundles, 10)
	req, _ := f.server.UnmaskRequest()
	resp, err := f.parts["site-00"].Unmask(req)
	if err != nil {
		t.Fatal(err)
	}
	return []message{a, kl, enc, bundles["site-01"], req, resp}
}

// TestWireCanonical: decoding then encoding gives back the same bytes, and
// anything but a canonical encoding is refused.
func TestWireCanonical(t *testing.T) {
	for _, m := range roundMessages(t) {
		b, err := m.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		for _, other := range []message{&AdvertiseKeys{}, &KeyList{}, &EncryptedShares{}, &ShareBundle{}, &UnmaskRequest{}, &UnmaskResponse{}} {
			err := other.UnmarshalBinary(b)
			if sameType(m, other) {
				if err != nil {
					t.Fatalf("%T: %v", m, err)
				}
				again, _ := other.MarshalBinary()
				if !bytes.Equal(again, b) {
					t.Fatalf("%T: re-encoding differs", m)
				}
			} else if err == nil {
				t.Fatalf("%T decoded as %T", m, other)
			}
		}
		dec := func(p []byte) error { return newLike(m).UnmarshalBinary(p) }
		if err := dec(append(bytes.Clone(b), 0)); err == nil || !strings.Contains(err.Error(), "1 bytes after the end") {
			t.Fatalf("%T with a trailing byte: %v", m, err)
		}
		for _, cut := range []int{0, 3, 6, len(b) / 2, len(b) - 1} {
			if err := dec(b[:cut]); err == nil {
				t.Fatalf("%T cut to %d bytes was accepted", m, cut)
			}
		}
	}
}

func sameType(a, b message) bool {
	switch a.(type) {
	case *AdvertiseKeys:
		_, ok := b.(*AdvertiseKeys)
		return ok
	case *KeyList:
		_, ok := b.(*KeyList)
		return ok
	case *EncryptedShares:
		_, ok := b.(*EncryptedShares)
		return ok
	case *ShareBundle:
		_, ok := b.(*ShareBundle)
		return ok
	case *UnmaskRequest:
		_, ok := b.(*UnmaskRequest)
		return ok
	case *UnmaskResponse:
		_, ok := b.(*UnmaskResponse)
		return ok
	}
	return false
}

func newLike(m message) message {
	switch m.(type) {
	case *AdvertiseKeys:
		return &AdvertiseKeys{}
	case *KeyList:
		return &KeyList{}
	case *EncryptedShares:
		return &EncryptedShares{}
	case *ShareBundle:
		return &ShareBundle{}
	case *UnmaskRequest:
		return &UnmaskRequest{}
	}
	return &UnmaskResponse{}
}

func TestWireRefusesUnsortedLists(t *testing.T) {
	req := &UnmaskRequest{Session: Session{"e", 1}, Survivors: []string{"b", "a"}}
	if _, err := req.MarshalBinary(); err == nil || !strings.Contains(err.Error(), "not sorted or repeated") {
		t.Fatalf("marshal: %v", err)
	}
	// Hand-encode the unsorted list to check the decoder too.
	var w writer
	w.header(typeUnmaskRequest)
	w.session(req.Session)
	writeNames(&w, req.Survivors)
	writeNames(&w, nil)
	if err := new(UnmaskRequest).UnmarshalBinary(w.b); err == nil || !strings.Contains(err.Error(), "survivors: names not sorted or repeated") {
		t.Fatalf("unmarshal: %v", err)
	}
}
