package secagg

import (
	"crypto/rand"
	"testing"
	"time"

	"github.com/fx-fl/fx/tensor"
)

// The benchmarks measure the case, 10 participants × 25M float32
// parameters, on one core, and report each against the plain round's work on
// the same bytes, measured in the same run: `out += x` over float32.

const (
	benchParams = 25_000_000
	benchSites  = 10
	benchChunk  = tensor.MaxChunk / 4 // one wire chunk of float32
)

// plainFold times out += x over n float32, the plain aggregator's fold.
func plainFold(out, x []float32) time.Duration {
	start := time.Now()
	for i := range out {
		out[i] += x[i]
	}
	return time.Since(start)
}

// BenchmarkMask masks one participant's 25M float32 update chunk by chunk
// against 9 peers (10 PRG streams, the self mask included).
func BenchmarkMask(b *testing.B) {
	f := newFixture(b, benchSites, benchSites/2+1, 1, layoutOf(tensor.F32, 16), 1)
	f.maskAndSend(f.shareKeys(f.advertise()), 16)
	m := f.maskers["site-00"]
	vals := make([]float32, benchParams)
	for i := range vals {
		vals[i] = float32(i%2001-1000) / 1000
	}
	raw := tensor.ViewFloat32("w", []int64{benchParams}, vals).Data
	out := make([]float32, benchParams)
	buf := make([]byte, 0, 4*benchChunk)
	b.SetBytes(int64(len(raw)))
	plainFold(out, vals) // fault the pages in: the aggregator's sum is warm
	var plain time.Duration
	for b.Loop() {
		var err error
		for off := 0; off < benchParams; off += benchChunk {
			end := min(off+benchChunk, benchParams)
			if buf, err = m.MaskChunk(0, int64(off), raw[4*off:4*end], tensor.F32, buf); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		plain += plainFold(out, vals)
		b.StartTimer()
	}
	perOp := b.Elapsed() / time.Duration(b.N)
	ratio := float64(perOp) / float64(plain/time.Duration(b.N))
	b.ReportMetric(ratio, "x-plain-fold")
	b.Logf("mask %d float32 against %d streams: %v (%.2f GB/s of input, %.2f GB/s of keystream); plain fold %v; ratio %.1f×",
		benchParams, m.Streams(), perOp, float64(len(raw))/perOp.Seconds()/1e9,
		float64(len(raw)*m.Streams())/perOp.Seconds()/1e9, plain/time.Duration(b.N), ratio)
}

// BenchmarkUnmask is the aggregator's side: fold 10 masked 25M-element
// inputs (one site dropped before sending: 9 arrive) and unmask the sum into
// a float32 mean, against folding 10 plain float32 updates.
func BenchmarkUnmask(b *testing.B) {
	masked := make([]byte, 4*benchChunk)
	rand.Read(masked) // the cost does not depend on the bytes
	vals := make([]float32, benchParams)
	out := make([]float32, benchParams)
	var fold, first, unmask, plain time.Duration
	for b.Loop() {
		b.StopTimer()
		f := newParties(b, benchSites, benchSites/2+1, 1, layoutOf(tensor.F32, benchParams), 2)
		bundles := f.shareKeys(f.advertise())
		for id, bd := range bundles {
			if _, err := f.parts[id].Masker(bd); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
		start := time.Now()
		for i, id := range f.ids[:benchSites-1] {
			for off := 0; off < benchParams; off += benchChunk {
				end := min(off+benchChunk, benchParams)
				if err := f.server.AddMaskedChunk(id, 0, int64(off), masked[:4*(end-off)]); err != nil {
					b.Fatal(err)
				}
			}
			if err := f.server.InputDone(id); err != nil {
				b.Fatal(err)
			}
			if i == 0 {
				first += time.Since(start)
			}
		}
		fold += time.Since(start)
		start = time.Now()
		res, err := f.unmask()
		if err != nil {
			b.Fatal(err)
		}
		dst := make([]byte, 4*benchChunk)
		for off := 0; off < benchParams; off += benchChunk {
			end := min(off+benchChunk, benchParams)
			if err := res.MeanChunk(0, int64(off), dst[:4*(end-off)], tensor.F32); err != nil {
				b.Fatal(err)
			}
		}
		unmask += time.Since(start)
		b.StopTimer()
		for range benchSites {
			plain += plainFold(out, vals)
		}
		b.StartTimer()
	}
	n := time.Duration(b.N)
	ratio := float64(fold+unmask) / float64(plain)
	b.ReportMetric(ratio, "x-plain-fold")
	b.Logf("fold 9 masked inputs %v (the first, into fresh pages, %v), unmask (18 streams) %v; plain fold of 10 float32 updates %v; ratio %.2f×",
		fold/n, first/n, unmask/n, plain/n, ratio)
}

// BenchmarkStreams is the PRG alone: 10 streams' masks added to 256 Ki
// elements, reported in bytes of keystream.
func BenchmarkStreams(b *testing.B) {
	var ss []stream
	for i := range 10 {
		key := make([]byte, 32)
		key[0] = byte(i)
		s, err := newStream(key, i%2 == 0)
		if err != nil {
			b.Fatal(err)
		}
		ss = append(ss, s)
	}
	dst := make([]uint32, 1<<18)
	b.SetBytes(int64(4 * len(dst) * len(ss)))
	for b.Loop() {
		applyStreams(dst, ss, 0, 0)
	}
}
