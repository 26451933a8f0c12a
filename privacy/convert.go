package privacy

import (
	"errors"
	"fmt"
	"math"
)

// Epsilon converts an RDP curve (rdp[i] at orders[i]) to the smallest ε for
// which it implies (ε, δ)-DP, and the order that attains it.
//
// It uses the conversion of Balle, Barthe, Gaboardi, Hsu and Sato 2020
// ("Hypothesis Testing Interpretations and Rényi Differential Privacy",
// Thm. 21) and Canonne, Kamath and Steinke 2020 (Prop. 12):
//
//	ε = min_α  RDP(α) + log((α−1)/α) − (log δ + log α)/(α−1),
//
// which is the default everywhere in this package because it is never
// looser than the classic conversion of EpsilonClassic — at every order it
// subtracts log(α/(α−1)) + log(α)/(α−1) > 0 — and is what Opacus and
// Google's dp_accounting report, so figures agree with theirs. An order
// whose RDP is so small that δ ≥ √(1 − e^(−RDP)) gives ε = 0: the total
// variation distance is then below δ (Pinsker-type bound, as dp_accounting
// does). ε is +Inf when every order is (no noise, or too much composition).
func Epsilon(orders, rdp []float64, delta float64) (eps, order float64, err error) {
	return convert(orders, rdp, delta, func(a, r float64) float64 {
		if delta*delta+math.Expm1(-r) > 0 {
			return 0
		}
		return r + math.Log1p(-1/a) - (math.Log(delta)+math.Log(a))/(a-1)
	})
}

// EpsilonClassic is Epsilon with the conversion of Mironov 2017 ("Rényi
// Differential Privacy", Prop. 3): ε = min_α RDP(α) + log(1/δ)/(α−1). It is
// looser; it is here to reproduce figures published before 2020 (the moments
// accountant of Abadi et al. 2016 is this bound at integer orders).
func EpsilonClassic(orders, rdp []float64, delta float64) (eps, order float64, err error) {
	return convert(orders, rdp, delta, func(a, r float64) float64 {
		return r - math.Log(delta)/(a-1)
	})
}

func convert(orders, rdp []float64, delta float64, at func(a, r float64) float64) (float64, float64, error) {
	if err := checkDelta(delta); err != nil {
		return 0, 0, err
	}
	if err := checkOrders(orders); err != nil {
		return 0, 0, err
	}
	if len(rdp) != len(orders) {
		return 0, 0, fmt.Errorf("%d RDP values for %d orders", len(rdp), len(orders))
	}
	best, bestOrder := math.Inf(1), orders[0]
	for i, a := range orders {
		r := rdp[i]
		if math.IsNaN(r) || r < 0 {
			return 0, 0, fmt.Errorf("RDP %v at order %v: want a number ≥ 0", r, a)
		}
		if e := at(a, r); e < best {
			best, bestOrder = e, a
		}
	}
	return max(best, 0), bestOrder, nil
}

func checkDelta(delta float64) error {
	if !(delta > 0 && delta < 1) {
		return fmt.Errorf("δ %v: want a number in (0, 1), usually below 1/(number of records or sites)", delta)
	}
	return nil
}

// Epsilon is the ε the mechanism spends at δ, over DefaultOrders with the
// tight conversion of the package-level Epsilon.
func (m SampledGaussian) Epsilon(delta float64) (float64, error) {
	rdp, err := m.RDP(defaultOrders)
	if err != nil {
		return 0, err
	}
	eps, _, err := Epsilon(defaultOrders, rdp, delta)
	return eps, err
}

// MinNoise is the smallest noise multiplier σ (to a relative 1e-9, rounded
// up) with which steps runs of the Gaussian mechanism at sampling rate rate
// stay within (eps, delta)-DP. It is how a researcher picks σ for a plan:
// the ε a mechanism spends falls as σ grows, so a bisection finds it.
func MinNoise(rate float64, steps int, eps, delta float64) (float64, error) {
	return minNoise(nil, rate, steps, eps, delta)
}

// minNoise is MinNoise on top of spent, an RDP curve over DefaultOrders (nil
// for nothing spent).
func minNoise(spent []float64, rate float64, steps int, eps, delta float64) (float64, error) {
	if err := checkEpsilon(eps); err != nil {
		return 0, err
	}
	total := make([]float64, len(defaultOrders))
	spends := func(sigma float64) (float64, error) {
		rdp, err := SampledGaussian{Noise: sigma, Rate: rate, Steps: steps}.RDP(defaultOrders)
		if err != nil {
			return 0, err
		}
		for i := range total {
			total[i] = rdp[i]
			if spent != nil {
				total[i] += spent[i]
			}
		}
		e, _, err := Epsilon(defaultOrders, total, delta)
		return e, err
	}
	if _, err := spends(1); err != nil {
		return 0, err
	}
	lo, hi := 0.0, 1.0
	for {
		e, _ := spends(hi)
		if e <= eps {
			break
		}
		if lo, hi = hi, 2*hi; hi > maxNoise {
			return 0, fmt.Errorf("no noise multiplier up to %g keeps %d steps at rate %v within ε = %v at δ = %v: allow a larger ε or fewer steps", float64(maxNoise), steps, rate, eps, delta)
		}
	}
	for hi-lo > 1e-9*hi {
		mid := lo + (hi-lo)/2
		if e, _ := spends(mid); e <= eps {
			hi = mid
		} else {
			lo = mid
		}
	}
	return hi, nil
}

const maxNoise = 1 << 20

// MaxSteps is the largest number of further steps of the sampled Gaussian
// mechanism (noise multiplier noise, sampling rate rate) that keep the
// total — spent, an RDP curve over DefaultOrders, or nil for nothing spent,
// plus the new steps — within (eps, delta)-DP. It answers a site's "you may
// run at most N more rounds". Mechanisms that spend nothing per step (rate
// 0) fit without end; MaxSteps then returns math.MaxInt.
func MaxSteps(spent []float64, noise, rate, eps, delta float64) (int, error) {
	if err := checkEpsilon(eps); err != nil {
		return 0, err
	}
	switch {
	case spent == nil:
		spent = make([]float64, len(defaultOrders))
	case len(spent) != len(defaultOrders):
		return 0, fmt.Errorf("spent RDP has %d values, want one for each of the %d default orders", len(spent), len(defaultOrders))
	}
	one, err := SampledGaussian{Noise: noise, Rate: rate, Steps: 1}.RDP(defaultOrders)
	if err != nil {
		return 0, err
	}
	total := make([]float64, len(one))
	fits := func(k int) (bool, error) {
		for i := range total {
			total[i] = spent[i] + float64(k)*one[i]
		}
		e, _, err := Epsilon(defaultOrders, total, delta)
		return e <= eps, err
	}
	if ok, err := fits(0); err != nil || !ok {
		return 0, err
	}
	if ok, _ := fits(math.MaxInt); ok {
		return math.MaxInt, nil
	}
	lo, hi := 0, 1 // fits(lo) holds, fits(hi) is to be found false
	for {
		if ok, _ := fits(hi); !ok {
			break
		}
		if hi > math.MaxInt/2 {
			lo, hi = hi, math.MaxInt
			break
		}
		lo, hi = hi, 2*hi
	}
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		if ok, _ := fits(mid); ok {
			lo = mid
		} else {
			hi = mid
		}
	}
	return lo, nil
}

func checkEpsilon(eps float64) error {
	if !(eps > 0) || math.IsInf(eps, 1) {
		return errors.New("target ε: want a finite number > 0")
	}
	return nil
}
