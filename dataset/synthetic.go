package dataset

import (
	"fmt"
	"math"
)

// LoadSynthetic generates a learnable classification problem, so demos and
// tests run without data files: each class is an isotropic Gaussian cluster
// around a centre drawn from a standard normal in c.Features dimensions, and
// labels are uniform over the classes. The cluster width is scaled with the
// dimension so that c.ClusterSpread alone sets the typical difficulty: at
// the default 1 neighbouring clusters barely touch (a linear model gets
// within a few percent of perfect), at 2 they overlap markedly. With very
// few features the random centres vary more, and some may fall close.
//
// The whole data set (c.TrainSamples + c.ValidSamples + c.TestSamples,
// drawn in that order, so a larger test split leaves the others as they
// were) is generated from c.Seed and then cut like any other by c.Shard and
// c.DirichletAlpha, so the shards of one seed are disjoint, identically
// distributed samples of the same problem (or label-skewed ones when alpha
// is set).
func LoadSynthetic(c Config) (*Dataset, error) {
	if c.Kind == "" {
		c.Kind = KindSynthetic
	}
	if c.Kind != KindSynthetic {
		return nil, fmt.Errorf("dataset: LoadSynthetic given kind %q", c.Kind)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	c = c.withDefaults()
	f, k := c.Features, c.Classes

	// Centres are unit-variance normal per feature, so two centres lie about
	// sqrt(2f) apart. Noise of standard deviation σ = spread·sqrt(f)/4 per
	// feature puts them 2·sqrt(2)/spread σ from the midpoint between them,
	// whatever f.
	centres := make([]float64, k*f)
	crng := newRand(c.Seed, streamSyntheticCentres)
	for i := range centres {
		centres[i] = crng.NormFloat64()
	}
	noise := c.ClusterSpread * math.Sqrt(float64(f)) / 4

	srng := newRand(c.Seed, streamSyntheticSamples)
	gen := func(n int) Split {
		s := Split{X: make([]float32, n*f), Y: make([]int32, n), N: n}
		for i := range n {
			y := srng.IntN(k)
			s.Y[i] = int32(y)
			row := s.X[i*f : (i+1)*f]
			for j := range row {
				row[j] = float32(centres[y*f+j] + noise*srng.NormFloat64())
			}
		}
		return s
	}
	d := &Dataset{
		Train:       gen(c.TrainSamples),
		Valid:       gen(c.ValidSamples),
		Test:        gen(c.TestSamples),
		SampleShape: []int64{int64(f)},
		Classes:     k,
		Description: fmt.Sprintf("synthetic Gaussian clusters (%d features, %d classes, spread %g, seed %d)", f, k, c.ClusterSpread, c.Seed),
	}
	return shardAsConfigured(d, c)
}
