package privacy

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Budget is what a data owner allows to be spent on one dataset, over
// every experiment that ever trains on it.
type Budget struct {
	// Epsilon is the most ε the dataset may reach, at Delta.
	Epsilon float64 `json:"epsilon" yaml:"epsilon" mapstructure:"epsilon"`
	// Delta is the δ at which ε is computed; keep it below 1/(number of
	// people whose data the dataset holds).
	Delta float64 `json:"delta" yaml:"delta" mapstructure:"delta"`
	// MinNoise is the smallest noise multiplier σ a round may use (0: any
	// that fits the budget). It stops a plan from spending the whole budget
	// in a few barely-noised rounds.
	MinNoise float64 `json:"min_noise_multiplier" yaml:"min_noise_multiplier" mapstructure:"min_noise_multiplier"`
	// MaxClip is the largest clip norm C a round may use (0: any). ε does
	// not depend on C, but the noise's scale and the update's size do.
	MaxClip float64 `json:"max_clip_norm" yaml:"max_clip_norm" mapstructure:"max_clip_norm"`
}

// Validate checks the budget itself, with messages for whoever wrote it.
func (b Budget) Validate() error {
	switch {
	case !(b.Epsilon > 0) || math.IsInf(b.Epsilon, 1):
		return fmt.Errorf("privacy budget: epsilon %v: want a finite number > 0 (1 to 10 is usual)", b.Epsilon)
	case !(b.Delta > 0 && b.Delta < 1):
		return fmt.Errorf("privacy budget: delta %v: want a number in (0, 1), below 1/(people in the dataset), e.g. 1e-5", b.Delta)
	case !(b.MinNoise >= 0) || math.IsInf(b.MinNoise, 1):
		return fmt.Errorf("privacy budget: min_noise_multiplier %v: want a finite number ≥ 0", b.MinNoise)
	case !(b.MaxClip >= 0) || math.IsInf(b.MaxClip, 1):
		return fmt.Errorf("privacy budget: max_clip_norm %v: want a finite number ≥ 0 (0: no limit)", b.MaxClip)
	}
	return nil
}

// ErrRefused is matched (errors.Is) by every error that refuses a plan or a
// round because of the site's privacy budget, as opposed to a failure of
// the ledger itself. Either way nothing may leave the site.
var ErrRefused = errors.New("refused by the site's privacy budget")

// Admit checks a plan's DP parameters, as one charge will carry them,
// against the budget's limits on σ and C — the parts of a budget that do
// not depend on what was spent before.
func (b Budget) Admit(c Charge) error {
	if err := b.Validate(); err != nil {
		return err
	}
	if err := c.validate(); err != nil {
		return err
	}
	if c.Noise < b.MinNoise {
		return fmt.Errorf("%w: noise multiplier %v is below this site's minimum of %v: the plan must use at least %v", ErrRefused, c.Noise, b.MinNoise, b.MinNoise)
	}
	if b.MaxClip > 0 && c.Clip > b.MaxClip {
		return fmt.Errorf("%w: clip norm %v is above this site's maximum of %v: the plan must clip updates to at most %v", ErrRefused, c.Clip, b.MaxClip, b.MaxClip)
	}
	return nil
}

// ExceededError refuses rounds that would take a dataset past its budget.
// Its fields let a caller report the numbers in its own way.
type ExceededError struct {
	Dataset    string
	Experiment string
	Name       string // the experiment's name (owner/name), if known
	Budget     Budget
	Spent      float64 // ε spent before, at Budget.Delta
	Would      float64 // ε after the rounds asked for
	Rounds     int     // the rounds asked for
	Fit        int     // how many of those rounds fit, at the same parameters
	Noise      float64 // the noise multiplier asked for
	// MinNoise is the smallest noise multiplier with which all the rounds
	// asked for would fit, or 0 if none would (the budget is used up).
	MinNoise float64
}

func (e *ExceededError) Error() string {
	var b strings.Builder
	exp := e.Experiment
	if e.Name != "" {
		exp = e.Name
	}
	what := fmt.Sprintf("the next round of experiment %s", exp)
	if e.Rounds != 1 {
		what = fmt.Sprintf("%d rounds of experiment %s", e.Rounds, exp)
	}
	fmt.Fprintf(&b, "%s would bring ε on dataset %q to %.3g at δ = %g, above this site's budget of %g (%.3g spent so far)",
		what, e.Dataset, e.Would, e.Budget.Delta, e.Budget.Epsilon, e.Spent)
	switch {
	case e.Fit == 1:
		b.WriteString("; 1 round of this experiment fits")
	case e.Fit > 1:
		fmt.Fprintf(&b, "; %d rounds of this experiment fit", e.Fit)
	default:
		fmt.Fprintf(&b, "; no round of this experiment fits at noise multiplier %v", e.Noise)
	}
	switch {
	case e.MinNoise > 0 && e.Rounds == 1:
		fmt.Fprintf(&b, "; a round at noise multiplier %s or more would", ceilDigits(e.MinNoise))
	case e.MinNoise > 0:
		fmt.Fprintf(&b, "; at noise multiplier %s or more, all %d would", ceilDigits(e.MinNoise), e.Rounds)
	case e.Fit == 0:
		b.WriteString("; the budget is used up: only the data owner can raise it")
	}
	return b.String()
}

// Is makes an ExceededError match ErrRefused.
func (e *ExceededError) Is(target error) bool { return target == ErrRefused }

// ceilDigits prints x to three significant digits, rounded up: a noise
// multiplier suggested as enough must not be printed below what is.
func ceilDigits(x float64) string {
	scale := math.Pow(10, 2-math.Floor(math.Log10(x)))
	return strconv.FormatFloat(math.Ceil(x*scale)/scale, 'g', -1, 64)
}
