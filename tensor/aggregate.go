package tensor

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"
)

// Aggregation over whole models.
//
// All updates must have the same tensors (names, dtypes, shapes); the result
// lists them in the order of the first update. Float tensors are aggregated in
// float32 (F32, F16, BF16) or float64 (F64) and stored back in their own dtype,
// so an F16 model is rounded once per round, not once per update.
//
// Integer tensors (step counters such as BatchNorm's num_batches_tracked) have
// no meaningful average; they are taken from the first update unchanged. This
// keeps models that carry them aggregatable, which rejecting them would not.

// checkUpdates validates every update and its agreement with the first, and
// returns a name index per update.
func checkUpdates(updates []Model) ([]map[string]*Tensor, error) {
	if len(updates) == 0 {
		return nil, errors.New("no updates to aggregate")
	}
	idx := make([]map[string]*Tensor, len(updates))
	for i, u := range updates {
		if err := u.Validate(); err != nil {
			return nil, fmt.Errorf("update %d: %w", i, err)
		}
		if i > 0 {
			if err := updates[0].Matches(u); err != nil {
				return nil, fmt.Errorf("update %d does not match update 0: %w", i, err)
			}
		}
		idx[i] = u.Index()
	}
	return idx, nil
}

// gather returns the data of tensor name in every update.
func gather(idx []map[string]*Tensor, name string) [][]byte {
	out := make([][]byte, len(idx))
	for i, m := range idx {
		out[i] = m[name].Data
	}
	return out
}

// FedAvg returns the average of the updates weighted by weights (the sample
// counts each was trained on): Σ w_i·u_i / Σ w_i. Weights must be positive and
// finite. One pass is made over the updates (see WeightedSum). If an input
// holds NaN or Inf the average does too, so the result is checked instead of
// every input, and a non-finite result is an error wrapping ErrNonFinite.
func FedAvg(updates []Model, weights []float64) (Model, error) {
	idx, err := checkUpdates(updates)
	if err != nil {
		return nil, err
	}
	if len(weights) != len(updates) {
		return nil, fmt.Errorf("fedavg: %d weights for %d updates", len(weights), len(updates))
	}
	var total float64
	for i, w := range weights {
		if !(w > 0) || math.IsInf(w, 0) {
			return nil, fmt.Errorf("fedavg: weight %d is %v, want a positive finite number", i, w)
		}
		total += w
	}
	if math.IsInf(total, 0) {
		return nil, errors.New("fedavg: the weights sum to +Inf")
	}
	w64 := make([]float64, len(weights))
	w32 := make([]float32, len(weights))
	for i, w := range weights {
		w64[i] = w / total
		w32[i] = float32(w64[i])
	}
	out := make(Model, 0, len(updates[0]))
	for _, ref := range updates[0] {
		srcs := gather(idx, ref.Name)
		t := New(ref.Name, ref.DType, ref.Shape)
		switch ref.DType {
		case F32:
			weightedSumInto(t.Float32s(), srcs, F32, w32)
		case F64:
			weightedSumInto(t.Float64s(), srcs, F64, w64)
		case F16, BF16:
			tmp := make([]float32, t.Elements())
			weightedSumInto(tmp, srcs, ref.DType, w32)
			if err := t.SetFloat32(tmp); err != nil {
				return nil, err
			}
		default:
			copy(t.Data, srcs[0])
		}
		if err := t.CheckFinite(); err != nil {
			return nil, fmt.Errorf("fedavg: the average is not finite (an update holds NaN or Inf, or values overflow): %w", err)
		}
		out = append(out, t)
	}
	return out, nil
}

// weightedSumInto sets dst = Σ w_i·srcs_i, srcs being raw elements of dtype
// dt. Sources already in the working precision and aligned (always, for
// tensors made by this package) go to the typed kernel; others are converted
// block by block as they are read, which keeps the pass single.
func weightedSumInto[T float](dst []T, srcs [][]byte, dt DType, w []T) {
	if views, ok := viewsAs[T](srcs, dt); ok {
		weightedSum(dst, views, w)
		return
	}
	size := dt.Size()
	parallelBlocks(len(dst), blockElems, func(lo, hi int) {
		d := dst[lo:hi]
		clear(d)
		for i, s := range srcs {
			axpyRaw(d, s[lo*size:hi*size], dt, w[i])
		}
	})
}

// viewsAs views every source as []T in place, if dt is T's format and every
// source is aligned for it.
func viewsAs[T float](srcs [][]byte, dt DType) ([][]T, bool) {
	views := make([][]T, len(srcs))
	for i, s := range srcs {
		v, ok := viewAs[T](s, dt)
		if !ok {
			return nil, false
		}
		views[i] = v
	}
	return views, true
}

// viewAs views raw as []T in place if dt is T's format and raw is aligned.
func viewAs[T float](raw []byte, dt DType) ([]T, bool) {
	if !hostLittleEndian {
		return nil, false
	}
	var out []T
	switch v := any(&out).(type) {
	case *[]float32:
		if dt != F32 || !aligned(raw, 4) {
			return nil, false
		}
		*v = bytesAs[float32](raw)
	case *[]float64:
		if dt != F64 || !aligned(raw, 8) {
			return nil, false
		}
		*v = bytesAs[float64](raw)
	default:
		return nil, false
	}
	return out, true
}

// Median returns the coordinate-wise median of the updates (for an even count,
// the mean of the two middle values). Inputs must be finite: a NaN has no
// place in an order, so one is an error wrapping ErrNonFinite.
//
// Memory: unlike FedAvg it cannot be computed by folding updates one at a time;
// all N updates must be in memory together (N × the model), plus a per-worker
// scratch of about 64 Ki values.
func Median(updates []Model) (Model, error) {
	return robustAggregate(updates, "median", -1)
}

// TrimmedMean returns the coordinate-wise mean after dropping, at every
// coordinate, the floor(beta·N) smallest and the floor(beta·N) largest values
// (beta in [0, 0.5); beta 0 is the plain mean). Inputs must be finite, as for
// Median, and it has Median's memory cost: N × the model.
func TrimmedMean(updates []Model, beta float64) (Model, error) {
	if !(beta >= 0 && beta < 0.5) {
		return nil, fmt.Errorf("trimmed mean: beta %v is outside [0, 0.5)", beta)
	}
	return robustAggregate(updates, "trimmed mean", int(math.Floor(beta*float64(len(updates)))))
}

// robustAggregate computes the median (trim < 0) or the trimmed mean dropping
// trim values at each end, tensor by tensor.
func robustAggregate(updates []Model, what string, trim int) (Model, error) {
	idx, err := checkUpdates(updates)
	if err != nil {
		return nil, err
	}
	out := make(Model, 0, len(updates[0]))
	for _, ref := range updates[0] {
		srcs := gather(idx, ref.Name)
		t := New(ref.Name, ref.DType, ref.Shape)
		finite := true
		switch ref.DType {
		case F32:
			finite = robustReduce(t.Float32s(), srcs, F32, trim)
		case F64:
			finite = robustReduce(t.Float64s(), srcs, F64, trim)
		case F16, BF16:
			tmp := make([]float32, t.Elements())
			finite = robustReduce(tmp, srcs, ref.DType, trim)
			if err := t.SetFloat32(tmp); err != nil {
				return nil, err
			}
		default:
			copy(t.Data, srcs[0])
		}
		if !finite {
			return nil, nonFiniteUpdate(idx, ref.Name, what)
		}
		out = append(out, t)
	}
	return out, nil
}

// nonFiniteUpdate names the first update whose tensor name holds a NaN or
// Inf, once a kernel has reported that one does: the kernels only notice, so
// that the common, finite case costs no second pass.
func nonFiniteUpdate(idx []map[string]*Tensor, name, what string) error {
	for i, m := range idx {
		if err := m[name].CheckFinite(); err != nil {
			return fmt.Errorf("%s: update %d: %w", what, i, err)
		}
	}
	return fmt.Errorf("%s: tensor %q: %w", what, name, ErrNonFinite)
}

// robustReduce sets each dst[j] from the sorted values of srcs at j. A block
// of B coordinates is decoded from every source into a B×N scratch laid out
// coordinate-major, so each source is read sequentially and each coordinate's
// N values end up contiguous, ready to sort in place. It reports whether all
// inputs were finite (if not, dst is meaningless).
func robustReduce[T float](dst []T, srcs [][]byte, dt DType, trim int) bool {
	n := len(srcs)
	block := max(64, min(blockElems, (1<<16)/n))
	size := dt.Size()
	var bad atomic.Bool
	pool := sync.Pool{New: func() any {
		s := make([]T, block*n)
		return &s
	}}
	parallelBlocksWork(len(dst), block, len(dst)*n, func(lo, hi int) {
		sp := pool.Get().(*[]T)
		defer pool.Put(sp)
		scratch := (*sp)[:(hi-lo)*n]
		for i, s := range srcs {
			if !decodeStrided(scratch[i:], n, s[lo*size:hi*size], dt) {
				bad.Store(true)
				return
			}
		}
		d := dst[lo:hi]
		for j := range d {
			vals := scratch[j*n : j*n+n]
			sortFloats(vals)
			d[j] = reduceSorted(vals, trim)
		}
	})
	return !bad.Load()
}

// decodeStrided writes the elements of raw to dst[0], dst[stride], ... and
// reports whether they were all finite (x-x is 0 exactly for finite x).
func decodeStrided[T float](dst []T, stride int, raw []byte, dt DType) bool {
	var nonFinite T
	if vals, ok := viewAs[T](raw, dt); ok {
		for i, v := range vals {
			dst[i*stride] = v
			nonFinite += v - v
		}
		return nonFinite == 0
	}
	for i := range len(raw) / dt.Size() {
		v := T(decodeElem(raw, dt, i))
		dst[i*stride] = v
		nonFinite += v - v
	}
	return nonFinite == 0
}

// decodeElem returns element i of raw as float64 (exact for every float dtype).
func decodeElem(raw []byte, dt DType, i int) float64 {
	switch dt {
	case F32:
		return float64(math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:])))
	case F64:
		return math.Float64frombits(binary.LittleEndian.Uint64(raw[8*i:]))
	case F16:
		return float64(F16ToFloat32(binary.LittleEndian.Uint16(raw[2*i:])))
	case BF16:
		return float64(BF16ToFloat32(binary.LittleEndian.Uint16(raw[2*i:])))
	}
	panic(fmt.Sprintf("tensor: decode non-float dtype %s", dt))
}

// sortFloats sorts finite values ascending; insertion sort for the short
// columns typical of federations, the standard sort beyond.
func sortFloats[T float](v []T) {
	if len(v) > 24 {
		slices.Sort(v)
		return
	}
	for i := 1; i < len(v); i++ {
		x := v[i]
		j := i
		for j > 0 && v[j-1] > x {
			v[j] = v[j-1]
			j--
		}
		v[j] = x
	}
}

// reduceSorted is the median of sorted v (trim < 0) or the mean of
// v[trim:len(v)-trim], summed in float64.
func reduceSorted[T float](v []T, trim int) T {
	n := len(v)
	if trim < 0 {
		if n%2 == 1 {
			return v[n/2]
		}
		return T(float64(v[n/2-1])/2 + float64(v[n/2])/2)
	}
	var s float64
	for _, x := range v[trim : n-trim] {
		s += float64(x)
	}
	return T(s / float64(n-2*trim))
}
