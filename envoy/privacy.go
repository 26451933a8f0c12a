package envoy

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"time"

	"github.com/fx-fl/fx/collaborator"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/privacy"
	"github.com/fx-fl/fx/runner"
)

// ledgerFile is the privacy ledger under the work directory. It must be
// kept, and backed up, with it: it is the only record of what the site's
// data has spent.
const ledgerFile = "privacy.json"

// reportDelta is the δ at which the ledger's ε is shown at a site that
// keeps no budget (whose own δ would be used otherwise).
const reportDelta = 1e-5

// openLedger opens the site's privacy ledger. A ledger that cannot be read
// stops the envoy here, rather than failing each round later.
func openLedger(workDir string) (*privacy.Ledger, error) {
	l, err := privacy.Open(filepath.Join(workDir, ledgerFile))
	if err != nil {
		return nil, fmt.Errorf("work_dir: %w", err)
	}
	return l, nil
}

// dataset is the name of the site's data in the ledger.
func (e *Envoy) dataset() string { return cmp.Or(e.cfg.Privacy.Dataset, e.name) }

// perRound is one round of the plan's DP as the ledger charges it: the
// whole update noised once (q = 1, one step).
func perRound(rec record, dp *experiment.DP) privacy.Charge {
	return privacy.Charge{
		Experiment: rec.ID, Name: rec.Owner + "/" + rec.Name,
		SampledGaussian: privacy.SampledGaussian{Noise: dp.NoiseMultiplier, Rate: 1, Steps: 1},
		Clip:            dp.ClipNorm, Delta: dp.Delta,
	}
}

// releases reports whether the plan's tasks send an update off the site:
// only train does.
func releases(plan *experiment.Plan) bool { return slices.Contains(plan.Tasks, runner.TaskTrain) }

// reviewPrivacy applies the site's privacy policy to an offered plan: the
// reason to decline it, or "" to go on with the review. A plan is accepted
// only if all its rounds fit what is left of the budget, so that a site
// does not drop out of an experiment halfway, and the reason says how many
// would fit and at what noise all would. Accepting reserves nothing: each
// round is charged when it is released, and one that no longer fits
// (another experiment spent the budget meanwhile) ends this site's part.
func (e *Envoy) reviewPrivacy(rec record, plan *experiment.Plan) string {
	pc := e.cfg.Privacy
	dp := plan.Privacy.DP
	if !releases(plan) {
		return ""
	}
	if dp == nil {
		if !pc.RequireDP {
			return ""
		}
		return "this site requires differential privacy for every experiment: state privacy.dp in the plan, " + e.dpAdvice(plan.Rounds)
	}
	if !pc.budgeted() {
		return ""
	}
	err := e.ledger.Review(e.dataset(), pc.Budget, perRound(rec, dp), plan.Rounds)
	switch {
	case errors.Is(err, privacy.ErrRefused):
		return "this site's privacy budget declines the plan: " + err.Error()
	case err != nil:
		e.log.Error("cannot check an offer against the privacy budget: the ledger must be repaired or restored from a backup", "experiment", rec.ID, "error", err)
		return "this site cannot check the plan against its privacy budget now (its ledger cannot be read); its data owner has been told"
	}
	return ""
}

// dpAdvice says which DP parameters this site accepts for a plan of the
// given rounds.
func (e *Envoy) dpAdvice(rounds int) string {
	b := e.cfg.Privacy.Budget
	clip := "any clip_norm"
	if b.MaxClip > 0 {
		clip = fmt.Sprintf("clip_norm at most %v", b.MaxClip)
	}
	advice := fmt.Sprintf("with noise_multiplier at least %v and %s", b.MinNoise, clip)
	probe := privacy.Charge{Experiment: "-", SampledGaussian: privacy.SampledGaussian{Noise: max(b.MinNoise, 1e-3), Rate: 1, Steps: 1}, Clip: cmp.Or(b.MaxClip, 1)}
	var ex *privacy.ExceededError
	switch err := e.ledger.Review(e.dataset(), b, probe, rounds); {
	case err == nil:
	case errors.As(err, &ex) && ex.MinNoise > 0:
		advice = fmt.Sprintf("with noise_multiplier at least %v for %d rounds (what is left of its budget of ε = %v at δ = %v) and %s", ceil3(ex.MinNoise), rounds, b.Epsilon, b.Delta, clip)
	case errors.As(err, &ex):
		advice = "but its privacy budget is used up: only its data owner can raise it"
	}
	return advice
}

// ceil3 is x rounded up to three significant digits: a noise multiplier
// advised as enough must not be printed below what is.
func ceil3(x float64) float64 {
	scale := math.Pow(10, 2-math.Floor(math.Log10(x)))
	return math.Ceil(x*scale) / scale
}

// collaboratorPrivacy is the DP a collaborator applies for the plan, or
// nil for a plan without it.
func (e *Envoy) collaboratorPrivacy(rec record, plan *experiment.Plan) *collaborator.Privacy {
	dp := plan.Privacy.DP
	if dp == nil {
		return nil
	}
	p := &collaborator.Privacy{Noise: dp.NoiseMultiplier, Clip: dp.ClipNorm, Delta: dp.Delta, Name: rec.Owner + "/" + rec.Name}
	if e.cfg.Privacy.budgeted() {
		p.Ledger, p.Dataset, p.Budget = e.ledger, e.dataset(), e.cfg.Privacy.Budget
	}
	return p
}

// PrivacyStatus is the site's privacy policy and its ledger, for
// `fx envoy privacy`.
type PrivacyStatus struct {
	RequireDP bool `json:"require_dp"`
	// Budget is the site's budget; nil when it keeps none.
	Budget *privacy.Budget `json:"budget"`
	// Delta is the δ every ε here is computed at: the budget's.
	Delta float64 `json:"delta"`
	// Ledger is the ledger's file.
	Ledger string `json:"ledger"`
	// Datasets are the site's data (Current) and any other name the
	// ledger holds charges for.
	Datasets []DatasetPrivacy `json:"datasets"`
}

// DatasetPrivacy is what one dataset spent, and what is left.
type DatasetPrivacy struct {
	Name string `json:"name"`
	// Current is the data this envoy serves now (privacy.dataset).
	Current bool `json:"current"`
	// Spent is the ε spent at Delta over every charge.
	Spent float64 `json:"epsilon_spent"`
	// Left is the budget's ε minus Spent, at least 0 (current, budgeted).
	Left *float64 `json:"epsilon_left,omitempty"`
	// Experiments are the charges grouped by experiment, in the order
	// they were first charged.
	Experiments []ExperimentPrivacy `json:"experiments"`
	// RoundsLeft are how many more rounds fit at some noise multipliers
	// (current, budgeted).
	RoundsLeft []RoundsLeft `json:"rounds_left,omitempty"`
}

// ExperimentPrivacy is one experiment's charges on a dataset.
type ExperimentPrivacy struct {
	ID   string `json:"id"`
	Name string `json:"name,omitempty"`
	// Rounds is the number of charges (rounds released), and First and
	// Last the rounds of the first and last.
	Rounds     int `json:"rounds"`
	FirstRound int `json:"first_round"`
	LastRound  int `json:"last_round"`
	// Noise and Clip are those of its last charge.
	Noise float64 `json:"noise_multiplier"`
	Clip  float64 `json:"clip_norm"`
	// Epsilon is what the experiment alone spent, at Delta.
	Epsilon float64   `json:"epsilon"`
	Last    time.Time `json:"last_charged"`
}

// RoundsLeft is how many more rounds of client-level DP (q = 1) fit at a
// noise multiplier; Refused says why none may run at it whatever is left.
type RoundsLeft struct {
	Noise   float64 `json:"noise_multiplier"`
	Rounds  int     `json:"rounds"`
	Refused string  `json:"refused,omitempty"`
}

// Privacy reports the site's privacy policy and ledger. Rounds left are
// given at the noise multipliers asked for, else at the budget's minimum,
// those the ledger's experiments used, 5 and 10.
func (e *Envoy) Privacy(noises []float64) (PrivacyStatus, error) {
	for _, sigma := range noises {
		if !(sigma > 0) || math.IsInf(sigma, 0) {
			return PrivacyStatus{}, fmt.Errorf("noise multiplier %v: want a finite number > 0", sigma)
		}
	}
	pc := e.cfg.Privacy
	st := PrivacyStatus{RequireDP: pc.RequireDP, Delta: reportDelta, Ledger: filepath.Join(e.cfg.WorkDir, ledgerFile), Datasets: []DatasetPrivacy{}}
	if pc.budgeted() {
		b := pc.Budget
		st.Budget, st.Delta = &b, b.Delta
	}
	names, err := e.ledger.Datasets()
	if err != nil {
		return st, err
	}
	current := e.dataset()
	if !slices.Contains(names, current) {
		names = append([]string{current}, names...)
	}
	for _, name := range names {
		d, err := e.datasetPrivacy(name, st.Delta)
		if err != nil {
			return st, err
		}
		if d.Current = name == current; d.Current && st.Budget != nil {
			left := max(0, st.Budget.Epsilon-d.Spent)
			d.Left = &left
			d.RoundsLeft, err = e.roundsLeft(name, *st.Budget, noises, d.Experiments)
			if err != nil {
				return st, err
			}
		}
		st.Datasets = append(st.Datasets, d)
	}
	slices.SortStableFunc(st.Datasets, func(a, b DatasetPrivacy) int {
		if a.Current != b.Current {
			if a.Current {
				return -1
			}
			return 1
		}
		return 0
	})
	return st, nil
}

// datasetPrivacy sums up one dataset's ledger entries.
func (e *Envoy) datasetPrivacy(name string, delta float64) (DatasetPrivacy, error) {
	d := DatasetPrivacy{Name: name, Experiments: []ExperimentPrivacy{}}
	entries, err := e.ledger.Entries(name)
	if err != nil {
		return d, err
	}
	if d.Spent, err = privacy.EpsilonOf(entries, delta); err != nil {
		return d, err
	}
	byID := map[string][]privacy.Entry{}
	for _, en := range entries {
		if _, seen := byID[en.Experiment]; !seen {
			d.Experiments = append(d.Experiments, ExperimentPrivacy{ID: en.Experiment})
		}
		byID[en.Experiment] = append(byID[en.Experiment], en)
	}
	for i := range d.Experiments {
		x := &d.Experiments[i]
		own := byID[x.ID]
		last := own[len(own)-1]
		x.Name, x.Rounds, x.Noise, x.Clip, x.Last = last.Name, len(own), last.Noise, last.Clip, last.At
		x.FirstRound, x.LastRound = own[0].Round, own[0].Round
		for _, en := range own {
			x.FirstRound, x.LastRound = min(x.FirstRound, en.Round), max(x.LastRound, en.Round)
		}
		if x.Epsilon, err = privacy.EpsilonOf(own, delta); err != nil {
			return d, err
		}
	}
	return d, nil
}

// roundsLeft says how many rounds fit at each noise multiplier.
func (e *Envoy) roundsLeft(name string, b privacy.Budget, noises []float64, exps []ExperimentPrivacy) ([]RoundsLeft, error) {
	noises = slices.Clone(noises)
	if len(noises) == 0 {
		if b.MinNoise > 0 {
			noises = append(noises, b.MinNoise)
		}
		for _, x := range exps {
			noises = append(noises, x.Noise)
		}
		noises = append(noises, 5, 10)
	}
	slices.Sort(noises)
	noises = slices.Compact(noises)
	var out []RoundsLeft
	for _, sigma := range noises {
		probe := privacy.Charge{Experiment: "-", SampledGaussian: privacy.SampledGaussian{Noise: sigma, Rate: 1, Steps: 1}, Clip: cmp.Or(b.MaxClip, 1)}
		n, err := e.ledger.Remaining(name, b, probe)
		switch {
		case errors.Is(err, privacy.ErrRefused):
			out = append(out, RoundsLeft{Noise: sigma, Refused: err.Error()})
		case err != nil:
			return nil, fmt.Errorf("noise multiplier %v: %w", sigma, err)
		default:
			out = append(out, RoundsLeft{Noise: sigma, Rounds: n})
		}
	}
	return out, nil
}
