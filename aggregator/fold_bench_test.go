package aggregator_test

import (
	"fmt"
	"math"
	"os"
	"strconv"
	"testing"
	"time"
	"unsafe"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/tensor"
)

// foldRound is one round's train updates as the aggregator receives them:
// each update a list of wire chunks of at most tensor.MaxChunk bytes of one
// float32 tensor, with its weight.
type foldRound struct {
	params  int
	updates [][][]byte
	weights []float64
}

func newFoldRound(updates, params int) *foldRound {
	r := &foldRound{params: params}
	for u := range updates {
		var chunks [][]byte
		for off := 0; off < params; off += tensor.MaxChunk / 4 {
			n := min(tensor.MaxChunk/4, params-off)
			c := make([]byte, 4*n)
			f := unsafe.Slice((*float32)(unsafe.Pointer(&c[0])), n)
			for j := range f {
				f[j] = float32((off+j)%1000) * float32(u+1) * 1e-3
			}
			chunks = append(chunks, c)
		}
		r.updates = append(r.updates, chunks)
		r.weights = append(r.weights, float64(100*(u+1)))
	}
	return r
}

// accumulator is the round's sum as the aggregator sets it up: a spool
// directory and aggregator.StageBudget of stages in memory.
func (r *foldRound) accumulator(b *testing.B) *tensor.Accumulator {
	total := 0.0
	for _, w := range r.weights {
		total += w
	}
	acc, err := tensor.NewAccumulator(tensor.AccumulatorConfig{
		Layout:         tensor.Model{tensor.New("w", tensor.F32, []int64{int64(r.params)})},
		SpillDir:       b.TempDir(),
		MemoryBudget:   aggregator.StageBudget(int64(4 * r.params)),
		MaxTotalWeight: total,
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { acc.Close() })
	return acc
}

// fold runs the aggregator's path: for each update Begin, Keep every
// chunk as the upload handler does, Commit with its weight.
func (r *foldRound) fold(b *testing.B, acc *tensor.Accumulator) {
	acc.Reset()
	for u, chunks := range r.updates {
		up, err := acc.Begin()
		if err != nil {
			b.Fatal(err)
		}
		var elem int64
		for _, c := range chunks {
			if err := up.Keep("w", elem, c, tensor.F32); err != nil {
				b.Fatal(err)
			}
			elem += int64(len(c) / 4)
		}
		if err := up.Commit(r.weights[u]); err != nil {
			b.Fatal(err)
		}
	}
}

// reference is the single-pass kernel numpy runs for out += w*x, update
// after update on one goroutine, over the same chunks.
func (r *foldRound) reference(out []float32) {
	clear(out)
	for u, chunks := range r.updates {
		w := float32(r.weights[u])
		at := 0
		for _, c := range chunks {
			x := unsafe.Slice((*float32)(unsafe.Pointer(&c[0])), len(c)/4)
			d := out[at : at+len(x)]
			for j := range d {
				d[j] += w * x[j]
			}
			at += len(x)
		}
	}
}

// BenchmarkFold measures folding a round's train updates on the path the
// aggregator runs (Accumulator: Begin, Keep of every 1 MiB wire chunk,
// Commit; memory and spill as the aggregator configures them) against the
// reference single-pass kernel out += w·x over the same updates in the
// same run; reference/accumulator is the ratio (goal ≥ 0.8). The default is
// a round of 10 updates of 25 M float32 parameters (FX_FOLD_PARAMS and
// FX_FOLD_UPDATES change it):
//
//	go test -run '^$' -bench Fold -benchtime 3x ./aggregator
func BenchmarkFold(b *testing.B) {
	params, updates := envInt(b, "FX_FOLD_PARAMS", 25_000_000), envInt(b, "FX_FOLD_UPDATES", 10)
	r := newFoldRound(updates, params)
	acc := r.accumulator(b)
	out := make([]float32, params)
	r.fold(b, acc) // fault every page in on both sides before timing
	r.reference(out)
	var tAcc, tRef time.Duration
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		r.fold(b, acc)
		t1 := time.Now()
		r.reference(out)
		tAcc += t1.Sub(t0)
		tRef += time.Since(t1)
	}
	b.StopTimer()
	checkFold(b, r, acc, out)
	bytes := float64(updates*params*4) * float64(b.N)
	b.ReportMetric(bytes/tAcc.Seconds()/1e9, "accumulator-GB/s")
	b.ReportMetric(bytes/tRef.Seconds()/1e9, "reference-GB/s")
	b.ReportMetric(tRef.Seconds()/tAcc.Seconds(), "reference/accumulator")
}

// checkFold compares the accumulator's mean with the reference's sum
// divided by the total weight at a few elements.
func checkFold(b *testing.B, r *foldRound, acc *tensor.Accumulator, out []float32) {
	mean, err := acc.Mean()
	if err != nil {
		b.Fatal(err)
	}
	total := 0.0
	for _, w := range r.weights {
		total += w
	}
	got := mean[0].Float32s()
	for _, j := range []int{0, r.params / 2, r.params - 1} {
		want := float64(out[j]) / total
		if math.Abs(float64(got[j])-want) > 1e-4*math.Abs(want)+1e-6 {
			b.Fatalf("element %d: the accumulator's mean %v, the reference's %v", j, got[j], want)
		}
	}
}

// BenchmarkFoldScaling runs the accumulator's fold for models from 1 M to
// 100 M float32 parameters (4 updates each) and reports the log-log slope
// of time against size (goal ≤ 1.1: cost grows with the bytes, no faster),
// next to the reference kernel's slope in the same run:
//
//	go test -run '^$' -bench FoldScaling -benchtime 1x ./aggregator
func BenchmarkFoldScaling(b *testing.B) {
	const updates = 4
	sizes := []int{1_000_000, 3_000_000, 10_000_000, 30_000_000, 100_000_000}
	var xs, accYs, refYs []float64
	for _, params := range sizes {
		r := newFoldRound(updates, params)
		acc := r.accumulator(b)
		out := make([]float32, params)
		r.fold(b, acc)
		r.reference(out)
		// Repeat small sizes so each measurement lasts long enough to time.
		reps := max(1, 100_000_000/params)
		var tAcc, tRef time.Duration
		for range b.N * reps {
			t0 := time.Now()
			r.fold(b, acc)
			t1 := time.Now()
			r.reference(out)
			tAcc += t1.Sub(t0)
			tRef += time.Since(t1)
		}
		checkFold(b, r, acc, out)
		n := float64(b.N * reps)
		b.Logf("%4d M params: accumulator %8.2f ms, reference %8.2f ms per round of %d updates (%.2f×)",
			params/1_000_000, tAcc.Seconds()/n*1e3, tRef.Seconds()/n*1e3, updates, tRef.Seconds()/tAcc.Seconds())
		xs = append(xs, math.Log(float64(params)))
		accYs = append(accYs, math.Log(tAcc.Seconds()/n))
		refYs = append(refYs, math.Log(tRef.Seconds()/n))
		b.ReportMetric(tRef.Seconds()/tAcc.Seconds(), fmt.Sprintf("reference/accumulator@%dM", params/1_000_000))
	}
	b.ReportMetric(slope(xs, accYs), "accumulator-slope")
	b.ReportMetric(slope(xs, refYs), "reference-slope")
}

// slope is the least-squares slope of ys against xs.
func slope(xs, ys []float64) float64 {
	var mx, my float64
	for i := range xs {
		mx += xs[i]
		my += ys[i]
	}
	mx /= float64(len(xs))
	my /= float64(len(ys))
	var num, den float64
	for i := range xs {
		num += (xs[i] - mx) * (ys[i] - my)
		den += (xs[i] - mx) * (xs[i] - mx)
	}
	return num / den
}

func envInt(b *testing.B, name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}
