package tensor

import (
	"encoding/binary"
	"errors"
	"math"
	"math/rand/v2"
	"sort"
	"strings"
	"testing"
)

// makeUpdates builds n updates with one tensor per float dtype plus an
// integer tensor, filled with random values that every dtype represents
// exactly (multiples of 1/8 below 64, exact even in bfloat16's 8 bits), so the
// expected results can be computed from the same float64 values.
func makeUpdates(rng *rand.Rand, n, elems int) ([]Model, map[string][][]float64) {
	names := map[DType]string{F32: "w32", F64: "w64", F16: "w16", BF16: "wbf"}
	values := map[string][][]float64{}
	updates := make([]Model, n)
	for i := range updates {
		var m Model
		for _, dt := range []DType{F32, F64, F16, BF16} {
			vals := make([]float32, elems)
			col := make([]float64, elems)
			for j := range vals {
				v := float32(rng.IntN(512)-256) / 8
				vals[j], col[j] = v, float64(v)
			}
			t := New(names[dt], dt, []int64{int64(elems)})
			if err := t.SetFloat32(vals); err != nil {
				panic(err)
			}
			m = append(m, t)
			values[names[dt]] = append(values[names[dt]], col)
		}
		steps := New("steps", I64, []int64{})
		binary.LittleEndian.PutUint64(steps.Data, uint64(100+i))
		m = append(m, steps)
		updates[i] = m
	}
	return updates, values
}

// tolerance of a result stored in dtype d, relative to the value's magnitude.
func tolerance(d DType) float64 {
	switch d {
	case F16:
		return 1.0 / 1024
	case BF16:
		return 1.0 / 128
	case F32:
		return 1e-6
	}
	return 1e-12
}

func checkAgainst(t *testing.T, got Model, values map[string][][]float64, want func(col []float64) float64) {
	t.Helper()
	for _, tn := range got {
		cols, ok := values[tn.Name]
		if !ok {
			continue
		}
		vals, err := tn.Float32Copy()
		if tn.DType == F64 {
			vals = nil
		}
		if err != nil {
			t.Fatal(err)
		}
		for j := range cols[0] {
			col := make([]float64, len(cols))
			for i := range cols {
				col[i] = cols[i][j]
			}
			w := want(col)
			var g float64
			if tn.DType == F64 {
				g = tn.Float64s()[j]
			} else {
				g = float64(vals[j])
			}
			if math.Abs(g-w) > tolerance(tn.DType)*(math.Abs(w)+1) {
				t.Fatalf("tensor %s element %d = %v, want %v (inputs %v)", tn.Name, j, g, w, col)
			}
		}
	}
}

func TestFedAvg(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	tests := []struct {
		name    string
		n       int
		elems   int
		weights []float64
	}{
		{"one update", 1, 10, []float64{5}},
		{"three weighted", 3, 37, []float64{1, 2, 3}},
		{"many, parallel path", 6, minParallel + 3, []float64{600, 1, 20, 3000, 5, 7}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			updates, values := makeUpdates(rng, tc.n, tc.elems)
			got, err := FedAvg(updates, tc.weights)
			if err != nil {
				t.Fatal(err)
			}
			if err := updates[0].Matches(got); err != nil {
				t.Fatal(err)
			}
			var total float64
			for _, w := range tc.weights {
				total += w
			}
			checkAgainst(t, got, values, func(col []float64) float64 {
				var s float64
				for i, v := range col {
					s += tc.weights[i] * v
				}
				return s / total
			})
			if steps := binary.LittleEndian.Uint64(got.Get("steps").Data); steps != 100 {
				t.Errorf("integer tensor = %d, want the first update's 100", steps)
			}
		})
	}
}

func TestFedAvgRejects(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	good, _ := makeUpdates(rng, 2, 4)
	withNaN, _ := makeUpdates(rng, 2, 4)
	withNaN[1].Get("w16").SetFloat32([]float32{1, float32(math.NaN()), 2, 3})
	reshaped, _ := makeUpdates(rng, 2, 4)
	reshaped[1][0] = New(reshaped[1][0].Name, reshaped[1][0].DType, []int64{2, 2})
	retyped, _ := makeUpdates(rng, 2, 4)
	retyped[1][1] = New(retyped[1][1].Name, F32, []int64{4})
	missing, _ := makeUpdates(rng, 2, 4)
	missing[1] = missing[1][1:]
	tests := []struct {
		name    string
		updates []Model
		weights []float64
		want    string
	}{
		{"no updates", nil, nil, "no updates"},
		{"weight count", good, []float64{1}, "1 weights for 2 updates"},
		{"zero weight", good, []float64{1, 0}, "weight 1 is 0"},
		{"negative weight", good, []float64{-1, 1}, "weight 0 is -1"},
		{"NaN weight", good, []float64{math.NaN(), 1}, "weight 0 is NaN"},
		{"NaN in update", withNaN, []float64{1, 1}, "not finite"},
		{"shape", reshaped, []float64{1, 1}, "want F32[4]"},
		{"dtype", retyped, []float64{1, 1}, "is F32[4], want F64[4]"},
		{"missing tensor", missing, []float64{1, 1}, "is missing"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := FedAvg(tc.updates, tc.weights)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
	_, err := FedAvg(withNaN, []float64{1, 1})
	if !errors.Is(err, ErrNonFinite) {
		t.Errorf("NaN error %v does not wrap ErrNonFinite", err)
	}
}

func median(col []float64) float64 {
	s := append([]float64(nil), col...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func trimmedMean(beta float64) func([]float64) float64 {
	return func(col []float64) float64 {
		s := append([]float64(nil), col...)
		sort.Float64s(s)
		k := int(beta * float64(len(s)))
		var sum float64
		for _, v := range s[k : len(s)-k] {
			sum += v
		}
		return sum / float64(len(s)-2*k)
	}
}

func TestRobustAggregators(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	tests := []struct {
		name  string
		n     int
		elems int
		agg   func([]Model) (Model, error)
		want  func([]float64) float64
	}{
		{"median of one", 1, 5, Median, median},
		{"median odd", 5, 33, Median, median},
		{"median even", 4, 33, Median, median},
		{"median many (sort path)", 31, 50, Median, median},
		{"median parallel", 5, 40000, Median, median},
		{"trimmed mean beta 0", 4, 20, func(u []Model) (Model, error) { return TrimmedMean(u, 0) }, trimmedMean(0)},
		{"trimmed mean beta 0.2", 5, 20, func(u []Model) (Model, error) { return TrimmedMean(u, 0.2) }, trimmedMean(0.2)},
		{"trimmed mean beta 0.49", 7, 20, func(u []Model) (Model, error) { return TrimmedMean(u, 0.49) }, trimmedMean(0.49)},
		{"trimmed mean parallel", 6, 30000, func(u []Model) (Model, error) { return TrimmedMean(u, 0.25) }, trimmedMean(0.25)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			updates, values := makeUpdates(rng, tc.n, tc.elems)
			got, err := tc.agg(updates)
			if err != nil {
				t.Fatal(err)
			}
			checkAgainst(t, got, values, tc.want)
			if steps := binary.LittleEndian.Uint64(got.Get("steps").Data); steps != 100 {
				t.Errorf("integer tensor = %d, want the first update's 100", steps)
			}
		})
	}
}

func TestMedianIgnoresOutliers(t *testing.T) {
	// Four honest updates near 1 and one attacker at 1e6: the median stays
	// with the honest ones; FedAvg does not.
	var updates []Model
	for _, v := range []float32{0.9, 1.0, 1.1, 1.2, 1e6} {
		updates = append(updates, Model{FromFloat32("w", []int64{2}, []float32{v, -v})})
	}
	got, err := Median(updates)
	if err != nil {
		t.Fatal(err)
	}
	if w := got[0].Float32s(); w[0] != 1.1 || w[1] != -1.1 {
		t.Errorf("median = %v, want [1.1 -1.1]", w)
	}
	tm, err := TrimmedMean(updates, 0.2)
	if err != nil {
		t.Fatal(err)
	}
	if w := tm[0].Float32s(); math.Abs(float64(w[0])-1.1) > 1e-6 {
		t.Errorf("trimmed mean = %v, want 1.1", w[0])
	}
}

func TestRobustRejects(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	good, _ := makeUpdates(rng, 3, 4)
	bad, _ := makeUpdates(rng, 3, 4)
	bad[2].Get("w32").Float32s()[3] = float32(math.Inf(1))
	tests := []struct {
		name string
		run  func() error
		want string
	}{
		{"median NaN", func() error { _, err := Median(bad); return err }, "update 2: tensor \"w32\" element 3 is +Inf"},
		{"trimmed NaN", func() error { _, err := TrimmedMean(bad, 0.1); return err }, "element 3"},
		{"beta 0.5", func() error { _, err := TrimmedMean(good, 0.5); return err }, "outside [0, 0.5)"},
		{"beta negative", func() error { _, err := TrimmedMean(good, -0.1); return err }, "outside"},
		{"beta NaN", func() error { _, err := TrimmedMean(good, math.NaN()); return err }, "outside"},
		{"no updates", func() error { _, err := Median(nil); return err }, "no updates"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.run(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}
