package privacy

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/fx-fl/fx/tensor"
)

var floatTypes = []tensor.DType{tensor.F64, tensor.F32, tensor.F16, tensor.BF16}

// model builds a one-tensor-per-dtype model whose values are f(i) for the
// tensor's i-th element, in that tensor's dtype.
func model(t *testing.T, n int, f func(i int) float64, dtypes ...tensor.DType) tensor.Model {
	t.Helper()
	var m tensor.Model
	for _, d := range dtypes {
		x := tensor.New("w."+strings.ToLower(string(d)), d, []int64{int64(n)})
		c := codecs[d]
		for i := range n {
			c.put(x.Data[i*c.size:], f(i))
		}
		m = append(m, x)
	}
	return m
}

// updateNorm is ‖trained − global‖₂ over all float tensors, read back in
// each dtype.
func updateNorm(global, trained tensor.Model) float64 {
	var ss float64
	for i, x := range trained {
		if !x.DType.IsFloat() {
			continue
		}
		c := codecs[x.DType]
		for off := 0; off < len(x.Data); off += c.size {
			d := c.get(x.Data[off:]) - c.get(global[i].Data[off:])
			ss += d * d
		}
	}
	return math.Sqrt(ss)
}

func TestClipBoundsTheUpdate(t *testing.T) {
	for _, d := range floatTypes {
		global := model(t, 1000, func(i int) float64 { return math.Sin(float64(i)) }, d)
		trained := model(t, 1000, func(i int) float64 { return math.Sin(float64(i)) + 0.5*math.Cos(float64(3*i)) }, d)
		before := updateNorm(global, trained)
		rel, err := ClipAndNoise(global, trained, 1, 0)
		if err != nil {
			t.Fatal(err)
		}
		if math.Abs(rel.Norm-before) > 1e-9*before || before <= 1 {
			t.Fatalf("%s: reported norm %v, the update's is %v (and must exceed the clip 1 for this test)", d, rel.Norm, before)
		}
		// F16 and BF16 round each written value to 11 and 8 bits: the norm
		// may come out above C by that relative error.
		slack := map[tensor.DType]float64{tensor.F64: 1e-12, tensor.F32: 1e-6, tensor.F16: 1e-3, tensor.BF16: 8e-3}[d]
		if after := updateNorm(global, trained); after > 1+slack || after < 1-slack {
			t.Errorf("%s: update norm after clipping to 1 is %v", d, after)
		}
		if want := 1 / before; math.Abs(rel.Scale-want) > 1e-12 {
			t.Errorf("%s: scale %v, want %v", d, rel.Scale, want)
		}
	}
}

// TestClipDirection: clipping shrinks Δ, it does not turn it.
func TestClipDirection(t *testing.T) {
	global := model(t, 3, func(i int) float64 { return 1 }, tensor.F64)
	trained := model(t, 3, func(i int) float64 { return 1 + float64(4*i) }, tensor.F64) // Δ = (0, 4, 8)
	if _, err := ClipAndNoise(global, trained, 2, 0); err != nil {
		t.Fatal(err)
	}
	got := []float64{codecs[tensor.F64].get(trained[0].Data[0:]), codecs[tensor.F64].get(trained[0].Data[8:]), codecs[tensor.F64].get(trained[0].Data[16:])}
	s := 2 / math.Sqrt(80)
	want := []float64{1, 1 + 4*s, 1 + 8*s}
	for i := range got {
		if math.Abs(got[i]-want[i]) > 1e-15 {
			t.Errorf("element %d: %v, want %v", i, got[i], want[i])
		}
	}
}

func TestUpdateWithinBoundIsUnchanged(t *testing.T) {
	global := model(t, 500, func(i int) float64 { return float64(i%17) - 8 }, floatTypes...)
	trained := model(t, 500, func(i int) float64 { return float64(i%17) - 8 + 0.001*float64(i%5) }, floatTypes...)
	want := trained.Clone()
	rel, err := ClipAndNoise(global, trained, 10, 0)
	if err != nil {
		t.Fatal(err)
	}
	if rel.Scale != 1 {
		t.Errorf("scale %v for an update within the bound", rel.Scale)
	}
	for i := range trained {
		if !bytes.Equal(trained[i].Data, want[i].Data) {
			t.Errorf("%s changed although its update is within the clip norm and there is no noise", trained[i].Name)
		}
	}
}

// TestNoiseStatistics draws 1e6 noise values (a zero update, so the model
// is all noise) and checks their mean, variance and the share within one
// standard deviation. Each check has a bound of six standard errors: the
// sample variance of n normal draws has a standard error of s²·√(2/n), the
// mean s/√n, the share p of a normal within 1 sd √(p(1−p)/n). A generator
// off by 1% in its standard deviation fails the variance check.
func TestNoiseStatistics(t *testing.T) {
	const n = 1_000_000
	const clip, sigma = 0.5, 1.7
	std := sigma * clip
	zero := func(int) float64 { return 0 }
	global, trained := model(t, n, zero, tensor.F64), model(t, n, zero, tensor.F64)
	rel, err := ClipAndNoise(global, trained, clip, sigma)
	if err != nil {
		t.Fatal(err)
	}
	if rel.Std != std || rel.Elements != n {
		t.Fatalf("release %+v, want std %v over %d elements", rel, std, n)
	}
	var sum, sumSq float64
	var within int
	for _, v := range trained[0].Float64s() {
		sum += v
		sumSq += v * v
		if math.Abs(v) <= std {
			within++
		}
	}
	mean := sum / n
	variance := sumSq/n - mean*mean
	if math.Abs(mean) > 6*std/math.Sqrt(n) {
		t.Errorf("noise mean %v, want 0 ± %v", mean, 6*std/math.Sqrt(n))
	}
	if r := variance / (std * std); math.Abs(r-1) > 6*math.Sqrt(2.0/n) {
		t.Errorf("noise variance is %v × (σC)², want 1 ± %v", r, 6*math.Sqrt(2.0/n))
	}
	const p = 0.682689492137 // P(|Z| ≤ 1)
	if share := float64(within) / n; math.Abs(share-p) > 6*math.Sqrt(p*(1-p)/n) {
		t.Errorf("%v of the noise lies within one sd, want %v", share, p)
	}
}

// TestNoiseInEveryDType: the noise reaches every float dtype at the right
// scale, on top of the clipped update.
func TestNoiseInEveryDType(t *testing.T) {
	const n = 100_000
	for _, d := range floatTypes {
		global := model(t, n, func(i int) float64 { return 1 }, d)
		trained := model(t, n, func(i int) float64 { return 1 }, d)
		if _, err := ClipAndNoise(global, trained, 0.25, 2); err != nil {
			t.Fatal(err)
		}
		c := codecs[d]
		var ss float64
		for off := 0; off < len(trained[0].Data); off += c.size {
			v := c.get(trained[0].Data[off:]) - 1
			ss += v * v
		}
		// 0.5 is the std; BF16 rounds 1 + noise to 8 bits, which adds a
		// variance of about (2^-8)²/12 relative: far inside the bound.
		if r := ss / n / 0.25; math.Abs(r-1) > 6*math.Sqrt(2.0/n)+1e-3 {
			t.Errorf("%s: noise variance %v × (σC)²", d, r)
		}
	}
}

// TestFreshNoiseEachCall: two calls on the same update draw different noise
// (each seeds its generator anew from crypto/rand).
func TestFreshNoiseEachCall(t *testing.T) {
	a := model(t, 64, func(int) float64 { return 0 }, tensor.F32)
	b := a.Clone()
	g := a.Clone()
	if _, err := ClipAndNoise(g, a, 1, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := ClipAndNoise(g, b, 1, 1); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(a[0].Data, b[0].Data) {
		t.Error("two calls drew the same noise")
	}
}

func TestIntegerTensorsAreReset(t *testing.T) {
	global := model(t, 4, func(i int) float64 { return 0 }, tensor.F32)
	trained := model(t, 4, func(i int) float64 { return 0.1 }, tensor.F32)
	gSteps := tensor.New("bn.num_batches_tracked", tensor.I64, nil)
	tSteps := tensor.New("bn.num_batches_tracked", tensor.I64, nil)
	tSteps.Data[0] = 123 // the site's batch count: must not leave the site
	global = append(global, gSteps)
	trained = append(trained, tSteps)
	rel, err := ClipAndNoise(global, trained, 1, 0.5)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tSteps.Data, gSteps.Data) {
		t.Errorf("integer tensor left at %v, want the global model's value", tSteps.Data)
	}
	if len(rel.Reset) != 1 || rel.Reset[0] != "bn.num_batches_tracked" {
		t.Errorf("Reset = %v", rel.Reset)
	}
	if rel.Elements != 4 {
		t.Errorf("%d elements noised, want the 4 float ones", rel.Elements)
	}
}

func TestClipAndNoiseRefusesBadInput(t *testing.T) {
	base := func() tensor.Model {
		return model(t, 8, func(i int) float64 { return float64(i) }, tensor.F32, tensor.F16)
	}
	nan := base()
	codecs[tensor.F32].put(nan[0].Data[4:], math.NaN())
	for _, c := range []struct {
		name        string
		global      tensor.Model
		trained     tensor.Model
		clip, noise float64
		want        string
	}{
		{"missing tensor", base(), base()[:1], 1, 1, `tensor "w.f16" is missing`},
		{"extra tensor", base()[:1], base(), 1, 1, `unknown tensor "w.f16"`},
		{"other shape", base(), model(t, 9, func(int) float64 { return 0 }, tensor.F32, tensor.F16), 1, 1, `tensor "w.f32" is F32[9], want F32[8]`},
		{"other dtype", base(), tensor.Model{tensor.New("w.f32", tensor.F64, []int64{8}), base()[1]}, 1, 1, `tensor "w.f32" is F64[8], want F32[8]`},
		{"NaN", base(), nan, 1, 1, `tensor "w.f32": the update is not finite`},
		{"zero clip", base(), base(), 0, 1, "clip norm 0"},
		{"negative noise", base(), base(), 1, -1, "noise multiplier -1"},
		{"NaN noise", base(), base(), 1, math.NaN(), "noise multiplier NaN"},
	} {
		before := c.trained.Clone()
		_, err := ClipAndNoise(c.global, c.trained, c.clip, c.noise)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one containing %q", c.name, err, c.want)
		}
		for i := range before {
			if !bytes.Equal(before[i].Data, c.trained[i].Data) {
				t.Errorf("%s: the refused model was changed", c.name)
			}
		}
	}
}

func TestNoiseOverflowIsAnError(t *testing.T) {
	global := model(t, 16, func(int) float64 { return 0 }, tensor.F16)
	trained := model(t, 16, func(int) float64 { return 0 }, tensor.F16)
	_, err := ClipAndNoise(global, trained, 1e4, 100) // std 1e6, F16 ends at 65504
	if err == nil || !strings.Contains(err.Error(), "overflows F16") {
		t.Errorf("error %v, want an overflow", err)
	}
	// The typed F32 loop: values near float32's largest overflow it, and
	// the same values in F64 do not.
	near := func(int) float64 { return 3.4e38 }
	_, err = ClipAndNoise(model(t, 16, near, tensor.F32), model(t, 16, near, tensor.F32), 1e37, 100) // std 1e39
	if err == nil || !strings.Contains(err.Error(), "overflows F32") {
		t.Errorf("F32: error %v, want an overflow", err)
	}
	if _, err := ClipAndNoise(model(t, 16, near, tensor.F64), model(t, 16, near, tensor.F64), 1e37, 100); err != nil {
		t.Errorf("F64: %v", err)
	}
}

// TestBlocksDrawTheirOwnNoise: the noise is drawn a block at a time on
// every core, each block from a stream of its own. Two blocks drawing the
// same stream (a seed not told apart by the block's place) would pass the
// statistics above but repeat the noise; their correlation must be that of
// independent draws, and a seed must give the same noise on every run.
func TestBlocksDrawTheirOwnNoise(t *testing.T) {
	const n = 4 * noiseBlock
	zero := func(int) float64 { return 0 }
	global, trained := model(t, n, zero, tensor.F64), model(t, n, zero, tensor.F64)
	var seed [32]byte
	seed[0] = 7
	if _, err := clipAndNoise(global, trained, 1, 1, seed); err != nil {
		t.Fatal(err)
	}
	v := trained[0].Float64s()
	for k := 1; k < 4; k++ {
		a, b := v[:noiseBlock], v[k*noiseBlock:(k+1)*noiseBlock]
		var ab, aa, bb float64
		for i := range a {
			ab, aa, bb = ab+a[i]*b[i], aa+a[i]*a[i], bb+b[i]*b[i]
		}
		// Independent standard normals: correlation within 6/√n of 0.
		if r := ab / math.Sqrt(aa*bb); math.Abs(r) > 6/math.Sqrt(noiseBlock) {
			t.Errorf("blocks 0 and %d correlate at %v: they draw the same noise", k, r)
		}
	}
	again := model(t, n, zero, tensor.F64)
	if _, err := clipAndNoise(global, again, 1, 1, seed); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again[0].Data, trained[0].Data) {
		t.Error("one seed gave different noise on two runs: the blocks' streams depend on the scheduling")
	}
}

// TestGaussianIsNormFloat64: the sampler's ziggurat is math/rand/v2's,
// tables and rare paths included (a million draws take the tail and wedge
// paths thousands of times): on the same keystream it returns exactly
// (*rand.Rand).NormFloat64's samples, so it inherits their distribution.
func TestGaussianIsNormFloat64(t *testing.T) {
	const n = 1_000_000
	key := [32]byte{3}
	want := rand.New(newKeystream(key))
	got := make([]float64, n)
	g := gaussian{newKeystream(key)}
	for lo := 0; lo < n; lo += 1000 { // runs of other lengths than the keystream's buffer
		g.fill(got[lo:lo+1000], 1)
	}
	var tail int
	for i, v := range got {
		if w := want.NormFloat64(); v != w {
			t.Fatalf("sample %d is %v, NormFloat64 drew %v", i, v, w)
		}
		if math.Abs(v) > rn {
			tail++
		}
	}
	if tail == 0 {
		t.Error("no sample beyond the base strip: the tail path went untested")
	}
}

// TestNoiseIsNormal: the share of noise within k standard deviations, for
// k from 0.5 to 4, is the normal's within six standard errors — the shape
// of the distribution, tails included, beyond TestNoiseStatistics' moments.
func TestNoiseIsNormal(t *testing.T) {
	const n = 1_000_000
	const std = 2.0
	zero := func(int) float64 { return 0 }
	global, trained := model(t, n, zero, tensor.F32), model(t, n, zero, tensor.F32)
	if _, err := ClipAndNoise(global, trained, 1, std); err != nil {
		t.Fatal(err)
	}
	v := trained[0].Float32s()
	for _, k := range []float64{0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4} {
		var within int
		for _, x := range v {
			if math.Abs(float64(x)) <= k*std {
				within++
			}
		}
		p := math.Erf(k / math.Sqrt2)
		if share := float64(within) / n; math.Abs(share-p) > 6*math.Sqrt(p*(1-p)/n) {
			t.Errorf("%v of the noise lies within %v sd, a normal has %v", share, k, p)
		}
	}
}

// TestTypedLoopsMatchTheCodecs: the F32 and F64 loops of the norm and the
// write compute what the dtype-generic codec loop does.
func TestTypedLoopsMatchTheCodecs(t *testing.T) {
	const n = 1003 // not a multiple of the unrolling
	for _, d := range []tensor.DType{tensor.F32, tensor.F64} {
		g := model(t, n, func(i int) float64 { return math.Sin(float64(i)) }, d)[0]
		tr := model(t, n, func(i int) float64 { return math.Sin(float64(i)) + math.Cos(float64(7*i)) }, d)[0]
		noise := make([]float64, n)
		for i := range noise {
			noise[i] = math.Sin(float64(3 * i))
		}
		c := codecs[d]
		var want float64
		for off := 0; off < len(tr.Data); off += c.size {
			x := c.get(tr.Data[off:]) - c.get(g.Data[off:])
			want += x * x
		}
		if got := sumSquares(d, tr.Data, g.Data); math.Abs(got-want) > 1e-12*want {
			t.Errorf("%s: sum of squares %v, the codec's %v", d, got, want)
		}
		generic := tr.Clone()
		for i := range n {
			off := i * c.size
			v := c.get(generic.Data[off:])
			c.put(generic.Data[off:], v-0.25*(v-c.get(g.Data[off:]))+noise[i])
		}
		if _, _, ok := clipNoise(d, tr.Data, g.Data, 0.25, noise); !ok {
			t.Fatalf("%s: overflow", d)
		}
		if !bytes.Equal(tr.Data, generic.Data) {
			t.Errorf("%s: the typed write differs from the codec's", d)
		}
	}
}

// TestOverflowNamesTheElement: the overflow error names the element in the
// tensor, not in the block or the run of noise it was drawn in.
func TestOverflowNamesTheElement(t *testing.T) {
	const n = 3 * noiseRun
	big := func(i int) float64 {
		if i >= 2500 && i < 2600 {
			return 65504 // F16's largest
		}
		return 0
	}
	global, trained := model(t, n, big, tensor.F16), model(t, n, big, tensor.F16)
	_, err := ClipAndNoise(global, trained, 1, 1000)
	if err == nil {
		t.Fatal("no overflow")
	}
	var at int
	if _, scan := fmt.Sscanf(err.Error()[strings.Index(err.Error(), "element"):], "element %d", &at); scan != nil || at < 2500 || at >= 2600 {
		t.Errorf("error %q: want an element in [2500, 2600)", err)
	}
}
