package tensor

import (
	"cmp"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
)

// Krum and multi-Krum (Blanchard et al., "Machine Learning with Adversaries:
// Byzantine Tolerant Gradient Descent", NeurIPS 2017).
//
// Median and trimmed mean judge every coordinate on its own; Krum judges
// whole updates. Each update is scored by how close it lies to its n−f−2
// nearest neighbours, so an update from a Byzantine site must either sit
// among the honest ones, where it does little harm, or away from them, where
// its score gives it away. With n updates of which at most f are Byzantine
// and n ≥ 2f+3, the best-scored update is provably close to the honest ones.
//
// Like Median, both need all N updates in memory at once; computing the
// scores costs O(N² × the model) arithmetic.

// krumSlices is how many parts the distance pass is cut into: each part adds
// into its own n(n−1)/2 sums, which are then added in part order, so the
// result does not depend on how the parts were scheduled (a Krum choice must
// not flip between two runs on a near tie), and more parts than cores keep
// every core busy.
const krumSlices = 32

// Krum returns a copy of the update with the lowest Krum score, tolerating
// up to f Byzantine updates among the n given: it needs n ≥ 2f+3. An update's
// score is the sum of its squared L2 distances, over every float element of
// the model, to its n−f−2 nearest other updates; ties go to the earlier
// update. Inputs must be finite, as for Median. Integer tensors are the
// chosen update's, like everything else.
func Krum(updates []Model, f int) (Model, error) {
	order, err := krumOrder(updates, f, "krum")
	if err != nil {
		return nil, err
	}
	return updates[order[0]].Clone(), nil
}

// MultiKrum returns the plain mean of the m updates with the lowest Krum
// scores (see Krum), tolerating up to f Byzantine updates among the n given:
// it needs n ≥ 2f+3 and 1 ≤ m ≤ n−f, since with f Byzantine updates only
// n−f are honest and any more would average in a Byzantine one. m = 1 is
// Krum; m = n−f is the paper's choice. Updates are not weighed, as Median
// weighs none: a site could claim many samples to pull the mean its way.
// Integer tensors are taken from the best-scored update.
func MultiKrum(updates []Model, f, m int) (Model, error) {
	order, err := krumOrder(updates, f, "multi-krum")
	if err != nil {
		return nil, err
	}
	if n := len(updates); m < 1 || m > n-f {
		return nil, fmt.Errorf("multi-krum: cannot average %d of %d updates with %d Byzantine: select 1 to %d (n−f), as only n−f are honest", m, n, f, n-f)
	}
	chosen := make([]Model, m)
	ones := make([]float64, m)
	for i, u := range order[:m] {
		chosen[i], ones[i] = updates[u], 1
	}
	avg, err := FedAvg(chosen, ones)
	if err != nil {
		return nil, fmt.Errorf("multi-krum: averaging the %d selected updates: %w", m, err)
	}
	return avg, nil
}

// krumOrder returns the update indices from the lowest Krum score to the
// highest, earlier updates first among equal scores.
func krumOrder(updates []Model, f int, what string) ([]int, error) {
	n := len(updates)
	if f < 0 {
		return nil, fmt.Errorf("%s: %d Byzantine updates: want 0 or more", what, f)
	}
	if n < 2*f+3 {
		return nil, fmt.Errorf("%s: %d updates cannot outweigh %d Byzantine ones: Krum needs at least 2f+3 = %d", what, n, f, 2*f+3)
	}
	idx, err := checkUpdates(updates)
	if err != nil {
		return nil, err
	}
	scores, err := krumScores(idx, updates[0], f, what)
	if err != nil {
		return nil, err
	}
	order := make([]int, n)
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(scores[a], scores[b]) })
	return order, nil
}

// krumScores returns every update's score: the sum of its n−f−2 smallest
// squared distances to the others.
func krumScores(idx []map[string]*Tensor, ref Model, f int, what string) ([]float64, error) {
	n := len(idx)
	dist, err := sqDistances(idx, ref, what)
	if err != nil {
		return nil, err
	}
	scores := make([]float64, n)
	row := make([]float64, 0, n-1)
	for i := range n {
		row = row[:0]
		for j := range n {
			if j != i {
				row = append(row, dist[pair(i, j, n)])
			}
		}
		slices.Sort(row)
		for _, d := range row[:n-f-2] {
			scores[i] += d
		}
	}
	return scores, nil
}

// pair is the position of the distance between updates i and j (i ≠ j) in
// the upper triangle of the n×n matrix, stored row by row.
func pair(i, j, n int) int {
	if i > j {
		i, j = j, i
	}
	return i*n - i*(i+1)/2 + j - i - 1
}

// distChunk is a range of one float tensor's elements in every update.
type distChunk struct {
	name   string
	srcs   [][]byte
	dt     DType
	lo, hi int
}

// sqDistances returns the squared L2 distance between every two updates over
// all their float tensors taken as one vector, indexed by pair, in one pass
// over the updates. The float tensors are cut into chunks of B elements; a
// chunk of every update is decoded into an n×B float64 scratch, which stays
// in cache while every pair's squared differences are added up from it.
// Accumulating in float64 keeps the sums' rounding far below any difference
// that matters between scores. Memory beyond the updates: a scratch per core
// and krumSlices × n(n−1)/2 sums.
func sqDistances(idx []map[string]*Tensor, ref Model, what string) ([]float64, error) {
	n := len(idx)
	pairs := n * (n - 1) / 2
	block := max(64, min(blockElems, (1<<15)/n))
	var chunks []distChunk
	elems := 0
	for _, t := range ref {
		if !t.DType.IsFloat() {
			continue
		}
		srcs := gather(idx, t.Name)
		count := int(t.Elements())
		for lo := 0; lo < count; lo += block {
			chunks = append(chunks, distChunk{name: t.Name, srcs: srcs, dt: t.DType, lo: lo, hi: min(lo+block, count)})
		}
		elems += count
	}
	parts := min(krumSlices, len(chunks))
	partial := make([]float64, parts*pairs)
	var bad atomic.Pointer[string]
	pool := sync.Pool{New: func() any {
		s := make([]float64, n*block)
		return &s
	}}
	parallelBlocksWork(parts, 1, elems*pairs, func(part, _ int) {
		sp := pool.Get().(*[]float64)
		defer pool.Put(sp)
		sums := partial[part*pairs : (part+1)*pairs]
		for _, c := range chunks[part*len(chunks)/parts : (part+1)*len(chunks)/parts] {
			if bad.Load() != nil {
				return
			}
			if !c.add(sums, *sp, block) {
				bad.Store(&c.name)
			}
		}
	})
	if name := bad.Load(); name != nil {
		return nil, nonFiniteUpdate(idx, *name, what)
	}
	dist := make([]float64, pairs)
	for part := range parts {
		for p, s := range partial[part*pairs : (part+1)*pairs] {
			dist[p] += s
		}
	}
	return dist, nil
}

// add decodes the chunk of every update into scratch (update i's at
// i*block) and adds each pair's squared differences to sums. It reports
// whether every input was finite (if not, sums are meaningless).
func (c distChunk) add(sums, scratch []float64, block int) bool {
	size := c.dt.Size()
	width := c.hi - c.lo
	n := len(c.srcs)
	for i, s := range c.srcs {
		if !decodeStrided(scratch[i*block:], 1, s[c.lo*size:c.hi*size], c.dt) {
			return false
		}
	}
	p := 0
	for i := range n {
		xi := scratch[i*block : i*block+width]
		for j := i + 1; j < n; j++ {
			sums[p] += sqDist(xi, scratch[j*block:j*block+width])
			p++
		}
	}
	return true
}

// sqDist returns Σ (a[k]−b[k])², with four partial sums so that the
// additions do not wait on one another.
func sqDist(a, b []float64) float64 {
	b = b[:len(a)]
	var s0, s1, s2, s3 float64
	k := 0
	for ; k+4 <= len(a); k += 4 {
		d0, d1, d2, d3 := a[k]-b[k], a[k+1]-b[k+1], a[k+2]-b[k+2], a[k+3]-b[k+3]
		s0 += d0 * d0
		s1 += d1 * d1
		s2 += d2 * d2
		s3 += d3 * d3
	}
	for ; k < len(a); k++ {
		d := a[k] - b[k]
		s0 += d * d
	}
	return (s0 + s1) + (s2 + s3)
}
