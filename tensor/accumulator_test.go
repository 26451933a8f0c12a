package tensor

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// testMaxWeight is the maximum total weight of the tests' accumulators that
// are not about it: far above the weights they commit.
const testMaxWeight = 1 << 20

// chunks cuts every tensor of m into pieces of random whole-element sizes and
// calls add for each, visiting tensors in a shuffled order.
func chunks(rng *rand.Rand, m Model, add func(name string, off int64, raw []byte, dt DType) error) error {
	order := rng.Perm(len(m))
	for _, i := range order {
		t := m[i]
		size := t.DType.Size()
		n := len(t.Data) / size
		for off := 0; off < n; {
			k := min(n-off, 1+rng.IntN(97))
			if err := add(t.Name, int64(off), t.Data[off*size:(off+k)*size], t.DType); err != nil {
				return err
			}
			off += k
		}
	}
	return nil
}

// sums snapshots the accumulator's running sums as bytes, for exact comparison.
func sums(a *Accumulator) []byte {
	var b bytes.Buffer
	for _, s := range a.slots {
		binary.Write(&b, binary.LittleEndian, s.sum32)
		binary.Write(&b, binary.LittleEndian, s.sum64)
		b.Write(s.ints)
	}
	return b.Bytes()
}

func TestAccumulatorMean(t *testing.T) {
	for _, spill := range []bool{false, true} {
		name := "memory"
		if spill {
			name = "spill"
		}
		t.Run(name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(21, 22))
			updates, values := makeUpdates(rng, 4, 300)
			weights := []float64{10, 20, 30, 40}
			cfg := AccumulatorConfig{Layout: updates[0], MaxTotalWeight: testMaxWeight}
			if spill {
				cfg.SpillDir = t.TempDir()
			}
			acc, err := NewAccumulator(cfg)
			if err != nil {
				t.Fatal(err)
			}
			for i, u := range updates {
				up, err := acc.Begin()
				if err != nil {
					t.Fatal(err)
				}
				if err := chunks(rng, u, up.AddChunk); err != nil {
					t.Fatal(err)
				}
				if err := up.Commit(weights[i]); err != nil {
					t.Fatal(err)
				}
				up.Discard() // after Commit: a no-op
			}
			if acc.Count() != 4 || acc.TotalWeight() != 100 {
				t.Errorf("count %d, total %v; want 4, 100", acc.Count(), acc.TotalWeight())
			}
			mean, err := acc.Mean()
			if err != nil {
				t.Fatal(err)
			}
			if err := updates[0].Matches(mean); err != nil {
				t.Fatal(err)
			}
			checkAgainst(t, mean, values, func(col []float64) float64 {
				var s float64
				for i, v := range col {
					s += weights[i] * v
				}
				return s / 100
			})
			if steps := binary.LittleEndian.Uint64(mean.Get("steps").Data); steps != 100 {
				t.Errorf("integer tensor = %d, want the first committed upload's 100", steps)
			}
			if spill {
				if entries, _ := os.ReadDir(cfg.SpillDir); len(entries) != 0 {
					t.Errorf("spill directory holds %d files after the commits", len(entries))
				}
			}
		})
	}
}

func TestAccumulatorRejectedUploadLeavesSumUnchanged(t *testing.T) {
	type rejection struct {
		name string
		// feed stages (part of) a bad upload, returning the first error seen.
		feed func(up *Upload, m Model) error
		want string
	}
	nanLast := func(up *Upload, m Model) error {
		// Every chunk is good except the very last, which holds a NaN.
		var err error
		for ti, t := range m {
			n := int64(len(t.Data) / t.DType.Size())
			size := int64(t.DType.Size())
			last := ti == len(m)-2 // the last float tensor; "steps" comes after
			for off := int64(0); off < n && err == nil; off += 50 {
				end := min(n, off+50)
				raw := append([]byte(nil), t.Data[off*size:end*size]...)
				if last && end == n {
					binary.LittleEndian.PutUint16(raw[len(raw)-2:], 0x7fc0) // bfloat16 NaN
				}
				err = up.AddChunk(t.Name, off, raw, t.DType)
			}
		}
		return err
	}
	rejections := []rejection{
		{"NaN in the last chunk", nanLast, "is NaN"},
		{"missing tensor", func(up *Upload, m Model) error {
			for _, t := range m[:len(m)-1] {
				if err := up.AddChunk(t.Name, 0, t.Data, t.DType); err != nil {
					return err
				}
			}
			return up.Commit(1)
		}, `tensor "steps" is missing`},
		{"incomplete tensor", func(up *Upload, m Model) error {
			for _, t := range m {
				data := t.Data
				if t.Name == "w32" {
					data = data[:len(data)-4]
				}
				if err := up.AddChunk(t.Name, 0, data, t.DType); err != nil {
					return err
				}
			}
			return up.Commit(1)
		}, "incomplete: 299 of 300"},
		{"unknown tensor", func(up *Upload, m Model) error {
			return up.AddChunk("extra", 0, make([]byte, 4), F32)
		}, `unknown tensor "extra"`},
		{"wrong dtype", func(up *Upload, m Model) error {
			return up.AddChunk("w64", 0, make([]byte, 8), F32)
		}, "chunk is F32, want F64"},
		{"chunk out of order", func(up *Upload, m Model) error {
			return up.AddChunk("w32", 5, make([]byte, 4), F32)
		}, "starts at element 5, want 0"},
		{"duplicate tensor", func(up *Upload, m Model) error {
			t := m.Get("w16")
			if err := up.AddChunk(t.Name, 0, t.Data, t.DType); err != nil {
				return err
			}
			return up.AddChunk(t.Name, 0, t.Data, t.DType)
		}, "already complete"},
		{"past the end", func(up *Upload, m Model) error {
			return up.AddChunk("w32", 0, make([]byte, 4*301), F32)
		}, "outside its 300 elements"},
		{"partial element", func(up *Upload, m Model) error {
			return up.AddChunk("w64", 0, make([]byte, 12), F64)
		}, "not a whole number"},
	}
	for _, spill := range []bool{false, true} {
		for _, rj := range rejections {
			t.Run(rj.name+map[bool]string{false: "/memory", true: "/spill"}[spill], func(t *testing.T) {
				rng := rand.New(rand.NewPCG(23, 24))
				updates, _ := makeUpdates(rng, 3, 300)
				cfg := AccumulatorConfig{Layout: updates[0], MaxTotalWeight: testMaxWeight}
				if spill {
					cfg.SpillDir = t.TempDir()
				}
				acc, err := NewAccumulator(cfg)
				if err != nil {
					t.Fatal(err)
				}
				for i, u := range updates[:2] {
					up, _ := acc.Begin()
					if err := chunks(rng, u, up.AddChunk); err != nil {
						t.Fatal(err)
					}
					if err := up.Commit(float64(i + 1)); err != nil {
						t.Fatal(err)
					}
				}
				before := sums(acc)
				meanBefore, err := acc.Mean()
				if err != nil {
					t.Fatal(err)
				}

				up, err := acc.Begin()
				if err != nil {
					t.Fatal(err)
				}
				err = rj.feed(up, updates[2])
				if err == nil || !strings.Contains(err.Error(), rj.want) {
					t.Fatalf("err = %v, want one mentioning %q", err, rj.want)
				}
				if err := up.Commit(3); err == nil {
					t.Fatal("a rejected upload committed")
				}
				up.Discard()
				up.Discard()

				if !bytes.Equal(sums(acc), before) {
					t.Fatal("the rejected upload changed the sum")
				}
				if acc.Count() != 2 || acc.TotalWeight() != 3 {
					t.Errorf("count %d, total %v; want 2, 3", acc.Count(), acc.TotalWeight())
				}
				meanAfter, err := acc.Mean()
				if err != nil {
					t.Fatal(err)
				}
				assertModelsEqual(t, meanAfter, meanBefore)
				if err := up.AddChunk("w32", 0, nil, F32); err == nil {
					t.Error("a discarded upload took a chunk")
				}
			})
		}
	}
}

func TestAccumulatorConcurrentUploads(t *testing.T) {
	for _, spill := range []bool{false, true} {
		t.Run(map[bool]string{false: "memory", true: "spill"}[spill], func(t *testing.T) {
			rng := rand.New(rand.NewPCG(25, 26))
			const n = 8
			// Large enough that chunks span several lock blocks.
			updates, values := makeUpdates(rng, n, 3*lockBlock/2)
			cfg := AccumulatorConfig{Layout: updates[0], MaxTotalWeight: testMaxWeight}
			if spill {
				cfg.SpillDir = t.TempDir()
			}
			acc, err := NewAccumulator(cfg)
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			errs := make(chan error, n)
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(i), 99))
					up, err := acc.Begin()
					if err != nil {
						errs <- err
						return
					}
					defer up.Discard()
					// Big chunks here: many small ones would make -race slow.
					err = chunksOf(r, updates[i], 20000, up.AddChunk)
					if i == n-1 {
						// The last upload is rejected after staging everything.
						return
					}
					if err == nil {
						err = up.Commit(float64(i + 1))
					}
					if err != nil {
						errs <- err
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			mean, err := acc.Mean()
			if err != nil {
				t.Fatal(err)
			}
			var total float64
			for i := range n - 1 {
				total += float64(i + 1)
			}
			checkAgainst(t, mean, values, func(col []float64) float64 {
				var s float64
				for i, v := range col[:n-1] {
					s += float64(i+1) * v
				}
				return s / total
			})
		})
	}
}

// chunksOf is chunks with a fixed chunk size in bytes (rounded to elements).
func chunksOf(rng *rand.Rand, m Model, chunkBytes int, add func(string, int64, []byte, DType) error) error {
	for _, i := range rng.Perm(len(m)) {
		t := m[i]
		size := t.DType.Size()
		step := max(1, chunkBytes/size)
		n := len(t.Data) / size
		for off := 0; off < n; off += step {
			end := min(n, off+step)
			if err := add(t.Name, int64(off), t.Data[off*size:end*size], t.DType); err != nil {
				return err
			}
		}
	}
	return nil
}

func TestAccumulatorDirectAddAndReset(t *testing.T) {
	layout := Model{FromFloat32("w", []int64{4}, nil), New("n", I32, []int64{1})}
	binary.LittleEndian.PutUint32(layout[1].Data, 7)
	acc, err := NewAccumulator(AccumulatorConfig{Layout: layout, MaxTotalWeight: testMaxWeight})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := acc.Mean(); err == nil || !strings.Contains(err.Error(), "no update") {
		t.Errorf("Mean of nothing: err = %v", err)
	}
	raw := FromFloat32("w", []int64{4}, []float32{1, 2, 3, 4}).Data
	if err := acc.AddChunk("w", 0, raw[:8], F32, 2); err != nil {
		t.Fatal(err)
	}
	if err := acc.AddChunk("w", 2, raw[8:], F32, 2); err != nil {
		t.Fatal(err)
	}
	if err := acc.AddWeight(2); err != nil {
		t.Fatal(err)
	}
	nan := FromFloat32("w", []int64{1}, []float32{float32(math.Inf(-1))}).Data
	directErrs := []struct {
		name string
		err  error
		want string
	}{
		{"non-finite chunk", acc.AddChunk("w", 0, nan, F32, 1), "-Inf"},
		{"integer tensor", acc.AddChunk("n", 0, make([]byte, 4), I32, 1), "only float tensors"},
		{"NaN weight", acc.AddChunk("w", 0, raw[:4], F32, math.NaN()), "positive finite"},
		{"zero weight", acc.AddWeight(0), "positive"},
	}
	for _, d := range directErrs {
		if d.err == nil || !strings.Contains(d.err.Error(), d.want) {
			t.Errorf("%s: err = %v, want one mentioning %q", d.name, d.err, d.want)
		}
	}
	if !errors.Is(directErrs[0].err, ErrNonFinite) {
		t.Errorf("non-finite error %v does not wrap ErrNonFinite", directErrs[0].err)
	}
	mean, err := acc.Mean()
	if err != nil {
		t.Fatal(err)
	}
	if got := mean.Get("w").Float32s(); got[0] != 1 || got[3] != 4 {
		t.Errorf("mean = %v, want [1 2 3 4]", got)
	}
	if n := binary.LittleEndian.Uint32(mean.Get("n").Data); n != 7 {
		t.Errorf("integer tensor = %d, want the layout's 7", n)
	}

	stale, _ := acc.Begin()
	acc.Reset()
	if acc.Count() != 0 {
		t.Errorf("count after Reset = %d", acc.Count())
	}
	if err := stale.AddChunk("w", 0, raw, F32); err != nil {
		t.Fatal(err)
	}
	if err := stale.AddChunk("n", 0, make([]byte, 4), I32); err != nil {
		t.Fatal(err)
	}
	if err := stale.Commit(1); err == nil || !strings.Contains(err.Error(), "reset") {
		t.Errorf("commit across Reset: err = %v", err)
	}
	if _, err := acc.Mean(); err == nil {
		t.Error("Mean after Reset succeeded")
	}
}

func TestNewAccumulatorRejects(t *testing.T) {
	tests := []struct {
		name string
		cfg  AccumulatorConfig
		want string
	}{
		{"empty", AccumulatorConfig{MaxTotalWeight: 1}, "empty layout"},
		{"duplicate", AccumulatorConfig{Layout: Model{New("a", F32, nil), New("a", F32, nil)}, MaxTotalWeight: 1}, "twice"},
		{"bad dtype", AccumulatorConfig{Layout: Model{{Name: "a", DType: "Q4"}}, MaxTotalWeight: 1}, "unknown dtype"},
		{"spill dir", AccumulatorConfig{Layout: Model{New("a", F32, nil)}, SpillDir: "/nonexistent/dir", MaxTotalWeight: 1}, "spill directory"},
		{"no maximum total weight", AccumulatorConfig{Layout: Model{New("a", F32, nil)}}, "maximum total weight"},
		{"infinite maximum total weight", AccumulatorConfig{Layout: Model{New("a", F32, nil)}, MaxTotalWeight: math.Inf(1)}, "maximum total weight"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewAccumulator(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

// TakeMean gives what Mean gives, without a copy, and the accumulator works
// again after Reset.
func TestTakeMean(t *testing.T) {
	layout := Model{
		FromFloat32("a", []int64{3}, []float32{0, 0, 0}),
		New("b", F64, []int64{2}),
		New("h", F16, []int64{2}),
	}
	acc, err := NewAccumulator(AccumulatorConfig{Layout: layout, MaxTotalWeight: testMaxWeight})
	if err != nil {
		t.Fatal(err)
	}
	add := func(w float64, a []float32, b []float64, h []float32) {
		t.Helper()
		bt := New("b", F64, []int64{2})
		copy(bt.Float64s(), b)
		ht := New("h", F16, []int64{2})
		if err := ht.SetFloat32(h); err != nil {
			t.Fatal(err)
		}
		up, err := acc.Begin()
		if err != nil {
			t.Fatal(err)
		}
		for _, x := range (Model{FromFloat32("a", []int64{3}, a), bt, ht}) {
			if err := up.AddChunk(x.Name, 0, x.Data, x.DType); err != nil {
				t.Fatal(err)
			}
		}
		if err := up.Commit(w); err != nil {
			t.Fatal(err)
		}
	}
	for round := range 2 {
		add(1, []float32{1, 2, 3}, []float64{4, 8}, []float32{1, 2})
		add(3, []float32{5, 6, 7}, []float64{8, 4}, []float32{3, 2})
		want, err := acc.Mean()
		if err != nil {
			t.Fatal(err)
		}
		got, err := acc.TakeMean()
		if err != nil {
			t.Fatal(err)
		}
		// (1·1 + 3·5)/4 = 4, (2+18)/4 = 5, (3+21)/4 = 6; (4+24)/4 = 7, (8+12)/4 = 5; (1+9)/4 = 2.5, 2.
		for i, name := range []string{"a", "b", "h"} {
			if !bytes.Equal(got[i].Data, want[i].Data) {
				t.Fatalf("round %d: TakeMean %s = %v, Mean gives %v", round, name, got[i].Data, want[i].Data)
			}
		}
		if v := got[0].Float32s(); v[0] != 4 || v[1] != 5 || v[2] != 6 {
			t.Fatalf("round %d: a = %v, want [4 5 6]", round, v)
		}
		if up, err := acc.Begin(); err == nil {
			for _, x := range layout {
				if err := up.AddChunk(x.Name, 0, x.Data, x.DType); err != nil {
					t.Fatal(err)
				}
			}
			if up.Commit(1) == nil {
				t.Fatal("a complete upload was counted after TakeMean and before Reset")
			}
		}
		acc.Reset()
		// The taken model is not touched by the next round's sums.
		add(1, []float32{9, 9, 9}, []float64{9, 9}, []float32{9, 9})
		if v := got[0].Float32s(); v[0] != 4 {
			t.Fatalf("round %d: the taken mean changed to %v", round, v)
		}
		acc.Reset()
	}
}

// TestSpilledStageFilesAreReused commits an upload, then stages a refused
// one and a good one in the file the first left behind: the refused one
// leaves the sum unchanged even though the reused file holds the first
// upload's bytes wherever it did not write, and Close frees the kept file.
func TestSpilledStageFilesAreReused(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	updates, values := makeUpdates(rng, 3, 200)
	dir := t.TempDir()
	acc, err := NewAccumulator(AccumulatorConfig{Layout: updates[0], SpillDir: dir, MaxTotalWeight: testMaxWeight})
	if err != nil {
		t.Fatal(err)
	}
	first, err := acc.Begin()
	if err != nil {
		t.Fatal(err)
	}
	file := first.file
	if err := chunks(rng, updates[0], first.AddChunk); err != nil {
		t.Fatal(err)
	}
	if err := first.Commit(1); err != nil {
		t.Fatal(err)
	}
	before := sums(acc)

	refused, err := acc.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if refused.file != file {
		t.Fatal("the second upload did not reuse the first one's stage file")
	}
	// Everything but one float tensor: its bytes in the file are the first
	// upload's, which must not be counted.
	var partial Model
	for _, tn := range updates[1] {
		if tn.Name != "wbf" {
			partial = append(partial, tn)
		}
	}
	if err := chunks(rng, partial, refused.AddChunk); err != nil {
		t.Fatal(err)
	}
	if err := refused.Commit(1); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("Commit of an incomplete upload in a reused file: %v, want a missing tensor", err)
	}
	refused.Discard()
	if !bytes.Equal(sums(acc), before) {
		t.Fatal("a refused upload in a reused stage file changed the sum")
	}

	second, err := acc.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if second.file != file {
		t.Fatal("the third upload did not reuse the stage file")
	}
	if err := chunks(rng, updates[1], second.AddChunk); err != nil {
		t.Fatal(err)
	}
	if err := second.Commit(3); err != nil {
		t.Fatal(err)
	}
	mean, err := acc.Mean()
	if err != nil {
		t.Fatal(err)
	}
	firstTwo := map[string][][]float64{}
	for name, cols := range values {
		firstTwo[name] = cols[:2]
	}
	checkAgainst(t, mean, firstTwo, func(col []float64) float64 { return (col[0] + 3*col[1]) / 4 })

	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("spill directory holds %d names; stage files are unlinked", len(entries))
	}
	if err := acc.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := file.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Stat of the kept stage file after Close: %v, want it closed", err)
	}
	// Uploads begun after Close still work; their files are not kept.
	late, err := acc.Begin()
	if err != nil {
		t.Fatal(err)
	}
	lateFile := late.file
	late.Discard()
	if _, err := lateFile.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("a stage file released after Close was kept open: %v", err)
	}
}

// A weight as large as a site may claim (2^62 samples) folded into updates
// at the top of their dtype's range must not overflow the sum: the mean is
// finite and is the weighted mean. Weights 1 and 6 over float32's largest
// value are the case where rounding alone carries the sum past it, which
// Mean clamps back to the exact mean.
func TestAccumulatorWeightsCannotOverflow(t *testing.T) {
	top := func(dt DType) float64 {
		switch dt {
		case F64:
			return math.MaxFloat64
		case F32:
			return math.MaxFloat32
		case BF16:
			return float64(math.Float32frombits(0x7F7F0000)) // bfloat16's largest
		}
		return 65504 // float16's largest
	}
	tests := []struct {
		name    string
		dtype   DType
		weights []float64
		values  func(DType) []float64 // one value per upload
	}{
		{"claimed 2^62 samples, float32", F32, []float64{1 << 62, 100}, func(dt DType) []float64 { return []float64{top(dt), 1e20} }},
		{"claimed 2^62 samples, float64", F64, []float64{1 << 62, 100}, func(dt DType) []float64 { return []float64{top(dt), 1e300} }},
		{"claimed 2^62 samples, bfloat16", BF16, []float64{1 << 62, 100}, func(dt DType) []float64 { return []float64{top(dt), 1} }},
		{"claimed 2^62 samples, float16", F16, []float64{1 << 62, 100}, func(dt DType) []float64 { return []float64{top(dt), 1} }},
		{"rounding at the top, float32", F32, []float64{1, 6}, func(dt DType) []float64 { return []float64{top(dt), top(dt)} }},
		{"both at the top, float64", F64, []float64{1 << 62, 1 << 62}, func(dt DType) []float64 { return []float64{-top(dt), -top(dt)} }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var total float64
			for _, w := range tc.weights {
				total += w
			}
			layout := Model{New("w", tc.dtype, []int64{3})}
			for _, take := range []bool{false, true} {
				acc, err := NewAccumulator(AccumulatorConfig{Layout: layout, MaxTotalWeight: total})
				if err != nil {
					t.Fatal(err)
				}
				values := tc.values(tc.dtype)
				var want float64
				for i, v := range values {
					u := floats(t, tc.dtype, v, v, -v)
					up, err := acc.Begin()
					if err != nil {
						t.Fatal(err)
					}
					if err := up.AddChunk("w", 0, u.Data, tc.dtype); err != nil {
						t.Fatal(err)
					}
					if err := up.Commit(tc.weights[i]); err != nil {
						t.Fatal(err)
					}
					want += tc.weights[i] / total * v
				}
				mean, err := acc.Mean()
				if take {
					mean, err = acc.TakeMean()
				}
				if err != nil {
					t.Fatalf("take %v: %v", take, err)
				}
				got := values64(t, mean.Get("w"))
				if d := math.Abs(got[0]-want) / math.Abs(want); !(d < 1e-2) || got[2] != -got[0] {
					t.Errorf("take %v: mean %v, want [%v %v %v]", take, got, want, want, -want)
				}
			}
		})
	}
}

// A weight that would take the round's total past MaxTotalWeight is refused
// and leaves the sum as it was; so are weights above the total itself or too
// small to count.
func TestAccumulatorRefusesWeightsPastTheMaximum(t *testing.T) {
	layout := Model{FromFloat32("w", []int64{2}, nil)}
	acc, err := NewAccumulator(AccumulatorConfig{Layout: layout, MaxTotalWeight: 100})
	if err != nil {
		t.Fatal(err)
	}
	commit := func(w float64) error {
		up, err := acc.Begin()
		if err != nil {
			t.Fatal(err)
		}
		defer up.Discard()
		if err := up.AddChunk("w", 0, FromFloat32("w", []int64{2}, []float32{1, 2}).Data, F32); err != nil {
			t.Fatal(err)
		}
		return up.Commit(w)
	}
	if err := commit(60); err != nil {
		t.Fatal(err)
	}
	before := sums(acc)
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"past the total", commit(41), "past the 100"},
		{"direct, past the total", acc.AddWeight(41), "past the 100"},
		{"above the total", commit(101), "more than the 100"},
		{"direct chunk above the total", acc.AddChunk("w", 0, make([]byte, 8), F32, 101), "more than the 100"},
		{"vanishing", commit(100 * 0x1p-110), "too small"},
		{"infinite", commit(math.Inf(1)), "positive finite"},
	} {
		if tc.err == nil || !strings.Contains(tc.err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want one mentioning %q", tc.name, tc.err, tc.want)
		}
	}
	if !bytes.Equal(sums(acc), before) || acc.TotalWeight() != 60 || acc.Count() != 1 {
		t.Fatalf("refused weights changed the sum (total %v, count %d)", acc.TotalWeight(), acc.Count())
	}
	if err := commit(40); err != nil {
		t.Fatalf("a weight that reaches the total exactly: %v", err)
	}
	acc.Reset()
	if err := commit(100); err != nil {
		t.Fatalf("after Reset the round's total starts again: %v", err)
	}
}

// floats makes a tensor "w" of dtype dt holding values.
func floats(t *testing.T, dt DType, values ...float64) *Tensor {
	t.Helper()
	u := New("w", dt, []int64{int64(len(values))})
	if dt == F64 {
		copy(u.Float64s(), values)
		return u
	}
	v32 := make([]float32, len(values))
	for i, v := range values {
		v32[i] = float32(v)
	}
	if err := u.SetFloat32(v32); err != nil {
		t.Fatal(err)
	}
	return u
}

// values64 reads a float tensor of any dtype as float64s.
func values64(t *testing.T, x *Tensor) []float64 {
	t.Helper()
	if x.DType == F64 {
		return append([]float64(nil), x.Float64s()...)
	}
	v32, err := x.Float32Copy()
	if err != nil {
		t.Fatal(err)
	}
	out := make([]float64, len(v32))
	for i, v := range v32 {
		out[i] = float64(v)
	}
	return out
}

// TestMemoryBudgetSpillsBeyondIt: uploads stage in memory while the stages
// there fit the MemoryBudget (kept chunks, not copies), and in the spill
// directory beyond it; either way the sum is bit for bit what staging all
// in memory gives.
func TestMemoryBudgetSpillsBeyondIt(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	updates, _ := makeUpdates(rng, 3, 300)
	budgeted, err := NewAccumulator(AccumulatorConfig{Layout: updates[0], SpillDir: t.TempDir(), MemoryBudget: 1, MaxTotalWeight: testMaxWeight})
	if err != nil {
		t.Fatal(err)
	}
	defer budgeted.Close()
	budgeted.memoryBudget = budgeted.stageBytes // room for one stage
	plain, err := NewAccumulator(AccumulatorConfig{Layout: updates[0], MaxTotalWeight: testMaxWeight})
	if err != nil {
		t.Fatal(err)
	}

	first, err := budgeted.Begin()
	if err != nil {
		t.Fatal(err)
	}
	second, err := budgeted.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if first.chunks == nil || first.file != nil {
		t.Fatal("the first upload, within the budget, is not staged in memory")
	}
	if second.file == nil {
		t.Fatal("the second upload, past the budget, is not spilled")
	}
	kept := updates[0][0].Data
	if err := chunks(rng, updates[0], first.Keep); err != nil {
		t.Fatal(err)
	}
	var staged []byte
	for _, c := range first.chunks[budgeted.index[updates[0][0].Name]] {
		staged = append(staged, c...)
		if &c[0] != &kept[len(staged)-len(c)] {
			t.Fatal("Keep copied the chunk it was to keep")
		}
	}
	if err := chunks(rng, updates[1], second.AddChunk); err != nil {
		t.Fatal(err)
	}
	for i, u := range []*Upload{first, second} {
		if err := u.Commit(float64(i + 1)); err != nil {
			t.Fatal(err)
		}
	}
	third, err := budgeted.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if third.chunks == nil {
		t.Fatal("a committed upload did not give its share of the budget back")
	}
	if err := chunks(rng, updates[2], third.AddChunk); err != nil {
		t.Fatal(err)
	}
	if err := third.Commit(3); err != nil {
		t.Fatal(err)
	}

	for i, u := range updates {
		up, err := plain.Begin()
		if err != nil {
			t.Fatal(err)
		}
		if err := chunks(rng, u, up.AddChunk); err != nil {
			t.Fatal(err)
		}
		if err := up.Commit(float64(i + 1)); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(sums(budgeted), sums(plain)) {
		t.Error("staging in memory and on disk gave another sum than staging in memory")
	}
	if budgeted.memStaged != 0 {
		t.Errorf("%d bytes of the memory budget still held after every upload ended", budgeted.memStaged)
	}
}

// TestGiveBackReusesTheMean: the model TakeMean handed over, given back
// before Reset or after ResetForGiveBack, becomes the next round's sum
// (cleared); after ResetForGiveBack a commit waits for it. A Reset without
// it allocates a new sum. The sums are right in every order.
func TestGiveBackReusesTheMean(t *testing.T) {
	for _, order := range []string{"give back, reset", "reset for give back, give back", "reset for give back, commit, give back", "reset"} {
		t.Run(order, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(9, 10))
			updates, _ := makeUpdates(rng, 2, 100)
			acc, err := NewAccumulator(AccumulatorConfig{Layout: updates[0], MaxTotalWeight: testMaxWeight})
			if err != nil {
				t.Fatal(err)
			}
			var mu sync.Mutex // rng is not safe for concurrent use
			commit := func(m Model) error {
				up, err := acc.Begin()
				if err != nil {
					return err
				}
				mu.Lock()
				err = chunks(rng, m, up.AddChunk)
				mu.Unlock()
				if err != nil {
					return err
				}
				return up.Commit(1)
			}
			if err := commit(updates[0]); err != nil {
				t.Fatal(err)
			}
			mean, err := acc.TakeMean()
			if err != nil {
				t.Fatal(err)
			}
			var given *Tensor
			for _, tn := range mean {
				if tn.DType == F32 && len(tn.Data) > 0 {
					given = tn
					break
				}
			}
			if given == nil {
				t.Fatal("no F32 tensor in the test model")
			}
			reused := func() bool {
				s := acc.slots[acc.index[given.Name]]
				return s.sum32 != nil && &asBytes(s.sum32)[0] == &given.Data[0]
			}
			switch order {
			case "give back, reset":
				acc.GiveBack(mean)
				acc.Reset()
			case "reset for give back, give back":
				acc.ResetForGiveBack()
				acc.GiveBack(mean)
			case "reset for give back, commit, give back":
				acc.ResetForGiveBack()
				committed := make(chan error, 1)
				go func() { committed <- commit(updates[1]) }()
				select {
				case err := <-committed:
					t.Fatalf("a commit went on before the sum was given back (%v)", err)
				case <-time.After(50 * time.Millisecond):
				}
				acc.GiveBack(mean)
				if err := <-committed; err != nil {
					t.Fatal(err)
				}
				if !reused() {
					t.Fatal("the commit folded into another sum than the one given back")
				}
			case "reset":
				acc.Reset()
				if reused() {
					t.Fatal("Reset reused the mean although it was not given back")
				}
			}
			if order != "reset for give back, commit, give back" {
				if order != "reset" && !reused() {
					t.Fatal("a new sum was allocated although the mean was given back")
				}
				for _, v := range acc.slots[acc.index[given.Name]].sum32 {
					if v != 0 {
						t.Fatal("the new round's sum is not zero")
					}
				}
				if err := commit(updates[1]); err != nil {
					t.Fatal(err)
				}
			}
			plain, err := NewAccumulator(AccumulatorConfig{Layout: updates[0], MaxTotalWeight: testMaxWeight})
			if err != nil {
				t.Fatal(err)
			}
			up, _ := plain.Begin()
			if err := chunks(rng, updates[1], up.AddChunk); err != nil {
				t.Fatal(err)
			}
			if err := up.Commit(1); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(sums(acc), sums(plain)) {
				t.Error("a round summed into the given-back memory differs from one summed into fresh memory")
			}
		})
	}
}
