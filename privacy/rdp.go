package privacy

import (
	"errors"
	"fmt"
	"math"
	"slices"
)

// defaultOrders are the Rényi orders every accountant here evaluates: the set
// Google's dp_accounting and TensorFlow Privacy use, so figures computed here
// can be checked against theirs. Small fractional orders win when ε is large
// (few rounds, little noise), large orders when ε is small; 512 covers
// ε well below 0.1 at δ = 1e-5.
var defaultOrders = func() []float64 {
	o := []float64{1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5}
	for a := 5; a < 64; a++ {
		o = append(o, float64(a))
	}
	return append(o, 128, 256, 512)
}()

// DefaultOrders returns (a copy of) the Rényi orders the package uses
// wherever it does not take orders as an argument.
func DefaultOrders() []float64 { return slices.Clone(defaultOrders) }

// SampledGaussian is Steps runs of the Gaussian mechanism, each on a Poisson
// sample of the data taken at rate Rate, with noise of standard deviation
// Noise times the sensitivity (the noise multiplier σ).
//
// Rate 1 is no sampling: every round sees all of it. In client-level DP for
// cross-silo FL a site clips its whole update to C and adds N(0, (σC)²)
// noise once per round it takes part in: that is SampledGaussian{Noise: σ,
// Rate: 1, Steps: 1} per round. Amplification by sampling (Rate < 1) holds
// only when the sample is drawn by a fair coin nobody can observe — for
// example the batches a DP-SGD runner draws from the site's records — not
// when everybody can see whether the site took part in a round.
type SampledGaussian struct {
	Noise float64 `json:"noise_multiplier"`
	Rate  float64 `json:"sampling_rate"`
	Steps int     `json:"steps"`
}

// Validate refuses parameters no accountant can use.
func (m SampledGaussian) Validate() error {
	switch {
	case math.IsNaN(m.Noise) || math.IsInf(m.Noise, 0) || m.Noise < 0:
		return fmt.Errorf("noise multiplier %v: want a finite number ≥ 0", m.Noise)
	case math.IsNaN(m.Rate) || m.Rate < 0 || m.Rate > 1:
		return fmt.Errorf("sampling rate %v: want a number in [0, 1] (1 when every round sees all the data)", m.Rate)
	case m.Steps < 0:
		return fmt.Errorf("steps %d: want ≥ 0", m.Steps)
	}
	return nil
}

// RDP returns the mechanism's Rényi DP at each order: ε_α such that the
// outputs on two neighbouring inputs have Rényi divergence of order α at
// most ε_α. RDP composes by addition, so Steps runs cost Steps times one.
//
// Rate 1 is the Gaussian mechanism, whose RDP is α/(2σ²) exactly (Mironov
// 2017, "Rényi Differential Privacy", Prop. 7). For Rate < 1 it is the
// Sampled Gaussian Mechanism of Mironov, Talwar and Zhang 2019 ("Rényi
// Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3): for
// integer α the finite binomial expansion of A_α, for fractional α its
// two-sided series (see logAFrac). Both are summed in log space, where the
// terms — up to e^(α²/2σ²) — cannot overflow. An order at which the series
// fails numerically gets +Inf, which is safe: ε takes the minimum over orders.
func (m SampledGaussian) RDP(orders []float64) ([]float64, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	if err := checkOrders(orders); err != nil {
		return nil, err
	}
	out := make([]float64, len(orders))
	if m.Steps == 0 {
		return out, nil
	}
	for i, a := range orders {
		out[i] = float64(m.Steps) * sgmRDP(a, m.Noise, m.Rate)
	}
	return out, nil
}

func checkOrders(orders []float64) error {
	if len(orders) == 0 {
		return errors.New("no Rényi orders given")
	}
	for _, a := range orders {
		if !(a > 1) || math.IsInf(a, 0) {
			return fmt.Errorf("Rényi order %v: want a finite number > 1", a)
		}
	}
	return nil
}

// sgmRDP is the RDP at order alpha of one run of the sampled Gaussian
// mechanism with noise multiplier sigma and sampling rate q.
func sgmRDP(alpha, sigma, q float64) float64 {
	switch {
	case q == 0:
		return 0
	case sigma == 0:
		return math.Inf(1)
	case q == 1:
		return alpha / (2 * sigma * sigma)
	}
	var logA float64
	if alpha == math.Trunc(alpha) && alpha <= maxIntegerOrder {
		logA = logAInt(q, sigma, int(alpha))
	} else {
		logA = logAFrac(q, sigma, alpha)
	}
	if math.IsNaN(logA) {
		return math.Inf(1)
	}
	return max(logA/(alpha-1), 0)
}

// maxIntegerOrder bounds the orders summed by the binomial expansion, which
// has alpha+1 terms; larger integers go through the series, which stops as
// soon as its terms vanish.
const maxIntegerOrder = 1 << 16

// logAInt is log A_α for integer α (MTZ 2019, Sec. 3.3):
//
//	A_α = Σ_{i=0..α} C(α,i) q^i (1−q)^(α−i) exp((i²−i)/(2σ²)).
func logAInt(q, sigma float64, alpha int) float64 {
	lq, l1q := math.Log(q), math.Log1p(-q)
	lgAlpha := lgamma(float64(alpha) + 1)
	acc := math.Inf(-1)
	for i := 0; i <= alpha; i++ {
		fi := float64(i)
		logBinom := lgAlpha - lgamma(fi+1) - lgamma(float64(alpha-i)+1)
		acc = logAdd(acc, logBinom+fi*lq+float64(alpha-i)*l1q+(fi*fi-fi)/(2*sigma*sigma))
	}
	return acc
}

// logAFrac is log A_α for fractional α. MTZ 2019 split the integral that
// defines A_α at z0 = σ² log(1/q − 1) + 1/2, where the mixture's density
// ratio crosses one, and expand each side in a binomial series that
// converges for real α:
//
//	A_α = Σ_i C(α,i) q^i (1−q)^(α−i) e^((i²−i)/2σ²) · ½ erfc((i − z0)/(√2σ))
//	    + Σ_i C(α,i) q^(α−i) (1−q)^i e^((j²−j)/2σ²) · ½ erfc((z0 − j)/(√2σ)),  j = α−i.
//
// C(α,i) changes sign once i > α+1, so positive and negative terms are
// summed apart and subtracted at the end. The sum stops once i > α and both
// terms are below e^-30 (relative to A_α ≥ 1, past double precision); a
// series that has not converged within maxSeriesTerms, or whose difference
// is not positive, yields NaN and so +Inf at this order.
func logAFrac(q, sigma, alpha float64) float64 {
	lq, l1q := math.Log(q), math.Log1p(-q)
	z0 := sigma*sigma*(l1q-lq) + 0.5
	twoVar := 2 * sigma * sigma
	scale := math.Sqrt2 * sigma
	lgAlpha := lgamma(alpha + 1)
	pos0, neg0, pos1, neg1 := math.Inf(-1), math.Inf(-1), math.Inf(-1), math.Inf(-1)
	for i := 0; i < maxSeriesTerms; i++ {
		fi := float64(i)
		j := alpha - fi
		lgj, sign := math.Lgamma(j + 1)
		logBinom := lgAlpha - lgamma(fi+1) - lgj
		s0 := logBinom + fi*lq + j*l1q + (fi*fi-fi)/twoVar + math.Log(0.5) + logErfc((fi-z0)/scale)
		s1 := logBinom + j*lq + fi*l1q + (j*j-j)/twoVar + math.Log(0.5) + logErfc((z0-j)/scale)
		if sign > 0 {
			pos0, pos1 = logAdd(pos0, s0), logAdd(pos1, s1)
		} else {
			neg0, neg1 = logAdd(neg0, s0), logAdd(neg1, s1)
		}
		if fi > alpha && max(s0, s1) < -30 {
			return logAdd(logSub(pos0, neg0), logSub(pos1, neg1))
		}
	}
	return math.NaN()
}

// maxSeriesTerms bounds logAFrac's loop; the series converges in tens of
// terms for every setting a site would use.
const maxSeriesTerms = 100_000

func lgamma(x float64) float64 {
	v, _ := math.Lgamma(x)
	return v
}

// logAdd returns log(e^a + e^b).
func logAdd(a, b float64) float64 {
	if a < b {
		a, b = b, a
	}
	if math.IsInf(b, -1) {
		return a
	}
	return a + math.Log1p(math.Exp(b-a))
}

// logSub returns log(e^a − e^b), or NaN when that is not positive.
func logSub(a, b float64) float64 {
	switch {
	case math.IsInf(b, -1):
		return a
	case a <= b:
		return math.NaN()
	}
	return a + math.Log(-math.Expm1(b-a))
}

// logErfc is log(erfc(x)) accurate far into the tail, where erfc itself
// underflows (x ≳ 26.5): there it uses the asymptotic expansion
// erfc(x) = e^(−x²)/(x√π) · (1 − 1/(2x²) + 3/(2x²)² − 15/(2x²)³ + …),
// whose six terms are exact to 1e-13 for x ≥ 20.
func logErfc(x float64) float64 {
	if x < 20 {
		return math.Log(math.Erfc(x))
	}
	u := 1 / (2 * x * x)
	series := 1 - u*(1-3*u*(1-5*u*(1-7*u*(1-9*u*(1-11*u)))))
	return -x*x - math.Log(x) - 0.5*math.Log(math.Pi) + math.Log(series)
}
