package dataset

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
)

// Stream numbers of the random generators, so that the shuffles of different
// purposes never share a sequence even with the same seed.
const (
	streamShardIID uint64 = iota + 1
	streamShardDirichlet
	streamValidSplit // the validation split held out from the training data (CSV, IDX)
	streamSyntheticCentres
	streamSyntheticSamples
)

// newRand returns the deterministic generator fx uses for one purpose; PCG's
// output is specified, so a seed means the same data on every machine.
func newRand(seed int64, stream uint64) *rand.Rand {
	return rand.New(rand.NewPCG(uint64(seed), stream))
}

// shardAsConfigured returns the shard of d that c names (d itself when c
// names none).
func shardAsConfigured(d *Dataset, c Config) (*Dataset, error) {
	i, n, err := ParseShard(c.Shard)
	if err != nil {
		return nil, err
	}
	if n == 1 {
		return d, nil
	}
	return d.Shard(i, n, c.DirichletAlpha, c.Seed)
}

// Shard returns part i (1-based) of n disjoint parts of d, cut as a Config's
// Shard, DirichletAlpha and Seed cut at load time: loading shard i/n equals
// loading the whole and calling Shard(i, n, alpha, seed). Simulations use it
// to cut one data set in memory rather than load it once per site. The
// validation and test splits are cut with the same label proportions as the
// training split; d is left unchanged.
func (d *Dataset) Shard(i, n int, alpha float64, seed int64) (*Dataset, error) {
	if n < 1 || i < 1 || i > n {
		return nil, fmt.Errorf("dataset: shard %d/%d: want 1 <= i <= N", i, n)
	}
	if alpha < 0 || math.IsNaN(alpha) || math.IsInf(alpha, 0) {
		return nil, fmt.Errorf("dataset: dirichlet_alpha %v must be positive (or 0 for no skew)", alpha)
	}
	if err := d.Validate(); err != nil {
		return nil, err
	}
	parts, err := partition([]labelled{{"training", d.Train.Y}, {"validation", d.Valid.Y}, {"test", d.Test.Y}}, d.Classes, n, alpha, seed)
	if err != nil {
		return nil, err
	}
	desc := fmt.Sprintf("%s, shard %d/%d", d.Description, i, n)
	if alpha > 0 {
		desc += fmt.Sprintf(" with Dirichlet(%g) label skew", alpha)
	}
	f := d.Features()
	return &Dataset{
		Train:       subset(&d.Train, f, parts[0][i-1]),
		Valid:       subset(&d.Valid, f, parts[1][i-1]),
		Test:        subset(&d.Test, f, parts[2][i-1]),
		SampleShape: slices.Clone(d.SampleShape),
		Classes:     d.Classes,
		ClassNames:  slices.Clone(d.ClassNames),
		Description: desc + fmt.Sprintf(", seed %d", seed),
	}, nil
}

// labelled is one split's labels, named for errors.
type labelled struct {
	name   string
	labels []int32
}

// partition cuts label sets into n disjoint parts each that together cover
// them; the first set is the training split, the others are cut like it.
// With alpha == 0 every cut is uniform at random (shard sizes differ by at
// most one). With alpha > 0 each class c is spread over the shards in
// proportions p_c ~ Dirichlet(alpha), the same for every set, so a site
// validates and tests on the label mix it trains on. Every training shard
// receives at least min(10, len(train)/n) samples and every shard of
// another non-empty set at least one: draws that miss this are redrawn a
// few times and then repaired by moving single samples from the largest
// cells. It returns, per set, the indices of each shard.
func partition(sets []labelled, classes, n int, alpha float64, seed int64) ([][][]int, error) {
	minimum := make([]int, len(sets))
	for k, s := range sets {
		switch {
		case k == 0 && len(s.labels) < n:
			return nil, fmt.Errorf("dataset: cannot cut %d %s samples into %d non-empty shards", len(s.labels), s.name, n)
		case k == 0:
			minimum[k] = min(minSamplesPerShardCap, len(s.labels)/n)
		case len(s.labels) > 0 && len(s.labels) < n:
			return nil, fmt.Errorf("dataset: cannot cut %d %s samples into %d non-empty shards", len(s.labels), s.name, n)
		case len(s.labels) > 0:
			minimum[k] = 1
		}
	}
	parts := make([][][]int, len(sets))
	if alpha == 0 {
		rng := newRand(seed, streamShardIID)
		for k, s := range sets {
			parts[k] = cutUniform(rng, len(s.labels), n)
		}
		return parts, nil
	}
	rng := newRand(seed, streamShardDirichlet)
	byClass := make([][][]int, len(sets))
	for k, s := range sets {
		byClass[k] = indicesByClass(s.labels, classes)
		for _, idx := range byClass[k] {
			rng.Shuffle(len(idx), func(a, b int) { idx[a], idx[b] = idx[b], idx[a] })
		}
	}
	const draws = 50
	counts := make([][][]int, len(sets)) // set → class → shard
	for range draws {
		for k := range sets {
			counts[k] = make([][]int, classes)
		}
		for c := range classes {
			p := dirichlet(rng, alpha, n)
			for k := range sets {
				counts[k][c] = apportion(p, len(byClass[k][c]))
			}
		}
		reached := true
		for k := range sets {
			reached = reached && shardsReach(counts[k], n, minimum[k])
		}
		if reached {
			break
		}
	}
	for k := range sets {
		repair(counts[k], n, minimum[k])
		parts[k] = cutByCounts(byClass[k], counts[k], n)
	}
	return parts, nil
}

// cutUniform shuffles 0..size-1 and cuts it into n parts whose sizes differ
// by at most one.
func cutUniform(rng *rand.Rand, size, n int) [][]int {
	perm := rng.Perm(size)
	parts := make([][]int, n)
	for j := range n {
		parts[j] = perm[j*size/n : (j+1)*size/n]
	}
	return parts
}

func indicesByClass(labels []int32, classes int) [][]int {
	by := make([][]int, classes)
	for i, y := range labels {
		by[y] = append(by[y], i)
	}
	return by
}

// dirichlet draws p ~ Dirichlet(alpha, ..., alpha) of dimension n.
func dirichlet(rng *rand.Rand, alpha float64, n int) []float64 {
	p := make([]float64, n)
	sum := 0.0
	for j := range p {
		p[j] = gamma(rng, alpha)
		sum += p[j]
	}
	if sum == 0 || math.IsInf(sum, 0) {
		// Every draw underflowed (tiny alpha): the limit of the distribution
		// puts all mass on one coordinate chosen uniformly.
		clear(p)
		p[rng.IntN(n)] = 1
		return p
	}
	for j := range p {
		p[j] /= sum
	}
	return p
}

// gamma draws from Gamma(shape, 1) by Marsaglia and Tsang's method, boosted
// for shape < 1.
func gamma(rng *rand.Rand, shape float64) float64 {
	if shape < 1 {
		u := rng.Float64()
		return gamma(rng, shape+1) * math.Pow(u, 1/shape)
	}
	d := shape - 1.0/3
	c := 1 / math.Sqrt(9*d)
	for {
		x := rng.NormFloat64()
		v := 1 + c*x
		if v <= 0 {
			continue
		}
		v = v * v * v
		u := rng.Float64()
		if u < 1-0.0331*x*x*x*x || math.Log(u) < 0.5*x*x+d*(1-v+math.Log(v)) {
			return d * v
		}
	}
}

// apportion splits total into len(p) integer counts proportional to p, by
// largest remainder, so the counts sum to total exactly.
func apportion(p []float64, total int) []int {
	counts := make([]int, len(p))
	rem := make([]float64, len(p))
	given := 0
	for j, pj := range p {
		exact := pj * float64(total)
		counts[j] = int(math.Floor(exact))
		rem[j] = exact - float64(counts[j])
		given += counts[j]
	}
	for ; given < total; given++ {
		best := 0
		for j := range rem {
			if rem[j] > rem[best] {
				best = j
			}
		}
		counts[best]++
		rem[best] = -1
	}
	return counts
}

func shardTotals(counts [][]int, n int) []int {
	totals := make([]int, n)
	for _, row := range counts {
		for j, v := range row {
			totals[j] += v
		}
	}
	return totals
}

func shardsReach(counts [][]int, n, minimum int) bool {
	for _, t := range shardTotals(counts, n) {
		if t < minimum {
			return false
		}
	}
	return true
}

// repair moves single samples into shards below minimum, each time from the
// largest (class, shard) cell of a shard that can spare one. The caller has
// checked that n*minimum samples exist, so this ends.
func repair(counts [][]int, n, minimum int) {
	totals := shardTotals(counts, n)
	for j := range n {
		for totals[j] < minimum {
			bc, bs := -1, -1
			for c, row := range counts {
				for s, v := range row {
					if s != j && totals[s] > minimum && v > 0 && (bc < 0 || v > counts[bc][bs]) {
						bc, bs = c, s
					}
				}
			}
			counts[bc][bs]--
			totals[bs]--
			counts[bc][j]++
			totals[j]++
		}
	}
}

// cutByCounts hands each shard its counted run of every class's shuffled indices.
func cutByCounts(byClass [][]int, counts [][]int, n int) [][]int {
	parts := make([][]int, n)
	for c, idx := range byClass {
		at := 0
		for j := range n {
			parts[j] = append(parts[j], idx[at:at+counts[c][j]]...)
			at += counts[c][j]
		}
	}
	return parts
}
