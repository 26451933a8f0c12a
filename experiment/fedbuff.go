package experiment

import (
	"fmt"
	"math"
)

// Asynchronous rounds: FedBuff (Nguyen et al. 2022, "Federated Learning
// with Buffered Asynchronous Aggregation"). With aggregation.mode async a
// round is a server step: it closes as soon as aggregation.buffer train
// updates have arrived, rather than when every site has reported, and a
// site uploads what it trained even if the global model has moved on since
// it started, as long as it is at most staleness.max steps behind. The
// upload is the site's update Δ = y − x_base (trained minus the model it
// started from), so the aggregator needs no old model: it sums
// w·f(s)·Δ in its running sum, and at the close steps
//
//	x ← x + η_g · Σ w·f(s)·Δ / Σ w·f(s)
//
// with w the update's weight under aggregation.weights, s its staleness
// (the steps taken since the model it trained from) and f the staleness
// function: (1+s)^−exponent (polynomial, FedBuff's 1/√(1+s) by default) or
// 1 (constant). η_g is aggregation.lr, 1 by default: with every site in a
// step and none stale, that is FedAvg. See docs/experiments.md, FedBuff.

// Aggregation modes (aggregation.mode).
const (
	ModeSync  = "sync"
	ModeAsync = "async"
)

// Staleness functions (aggregation.staleness.function).
const (
	StalenessPolynomial = "polynomial"
	StalenessConstant   = "constant"
)

// Defaults of an asynchronous plan.
const (
	// DefaultStalenessExponent is FedBuff's: an update s steps behind
	// weighs 1/√(1+s).
	DefaultStalenessExponent = 0.5
	// DefaultMaxStaleness is the most steps an update may be behind the
	// global model and still count: at 10 it weighs 0.3 of a fresh one
	// under the default function, and a site that far behind is better
	// served starting again from the newest model.
	DefaultMaxStaleness = 10
	// DefaultAsyncLR is the server learning rate η_g of an asynchronous
	// step when aggregation.lr is 0.
	DefaultAsyncLR = 1.0
)

// Staleness says how an asynchronous step weighs an update trained from an
// older model (aggregation.staleness).
type Staleness struct {
	// Function is polynomial ((1+s)^−exponent, the default) or constant
	// (every update counts fully) (function).
	Function string `yaml:"function,omitempty" json:"function,omitempty"`
	// Exponent is the polynomial's a ≥ 0 (exponent); 0 means
	// DefaultStalenessExponent.
	Exponent float64 `yaml:"exponent,omitempty" json:"exponent,omitempty"`
	// Max is the most steps an update may be behind and still count (max);
	// older ones are refused and their site starts again from the newest
	// model. 0 means DefaultMaxStaleness.
	Max int `yaml:"max,omitempty" json:"max,omitempty"`
}

// Async reports whether the plan runs FedBuff's asynchronous rounds.
func (p *Plan) Async() bool { return p.Aggregation.Mode == ModeAsync }

// BufferFor is K, the train updates that close an asynchronous step, in an
// experiment of the given participants: aggregation.buffer, or else all
// participants but one (so that one slow site never holds a step up), at
// least 1; never more than the participants.
func (p *Plan) BufferFor(participants int) int {
	k := p.Aggregation.Buffer
	if k <= 0 {
		k = participants - 1
	}
	return max(1, min(k, participants))
}

// MaxStaleness is aggregation.staleness.max, or DefaultMaxStaleness.
func (p *Plan) MaxStaleness() int {
	if m := p.Aggregation.Staleness.Max; m > 0 {
		return m
	}
	return DefaultMaxStaleness
}

// StalenessWeight is f(s), the factor an update s steps behind is weighed
// by on top of its aggregation.weights weight: in (0, 1], 1 when s is 0.
func (p *Plan) StalenessWeight(s int) float64 {
	st := p.Aggregation.Staleness
	if st.Function == StalenessConstant || s <= 0 {
		return 1
	}
	a := st.Exponent
	if a == 0 {
		a = DefaultStalenessExponent
	}
	return math.Pow(1+float64(s), -a)
}

// AsyncLR is the server learning rate η_g of an asynchronous step:
// aggregation.lr, or DefaultAsyncLR.
func (p *Plan) AsyncLR() float64 {
	if lr := p.Aggregation.LR; lr > 0 {
		return lr
	}
	return DefaultAsyncLR
}

// validateAsync checks aggregation.mode, buffer and staleness, and refuses
// what asynchronous rounds do not combine with.
func (p *Plan) validateAsync(v *problems) {
	a := &p.Aggregation
	switch a.Mode {
	case "", ModeSync:
		if a.Buffer != 0 {
			v.add("aggregation.buffer", "is only used with mode: async")
		}
		if a.Staleness != (Staleness{}) {
			v.add("aggregation.staleness", "is only used with mode: async")
		}
		return
	case ModeAsync:
	default:
		v.add("aggregation.mode", fmt.Sprintf("must be sync (the default: a round waits for its sites) or async (FedBuff: a step as soon as aggregation.buffer updates are in), got %q", a.Mode))
		return
	}
	switch {
	case a.Algorithm == AlgFedAvg:
	case a.Algorithm == AlgMedian || a.Algorithm == AlgTrimmedMean || a.Algorithm == AlgKrum || a.Algorithm == AlgMultiKrum:
		v.add("aggregation.mode", fmt.Sprintf("async cannot be combined with algorithm %s: it compares whole models of one round, and an asynchronous step sums updates trained from different models; use fedavg", a.Algorithm))
	case a.Algorithm == AlgScaffold:
		v.add("aggregation.mode", "async cannot be combined with scaffold: its control variates assume every site starts a round from the same model; use fedavg")
	case a.Algorithm == AlgFedAdam || a.Algorithm == AlgFedYogi || a.Algorithm == AlgFedAdagrad:
		v.add("aggregation.mode", fmt.Sprintf("async cannot be combined with %s yet: an asynchronous step is fedavg's, scaled by aggregation.lr (the server learning rate); use fedavg", a.Algorithm))
	case a.Algorithm != "":
		v.add("aggregation.mode", fmt.Sprintf("async cannot be combined with the registered strategy %s: strategies are given one round's whole models; use fedavg", a.Algorithm))
	}
	if a.Secure {
		v.add("aggregation.secure", "cannot be combined with mode: async: secure aggregation masks a round's updates against each other, and an asynchronous step takes whichever arrive first; turn secure off, or use mode: sync")
	}
	if p.Privacy.DP != nil {
		v.add("privacy.dp", "cannot be combined with mode: async yet: the sites would upload their update without the clip and noise it needs; use mode: sync with dp")
	}
	if len(a.Local) > 0 {
		v.add("aggregation.local", "cannot be combined with mode: async yet: remove local, or use mode: sync")
	}
	if p.Evaluation() && len(p.Tasks) > 0 {
		v.add("aggregation.mode", "async steps the model with the sites' train updates, and this plan's tasks do not train: remove mode, or add train to tasks")
	}
	switch k, sites := a.Buffer, p.Participants.Min; {
	case k < 0:
		v.add("aggregation.buffer", fmt.Sprintf("must be at least 1 (the updates that close a step), or 0 for all participants but one, got %d", k))
	case k > 0 && sites >= 1 && k > sites:
		v.add("aggregation.buffer", fmt.Sprintf("is %d but participants.min is %d: an experiment that starts with %d sites could never fill a step; lower buffer or raise participants.min", k, sites, sites))
	}
	// A step closes with K updates, and one that closes with fewer than
	// min_reporting fails the experiment: K must allow it. With buffer 0,
	// K is the participants but one, at least participants.min − 1.
	if k, mr := a.Buffer, p.Stragglers.MinReporting; k >= 0 && mr >= 1 {
		what := fmt.Sprintf("buffer %d", k)
		if k == 0 && p.Participants.Min >= 1 {
			k, what = max(1, p.Participants.Min-1), fmt.Sprintf("the default buffer (participants − 1, %d with participants.min %d)", max(1, p.Participants.Min-1), p.Participants.Min)
		}
		if k > 0 && mr > k {
			v.add("stragglers.min_reporting", fmt.Sprintf("is %d, but an asynchronous step closes with %s updates and would fail: lower min_reporting to at most %d, or set aggregation.buffer", mr, what, k))
		}
	}
	st := a.Staleness
	switch st.Function {
	case "", StalenessPolynomial:
		if !(st.Exponent >= 0) || math.IsInf(st.Exponent, 0) {
			v.add("aggregation.staleness.exponent", fmt.Sprintf("must be a finite number ≥ 0 (an update s steps behind weighs (1+s)^-exponent; 0 means %v), got %v", DefaultStalenessExponent, st.Exponent))
		}
	case StalenessConstant:
		if st.Exponent != 0 {
			v.add("aggregation.staleness.exponent", "is only used with function: polynomial")
		}
	default:
		v.add("aggregation.staleness.function", fmt.Sprintf("must be polynomial ((1+s)^-exponent, the default) or constant (stale updates count fully), got %q", st.Function))
	}
	if st.Max < 0 {
		v.add("aggregation.staleness.max", fmt.Sprintf("must be at least 1 (the most steps an update may be behind), or 0 for %d, got %d", DefaultMaxStaleness, st.Max))
	}
}
