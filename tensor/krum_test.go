package tensor

import (
	"cmp"
	"encoding/binary"
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

// handUpdates are five updates of a model whose two float elements sit in
// two tensors of different dtypes (a: F32, b: F64), plus an integer step
// counter that is 100+i in update i. As points (a, b):
//
//	u0 = (9, 9)   the outlier
//	u1 = (0, 0)
//	u2 = (1, 0)
//	u3 = (0, 2)
//	u4 = (1, 1)
//
// Squared distances:
//
//	     u1   u2   u3   u4
//	u0  162  145  130  128
//	u1         1    4    2
//	u2              5    1
//	u3                   2
//
// With f = 1 each score sums the n−f−2 = 2 smallest distances to the others:
//
//	u0: 128+130 = 258   u1: 1+2 = 3   u2: 1+1 = 2   u3: 2+4 = 6   u4: 1+2 = 3
//
// so Krum picks u2, and the order by score is u2, u1, u4, u3, u0 (u1 and u4
// tie at 3; the earlier comes first).
func handUpdates() []Model {
	points := [][2]float64{{9, 9}, {0, 0}, {1, 0}, {0, 2}, {1, 1}}
	out := make([]Model, len(points))
	for i, p := range points {
		b := New("b", F64, []int64{1})
		b.Float64s()[0] = p[1]
		steps := New("steps", I64, []int64{})
		binary.LittleEndian.PutUint64(steps.Data, uint64(100+i))
		out[i] = Model{FromFloat32("a", []int64{1}, []float32{float32(p[0])}), b, steps}
	}
	return out
}

// point returns a hand model's (a, b) and its step counter.
func point(t *testing.T, m Model) ([2]float64, uint64) {
	t.Helper()
	if err := handUpdates()[0].Matches(m); err != nil {
		t.Fatal(err)
	}
	return [2]float64{float64(m.Get("a").Float32s()[0]), m.Get("b").Float64s()[0]}, binary.LittleEndian.Uint64(m.Get("steps").Data)
}

func TestKrumByHand(t *testing.T) {
	updates := handUpdates()
	idx, err := checkUpdates(updates)
	if err != nil {
		t.Fatal(err)
	}
	scores, err := krumScores(idx, updates[0], 1, "krum")
	if err != nil {
		t.Fatal(err)
	}
	if want := []float64{258, 3, 2, 6, 3}; !slices.Equal(scores, want) {
		t.Fatalf("scores %v, want %v", scores, want)
	}
	got, err := Krum(updates, 1)
	if err != nil {
		t.Fatal(err)
	}
	if p, steps := point(t, got); p != [2]float64{1, 0} || steps != 102 {
		t.Errorf("krum chose %v with steps %d, want u2 = [1 0] with its steps 102", p, steps)
	}
	// The result is a copy: changing it leaves the update alone.
	got.Get("a").Float32s()[0] = 42
	if updates[2].Get("a").Float32s()[0] != 1 {
		t.Error("Krum returned the update itself, not a copy")
	}
}

func TestMultiKrumByHand(t *testing.T) {
	tests := []struct {
		m    int
		want [2]float64 // the mean of the m best of u2, u1, u4, u3
	}{
		{1, [2]float64{1, 0}},             // u2: Krum
		{2, [2]float64{0.5, 0}},           // u2, u1 (u1 beats u4 on the tie)
		{3, [2]float64{2.0 / 3, 1.0 / 3}}, // u2, u1, u4
		{4, [2]float64{0.5, 0.75}},        // u2, u1, u4, u3: n−f, all but the outlier
	}
	for _, tc := range tests {
		got, err := MultiKrum(handUpdates(), 1, tc.m)
		if err != nil {
			t.Fatalf("m=%d: %v", tc.m, err)
		}
		p, steps := point(t, got)
		if math.Abs(p[0]-tc.want[0]) > 1e-6 || math.Abs(p[1]-tc.want[1]) > 1e-12 {
			t.Errorf("m=%d: mean %v, want %v", tc.m, p, tc.want)
		}
		if steps != 102 {
			t.Errorf("m=%d: steps %d, want the best-scored update's 102", tc.m, steps)
		}
	}
}

// bruteScores computes Krum scores straight from the definition, over the
// float64 values makeUpdates reports.
func bruteScores(values map[string][][]float64, n, f int) []float64 {
	dist := make([][]float64, n)
	for i := range dist {
		dist[i] = make([]float64, n)
	}
	for _, cols := range values {
		for i := range n {
			for j := range n {
				for k := range cols[i] {
					d := cols[i][k] - cols[j][k]
					dist[i][j] += d * d
				}
			}
		}
	}
	scores := make([]float64, n)
	for i := range n {
		row := slices.Delete(slices.Clone(dist[i]), i, i+1)
		slices.Sort(row)
		for _, d := range row[:n-f-2] {
			scores[i] += d
		}
	}
	return scores
}

// Scores over every float dtype (F32, F64, F16, BF16 tensors in one model),
// on the serial and the parallel path, equal the definition's.
func TestKrumScoresEveryDType(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	tests := []struct {
		name     string
		n, f     int
		elems    int
		parallel bool
	}{
		{"smallest", 3, 0, 7, false},
		{"f=2", 8, 2, 33, false},
		{"parallel", 6, 1, 3000, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			updates, values := makeUpdates(rng, tc.n, tc.elems)
			if work := 4 * tc.elems * tc.n * (tc.n - 1) / 2; (work >= minParallel) != tc.parallel {
				t.Fatalf("work %d does not take the path the case is named for", work)
			}
			idx, err := checkUpdates(updates)
			if err != nil {
				t.Fatal(err)
			}
			got, err := krumScores(idx, updates[0], tc.f, "krum")
			if err != nil {
				t.Fatal(err)
			}
			want := bruteScores(values, tc.n, tc.f)
			for i := range want {
				// The values are multiples of 1/8, so every sum is exact.
				if got[i] != want[i] {
					t.Errorf("score %d = %v, want %v", i, got[i], want[i])
				}
			}
			best := slices.Index(want, slices.Min(want))
			k, err := Krum(updates, tc.f)
			if err != nil {
				t.Fatal(err)
			}
			if Digest(k) != Digest(updates[best]) {
				t.Errorf("Krum did not return update %d, the best-scored", best)
			}
		})
	}
}

// Multi-Krum averages the selected updates in every dtype, as FedAvg with
// equal weights would.
func TestMultiKrumEveryDType(t *testing.T) {
	rng := rand.New(rand.NewPCG(23, 24))
	const n, f, m = 7, 2, 4
	updates, values := makeUpdates(rng, n, 20)
	scores := bruteScores(values, n, f)
	order := []int{0, 1, 2, 3, 4, 5, 6}
	slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(scores[a], scores[b]) })
	got, err := MultiKrum(updates, f, m)
	if err != nil {
		t.Fatal(err)
	}
	checkAgainst(t, got, values, func(col []float64) float64 {
		var s float64
		for _, i := range order[:m] {
			s += col[i]
		}
		return s / m
	})
	if steps := binary.LittleEndian.Uint64(got.Get("steps").Data); steps != uint64(100+order[0]) {
		t.Errorf("integer tensor %d, want the best-scored update's %d", steps, 100+order[0])
	}
}

// A Byzantine update of huge values, wherever it sits among the updates and
// in whichever dtype, is never chosen by Krum nor averaged in by multi-Krum,
// while the mean (FedAvg) is dragged away by it.
func TestKrumNeverChoosesTheByzantineUpdate(t *testing.T) {
	rng := rand.New(rand.NewPCG(25, 26))
	const n, f = 6, 1
	for _, dt := range []DType{F32, F64, F16, BF16} {
		for bad := range n {
			updates := make([]Model, n)
			for i := range updates {
				vals := make([]float32, 50)
				for k := range vals {
					vals[k] = 1 + float32(rng.NormFloat64())/10
					if i == bad {
						vals[k] = 6e4 // near F16's largest
					}
				}
				w := New("w", dt, []int64{50})
				if err := w.SetFloat32(vals); err != nil {
					t.Fatal(err)
				}
				updates[i] = Model{w}
			}
			k, err := Krum(updates, f)
			if err != nil {
				t.Fatal(err)
			}
			if Digest(k) == Digest(updates[bad]) {
				t.Errorf("%s, Byzantine update %d: Krum chose it", dt, bad)
			}
			mk, err := MultiKrum(updates, f, n-f)
			if err != nil {
				t.Fatal(err)
			}
			vals, _ := mk[0].Float32Copy()
			if mx := slices.Max(vals); mx > 2 {
				t.Errorf("%s, Byzantine update %d: multi-Krum's mean reaches %v, want the honest ones' near 1", dt, bad, mx)
			}
		}
	}
}

func TestKrumRejects(t *testing.T) {
	rng := rand.New(rand.NewPCG(27, 28))
	five, _ := makeUpdates(rng, 5, 4)
	nan, _ := makeUpdates(rng, 5, 4)
	nan[3].Get("wbf").SetFloat32([]float32{0, 1, float32(math.NaN()), 2})
	inf, _ := makeUpdates(rng, 5, 4)
	inf[1].Get("w64").Float64s()[0] = math.Inf(-1)
	reshaped, _ := makeUpdates(rng, 5, 4)
	reshaped[4][0] = New(reshaped[4][0].Name, reshaped[4][0].DType, []int64{2, 2})
	tests := []struct {
		name string
		run  func() error
		want string
	}{
		{"f too large for n", func() error { _, err := Krum(five, 2); return err }, "krum: 5 updates cannot outweigh 2 Byzantine ones: Krum needs at least 2f+3 = 7"},
		{"multi-krum f too large", func() error { _, err := MultiKrum(five[:4], 1, 1); return err }, "multi-krum: 4 updates cannot outweigh 1 Byzantine ones: Krum needs at least 2f+3 = 5"},
		{"f negative", func() error { _, err := Krum(five, -1); return err }, "want 0 or more"},
		{"no updates", func() error { _, err := Krum(nil, 0); return err }, "0 updates"},
		{"select above n−f", func() error { _, err := MultiKrum(five, 1, 5); return err }, "select 1 to 4 (n−f)"},
		{"select zero", func() error { _, err := MultiKrum(five, 1, 0); return err }, "cannot average 0 of 5"},
		{"NaN", func() error { _, err := Krum(nan, 1); return err }, `krum: update 3: tensor "wbf" element 2 is NaN`},
		{"Inf", func() error { _, err := MultiKrum(inf, 1, 2); return err }, `multi-krum: update 1: tensor "w64" element 0 is -Inf`},
		{"shape", func() error { _, err := Krum(reshaped, 1); return err }, "update 4 does not match update 0"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.run(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
	if _, err := Krum(nan, 1); !errors.Is(err, ErrNonFinite) {
		t.Errorf("NaN error %v does not wrap ErrNonFinite", err)
	}
}

// A model without float tensors scores every update 0: Krum takes the first.
func TestKrumWithoutFloatTensors(t *testing.T) {
	var updates []Model
	for i := range 3 {
		steps := New("steps", I64, []int64{})
		binary.LittleEndian.PutUint64(steps.Data, uint64(i))
		updates = append(updates, Model{steps})
	}
	got, err := Krum(updates, 0)
	if err != nil {
		t.Fatal(err)
	}
	if s := binary.LittleEndian.Uint64(got[0].Data); s != 0 {
		t.Errorf("steps %d, want the first update's 0", s)
	}
}

// BenchmarkKrum measures scoring 10 updates of a 1 Mi-element F32 model
// (45 pairs) against the median of the same updates, the other algorithm
// that holds them all (go test -run '^$' -bench Krum ./tensor).
func BenchmarkKrum(b *testing.B) {
	updates, _ := makeUpdates(rand.New(rand.NewPCG(1, 2)), 10, 1<<18) // 4 tensors of 256 Ki
	for _, c := range []struct {
		name string
		agg  func([]Model) (Model, error)
	}{
		{"krum", func(u []Model) (Model, error) { return Krum(u, 2) }},
		{"median", Median},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(updates[0].Bytes() * int64(len(updates)))
			for range b.N {
				if _, err := c.agg(updates); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
