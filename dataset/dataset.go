// Package dataset loads labelled classification data into memory for the
// built-in runners: IDX files (the MNIST family), CSV tables, and generated
// Gaussian clusters for demos and tests.
//
// A data set has three splits. The training split is what sites train on;
// the validation split is held out from the training data and scores the
// models of every round (and so picks the best); the test split is kept
// apart from both, for one final evaluation of the model a researcher
// keeps. Results quoted on the test split have not been used to choose
// anything. Runners see the training and validation splits only.
//
// Federated experiments are usually simulated by cutting one data set into
// disjoint parts, one per site. Every loader therefore accepts a shard ("i/N")
// and an optional Dirichlet label skew, applied identically to every split,
// so N envoys configured with shards 1/N..N/N and the same seed hold a
// partition of the data between them without talking to each other.
package dataset

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
)

// Split is one part of a data set (training, validation or test) held as a
// dense row-major matrix, the layout matrix kernels consume without copying.
type Split struct {
	// X holds N rows of Features() values each.
	X []float32
	// Y holds N labels in 0..Classes-1.
	Y []int32
	// N is the number of samples.
	N int
}

// Dataset is a labelled classification data set held in memory.
type Dataset struct {
	// Train is what a site trains on; Valid is held out from the same
	// source and validates every round's models.
	Train, Valid Split
	// Test is kept apart from training and validation for a final
	// evaluation (IDX: the t10k files; synthetic: generated alike); empty
	// when the source has none (CSV). Runners are not given it.
	Test Split
	// SampleShape is the shape of one sample, e.g. [28 28]; its product is the
	// number of features per row of X.
	SampleShape []int64
	// Classes is the number of labels, the same on every shard of a data set
	// so that all sites build models with the same output layer.
	Classes int
	// ClassNames names the labels when the source has names (CSV); it is nil
	// otherwise, and has Classes entries when set.
	ClassNames []string
	// Description says where the data came from and how it was cut.
	Description string
}

// Features is the number of values per sample.
func (d *Dataset) Features() int {
	n := int64(1)
	for _, s := range d.SampleShape {
		n *= s
	}
	return int(n)
}

// Validate checks that the splits agree with the sample shape and the class
// count, so consumers may index without further checks.
func (d *Dataset) Validate() error {
	if len(d.SampleShape) == 0 {
		return errors.New("dataset: sample shape is empty")
	}
	for _, s := range d.SampleShape {
		if s <= 0 {
			return fmt.Errorf("dataset: sample shape %v has a non-positive dimension", d.SampleShape)
		}
	}
	if d.Classes < 2 {
		return fmt.Errorf("dataset: %d classes, need at least 2", d.Classes)
	}
	if d.ClassNames != nil && len(d.ClassNames) != d.Classes {
		return fmt.Errorf("dataset: %d class names for %d classes", len(d.ClassNames), d.Classes)
	}
	f := d.Features()
	for _, s := range []struct {
		name  string
		split *Split
	}{{"train", &d.Train}, {"valid", &d.Valid}, {"test", &d.Test}} {
		sp := s.split
		if sp.N < 0 || len(sp.Y) != sp.N || len(sp.X) != sp.N*f {
			return fmt.Errorf("dataset: %s split has N=%d, %d labels and %d values, want %d values (%d features per sample)",
				s.name, sp.N, len(sp.Y), len(sp.X), sp.N*f, f)
		}
		for i, y := range sp.Y {
			if y < 0 || int(y) >= d.Classes {
				return fmt.Errorf("dataset: %s sample %d has label %d, want 0..%d", s.name, i, y, d.Classes-1)
			}
		}
	}
	if d.Train.N == 0 {
		return errors.New("dataset: training split is empty")
	}
	return nil
}

// ClassCounts returns how many samples of each class a split holds; it shows
// how skewed a shard is.
func (d *Dataset) ClassCounts(s *Split) []int {
	counts := make([]int, d.Classes)
	for _, y := range s.Y {
		if y >= 0 && int(y) < d.Classes {
			counts[y]++
		}
	}
	return counts
}

// String summarises the data set: description, shapes and counts.
func (d *Dataset) String() string {
	return fmt.Sprintf("%s: %d training, %d validation and %d test samples of shape %v, %d classes",
		d.Description, d.Train.N, d.Valid.N, d.Test.N, d.SampleShape, d.Classes)
}

// Kinds of data source a Config may name.
const (
	KindIDX       = "idx"
	KindCSV       = "csv"
	KindSynthetic = "synthetic"
)

// Defaults for the options a Config leaves zero.
const (
	DefaultLabelColumn   = "label"
	DefaultValidFraction = 0.2
	DefaultFeatures      = 16
	DefaultClasses       = 4
	DefaultTrainSamples  = 4000
	DefaultValidSamples  = 1000
	DefaultClusterSpread = 1.0
)

// Limits that keep a typo in a configuration from exhausting memory or
// leaving a shard without data.
const (
	maxSyntheticValues    = 1 << 28
	maxSyntheticClasses   = 1 << 16
	minSamplesPerShardCap = 10
)

// Config selects and cuts a data set. Options that do not apply to the kind
// must be left zero: Validate names the ones that are set, as a typo in a
// site's configuration would otherwise go unnoticed.
type Config struct {
	// Kind is "idx", "csv" or "synthetic".
	Kind string `yaml:"kind" mapstructure:"kind"`
	// Path is the directory holding the IDX files, or the CSV file.
	Path string `yaml:"path" mapstructure:"path"`
	// Shard "i/N" keeps the i-th (1-based) of N disjoint parts; empty keeps all.
	Shard string `yaml:"shard" mapstructure:"shard"`
	// DirichletAlpha, when positive, skews the labels across shards: each
	// class is spread over the N shards in proportions drawn from
	// Dirichlet(alpha). Smaller values give stronger skew; zero cuts the data
	// uniformly at random.
	DirichletAlpha float64 `yaml:"dirichlet_alpha" mapstructure:"dirichlet_alpha"`
	// Seed makes shuffles, splits and generated data reproducible. Every shard
	// of one data set must use the same seed.
	Seed int64 `yaml:"seed" mapstructure:"seed"`

	// LabelColumn names the CSV column holding the label ("label" by default).
	LabelColumn string `yaml:"label_column" mapstructure:"label_column"`
	// ValidFraction is the share of the training data (the CSV rows, the
	// IDX train-* files) held out for validation, chosen at random with
	// Seed before any shard is cut, in (0, 1); 0.2 by default.
	ValidFraction float64 `yaml:"valid_fraction" mapstructure:"valid_fraction"`

	// Features is the number of generated features per sample (synthetic).
	Features int `yaml:"features" mapstructure:"features"`
	// Classes is the number of generated classes (synthetic).
	Classes int `yaml:"classes" mapstructure:"classes"`
	// TrainSamples, ValidSamples and TestSamples are the sizes of the
	// whole generated data set's splits, before sharding (synthetic);
	// TestSamples is ValidSamples by default.
	TrainSamples int `yaml:"train_samples" mapstructure:"train_samples"`
	ValidSamples int `yaml:"valid_samples" mapstructure:"valid_samples"`
	TestSamples  int `yaml:"test_samples" mapstructure:"test_samples"`
	// ClusterSpread is the standard deviation of each class cluster around its
	// centre, relative to the spread of the centres (synthetic); larger is
	// harder. 1.0 by default.
	ClusterSpread float64 `yaml:"cluster_spread" mapstructure:"cluster_spread"`
}

// Validate checks the configuration without touching any file.
func (c Config) Validate() error {
	var wrong []string
	only := func(set bool, key, kind string) {
		if set {
			wrong = append(wrong, fmt.Sprintf("%s applies to kind %q only", key, kind))
		}
	}
	switch c.Kind {
	case KindIDX, KindCSV:
		if c.Path == "" {
			return fmt.Errorf("dataset: kind %q needs a path", c.Kind)
		}
	case KindSynthetic:
		if c.Path != "" {
			return errors.New("dataset: kind \"synthetic\" takes no path")
		}
	case "":
		return errors.New("dataset: kind is missing (want idx, csv or synthetic)")
	default:
		return fmt.Errorf("dataset: unknown kind %q (want idx, csv or synthetic)", c.Kind)
	}
	if c.Kind != KindCSV {
		only(c.LabelColumn != "", "label_column", KindCSV)
	}
	if c.Kind == KindSynthetic && c.ValidFraction != 0 {
		wrong = append(wrong, "valid_fraction applies to kinds \"idx\" and \"csv\" only (synthetic data sets valid_samples)")
	}
	if c.Kind != KindSynthetic {
		only(c.Features != 0, "features", KindSynthetic)
		only(c.Classes != 0, "classes", KindSynthetic)
		only(c.TrainSamples != 0, "train_samples", KindSynthetic)
		only(c.ValidSamples != 0, "valid_samples", KindSynthetic)
		only(c.TestSamples != 0, "test_samples", KindSynthetic)
		only(c.ClusterSpread != 0, "cluster_spread", KindSynthetic)
	}
	if len(wrong) > 0 {
		return fmt.Errorf("dataset: kind %q: %s", c.Kind, strings.Join(wrong, "; "))
	}
	_, n, err := ParseShard(c.Shard)
	if err != nil {
		return err
	}
	if c.DirichletAlpha < 0 || c.DirichletAlpha != c.DirichletAlpha {
		return fmt.Errorf("dataset: dirichlet_alpha %v must be positive (or 0 for no skew)", c.DirichletAlpha)
	}
	if c.DirichletAlpha > 0 && n == 1 {
		return errors.New("dataset: dirichlet_alpha needs a shard \"i/N\" with N > 1")
	}
	if c.ValidFraction < 0 || c.ValidFraction >= 1 || c.ValidFraction != c.ValidFraction {
		return fmt.Errorf("dataset: valid_fraction %v must lie in (0, 1)", c.ValidFraction)
	}
	if c.Kind == KindSynthetic {
		d := c.withDefaults()
		switch {
		case d.Features < 1:
			return fmt.Errorf("dataset: features %d must be positive", c.Features)
		case d.Classes < 2 || d.Classes > maxSyntheticClasses:
			return fmt.Errorf("dataset: classes %d must lie in 2..%d", c.Classes, maxSyntheticClasses)
		case d.TrainSamples < 1:
			return fmt.Errorf("dataset: train_samples %d must be positive", c.TrainSamples)
		case d.ValidSamples < 0:
			return fmt.Errorf("dataset: valid_samples %d must not be negative", c.ValidSamples)
		case d.TestSamples < 0:
			return fmt.Errorf("dataset: test_samples %d must not be negative", c.TestSamples)
		case d.ClusterSpread <= 0 || d.ClusterSpread != d.ClusterSpread:
			return fmt.Errorf("dataset: cluster_spread %v must be positive", c.ClusterSpread)
		case int64(d.TrainSamples+d.ValidSamples+d.TestSamples)*int64(d.Features) > maxSyntheticValues:
			return fmt.Errorf("dataset: %d samples of %d features is more than %d values",
				d.TrainSamples+d.ValidSamples+d.TestSamples, d.Features, maxSyntheticValues)
		}
	}
	return nil
}

// withDefaults fills the zero options of the configured kind.
func (c Config) withDefaults() Config {
	switch c.Kind {
	case KindIDX:
		if c.ValidFraction == 0 {
			c.ValidFraction = DefaultValidFraction
		}
	case KindCSV:
		if c.LabelColumn == "" {
			c.LabelColumn = DefaultLabelColumn
		}
		if c.ValidFraction == 0 {
			c.ValidFraction = DefaultValidFraction
		}
	case KindSynthetic:
		if c.Features == 0 {
			c.Features = DefaultFeatures
		}
		if c.Classes == 0 {
			c.Classes = DefaultClasses
		}
		if c.TrainSamples == 0 {
			c.TrainSamples = DefaultTrainSamples
		}
		if c.ValidSamples == 0 {
			c.ValidSamples = DefaultValidSamples
		}
		if c.TestSamples == 0 {
			c.TestSamples = c.ValidSamples
		}
		if c.ClusterSpread == 0 {
			c.ClusterSpread = DefaultClusterSpread
		}
	}
	return c
}

// Load validates c and loads the data set it names.
func Load(c Config) (*Dataset, error) {
	switch c.Kind {
	case KindIDX:
		return LoadIDX(c)
	case KindCSV:
		return LoadCSV(c)
	case KindSynthetic:
		return LoadSynthetic(c)
	}
	return nil, c.Validate()
}

// ParseShard reads "i/N" (1 ≤ i ≤ N). The empty string is the whole data set,
// shard 1/1.
func ParseShard(s string) (i, n int, err error) {
	if s == "" {
		return 1, 1, nil
	}
	a, b, ok := strings.Cut(strings.TrimSpace(s), "/")
	if ok {
		i, err = strconv.Atoi(strings.TrimSpace(a))
		if err == nil {
			n, err = strconv.Atoi(strings.TrimSpace(b))
		}
	}
	if !ok || err != nil {
		return 0, 0, fmt.Errorf("dataset: shard %q is not of the form \"i/N\"", s)
	}
	if n < 1 || i < 1 || i > n {
		return 0, 0, fmt.Errorf("dataset: shard %q: want 1 <= i <= N", s)
	}
	return i, n, nil
}

// holdOut cuts all into a training and a validation split: a fraction of
// its rows, at least one and not all, chosen at random with seed.
func holdOut(all *Split, features int, fraction float64, seed int64) (train, valid Split) {
	nValid := min(max(int(math.Round(fraction*float64(all.N))), 1), all.N-1)
	perm := newRand(seed, streamValidSplit).Perm(all.N)
	return subset(all, features, perm[nValid:]), subset(all, features, perm[:nValid])
}

// subset gathers the rows of s at idx (kept in ascending order, so a shard
// reads like the source).
func subset(s *Split, features int, idx []int) Split {
	idx = slices.Clone(idx)
	slices.Sort(idx)
	out := Split{X: make([]float32, len(idx)*features), Y: make([]int32, len(idx)), N: len(idx)}
	for r, i := range idx {
		copy(out.X[r*features:(r+1)*features], s.X[i*features:(i+1)*features])
		out.Y[r] = s.Y[i]
	}
	return out
}
