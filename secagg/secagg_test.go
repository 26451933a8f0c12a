package secagg

import (
	"bytes"
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/fx-fl/fx/tensor"
)

func TestShamir(t *testing.T) {
	secret := bytes.Repeat([]byte{0xff}, secretSize) // the largest secret
	secret[0] = 0xab
	shares, err := splitSecret(secret, 3, 5)
	if err != nil {
		t.Fatal(err)
	}
	for _, xs := range [][]int{{1, 2, 3}, {5, 3, 1}, {2, 4, 5}, {1, 2, 3, 4, 5}} {
		ys := make([][]byte, len(xs))
		for i, x := range xs {
			ys[i] = shares[x-1]
		}
		got, err := combineShares(xs, ys)
		if err != nil || !bytes.Equal(got, secret) {
			t.Fatalf("shares %v: got %x, %v; want %x", xs, got, err, secret)
		}
	}
	// Two shares of a 3-of-5 sharing are a line through a random point:
	// they interpolate to something else (or to no 32-byte value at all).
	if got, err := combineShares([]int{1, 2}, [][]byte{shares[0], shares[1]}); err == nil && bytes.Equal(got, secret) {
		t.Fatal("two of three shares gave the secret")
	}
	if _, err := combineShares([]int{1, 1, 2}, [][]byte{shares[0], shares[0], shares[1]}); err == nil {
		t.Fatal("a repeated x-coordinate was accepted")
	}
}

func TestRoundSum(t *testing.T) {
	for _, dt := range []tensor.DType{tensor.F32, tensor.F64, tensor.F16, tensor.BF16} {
		for n := 3; n <= 10; n++ {
			t.Run(fmt.Sprintf("%s/n=%d", dt, n), func(t *testing.T) {
				const r = 2.0
				f := newFixture(t, n, n/2+1, r, layoutOf(dt, 1, 4099, 20000), uint64(n))
				f.maskAndSend(f.shareKeys(f.advertise()), 999+n)
				res, err := f.unmask()
				if err != nil {
					t.Fatal(err)
				}
				f.checkMean(res, r, f.ids)
			})
		}
	}
}

// TestFedAvg checks the result against the plain FedAvg of the tensor
// package over the same (unclipped, in-range) updates.
func TestFedAvg(t *testing.T) {
	const r = 4.0
	f := newFixture(t, 5, 3, r, layoutOf(tensor.F32, 3000, 17), 99)
	for _, m := range f.inputs { // bring the inputs within [−R, R]
		for _, tt := range m {
			for i, v := range tt.Float32s() {
				tt.Float32s()[i] = v / 1.2
			}
		}
	}
	f.maskAndSend(f.shareKeys(f.advertise()), 1<<10)
	res, err := f.unmask()
	if err != nil {
		t.Fatal(err)
	}
	got, err := res.Model()
	if err != nil {
		t.Fatal(err)
	}
	var updates []tensor.Model
	for _, id := range f.ids {
		updates = append(updates, f.inputs[id])
	}
	want, err := tensor.FedAvg(updates, f.weights)
	if err != nil {
		t.Fatal(err)
	}
	fp, _ := newFixedPoint(r)
	tol := 5*fp.resolution()/2 + 4*r*0x1p-24 // fixed point, and float32 rounding of FedAvg and of the result
	for i := range got {
		for j, v := range got[i].Float32s() {
			if d := math.Abs(float64(v - want[i].Float32s()[j])); d > tol {
				t.Fatalf("%s[%d]: secure %v, FedAvg %v", got[i].Name, j, v, want[i].Float32s()[j])
			}
		}
	}
	if res.TotalWeight() != sum(f.weights) {
		t.Fatalf("total weight %v, want %v", res.TotalWeight(), sum(f.weights))
	}
}

func sum(v []float64) float64 {
	s := 0.0
	for _, x := range v {
		s += x
	}
	return s
}

// TestDropouts: of seven sites, one never advertises, one drops after
// advertising, one after sending its shares (before its masked input) and
// one after sending its masked input (it never answers the unmasking). The
// round closes with the mean of the four inputs that arrived.
func TestDropouts(t *testing.T) {
	const r = 1.0
	f := newFixture(t, 8, 4, r, layoutOf(tensor.F32, 5000, 333), 3)
	kl := f.advertise("site-07")
	bundles := f.shareKeys(kl, "site-06")
	if _, ok := bundles["site-06"]; ok || len(bundles) != 6 {
		t.Fatalf("bundles for %d sites, site-06 among them: %v", len(bundles), ok)
	}
	f.maskAndSend(bundles, 4096, "site-05") // site-05 drops before its input
	res, err := f.unmask("site-04")         // site-04 drops after its input
	if err != nil {
		t.Fatal(err)
	}
	survivors := []string{"site-00", "site-01", "site-02", "site-03", "site-04"}
	if got := res.Survivors(); strings.Join(got, ",") != strings.Join(survivors, ",") {
		t.Fatalf("survivors %v, want %v", got, survivors)
	}
	f.checkMean(res, r, survivors)
}

// TestTooFewSurvivors: the round fails with the reason when fewer than t
// inputs arrive, and when fewer than t participants answer the unmasking.
func TestTooFewSurvivors(t *testing.T) {
	f := newFixture(t, 4, 3, 1, layoutOf(tensor.F32, 100), 4)
	f.maskAndSend(f.shareKeys(f.advertise()), 100, "site-02", "site-03")
	_, err := f.server.UnmaskRequest()
	if err == nil || !strings.Contains(err.Error(), "2 participants sent their masked input (site-00, site-01), fewer than the threshold 3") {
		t.Fatalf("got %v", err)
	}

	f = newFixture(t, 4, 3, 1, layoutOf(tensor.F32, 100), 4)
	f.maskAndSend(f.shareKeys(f.advertise()), 100)
	_, err = f.unmask("site-00", "site-01")
	if err == nil || !strings.Contains(err.Error(), "2 participants answered the unmask request (site-02, site-03), fewer than the threshold 3") {
		t.Fatalf("got %v", err)
	}

	// A participant refuses to help unmask fewer than t inputs, even if the
	// server asks.
	f = newFixture(t, 4, 3, 1, layoutOf(tensor.F32, 100), 4)
	f.maskAndSend(f.shareKeys(f.advertise()), 100)
	_, err = f.parts["site-00"].Unmask(&UnmaskRequest{Session: f.session, Survivors: []string{"site-00", "site-01"}, Dropped: []string{"site-02", "site-03"}})
	if err == nil || !strings.Contains(err.Error(), "names 2 survivors, fewer than the threshold 3") {
		t.Fatalf("got %v", err)
	}

	// Too few sites at the start is refused before any key is shared.
	f = newFixture(t, 4, 3, 1, layoutOf(tensor.F32, 100), 4)
	for _, id := range f.ids[:2] {
		a, _ := f.parts[id].Advertise()
		if err := f.server.Advertise(a); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.server.KeyList(); err == nil || !strings.Contains(err.Error(), "2 participants advertised keys, fewer than the threshold 3") {
		t.Fatalf("got %v", err)
	}
}

// TestIncompleteInput: a participant whose upload stopped halfway cannot
// be counted, nor dropped (its chunks are in the sum): the round fails and
// says whose input it was.
func TestIncompleteInput(t *testing.T) {
	f := newFixture(t, 3, 2, 1, layoutOf(tensor.F32, 100), 5)
	b := f.shareKeys(f.advertise())
	m, err := f.parts["site-01"].Masker(b["site-01"])
	if err != nil {
		t.Fatal(err)
	}
	delete(b, "site-01")
	f.maskAndSend(b, 100)
	chunk, err := m.MaskChunk(0, 0, f.inputs["site-01"][0].Data[:40*4], tensor.F32, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.server.AddMaskedChunk("site-01", 0, 0, chunk); err != nil {
		t.Fatal(err)
	}
	if err := f.server.InputDone("site-01"); err == nil || !strings.Contains(err.Error(), `input of "site-01" is incomplete: tensor "layer0.weight" has 40 of 100 elements`) {
		t.Fatalf("got %v", err)
	}
	if err := f.server.AddMaskedChunk("site-01", 0, 50, chunk); err == nil || !strings.Contains(err.Error(), "from element 40") {
		t.Fatalf("out-of-order chunk: got %v", err)
	}
	if _, err := f.server.UnmaskRequest(); err == nil || !strings.Contains(err.Error(), `the masked input of "site-01" is incomplete`) {
		t.Fatalf("got %v", err)
	}
}

// TestTamperAndReplay: a share altered on its way, moved to another
// recipient or replayed from another round is refused, naming who and what.
func TestTamperAndReplay(t *testing.T) {
	setup := func(round uint64) (*fixture, map[string]*ShareBundle) {
		f := newFixture(t, 3, 2, 1, layoutOf(tensor.F32, 10), 6)
		f.session.Round = round
		for _, p := range f.parts {
			p.cfg.Session = f.session
		}
		f.server.cfg.Session = f.session
		return f, f.shareKeys(f.advertise())
	}
	wantErr := func(err error, parts ...string) {
		t.Helper()
		if err == nil {
			t.Fatalf("accepted; want an error with %q", parts)
		}
		for _, p := range parts {
			if !strings.Contains(err.Error(), p) {
				t.Fatalf("error %q does not say %q", err, p)
			}
		}
	}

	f, b := setup(7)
	b["site-00"].Shares[1].Sealed[20] ^= 1
	_, err := f.parts["site-00"].Masker(b["site-00"])
	wantErr(err, `participant "site-00"`, `the share from "site-02" to "site-00" fails authentication`, "tampered")

	// site-01's share for site-02, relabelled as if it were for site-00.
	f, b = setup(7)
	moved := b["site-02"].Shares[1]
	moved.To = "site-00"
	b["site-00"].Shares[0] = moved
	_, err = f.parts["site-00"].Masker(b["site-00"])
	wantErr(err, `the share from "site-01" to "site-00" fails authentication`)

	// A bundle of round 6 delivered in round 7, as is and with its header
	// rewritten to round 7.
	old, oldB := setup(6)
	_ = old
	f, _ = setup(7)
	_, err = f.parts["site-00"].Masker(oldB["site-00"])
	wantErr(err, `the share bundle is for experiment "alice/study" round 6: replayed or misrouted`)
	oldB["site-00"].Session.Round = 7
	_, err = f.parts["site-00"].Masker(oldB["site-00"])
	wantErr(err, `the share from "site-01" to "site-00" fails authentication`)

	// The server refuses messages of another round, and duplicates.
	f = newFixture(t, 3, 2, 1, layoutOf(tensor.F32, 10), 6)
	a, _ := f.parts["site-00"].Advertise()
	a.Session.Round = 6
	wantErr(f.server.Advertise(a), `key advertisement from "site-00" is for experiment "alice/study" round 6: replayed or misrouted`)
	a.Session.Round = 7
	if err := f.server.Advertise(a); err != nil {
		t.Fatal(err)
	}
	wantErr(f.server.Advertise(a), `"site-00" advertised its keys twice`)

	// A participant refuses a key list that lowers the threshold.
	f = newFixture(t, 3, 2, 1, layoutOf(tensor.F32, 10), 6)
	kl := f.advertise()
	kl.Threshold = 1
	_, err = f.parts["site-00"].ShareKeys(kl)
	wantErr(err, "the key list says threshold 1 and range 1, the plan says 2 and 1")

	// A revealed share corrupted on its way to the server is caught by the
	// commitment.
	f = newFixture(t, 3, 2, 1, layoutOf(tensor.F32, 10), 6)
	f.maskAndSend(f.shareKeys(f.advertise()), 10)
	req, _ := f.server.UnmaskRequest()
	for i, id := range f.ids {
		resp, err := f.parts[id].Unmask(req)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			resp.SelfMasks[1].Value[40] ^= 1
		}
		if err := f.server.AddUnmaskResponse(resp); err != nil {
			t.Fatal(err)
		}
	}
	_, err = f.server.Result()
	wantErr(err, `reconstructing the self-mask seed of "site-01" from the shares of site-00, site-01, site-02`, "corrupt")
}

// TestRevealRule: a participant never discloses shares of both secrets of
// one peer, whatever the server asks and in whatever order.
func TestRevealRule(t *testing.T) {
	f := newFixture(t, 4, 2, 1, layoutOf(tensor.F32, 10), 8)
	f.maskAndSend(f.shareKeys(f.advertise()), 10)
	p := f.parts["site-00"]
	first := &UnmaskRequest{Session: f.session, Survivors: []string{"site-00", "site-01", "site-02"}, Dropped: []string{"site-03"}}
	r1, err := p.Unmask(first)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := p.Unmask(first) // a retry gets the same answer
	if err != nil || normalize(r1) != normalize(r2) {
		t.Fatalf("retry: %v, %v", err, normalize(r1) == normalize(r2))
	}
	// Now claim site-02 dropped: its s-share would join the b-share given.
	_, err = p.Unmask(&UnmaskRequest{Session: f.session, Survivors: []string{"site-00", "site-01"}, Dropped: []string{"site-02", "site-03"}})
	if err == nil || !strings.Contains(err.Error(), `refusing to disclose a share of "site-02"'s mask key s^SK: a share of its self-mask seed b was already disclosed`) {
		t.Fatalf("got %v", err)
	}
	// And the other way round: site-03's b after its s.
	_, err = p.Unmask(&UnmaskRequest{Session: f.session, Survivors: []string{"site-00", "site-01", "site-02", "site-03"}})
	if err == nil || !strings.Contains(err.Error(), `refusing to disclose a share of "site-03"'s self-mask seed b: a share of its mask key s^SK was already disclosed`) {
		t.Fatalf("got %v", err)
	}
	// A request that does not split U2 is refused.
	_, err = p.Unmask(&UnmaskRequest{Session: f.session, Survivors: []string{"site-00", "site-01", "site-02"}})
	if err == nil || !strings.Contains(err.Error(), "are not a split of the participants that sent shares") {
		t.Fatalf("got %v", err)
	}
}

func TestMaskChunkRefusesNonFinite(t *testing.T) {
	f := newFixture(t, 3, 2, 1, layoutOf(tensor.F32, 10), 9)
	f.maskAndSend(f.shareKeys(f.advertise()), 10)
	raw := tensor.FromFloat32("x", []int64{3}, []float32{1, float32(math.NaN()), 2}).Data
	_, err := f.maskers["site-00"].MaskChunk(2, 100, raw, tensor.F32, nil)
	if err == nil || !strings.Contains(err.Error(), "tensor 2: element 101 is NaN") {
		t.Fatalf("got %v", err)
	}
	if _, err := f.maskers["site-00"].MaskChunk(0, 0, []byte{1, 2, 3, 4}, tensor.I32, nil); err == nil {
		t.Fatal("an integer chunk was masked")
	}
}

func TestSteps(t *testing.T) {
	p, err := NewParticipant(ParticipantConfig{Session: Session{"e", 1}, ID: "a", Threshold: 2, Range: 1, Weight: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.ShareKeys(&KeyList{}); err == nil || !strings.Contains(err.Error(), "ShareKeys called, but the next step is Advertise") {
		t.Fatalf("got %v", err)
	}
	for _, c := range []ParticipantConfig{
		{Session: Session{"e", 1}, ID: "a", Threshold: 1, Range: 1, Weight: 1},
		{Session: Session{"e", 1}, ID: "a", Threshold: 2, Range: 0, Weight: 1},
		{Session: Session{"e", 1}, ID: "a", Threshold: 2, Range: 1, Weight: math.Inf(1)},
		{Session: Session{"e", 1}, ID: "", Threshold: 2, Range: 1, Weight: 1},
		{Session: Session{"", 1}, ID: "a", Threshold: 2, Range: 1, Weight: 1},
	} {
		if _, err := NewParticipant(c); err == nil {
			t.Fatalf("%+v accepted", c)
		}
	}
}

func TestFixedPointBits(t *testing.T) {
	for _, c := range []struct {
		r    float64
		bits int
	}{{1, 30}, {0.75, 30}, {1.5, 29}, {2, 29}, {64, 24}, {1 << 30, 0}, {0x1p-10, 40}} {
		fp, err := newFixedPoint(c.r)
		if err != nil || fp.fracBits != c.bits {
			t.Errorf("range %v: %d fractional bits, %v; want %d", c.r, fp.fracBits, err, c.bits)
		}
	}
	for _, r := range []float64{0, -1, math.NaN(), math.Inf(1), 1<<30 + 1} {
		if _, err := newFixedPoint(r); err == nil {
			t.Errorf("range %v accepted", r)
		}
	}
	// The extremes of the range and of the weights do not wrap: n inputs
	// of +R (or −R) weighted to a total of 1 sum to about ±2^30.
	fp, _ := newFixedPoint(3)
	var sum uint32
	w := make([]uint32, 1)
	raw := tensor.FromFloat32("x", []int64{1}, []float32{1e30}).Data // clipped to R
	for range 7 {
		if err := fp.encode(w, raw, tensor.F32, 1.0/7, 0); err != nil {
			t.Fatal(err)
		}
		sum += w[0]
	}
	if got := decode(sum, fp.unit(1)); math.Abs(got-3) > 7*fp.resolution() {
		t.Fatalf("7 × R/7 decodes to %v, want 3", got)
	}
}

// TestRelease: a released Result's sum is gone, and reading the mean after
// it is an error, not a panic or a mean of zeros.
func TestRelease(t *testing.T) {
	const r = 2.0
	f := newFixture(t, 3, 2, r, layoutOf(tensor.F32, 1, 100), 7)
	f.maskAndSend(f.shareKeys(f.advertise()), 11)
	res, err := f.unmask()
	if err != nil {
		t.Fatal(err)
	}
	f.checkMean(res, r, f.ids)
	res.Release()
	if res.s.sums != nil {
		t.Error("the sum is still held after Release")
	}
	if err := res.MeanChunk(0, 0, make([]byte, 4), tensor.F32); err == nil || !strings.Contains(err.Error(), "released") {
		t.Errorf("MeanChunk after Release: %v, want an error saying the sum was released", err)
	}
}
