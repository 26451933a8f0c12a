package dataset

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"
)

func TestParseShard(t *testing.T) {
	tests := []struct {
		in      string
		i, n    int
		wantErr bool
	}{
		{"", 1, 1, false},
		{"1/1", 1, 1, false},
		{"3/4", 3, 4, false},
		{" 2 / 5 ", 2, 5, false},
		{"0/4", 0, 0, true},
		{"5/4", 0, 0, true},
		{"1/0", 0, 0, true},
		{"-1/3", 0, 0, true},
		{"2", 0, 0, true},
		{"a/b", 0, 0, true},
		{"1/2/3", 0, 0, true},
	}
	for _, tc := range tests {
		i, n, err := ParseShard(tc.in)
		if (err != nil) != tc.wantErr || i != tc.i || n != tc.n {
			t.Errorf("ParseShard(%q) = %d, %d, %v; want %d, %d, error %v", tc.in, i, n, err, tc.i, tc.n, tc.wantErr)
		}
	}
}

// TestShardsPartition loads every shard of a file-backed data set and checks,
// by the sample identities written into the pixels, that the shards are
// disjoint, cover every split, keep the training files' samples out of the
// test split and the test file's out of the others, and are reproducible.
func TestShardsPartition(t *testing.T) {
	set := idxSet{nTrain: 600, nTest: 120, rows: 2, cols: 2, classes: 6}
	dir := t.TempDir()
	set.write(t, dir, [4]bool{true, true, false, false})
	tests := []struct {
		n     int
		alpha float64
	}{
		{1, 0}, {2, 0}, {4, 0}, {7, 0},
		{3, 0.1}, {4, 0.5}, {5, 100},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("n=%d,alpha=%g", tc.n, tc.alpha), func(t *testing.T) {
			seenTrain := make([]int, set.nTrain) // in Train or Valid
			seenTest := make([]int, set.nTest)
			for i := 1; i <= tc.n; i++ {
				c := Config{Kind: KindIDX, Path: dir, Shard: fmt.Sprintf("%d/%d", i, tc.n), DirichletAlpha: tc.alpha, Seed: 42}
				d, err := Load(c)
				if err != nil {
					t.Fatal(err)
				}
				if d.Train.N == 0 || d.Valid.N == 0 || d.Test.N == 0 {
					t.Fatalf("shard %d is empty: %d train, %d valid, %d test", i, d.Train.N, d.Valid.N, d.Test.N)
				}
				if d.Classes != set.classes {
					t.Fatalf("shard %d sees %d classes, want %d", i, d.Classes, set.classes)
				}
				if tc.alpha == 0 {
					const train = 480 // 600 less a fifth held out for validation
					if lo, hi := train/tc.n, (train+tc.n-1)/tc.n; d.Train.N < lo || d.Train.N > hi {
						t.Errorf("uniform shard %d has %d samples, want %d..%d", i, d.Train.N, lo, hi)
					}
				}
				for r := range d.Train.N {
					id := sampleID(d.Train.X, d.Features(), r)
					seenTrain[id]++
					if want := int32(set.labels(set.nTrain)[id]); d.Train.Y[r] != want {
						t.Fatalf("shard %d: sample %d has label %d, want %d", i, id, d.Train.Y[r], want)
					}
				}
				for r := range d.Valid.N {
					seenTrain[sampleID(d.Valid.X, d.Features(), r)]++
				}
				for r := range d.Test.N {
					id := sampleID(d.Test.X, d.Features(), r) - testID
					if id < 0 || id >= set.nTest {
						t.Fatalf("shard %d: test sample %d is not from the test file", i, id+testID)
					}
					seenTest[id]++
				}
				again, err := Load(c)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(again.Train.X, d.Train.X) || !slices.Equal(again.Valid.Y, d.Valid.Y) || !slices.Equal(again.Test.X, d.Test.X) {
					t.Errorf("shard %d differs between two loads", i)
				}
			}
			for id, k := range seenTrain {
				if k != 1 {
					t.Fatalf("training file sample %d is in %d training or validation shards, want exactly 1", id, k)
				}
			}
			for id, k := range seenTest {
				if k != 1 {
					t.Fatalf("test sample %d is in %d shards, want exactly 1", id, k)
				}
			}
		})
	}
}

// skew is the mean total-variation distance between each shard's label
// distribution and the overall one: 0 for identical mixes, near 1 when every
// shard holds a single class.
func skew(t *testing.T, labels []int32, classes int, parts [][]int) float64 {
	t.Helper()
	global := make([]float64, classes)
	for _, y := range labels {
		global[y] += 1 / float64(len(labels))
	}
	var sum float64
	for _, p := range parts {
		local := make([]float64, classes)
		for _, i := range p {
			local[labels[i]] += 1 / float64(len(p))
		}
		var tv float64
		for c := range classes {
			tv += math.Abs(local[c]-global[c]) / 2
		}
		sum += tv
	}
	return sum / float64(len(parts))
}

func balancedLabels(n, classes int) []int32 {
	y := make([]int32, n)
	for i := range y {
		y[i] = int32(i % classes)
	}
	return y
}

func TestDirichletSkew(t *testing.T) {
	train, valid, test := balancedLabels(10000, 10), balancedLabels(2000, 10), balancedLabels(3000, 10)
	sets := []labelled{{"training", train}, {"validation", valid}, {"test", test}}
	tests := []struct {
		alpha              float64
		minSkew, maxSkew   float64
		validFollowsLabels bool
	}{
		{alpha: 0, minSkew: 0, maxSkew: 0.05},
		{alpha: 100, minSkew: 0, maxSkew: 0.1},
		{alpha: 0.5, minSkew: 0.3, maxSkew: 1},
		{alpha: 0.1, minSkew: 0.5, maxSkew: 1},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("alpha=%g", tc.alpha), func(t *testing.T) {
			parts, err := partition(sets, 10, 4, tc.alpha, 7)
			if err != nil {
				t.Fatal(err)
			}
			tr := parts[0]
			s := skew(t, train, 10, tr)
			if s < tc.minSkew || s > tc.maxSkew {
				t.Errorf("training skew %.3f outside [%g, %g]", s, tc.minSkew, tc.maxSkew)
			}
			if tc.alpha > 0 {
				// The validation and test splits of a shard follow its
				// training mix.
				mix := func(labels []int32, idx []int) []float64 {
					m := make([]float64, 10)
					for _, i := range idx {
						m[labels[i]] += 1 / float64(len(idx))
					}
					return m
				}
				for j := range tr {
					trainMix := mix(train, tr[j])
					for k, other := range sets[1:] {
						otherMix := mix(other.labels, parts[k+1][j])
						for c := range 10 {
							if math.Abs(trainMix[c]-otherMix[c]) > 0.05 {
								t.Errorf("shard %d class %d: %.2f of training but %.2f of %s", j, c, trainMix[c], otherMix[c], other.name)
							}
						}
					}
				}
			}
			again, err := partition(sets, 10, 4, tc.alpha, 7)
			if err != nil {
				t.Fatal(err)
			}
			for k := range parts {
				for j := range parts[k] {
					if !slices.Equal(parts[k][j], again[k][j]) {
						t.Fatalf("%s shard %d differs between two runs with the same seed", sets[k].name, j)
					}
				}
			}
			other, err := partition(sets, 10, 4, tc.alpha, 8)
			if err != nil {
				t.Fatal(err)
			}
			if slices.Equal(other[0][0], tr[0]) {
				t.Errorf("seeds 7 and 8 give the same shard")
			}
		})
	}
}

// TestDirichletNonEmpty uses a skew so strong that most draws leave shards
// without data, and more shards than classes: every shard must still get
// its minimum.
func TestDirichletNonEmpty(t *testing.T) {
	train, valid, test := balancedLabels(500, 3), balancedLabels(30, 3), balancedLabels(20, 3)
	for seed := range int64(20) {
		parts, err := partition([]labelled{{"training", train}, {"validation", valid}, {"test", test}}, 3, 8, 0.001, seed)
		if err != nil {
			t.Fatal(err)
		}
		tr, va, te := parts[0], parts[1], parts[2]
		total := 0
		for j := range tr {
			if len(tr[j]) < 10 || len(va[j]) < 1 || len(te[j]) < 1 {
				t.Fatalf("seed %d: shard %d has %d training, %d validation and %d test samples", seed, j, len(tr[j]), len(va[j]), len(te[j]))
			}
			total += len(tr[j])
		}
		if total != len(train) {
			t.Fatalf("seed %d: shards hold %d samples, want %d", seed, total, len(train))
		}
	}
}

func TestPartitionTooFewSamples(t *testing.T) {
	if _, err := partition([]labelled{{"training", balancedLabels(3, 2)}, {"validation", nil}}, 2, 4, 0, 1); err == nil {
		t.Error("3 samples cut into 4 shards: no error")
	}
	if _, err := partition([]labelled{{"training", balancedLabels(30, 2)}, {"validation", balancedLabels(2, 2)}}, 2, 4, 0.5, 1); err == nil || !strings.Contains(err.Error(), "2 validation samples") {
		t.Errorf("2 validation samples cut into 4 shards: %v", err)
	}
	// A split the source lacks (a CSV file's test split) is no obstacle.
	if _, err := partition([]labelled{{"training", balancedLabels(30, 2)}, {"validation", balancedLabels(8, 2)}, {"test", nil}}, 2, 4, 0.5, 1); err != nil {
		t.Errorf("no test split: %v", err)
	}
}

// TestShardMatchesLoad checks that cutting a loaded data set in memory gives
// the shard a loader gives, so simulations and sites see the same data.
func TestShardMatchesLoad(t *testing.T) {
	base := Config{Kind: KindSynthetic, TrainSamples: 900, ValidSamples: 300, Seed: 11}
	whole, err := Load(base)
	if err != nil {
		t.Fatal(err)
	}
	for _, alpha := range []float64{0, 0.3} {
		for i := 1; i <= 3; i++ {
			c := base
			c.Shard, c.DirichletAlpha = fmt.Sprintf("%d/3", i), alpha
			loaded, err := Load(c)
			if err != nil {
				t.Fatal(err)
			}
			cut, err := whole.Shard(i, 3, alpha, 11)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(loaded.Train.X, cut.Train.X) || !slices.Equal(loaded.Valid.Y, cut.Valid.Y) || !slices.Equal(loaded.Test.X, cut.Test.X) ||
				loaded.Description != cut.Description {
				t.Errorf("alpha %g shard %d: Load and Shard differ (%q vs %q)", alpha, i, loaded.Description, cut.Description)
			}
		}
	}
	if whole.Train.N != 900 {
		t.Errorf("Shard changed the whole data set: %d samples", whole.Train.N)
	}
	for _, bad := range [][2]int{{0, 3}, {4, 3}, {1, 0}} {
		if _, err := whole.Shard(bad[0], bad[1], 0, 1); err == nil {
			t.Errorf("Shard(%d, %d) accepted", bad[0], bad[1])
		}
	}
	if _, err := whole.Shard(1, 2, -1, 1); err == nil {
		t.Error("negative alpha accepted")
	}
}
