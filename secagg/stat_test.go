package secagg

import (
	"encoding/binary"
	"testing"
	"testing/cryptotest"

	"gonum.org/v1/gonum/stat/distuv"

	"github.com/fx-fl/fx/tensor"
)

// chiSquare is Pearson's statistic of counts against a uniform expectation.
func chiSquare(counts []float64) float64 {
	total := 0.0
	for _, c := range counts {
		total += c
	}
	want := total / float64(len(counts))
	x := 0.0
	for _, c := range counts {
		x += (c - want) * (c - want) / want
	}
	return x
}

// uniformity returns the chi-square statistics of words' bytes (256
// buckets) and of their top 16 bits (65536 buckets), each with the value a
// uniform source exceeds with probability 10^-6.
type uniformity struct{ bytes, bytesMax, top16, top16Max float64 }

func measure(words []byte) uniformity {
	b := make([]float64, 256)
	h := make([]float64, 1<<16)
	for i := 0; i+4 <= len(words); i += 4 {
		for _, x := range words[i : i+4] {
			b[x]++
		}
		h[binary.LittleEndian.Uint32(words[i:])>>16]++
	}
	q := func(buckets int) float64 { return distuv.ChiSquared{K: float64(buckets - 1)}.Quantile(1 - 1e-6) }
	return uniformity{chiSquare(b), q(256), chiSquare(h), q(1 << 16)}
}

// TestMaskedLooksUniform: what the aggregator receives from one participant,
// 2^20 masked values of an update, is indistinguishable from uniform words
// by a chi-square test on byte values and on the top 16 bits, while the
// same update encoded without masks fails both by far.
//
// The threshold is the chi-square quantile at 1 − 10^-6 (255 and 65535
// degrees of freedom, 2^22 bytes and 2^20 words, 16 expected per bucket at
// the finest), so a truly uniform source fails it with probability 10^-6;
// the keys and seeds come from a fixed seed (testing/cryptotest), so the
// test is deterministic. A mask that failed to cover some bits, or a PRG
// stream reused between elements, shows as a statistic in the thousands.
func TestMaskedLooksUniform(t *testing.T) {
	cryptotest.SetGlobalRandom(t, 20)
	const n = 1 << 20
	f := newFixture(t, 3, 2, 1, layoutOf(tensor.F32, n), 20)
	f.maskAndSend(f.shareKeys(f.advertise()), 1<<18)

	in := f.inputs["site-01"][0]
	masked, err := f.maskers["site-01"].MaskChunk(0, 0, in.Data, tensor.F32, nil)
	if err != nil {
		t.Fatal(err)
	}
	u := measure(masked)
	t.Logf("masked: bytes χ² = %.1f (limit %.1f), top 16 bits χ² = %.1f (limit %.1f)", u.bytes, u.bytesMax, u.top16, u.top16Max)
	if u.bytes > u.bytesMax || u.top16 > u.top16Max {
		t.Errorf("masked input is not uniform: bytes χ² %.1f (limit %.1f), top 16 bits χ² %.1f (limit %.1f)", u.bytes, u.bytesMax, u.top16, u.top16Max)
	}

	words := make([]uint32, n)
	fp, _ := newFixedPoint(1)
	if err := fp.encode(words, in.Data, tensor.F32, f.parts["site-01"].weight, 0); err != nil {
		t.Fatal(err)
	}
	plain := make([]byte, 4*n)
	for i, w := range words {
		binary.LittleEndian.PutUint32(plain[4*i:], w)
	}
	p := measure(plain)
	t.Logf("unmasked: bytes χ² = %.1f, top 16 bits χ² = %.1f", p.bytes, p.top16)
	if p.bytes <= p.bytesMax || p.top16 <= p.top16Max {
		t.Errorf("the unmasked encoding passes the uniformity test (bytes χ² %.1f, top 16 bits χ² %.1f): the test cannot tell", p.bytes, p.top16)
	}
}
