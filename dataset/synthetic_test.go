package dataset

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"
)

// nearestCentroid fits class means on train and returns the accuracy of
// assigning each validation sample to the nearest one: a learner simple
// enough to live in this package and strong enough for Gaussian clusters.
func nearestCentroid(d *Dataset) float64 {
	f := d.Features()
	means := make([]float64, d.Classes*f)
	counts := make([]float64, d.Classes)
	for r := range d.Train.N {
		y := int(d.Train.Y[r])
		counts[y]++
		for j := range f {
			means[y*f+j] += float64(d.Train.X[r*f+j])
		}
	}
	for c := range d.Classes {
		for j := range f {
			means[c*f+j] /= max(counts[c], 1)
		}
	}
	correct := 0
	for r := range d.Valid.N {
		best, bestDist := 0, math.Inf(1)
		for c := range d.Classes {
			var dist float64
			for j := range f {
				diff := float64(d.Valid.X[r*f+j]) - means[c*f+j]
				dist += diff * diff
			}
			if dist < bestDist {
				best, bestDist = c, dist
			}
		}
		if best == int(d.Valid.Y[r]) {
			correct++
		}
	}
	return float64(correct) / float64(d.Valid.N)
}

func TestSyntheticLearnable(t *testing.T) {
	tests := []struct {
		features, classes int
		spread            float64
		minAcc, maxAcc    float64
	}{
		// In two dimensions random centres may fall close together.
		{2, 3, 1, 0.6, 1},
		{16, 4, 1, 0.9, 1},
		{64, 10, 1, 0.9, 1},
		// A wider spread makes the problem harder but still learnable.
		{16, 4, 3, 0.4, 0.9},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("f=%d,k=%d,spread=%g", tc.features, tc.classes, tc.spread), func(t *testing.T) {
			d, err := Load(Config{Kind: KindSynthetic, Features: tc.features, Classes: tc.classes, ClusterSpread: tc.spread, Seed: 1})
			if err != nil {
				t.Fatal(err)
			}
			if err := d.Validate(); err != nil {
				t.Fatal(err)
			}
			if d.Train.N != DefaultTrainSamples || d.Valid.N != DefaultValidSamples || d.Classes != tc.classes {
				t.Fatalf("got %d/%d samples and %d classes", d.Train.N, d.Valid.N, d.Classes)
			}
			acc := nearestCentroid(d)
			if acc < tc.minAcc || acc > tc.maxAcc {
				t.Errorf("nearest-centroid accuracy %.3f outside [%g, %g]", acc, tc.minAcc, tc.maxAcc)
			}
			chance := 1 / float64(tc.classes)
			if acc < chance+0.2 {
				t.Errorf("accuracy %.3f is near chance %.3f", acc, chance)
			}
		})
	}
}

func TestSyntheticShards(t *testing.T) {
	base := Config{Kind: KindSynthetic, TrainSamples: 3000, ValidSamples: 600, Seed: 5}
	whole, err := Load(base)
	if err != nil {
		t.Fatal(err)
	}
	var shards []*Dataset
	for i := 1; i <= 3; i++ {
		c := base
		c.Shard = fmt.Sprintf("%d/3", i)
		d, err := Load(c)
		if err != nil {
			t.Fatal(err)
		}
		if d.Train.N != 1000 || d.Valid.N != 200 || d.Test.N != 200 {
			t.Errorf("shard %d: %d/%d/%d samples, want 1000/200/200 (the test split as large as the validation split)", i, d.Train.N, d.Valid.N, d.Test.N)
		}
		if !strings.Contains(d.Description, fmt.Sprintf("shard %d/3", i)) {
			t.Errorf("description %q does not name the shard", d.Description)
		}
		// Identically distributed: each shard alone learns the whole problem.
		if acc := nearestCentroid(d); acc < 0.9 {
			t.Errorf("shard %d: accuracy %.3f", i, acc)
		}
		shards = append(shards, d)
	}
	if slices.Equal(shards[0].Train.X[:16], shards[1].Train.X[:16]) {
		t.Error("shards 1 and 2 start with the same sample")
	}
	total := 0
	for _, d := range shards {
		total += d.Train.N
	}
	if total != whole.Train.N {
		t.Errorf("shards hold %d samples, whole data set %d", total, whole.Train.N)
	}
	again, err := Load(base)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(again.Train.X, whole.Train.X) {
		t.Error("the same seed generated different data")
	}
	// The test split is drawn last: asking for another size leaves the
	// training and validation data as they were.
	more := base
	more.TestSamples = 900
	bigger, err := Load(more)
	if err != nil {
		t.Fatal(err)
	}
	if bigger.Test.N != 900 || !slices.Equal(bigger.Train.X, whole.Train.X) || !slices.Equal(bigger.Valid.X, whole.Valid.X) || !slices.Equal(bigger.Test.X[:len(whole.Test.X)], whole.Test.X) {
		t.Error("test_samples changed the other splits")
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		c    Config
		want string // "" for valid
	}{
		{"idx", Config{Kind: KindIDX, Path: "/d"}, ""},
		{"csv", Config{Kind: KindCSV, Path: "/f.csv", LabelColumn: "y", ValidFraction: 0.1, Shard: "1/2"}, ""},
		{"synthetic", Config{Kind: KindSynthetic, Features: 3, Classes: 2, Shard: "2/3", DirichletAlpha: 0.5}, ""},
		{"no kind", Config{}, "kind is missing"},
		{"unknown kind", Config{Kind: "parquet"}, `unknown kind "parquet"`},
		{"idx without path", Config{Kind: KindIDX}, "needs a path"},
		{"synthetic with path", Config{Kind: KindSynthetic, Path: "/x"}, "takes no path"},
		{"csv option on idx", Config{Kind: KindIDX, Path: "/d", LabelColumn: "y"}, "label_column applies to kind \"csv\""},
		{"synthetic option on csv", Config{Kind: KindCSV, Path: "/f", Classes: 3}, "classes applies to kind \"synthetic\""},
		{"bad shard", Config{Kind: KindIDX, Path: "/d", Shard: "3/2"}, "want 1 <= i <= N"},
		{"alpha without shard", Config{Kind: KindIDX, Path: "/d", DirichletAlpha: 0.5}, "needs a shard"},
		{"negative alpha", Config{Kind: KindIDX, Path: "/d", Shard: "1/2", DirichletAlpha: -1}, "dirichlet_alpha"},
		{"fraction 1", Config{Kind: KindCSV, Path: "/f", ValidFraction: 1}, "valid_fraction"},
		{"idx fraction", Config{Kind: KindIDX, Path: "/d", ValidFraction: 0.1}, ""},
		{"negative idx fraction", Config{Kind: KindIDX, Path: "/d", ValidFraction: -0.1}, "valid_fraction"},
		{"synthetic fraction", Config{Kind: KindSynthetic, ValidFraction: 0.1}, "valid_fraction applies to kinds \"idx\" and \"csv\""},
		{"test samples on idx", Config{Kind: KindIDX, Path: "/d", TestSamples: 5}, "test_samples applies to kind \"synthetic\""},
		{"negative test samples", Config{Kind: KindSynthetic, TestSamples: -1}, "test_samples"},
		{"one class", Config{Kind: KindSynthetic, Classes: 1}, "classes 1"},
		{"negative spread", Config{Kind: KindSynthetic, ClusterSpread: -1}, "cluster_spread"},
		{"too large", Config{Kind: KindSynthetic, Features: 1 << 20, TrainSamples: 1 << 20}, "more than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.c.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("unexpected error %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("error %v, want one mentioning %q", err, tc.want)
			}
			if tc.want != "" {
				if _, err := Load(tc.c); err == nil {
					t.Fatal("Load accepted an invalid configuration")
				}
			}
		})
	}
}
