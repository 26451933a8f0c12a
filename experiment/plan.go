package experiment

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"path"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/runner/builtin"
)

// PlanFile is the name of the plan at the root of an experiment directory or
// archive.
const PlanFile = "plan.yaml"

// InitialModelFile is the initial model at an archive's root: required for
// exec runners, optional for built-in ones (the aggregator initialises
// those). Round 1 starts from it.
const InitialModelFile = "model.safetensors"

// Runner kinds.
const (
	// RunnerBuiltin runs one of fx's plain-Go models (RunnerSpec.Model).
	RunnerBuiltin = "builtin"
	// RunnerExec runs the experiment's own command (RunnerSpec.Command) at
	// each site through the runner protocol.
	RunnerExec = "exec"
)

// Modes of an exec runner (runner.mode); they match runner/exec's.
const (
	RunnerModePersistent = "persistent"
	RunnerModePerTask    = "per_task"
)

// Built-in models a plan may name with runner.kind: builtin.
const (
	ModelSoftmax = "softmax"
	ModelMLP     = "mlp"
)

// Aggregation algorithms.
const (
	AlgFedAvg      = "fedavg"
	AlgMedian      = "median"
	AlgTrimmedMean = "trimmed_mean"
	AlgKrum        = "krum"
	AlgMultiKrum   = "multi_krum"
	AlgFedAdam     = "fedadam"
	AlgFedYogi     = "fedyogi"
	AlgFedAdagrad  = "fedadagrad"
	// AlgScaffold is in scaffold.go.
)

// builtinAlgorithms are the aggregation algorithms fx ships, in the order
// error messages list them.
var builtinAlgorithms = []string{AlgFedAvg, AlgMedian, AlgTrimmedMean, AlgKrum, AlgMultiKrum, AlgFedAdam, AlgFedYogi, AlgFedAdagrad, AlgScaffold}

// algorithmName is what a registered algorithm may be called: a plan key's
// value, easy to type, and never a path.
var algorithmName = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,63}$`)

// registered holds the algorithms registered in this process (see
// RegisterAlgorithm), by name, with their options' check.
var registered = struct {
	sync.RWMutex
	m map[string]func(options map[string]any) error
}{m: map[string]func(map[string]any) error{}}

// RegisterAlgorithm makes name a valid aggregation.algorithm in this
// process, besides the built-in ones; checkOptions, if not nil, checks the
// plan's aggregation.options for it, so that the director refuses a bad
// option at submission rather than the aggregator at the first round.
// aggregator.RegisterStrategy calls it: register strategies there, not
// here. It panics, like database/sql.Register, on a name that is built in,
// already registered or not lowercase letters, digits, '_' and '-' (at most
// 64, starting with a letter): those are mistakes in the program, not in a
// plan.
func RegisterAlgorithm(name string, checkOptions func(options map[string]any) error) {
	if !algorithmName.MatchString(name) {
		panic(fmt.Sprintf("experiment.RegisterAlgorithm: %q is not a valid algorithm name (lowercase letters, digits, '_' and '-', starting with a letter, at most 64)", name))
	}
	if slices.Contains(builtinAlgorithms, name) {
		panic(fmt.Sprintf("experiment.RegisterAlgorithm: %s is a built-in algorithm: choose another name", name))
	}
	registered.Lock()
	defer registered.Unlock()
	if _, dup := registered.m[name]; dup {
		panic(fmt.Sprintf("experiment.RegisterAlgorithm: %s is already registered", name))
	}
	if checkOptions == nil {
		checkOptions = func(map[string]any) error { return nil }
	}
	registered.m[name] = checkOptions
}

// Algorithms lists the aggregation algorithms a plan may name in this
// process: the built-in ones, then the registered ones in name order.
func Algorithms() []string {
	registered.RLock()
	defer registered.RUnlock()
	return append(slices.Clone(builtinAlgorithms), slices.Sorted(maps.Keys(registered.m))...)
}

// BuiltinAlgorithm reports whether algorithm is one of the aggregation
// algorithms fx ships (as opposed to one registered by the program).
func BuiltinAlgorithm(algorithm string) bool { return slices.Contains(builtinAlgorithms, algorithm) }

// IsLocal reports whether the tensor name is one the sites keep to
// themselves (aggregation.local).
func (a *Aggregation) IsLocal(name string) bool {
	for _, p := range a.Local {
		if ok, _ := path.Match(p, name); ok {
			return true
		}
	}
	return false
}

func registeredCheck(name string) (func(map[string]any) error, bool) {
	registered.RLock()
	defer registered.RUnlock()
	check, ok := registered.m[name]
	return check, ok
}

// How train updates are weighed (aggregation.weights).
const (
	// WeightsSamples weighs each update by the samples its result reports,
	// which may not exceed the train samples its envoy registered.
	WeightsSamples = "samples"
	// WeightsRegistered weighs each update by the train samples its envoy
	// registered, whatever its result reports.
	WeightsRegistered = "registered"
	// WeightsEqual weighs every update the same.
	WeightsEqual = "equal"
)

// Directions for best_model.mode.
const (
	ModeMax = "max"
	ModeMin = "min"
)

// The plan's defaults. They are applied in exactly one place, DefaultPlan,
// which ParsePlan decodes the YAML on top of: a key the plan leaves out (or
// sets to null) keeps its default, and a key it sets explicitly, even to
// zero, is validated as written. That is why "stragglers: {deadline: 0}" is
// an error rather than a silent 10m.
const (
	// DefaultParticipantsMin: one accepting envoy is enough to start.
	DefaultParticipantsMin = 1
	// DefaultAcceptTimeout bounds how long the director waits for
	// participants.min envoys to accept before the experiment fails, so an
	// experiment nobody accepts does not stay pending forever.
	DefaultAcceptTimeout = 30 * time.Minute
	// DefaultGatherTimeout is how long an offer that participants.min
	// envoys have accepted still waits for the other invited envoys to
	// answer, so that every site that wants to take part does (and the
	// experiment survives losing one), without waiting for a site that
	// does not answer.
	DefaultGatherTimeout = time.Minute
	// DefaultRunnerTimeout bounds one task (one train or validate call).
	DefaultRunnerTimeout = 30 * time.Minute
	// DefaultSeed makes runs reproducible unless the plan asks otherwise.
	DefaultSeed = 1
	// DefaultAlgorithm is plain federated averaging.
	DefaultAlgorithm = AlgFedAvg
	// DefaultWeights weighs updates by the samples they report.
	DefaultWeights = WeightsSamples
	// DefaultTrim is the fraction trimmed from each end by trimmed_mean
	// (ignored by the other algorithms).
	DefaultTrim = 0.1
	// DefaultByzantine is the number of Byzantine updates krum and
	// multi_krum tolerate (ignored by the other algorithms): one, since
	// tolerating none is what fedavg does at a fraction of the cost.
	DefaultByzantine = 1
	// DefaultDeadline closes a round that is still waiting: a round never
	// waits forever for a site that went away.
	DefaultDeadline = 10 * time.Minute
	// DefaultMinReporting is the number of reports a round needs to close
	// successfully at the deadline.
	DefaultMinReporting = 1
	// DefaultPercent: wait for every participant (until the deadline).
	DefaultPercent = 1.0
	// DefaultBestMetric and DefaultBestMode pick the model with the highest
	// accuracy.
	DefaultBestMetric = "accuracy"
	DefaultBestMode   = ModeMax
	// DefaultBestTask: the best model is judged on the global model's
	// validation at the start of each round.
	DefaultBestTask = runner.TaskAggregatedValidation
	// DefaultRetentionEvery keeps every round's model.
	DefaultRetentionEvery = 1
)

// MaxRounds is the most rounds a plan may ask for. A round takes seconds at
// the least, so it is far beyond what an experiment runs; what it stops is
// a typo (rounds: 1000000000) that would keep an aggregator, its sites and
// the director's disk busy for good.
const MaxRounds = 10000

// DefaultTasks is the task list of a plan that names none: validate the
// global model, train, validate the trained weights.
func DefaultTasks() []string {
	return []string{runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation}
}

// Plan is an experiment plan, the contents of plan.yaml. Field comments give
// the YAML key; DefaultPlan gives the defaults.
type Plan struct {
	// Name names the experiment (name); see ValidateName. Required.
	Name string `yaml:"name" json:"name"`
	// Rounds is the number of federated rounds (rounds). Required, ≥ 1.
	Rounds int `yaml:"rounds" json:"rounds"`
	// Participants selects the envoys the experiment is offered to.
	Participants Participants `yaml:"participants" json:"participants"`
	// Runner says how collaborators run tasks.
	Runner RunnerSpec `yaml:"runner" json:"runner"`
	// Aggregation says how the aggregator combines updates.
	Aggregation Aggregation `yaml:"aggregation" json:"aggregation"`
	// Training says what the sites' local training optimises.
	Training Training `yaml:"training" json:"training"`
	// Stragglers says when a round closes without everyone.
	Stragglers Stragglers `yaml:"stragglers" json:"stragglers"`
	// Tasks are the tasks each collaborator runs every round, in order
	// (tasks). Must include train, once, or be only
	// aggregated_model_validation: an evaluation (see Evaluation).
	Tasks []string `yaml:"tasks" json:"tasks"`
	// BestModel says which round's model is kept as the best.
	BestModel BestModel `yaml:"best_model" json:"best_model"`
	// Retention says which rounds' models stay on the director's disk.
	Retention Retention `yaml:"retention" json:"retention"`
	// Privacy states the experiment's privacy protections (privacy).
	Privacy Privacy `yaml:"privacy,omitempty" json:"privacy,omitzero"`
}

// Privacy states the protections the experiment asks the sites to apply
// (privacy). Each site enforces them itself, before anything leaves it.
type Privacy struct {
	// DP, when set, makes every site clip and noise its update each round
	// (privacy.dp); see docs/privacy.md.
	DP *DP `yaml:"dp,omitempty" json:"dp,omitempty"`
}

// DP is client-level differential privacy, applied at each site to the
// update it sends (privacy.dp): the update (trained − global model) is
// clipped to L2 norm ClipNorm and Gaussian noise of standard deviation
// NoiseMultiplier·ClipNorm is added, whatever the runner did. A site that
// keeps a privacy budget charges every round to it and declines a plan that
// does not fit; it may require DP and set a minimum noise multiplier and a
// maximum clip norm.
type DP struct {
	// NoiseMultiplier is σ, the noise's standard deviation in units of
	// ClipNorm (noise_multiplier); ε per round depends on it alone.
	NoiseMultiplier float64 `yaml:"noise_multiplier" json:"noise_multiplier"`
	// ClipNorm is C, the bound on the L2 norm of a site's whole update
	// (clip_norm): too small slows learning, too large adds noise.
	ClipNorm float64 `yaml:"clip_norm" json:"clip_norm"`
	// Delta is the δ at which the researcher states ε (delta), kept in
	// each site's ledger for the record; 0 states none. Each site accounts
	// at its own budget's δ.
	Delta float64 `yaml:"delta,omitempty" json:"delta,omitempty"`
}

// Retention says which rounds' global models the director keeps once the
// experiment has moved past them (retention). The initial model, the best
// and the last two rounds' are always kept: the best and the last for the
// researcher, the one before the last so that a resume can fall back to it
// if the last is damaged. Each model is as large as the model itself, so a
// plan with many rounds of a large model should keep fewer.
type Retention struct {
	// Every keeps every Nth round's model as well (every): 1 keeps every
	// round's (the default), 0 only those always kept.
	Every int `yaml:"every" json:"every"`
}

// Evaluation reports whether the plan only scores a model it is given: its
// tasks hold no train, only aggregated_model_validation. Such an experiment
// has one round, in which every site validates the archive's
// model.safetensors; nothing trains and no new model is made.
func (p *Plan) Evaluation() bool { return !slices.Contains(p.Tasks, runner.TaskTrain) }

// TrainingRounds is the number of rounds that train a new global model:
// the plan's rounds, or 0 for an evaluation, whose one round only scores
// the initial model.
func (p *Plan) TrainingRounds() int {
	if p.Evaluation() {
		return 0
	}
	return p.Rounds
}

// InitialModelNeed says why the archive must hold the initial model
// (InitialModelFile), or "" when the aggregator can make one (a built-in
// model trained from scratch). The reason completes "the archive has no
// model.safetensors at its root: ".
func (p *Plan) InitialModelNeed() string {
	switch {
	case p.Evaluation():
		return "an evaluation (tasks without train) scores the model you give it, so put that model there (fx experiment model NAME -o model.safetensors downloads one an experiment trained)"
	case p.Runner.Kind != RunnerBuiltin:
		return fmt.Sprintf("runner kind %s needs the initial model there (the aggregator initialises built-in models only)", p.Runner.Kind)
	}
	return ""
}

// KeptModels is the most models the plan's retention keeps on disk at
// once, the initial model included.
func (p *Plan) KeptModels() int {
	n := 4 // the initial, the best, the last two
	if e := p.Retention.Every; e > 0 {
		n += p.Rounds / e
	}
	return min(n, p.Rounds+1)
}

// Participants selects envoys (participants). An envoy qualifies if it is
// listed in Envoys (when Envoys is not empty) and its dataset carries every
// tag in Tags and matches the shapes given.
//
// The experiment starts once Min envoys have accepted, with every invited
// envoy that has accepted by then, up to Max: as soon as every invited
// envoy has answered or Max have accepted, and at the latest GatherTimeout
// after the Min-th acceptance. While it runs, at least Min participants
// must remain: one that fails is dropped and the others go on.
type Participants struct {
	// Min is how many envoys must accept before the experiment starts,
	// and how many must remain while it runs (min).
	Min int `yaml:"min" json:"min"`
	// Max is the most envoys that take part; 0 means no bound (max).
	Max int `yaml:"max,omitempty" json:"max,omitempty"`
	// Envoys names the envoys to offer the experiment to; empty means any
	// envoy that matches the other criteria (envoys).
	Envoys []string `yaml:"envoys,omitempty" json:"envoys,omitempty"`
	// Tags the envoy's dataset must all carry (tags).
	Tags []string `yaml:"tags,omitempty" json:"tags,omitempty"`
	// SampleShape and TargetShape, when set, must equal the shapes of the
	// envoy's dataset samples and targets (sample_shape, target_shape).
	SampleShape []int64 `yaml:"sample_shape,omitempty" json:"sample_shape,omitempty"`
	TargetShape []int64 `yaml:"target_shape,omitempty" json:"target_shape,omitempty"`
	// AcceptTimeout bounds the wait for Min acceptances (accept_timeout).
	AcceptTimeout Duration `yaml:"accept_timeout" json:"accept_timeout"`
	// GatherTimeout bounds how long, once Min envoys have accepted, the
	// offer waits for the other invited envoys to answer; 0 starts the
	// experiment as soon as Min have accepted (gather_timeout).
	GatherTimeout Duration `yaml:"gather_timeout" json:"gather_timeout"`
}

// RunnerSpec says how a collaborator runs tasks (runner).
type RunnerSpec struct {
	// Kind is builtin or exec (kind). Required.
	Kind string `yaml:"kind" json:"kind"`
	// Model is the built-in model, softmax or mlp (model); builtin only.
	Model string `yaml:"model,omitempty" json:"model,omitempty"`
	// Command is the argv run at the site, relative to the unpacked
	// experiment directory (command); exec only.
	Command []string `yaml:"command,omitempty" json:"command,omitempty"`
	// Mode is how an exec runner's command is run (mode): persistent (the
	// default: one process per site serves every task) or per_task (a
	// process per task, runner protocol 1); exec only.
	Mode string `yaml:"mode,omitempty" json:"mode,omitempty"`
	// Timeout bounds one task (timeout).
	Timeout Duration `yaml:"timeout" json:"timeout"`
	// Seed seeds the runner's randomness (seed).
	Seed int64 `yaml:"seed" json:"seed"`
	// Hyperparameters are handed to the runner as they are, as JSON for an
	// exec runner, so they must be JSON values: string keys, finite numbers
	// (hyperparameters).
	Hyperparameters map[string]any `yaml:"hyperparameters,omitempty" json:"hyperparameters,omitempty"`
}

// Aggregation says how updates are combined (aggregation). LR, Beta1, Beta2
// and Tau configure the server optimiser of fedadam, fedyogi and fedadagrad;
// zero means that algorithm's own default, and other algorithms ignore them.
type Aggregation struct {
	// Algorithm is one of fedavg, median, trimmed_mean, krum, multi_krum,
	// fedadam, fedyogi, fedadagrad, or a strategy the fx binary registered
	// (see RegisterAlgorithm and aggregator.RegisterStrategy) (algorithm).
	Algorithm string `yaml:"algorithm" json:"algorithm"`
	// Options configure a registered strategy, handed to it as they are
	// (options): JSON values, which the strategy checks. The built-in
	// algorithms take the keys below instead, so options is refused with
	// them.
	Options map[string]any `yaml:"options,omitempty" json:"options,omitempty"`
	// Local names the tensors each site keeps to itself (local): tensor
	// names or path.Match patterns such as "fc2.*". Those are personalised
	// layers (FedPer's head, FedBN's batch norms): each site trains its
	// own, keeps them in its work directory across rounds, and never
	// uploads them; the aggregator aggregates the other tensors and leaves
	// the global model's local ones at their initial values.
	Local []string `yaml:"local,omitempty" json:"local,omitempty"`
	// Weights says how fedavg and the server optimisers weigh each train
	// update: samples, registered or equal (weights). Reported sample counts
	// are bounded by the envoy's registered ones under every policy; median,
	// trimmed_mean, krum and multi_krum weigh no update.
	Weights string `yaml:"weights" json:"weights"`
	// Trim is the fraction dropped from each end by trimmed_mean, in
	// [0, 0.5) (trim).
	Trim float64 `yaml:"trim" json:"trim"`
	// Byzantine is how many Byzantine updates krum and multi_krum tolerate,
	// f ≥ 0 (byzantine); each round needs at least 2f+3 updates.
	Byzantine int `yaml:"byzantine" json:"byzantine"`
	// Select is how many of the best-scored updates multi_krum averages, in
	// [1, n−f]; 0 means n−f, all but f of the round's n updates (select).
	Select int `yaml:"select,omitempty" json:"select,omitempty"`
	// LR is the server learning rate, ≥ 0 (lr).
	LR float64 `yaml:"lr,omitempty" json:"lr,omitempty"`
	// Beta1 and Beta2 are the moment decay rates, in [0, 1) (beta1, beta2).
	Beta1 float64 `yaml:"beta1,omitempty" json:"beta1,omitempty"`
	Beta2 float64 `yaml:"beta2,omitempty" json:"beta2,omitempty"`
	// Tau is the adaptivity (the denominator's epsilon), ≥ 0 (tau).
	Tau float64 `yaml:"tau,omitempty" json:"tau,omitempty"`
	// Secure turns on secure aggregation (secure): the aggregator learns
	// only the weighted sum of each round's train updates, never one site's
	// (docs/privacy.md). It combines with fedavg and the server optimisers,
	// which work on the mean, and not with the algorithms that look at each
	// update.
	Secure bool `yaml:"secure,omitempty" json:"secure,omitempty"`
	// SecureThreshold is secure aggregation's threshold t, at least 2 and
	// at most participants.min (secure_threshold): a round closes only if
	// at least t sites upload and help unmask, and t − 1 colluding sites
	// learn nothing of another's update. 0 means a majority of
	// participants.min (SecureThresholdOrDefault).
	SecureThreshold int `yaml:"secure_threshold,omitempty" json:"secure_threshold,omitempty"`
	// SecureRange is secure aggregation's clipping range R (secure_range):
	// every element of a site's update (trained − global) is clipped to
	// [−R, R] and sent in fixed point with 30 − ⌈log2 R⌉ fractional bits.
	// 0 means DefaultSecureRange.
	SecureRange float64 `yaml:"secure_range,omitempty" json:"secure_range,omitempty"`
	// Mode is sync (the default: a round waits for its sites, see
	// stragglers) or async (mode): FedBuff's buffered asynchronous rounds,
	// in which a server step is taken as soon as Buffer updates have
	// arrived, whatever model they were trained from (fedbuff.go).
	Mode string `yaml:"mode,omitempty" json:"mode,omitempty"`
	// Buffer is K, the train updates that close an asynchronous server
	// step (buffer), at most participants.min; 0 means one less than the
	// experiment's participants (BufferFor).
	Buffer int `yaml:"buffer,omitempty" json:"buffer,omitempty"`
	// Staleness says how an asynchronous step weighs an update trained
	// from an older model, and which it refuses (staleness).
	Staleness Staleness `yaml:"staleness,omitempty" json:"staleness,omitzero"`
}

// DefaultSecureRange is aggregation.secure_range when the plan gives none:
// updates (trained − global) of up to 4 in magnitude per element pass
// unclipped, summed with 28 fractional bits.
const DefaultSecureRange = 4.0

// Bounds of aggregation.secure_range (package secagg's).
const (
	MinSecureRange = 0x1p-60
	MaxSecureRange = 0x1p30
)

// SecureThresholdOrDefault is the threshold t of secure aggregation: the
// plan's secure_threshold, or else a majority of participants.min,
// ⌊min/2⌋ + 1, and at least 2.
func (p *Plan) SecureThresholdOrDefault() int {
	if t := p.Aggregation.SecureThreshold; t > 0 {
		return t
	}
	return max(2, p.Participants.Min/2+1)
}

// SecureRangeOrDefault is the clipping range R of secure aggregation: the
// plan's secure_range, or DefaultSecureRange.
func (p *Plan) SecureRangeOrDefault() float64 {
	if r := p.Aggregation.SecureRange; r > 0 {
		return r
	}
	return DefaultSecureRange
}

// SecureAlgorithm reports whether an aggregation algorithm works on the
// mean of the updates alone, so that it combines with secure aggregation:
// fedavg and the server optimisers do; median, trimmed_mean, krum,
// multi_krum and registered strategies look at each update.
func SecureAlgorithm(algorithm string) bool {
	switch algorithm {
	case AlgFedAvg, AlgFedAdam, AlgFedYogi, AlgFedAdagrad:
		return true
	}
	return false
}

// Training says what each site's local training optimises besides the
// model's own loss (training). It is the site's side of an algorithm, so it
// applies whatever the runner kind and the aggregation algorithm: FedProx
// is proximal_mu with fedavg, and the proximal term combines as well with
// the server optimisers or the robust algorithms.
type Training struct {
	// ProximalMu is FedProx's μ (proximal_mu), ≥ 0: each site minimises
	// its loss plus (μ/2)·‖w − w_global‖², w_global being the round's
	// global model, which keeps local models from drifting apart when the
	// sites' data differ (Li et al. 2020, "Federated Optimization in
	// Heterogeneous Networks"). 0, the default, is plain local training.
	// Runners get it with every task.
	ProximalMu float64 `yaml:"proximal_mu,omitempty" json:"proximal_mu,omitempty"`
}

// Stragglers is the policy that closes a round (stragglers). A round closes
// as soon as Percent of its participants have reported (and at least
// MinReporting), or at Deadline: then it succeeds if MinReporting reports
// arrived and fails otherwise.
type Stragglers struct {
	// Deadline is the longest a round stays open (deadline), > 0.
	Deadline Duration `yaml:"deadline" json:"deadline"`
	// MinReporting is the fewest reports a round may close with
	// (min_reporting), ≥ 1.
	MinReporting int `yaml:"min_reporting" json:"min_reporting"`
	// Percent is the fraction of participants whose reports close the round
	// early, in (0, 1] (percent).
	Percent float64 `yaml:"percent" json:"percent"`
}

// BestModel says how the best model is chosen (best_model): the round whose
// global model scored best on Metric, as aggregated over the collaborators'
// results of Task, in direction Mode.
type BestModel struct {
	Metric string `yaml:"metric" json:"metric"`
	Mode   string `yaml:"mode" json:"mode"`
	Task   string `yaml:"task" json:"task"`
}

// DefaultPlan returns a plan holding every default and nothing else: no name,
// no rounds, no runner kind, which a plan must give. ParsePlan decodes YAML on
// top of it; a Go program building a plan should start from it too.
func DefaultPlan() Plan {
	return Plan{
		Participants: Participants{
			Min:           DefaultParticipantsMin,
			AcceptTimeout: Duration(DefaultAcceptTimeout),
			GatherTimeout: Duration(DefaultGatherTimeout),
		},
		Runner: RunnerSpec{
			Timeout: Duration(DefaultRunnerTimeout),
			Seed:    DefaultSeed,
		},
		Aggregation: Aggregation{
			Algorithm: DefaultAlgorithm,
			Weights:   DefaultWeights,
			Trim:      DefaultTrim,
			Byzantine: DefaultByzantine,
		},
		Stragglers: Stragglers{
			Deadline:     Duration(DefaultDeadline),
			MinReporting: DefaultMinReporting,
			Percent:      DefaultPercent,
		},
		Tasks: DefaultTasks(),
		BestModel: BestModel{
			Metric: DefaultBestMetric,
			Mode:   DefaultBestMode,
			Task:   DefaultBestTask,
		},
		Retention: Retention{Every: DefaultRetentionEvery},
	}
}

// ErrInvalidPlan is matched (errors.Is) by every error ParsePlan and
// Plan.Validate return.
var ErrInvalidPlan = errors.New("invalid plan")

// Problem is one thing wrong with a plan: the key path it concerns (such as
// "stragglers.percent" or "participants.envoys[1]") and what is wrong. Line
// is the line in plan.yaml for problems found while decoding (unknown keys,
// wrong types), else 0. A decoding problem that cannot be tied to one key
// has an empty Key.
type Problem struct {
	Key     string
	Line    int
	Message string
}

func (p Problem) String() string {
	switch {
	case p.Key == "":
		return fmt.Sprintf("line %d: %s", p.Line, p.Message)
	case p.Line > 0:
		return fmt.Sprintf("line %d: %s: %s", p.Line, p.Key, p.Message)
	}
	return p.Key + ": " + p.Message
}

// ValidationError lists every problem found in a plan, so a researcher fixes
// them all in one go rather than one per submission.
type ValidationError struct {
	Problems []Problem
}

// Error lists the problems, one a line when there are several.
func (e *ValidationError) Error() string {
	var b strings.Builder
	b.WriteString(ErrInvalidPlan.Error())
	b.WriteString(":")
	if len(e.Problems) == 1 {
		b.WriteString(" ")
		b.WriteString(e.Problems[0].String())
		return b.String()
	}
	for _, p := range e.Problems {
		b.WriteString("\n  ")
		b.WriteString(p.String())
	}
	return b.String()
}

// Unwrap makes errors.Is(err, ErrInvalidPlan) true.
func (e *ValidationError) Unwrap() error { return ErrInvalidPlan }

// ParsePlan decodes plan.yaml strictly, applies the defaults (see
// DefaultPlan) and validates the result. Unknown keys and values of the
// wrong type are reported with their key path and line; a document that is
// not one YAML mapping is refused; then every rule of Plan.Validate is
// checked. Problems come back together in a *ValidationError where possible,
// and every error matches ErrInvalidPlan.
func ParsePlan(data []byte) (*Plan, error) { return parsePlan(data, true, false) }

// ParsePlanAnyAlgorithm is ParsePlan for a party that does not aggregate
// (an envoy, the researcher's client): an aggregation.algorithm that is
// neither built in nor registered in this process passes if it is a
// well-formed name, since the director that aggregates may run an fx
// built with strategies this binary lacks. The director's ParsePlan at
// submission refuses a name it does not know.
func ParsePlanAnyAlgorithm(data []byte) (*Plan, error) { return parsePlan(data, true, true) }

// ParseStoredPlan reads a plan the director accepted before: like
// ParsePlan, except that limits added since (rounds ≤ MaxRounds) are not
// applied, so that an experiment recorded before them still loads. Such
// an experiment cannot start again: the aggregator validates its plan.
// Nor is its algorithm checked against those registered (see
// ParsePlanAnyAlgorithm): a director built without the strategy an
// experiment used still lists it, and fails it if it runs again.
func ParseStoredPlan(data []byte) (*Plan, error) { return parsePlan(data, false, true) }

func parsePlan(data []byte, limits, anyAlgorithm bool) (*Plan, error) {
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%w: the plan is empty: it needs at least name, rounds and runner.kind", ErrInvalidPlan)
		}
		return nil, fmt.Errorf("%w: %w", ErrInvalidPlan, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidPlan, err)
		}
		return nil, fmt.Errorf("%w: line %d: a second YAML document: a plan is a single document (remove the '---')", ErrInvalidPlan, extra.Line)
	}
	root := &doc
	if root.Kind == yaml.DocumentNode && len(root.Content) == 1 {
		root = root.Content[0]
	}
	if root.Kind != yaml.MappingNode {
		if root.Kind == yaml.ScalarNode && root.Tag == "!!null" {
			return nil, fmt.Errorf("%w: the plan is empty: it needs at least name, rounds and runner.kind", ErrInvalidPlan)
		}
		return nil, fmt.Errorf("%w: line %d: a plan is a mapping of keys (name, rounds, runner, ...), not a %s", ErrInvalidPlan, root.Line, nodeKindName(root))
	}
	var schema []Problem
	checkSchema(root, reflect.TypeFor[Plan](), "", &schema)

	// Decoded even when the schema check found problems, so that every
	// unknown key and every value of the wrong type is reported at once.
	p := DefaultPlan()
	strict := yaml.NewDecoder(bytes.NewReader(data))
	strict.KnownFields(len(schema) == 0) // unknown keys are in schema already
	if err := strict.Decode(&p); err != nil {
		var te *yaml.TypeError
		if !errors.As(err, &te) {
			return nil, fmt.Errorf("%w: %w", ErrInvalidPlan, err)
		}
		schema = append(schema, typeProblems(root, te)...)
	}
	if len(schema) > 0 {
		slices.SortStableFunc(schema, func(a, b Problem) int { return cmp.Compare(a.Line, b.Line) })
		return nil, &ValidationError{Problems: schema}
	}
	p.normalize()
	if err := p.validate(limits, anyAlgorithm); err != nil {
		return nil, err
	}
	return &p, nil
}

// Marshal encodes the plan as YAML that ParsePlan reads back to an equal
// plan. Defaults are written out, so the output documents what will run.
func (p *Plan) Marshal() ([]byte, error) {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(p); err != nil {
		return nil, fmt.Errorf("encoding plan %q: %w", p.Name, err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encoding plan %q: %w", p.Name, err)
	}
	return buf.Bytes(), nil
}

// normalize makes "envoys: []" and an absent key decode to the same plan, so
// a plan survives Marshal and ParsePlan unchanged. Tasks are left alone: an
// explicitly empty task list is an error, not a request for the default.
func (p *Plan) normalize() {
	if len(p.Participants.Envoys) == 0 {
		p.Participants.Envoys = nil
	}
	if len(p.Participants.Tags) == 0 {
		p.Participants.Tags = nil
	}
	if len(p.Participants.SampleShape) == 0 {
		p.Participants.SampleShape = nil
	}
	if len(p.Participants.TargetShape) == 0 {
		p.Participants.TargetShape = nil
	}
	if len(p.Runner.Command) == 0 {
		p.Runner.Command = nil
	}
	if len(p.Runner.Hyperparameters) == 0 {
		p.Runner.Hyperparameters = nil
	}
	if len(p.Aggregation.Options) == 0 {
		p.Aggregation.Options = nil
	}
	if len(p.Aggregation.Local) == 0 {
		p.Aggregation.Local = nil
	}
}

// Validate checks every rule of the plan and reports all the problems it
// finds in one *ValidationError, each naming its key path. It checks the plan
// as it is: defaults are not filled in here (ParsePlan starts from
// DefaultPlan), so a zero deadline, say, is reported rather than replaced.
func (p *Plan) Validate() error { return p.validate(true, false) }

func (p *Plan) validate(limits, anyAlgorithm bool) error {
	var v problems

	if p.Name == "" {
		v.add("name", "required: the experiment's name (letters, digits, '.', '_' and '-')")
	} else if err := ValidateName("experiment", p.Name); err != nil {
		var ne *NameError
		if errors.As(err, &ne) {
			v.add("name", fmt.Sprintf("%q: %s", p.Name, ne.Reason))
		} else {
			v.add("name", err.Error())
		}
	}
	switch {
	case p.Rounds == 0:
		v.add("rounds", "required: the number of federated rounds, at least 1")
	case p.Rounds < 0:
		v.add("rounds", fmt.Sprintf("must be at least 1, got %d", p.Rounds))
	case p.Rounds > MaxRounds && limits:
		v.add("rounds", fmt.Sprintf("%d is over the limit of %d", p.Rounds, MaxRounds))
	}
	if p.Retention.Every < 0 {
		v.add("retention.every", fmt.Sprintf("must be 0 (keep the initial, best and last two models only), 1 (every round's) or more (every Nth round's too), got %d", p.Retention.Every))
	}

	p.validateParticipants(&v)
	p.validateRunner(&v)
	p.validateAggregation(&v, anyAlgorithm)
	p.validateTraining(&v)
	p.validateScaffold(&v)
	p.validateAsync(&v)
	p.validateStragglers(&v)
	p.validateTasks(&v)
	p.validateBestModel(&v)
	p.validatePrivacy(&v)

	if len(v) == 0 {
		return nil
	}
	return &ValidationError{Problems: v}
}

func (p *Plan) validateParticipants(v *problems) {
	pa := &p.Participants
	if pa.Min < 1 {
		v.add("participants.min", fmt.Sprintf("must be at least 1, got %d", pa.Min))
	}
	switch {
	case pa.Max < 0:
		v.add("participants.max", fmt.Sprintf("must be at least participants.min, or 0 for no bound, got %d", pa.Max))
	case pa.Max > 0 && pa.Max < pa.Min:
		v.add("participants.max", fmt.Sprintf("is %d but participants.min is %d: the experiment could never start", pa.Max, pa.Min))
	}
	seen := map[string]int{}
	for i, e := range pa.Envoys {
		key := fmt.Sprintf("participants.envoys[%d]", i)
		if err := ValidateName("envoy", e); err != nil {
			var ne *NameError
			if errors.As(err, &ne) {
				v.add(key, fmt.Sprintf("%q: %s", e, ne.Reason))
			} else {
				v.add(key, err.Error())
			}
			continue
		}
		if j, dup := seen[e]; dup {
			v.add(key, fmt.Sprintf("%q is already listed at participants.envoys[%d]", e, j))
			continue
		}
		seen[e] = i
	}
	if len(pa.Envoys) > 0 && pa.Min > len(pa.Envoys) {
		v.add("participants.min", fmt.Sprintf("is %d but participants.envoys lists only %d envoys: the experiment could never start", pa.Min, len(pa.Envoys)))
	}
	seenTag := map[string]int{}
	for i, t := range pa.Tags {
		key := fmt.Sprintf("participants.tags[%d]", i)
		if strings.TrimSpace(t) == "" {
			v.add(key, "must not be empty")
			continue
		}
		if j, dup := seenTag[t]; dup {
			v.add(key, fmt.Sprintf("%q is already listed at participants.tags[%d]", t, j))
			continue
		}
		seenTag[t] = i
	}
	validateShape(v, "participants.sample_shape", pa.SampleShape)
	validateShape(v, "participants.target_shape", pa.TargetShape)
	if pa.AcceptTimeout <= 0 {
		v.add("participants.accept_timeout", fmt.Sprintf("must be a positive duration such as 30m, got %s", pa.AcceptTimeout))
	}
	if pa.GatherTimeout < 0 {
		v.add("participants.gather_timeout", fmt.Sprintf("must be a duration such as 1m, or 0 to start as soon as participants.min have accepted, got %s", pa.GatherTimeout))
	}
}

func validateShape(v *problems, key string, shape []int64) {
	for i, d := range shape {
		if d < 1 {
			v.add(fmt.Sprintf("%s[%d]", key, i), fmt.Sprintf("dimensions must be at least 1, got %d", d))
		}
	}
}

func (p *Plan) validateRunner(v *problems) {
	r := &p.Runner
	switch r.Kind {
	case "":
		v.add("runner.kind", "required: builtin (a model shipped with fx) or exec (your own command)")
	case RunnerBuiltin:
		switch r.Model {
		case ModelSoftmax, ModelMLP:
			// Checked here, at the researcher's and at submission, not
			// by each site after it downloaded the archive.
			if _, err := builtin.ParseHyperparameters(r.Model, r.Hyperparameters); err != nil {
				v.add("runner.hyperparameters", err.Error())
			}
		case "":
			v.add("runner.model", "required with kind builtin: softmax or mlp")
		default:
			v.add("runner.model", fmt.Sprintf("must be softmax or mlp, got %q", r.Model))
		}
		if len(r.Command) > 0 {
			v.add("runner.command", "only used with kind exec: remove it, or set runner.kind: exec")
		}
		if r.Mode != "" {
			v.add("runner.mode", "only used with kind exec: remove it, or set runner.kind: exec")
		}
	case RunnerExec:
		if len(r.Command) == 0 {
			v.add("runner.command", "required with kind exec: the program and its arguments, such as [python3, train.py]")
		} else if strings.TrimSpace(r.Command[0]) == "" {
			v.add("runner.command[0]", "must name the program to run")
		}
		for i, a := range r.Command {
			if strings.ContainsRune(a, 0) {
				v.add(fmt.Sprintf("runner.command[%d]", i), "must not contain a NUL character")
			}
		}
		if r.Model != "" {
			v.add("runner.model", "only used with kind builtin: remove it, or set runner.kind: builtin")
		}
		switch r.Mode {
		case "", RunnerModePersistent, RunnerModePerTask:
		default:
			v.add("runner.mode", fmt.Sprintf("must be %s (one process serves every task, the default) or %s (a process per task), got %q",
				RunnerModePersistent, RunnerModePerTask, r.Mode))
		}
	default:
		v.add("runner.kind", fmt.Sprintf("must be builtin or exec, got %q", r.Kind))
	}
	if r.Timeout <= 0 {
		v.add("runner.timeout", fmt.Sprintf("must be a positive duration such as 30m, got %s", r.Timeout))
	}
	keys := make([]string, 0, len(r.Hyperparameters))
	for k := range r.Hyperparameters {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if k == "" {
			v.add("runner.hyperparameters", "keys must not be empty")
			continue
		}
		validateJSONValue(v, "runner.hyperparameters."+k, r.Hyperparameters[k])
	}
}

// validateJSONValue checks that a hyperparameter can be handed to a runner as
// JSON: YAML allows non-string keys and .nan, JSON does not.
func validateJSONValue(v *problems, key string, x any) {
	switch x := x.(type) {
	case nil, bool, string, int, int64, uint64:
	case float64:
		if math.IsNaN(x) || math.IsInf(x, 0) {
			v.add(key, fmt.Sprintf("must be a finite number, got %v", x))
		}
	case []any:
		for i, e := range x {
			validateJSONValue(v, fmt.Sprintf("%s[%d]", key, i), e)
		}
	case map[string]any:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			validateJSONValue(v, key+"."+k, x[k])
		}
	case map[any]any:
		v.add(key, "mapping keys must be strings (runners receive hyperparameters as JSON)")
	default:
		v.add(key, fmt.Sprintf("unsupported value of type %T: use strings, numbers, booleans, lists and mappings", x))
	}
}

func (p *Plan) validateAggregation(v *problems, anyAlgorithm bool) {
	a := &p.Aggregation
	known := func() string {
		names := Algorithms()
		return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
	}
	check, isRegistered := registeredCheck(a.Algorithm)
	switch {
	case BuiltinAlgorithm(a.Algorithm):
		if len(a.Options) > 0 {
			v.add("aggregation.options", fmt.Sprintf("configure a registered strategy, and %s is built in: remove options and use its own keys (weights, trim, byzantine, select, lr, beta1, beta2, tau)", a.Algorithm))
		}
	case a.Algorithm == "":
		v.add("aggregation.algorithm", fmt.Sprintf("must not be empty: %s (default fedavg)", known()))
	case isRegistered:
		if err := check(a.Options); err != nil {
			v.add("aggregation.options", fmt.Sprintf("for %s: %v", a.Algorithm, err))
		}
	case anyAlgorithm && algorithmName.MatchString(a.Algorithm):
		// Another fx binary's strategy: the director checks it.
	default:
		v.add("aggregation.algorithm", fmt.Sprintf("must be %s, got %q (a strategy of your own must be registered in the director's fx binary: see docs/experiments.md, Custom strategies)", known(), a.Algorithm))
	}
	for _, k := range slices.Sorted(maps.Keys(a.Options)) {
		if k == "" {
			v.add("aggregation.options", "keys must not be empty")
			continue
		}
		validateJSONValue(v, "aggregation.options."+k, a.Options[k])
	}
	p.validateLocal(v)
	switch a.Weights {
	case WeightsSamples, WeightsRegistered, WeightsEqual:
	default:
		v.add("aggregation.weights", fmt.Sprintf("must be samples (the reported samples, at most those registered), registered (the envoy's registered train samples) or equal, got %q", a.Weights))
	}
	if !(a.Trim >= 0 && a.Trim < 0.5) {
		v.add("aggregation.trim", fmt.Sprintf("must be in [0,0.5), got %v", a.Trim))
	}
	p.validateKrum(v)
	p.validateSecure(v)
	if !(a.LR >= 0) || math.IsInf(a.LR, 0) {
		v.add("aggregation.lr", fmt.Sprintf("must be a finite number ≥ 0 (0 means the algorithm's default), got %v", a.LR))
	}
	if !(a.Beta1 >= 0 && a.Beta1 < 1) {
		v.add("aggregation.beta1", fmt.Sprintf("must be in [0,1) (0 means the algorithm's default), got %v", a.Beta1))
	}
	if !(a.Beta2 >= 0 && a.Beta2 < 1) {
		v.add("aggregation.beta2", fmt.Sprintf("must be in [0,1) (0 means the algorithm's default), got %v", a.Beta2))
	}
	if !(a.Tau >= 0) || math.IsInf(a.Tau, 0) {
		v.add("aggregation.tau", fmt.Sprintf("must be a finite number ≥ 0 (0 means the algorithm's default), got %v", a.Tau))
	}
}

// validateSecure checks secure aggregation's settings and what it
// combines with.
func (p *Plan) validateSecure(v *problems) {
	a := &p.Aggregation
	if !a.Secure {
		if a.SecureThreshold != 0 {
			v.add("aggregation.secure_threshold", "is only used with secure: true")
		}
		if a.SecureRange != 0 {
			v.add("aggregation.secure_range", "is only used with secure: true")
		}
		return
	}
	if a.Algorithm != "" && !SecureAlgorithm(a.Algorithm) && a.Algorithm != AlgScaffold { // scaffold's reason: validateScaffold
		v.add("aggregation.secure", fmt.Sprintf("cannot be combined with algorithm %s: it needs each site's update, and under secure aggregation the aggregator sees only their sum; use fedavg, fedadam, fedyogi or fedadagrad, or turn secure off", a.Algorithm))
	}
	if a.Weights == WeightsRegistered {
		v.add("aggregation.secure", "cannot be combined with weights: registered (a site does not know the count the director holds for it, and must mask its update with its weight); use samples or equal")
	}
	if p.Evaluation() && len(p.Tasks) > 0 {
		v.add("aggregation.secure", "sums the sites' train updates, and this plan's tasks do not train: remove it, or add train to tasks")
	}
	if p.Participants.Min < 2 {
		v.add("aggregation.secure", fmt.Sprintf("needs at least 2 participants (a sum of one site's update is that update): raise participants.min from %d", p.Participants.Min))
	}
	switch t := a.SecureThreshold; {
	case t < 0 || t == 1:
		v.add("aggregation.secure_threshold", fmt.Sprintf("must be at least 2 (with 1 the aggregator could unmask a single site's update), or 0 for a majority of participants.min, got %d", t))
	case t > 0 && p.Participants.Min >= 2 && t > p.Participants.Min:
		v.add("aggregation.secure_threshold", fmt.Sprintf("is %d, above participants.min %d: a round with participants.min sites could never close; lower it or raise participants.min", t, p.Participants.Min))
	}
	if r := a.SecureRange; r != 0 && !(r >= MinSecureRange && r <= MaxSecureRange) {
		v.add("aggregation.secure_range", fmt.Sprintf("must be in [2^-60, 2^30] (the largest magnitude of an update element; 0 means %v), got %v", DefaultSecureRange, r))
	}
}

// validateLocal checks aggregation.local's patterns. Whether they match
// the model's tensors the aggregator checks when it loads the model: the
// plan alone does not know them.
func (p *Plan) validateLocal(v *problems) {
	seen := map[string]int{}
	for i, pat := range p.Aggregation.Local {
		key := fmt.Sprintf("aggregation.local[%d]", i)
		if _, err := path.Match(pat, ""); err != nil || strings.TrimSpace(pat) == "" {
			v.add(key, fmt.Sprintf("must be a tensor name or a pattern such as fc2.* (path.Match syntax), got %q", pat))
			continue
		}
		if j, dup := seen[pat]; dup {
			v.add(key, fmt.Sprintf("%q is already listed at aggregation.local[%d]", pat, j))
			continue
		}
		seen[pat] = i
	}
	if len(p.Aggregation.Local) > 0 && p.Evaluation() && len(p.Tasks) > 0 {
		v.add("aggregation.local", "keeps the tensors each site trains for itself, and this plan's tasks do not train: remove it, or add train to tasks")
	}
}

// validateKrum checks byzantine and select. An experiment runs with at least
// participants.min sites, so that is the round size a plan can be held to
// here; a round that closes with fewer updates fails when it aggregates.
func (p *Plan) validateKrum(v *problems) {
	a := &p.Aggregation
	krum := a.Algorithm == AlgKrum || a.Algorithm == AlgMultiKrum
	f, sites := a.Byzantine, p.Participants.Min
	switch {
	case f < 0:
		v.add("aggregation.byzantine", fmt.Sprintf("must be 0 or more (the Byzantine updates krum and multi_krum tolerate), got %d", f))
	case krum && sites >= 1 && sites < 2*f+3:
		fix := fmt.Sprintf("raise participants.min to %d or lower byzantine to %d", 2*f+3, (sites-3)/2)
		if sites < 3 {
			fix = fmt.Sprintf("raise participants.min to %d (even byzantine 0 needs 3)", 2*f+3)
		}
		v.add("aggregation.byzantine", fmt.Sprintf("is %d, so %s needs at least 2f+3 = %d updates a round, but participants.min is %d: %s",
			f, a.Algorithm, 2*f+3, sites, fix))
	}
	switch {
	case a.Select < 0:
		v.add("aggregation.select", fmt.Sprintf("must be 1 or more, or 0 for all but byzantine of each round's updates, got %d", a.Select))
	case a.Select > 0 && a.Algorithm != AlgMultiKrum:
		v.add("aggregation.select", fmt.Sprintf("is only used with algorithm multi_krum, not %s", a.Algorithm))
	case a.Select > 0 && f >= 0 && sites >= 1 && a.Select > sites-f:
		v.add("aggregation.select", fmt.Sprintf("is %d, but a round of participants.min = %d updates with byzantine %d holds only %d honest ones: select at most %d, or 0 for all but byzantine",
			a.Select, sites, f, sites-f, sites-f))
	}
}

func (p *Plan) validateTraining(v *problems) {
	switch mu := p.Training.ProximalMu; {
	case !(mu >= 0) || math.IsInf(mu, 0):
		v.add("training.proximal_mu", fmt.Sprintf("must be a finite number ≥ 0 (0: plain local training; FedProx's authors tried 0.001 to 1), got %v", mu))
	case mu > 0 && p.Evaluation() && len(p.Tasks) > 0:
		v.add("training.proximal_mu", "is only used by the train task, and this plan's tasks do not train: remove it, or add train to tasks")
	}
}

func (p *Plan) validateStragglers(v *problems) {
	s := &p.Stragglers
	if s.Deadline <= 0 {
		v.add("stragglers.deadline", fmt.Sprintf("must be a positive duration such as 10m (a round must not wait forever), got %s", s.Deadline))
	}
	if s.MinReporting < 1 {
		v.add("stragglers.min_reporting", fmt.Sprintf("must be at least 1, got %d", s.MinReporting))
	} else if p.Participants.Min >= 1 && s.MinReporting > p.Participants.Min {
		v.add("stragglers.min_reporting", fmt.Sprintf("is %d but participants.min is %d: an experiment that starts with %d collaborators could never close a round", s.MinReporting, p.Participants.Min, p.Participants.Min))
	}
	if !(s.Percent > 0 && s.Percent <= 1) {
		v.add("stragglers.percent", fmt.Sprintf("must be in (0,1], got %v", s.Percent))
	}
}

func (p *Plan) validateTasks(v *problems) {
	if len(p.Tasks) == 0 {
		v.add("tasks", fmt.Sprintf("must list at least train (or only %s, to evaluate a given model); leave the key out for the default [%s]",
			runner.TaskAggregatedValidation, strings.Join(DefaultTasks(), ", ")))
		return
	}
	seen := map[string]int{}
	for i, t := range p.Tasks {
		key := fmt.Sprintf("tasks[%d]", i)
		if err := runner.ValidateTaskName(t); err != nil {
			v.add(key, err.Error())
			continue
		}
		if j, dup := seen[t]; dup {
			v.add(key, fmt.Sprintf("%s is already listed at tasks[%d]", t, j))
			continue
		}
		seen[t] = i
	}
	train, hasTrain := seen[runner.TaskTrain]
	local, hasLocal := seen[runner.TaskLocalValidation]
	switch {
	case hasLocal && !hasTrain:
		v.add(fmt.Sprintf("tasks[%d]", local), fmt.Sprintf("%s validates the weights train produces, and there is no train: add train before it, or list only %s to evaluate a given model",
			runner.TaskLocalValidation, runner.TaskAggregatedValidation))
	case hasLocal && local < train:
		v.add(fmt.Sprintf("tasks[%d]", local), fmt.Sprintf("%s validates the weights train produces, so it must come after train", runner.TaskLocalValidation))
	case !hasTrain && len(seen) > 0 && p.Rounds > 1:
		// An evaluation scores one given model: a second round would
		// score the same model on the same data again.
		v.add("rounds", fmt.Sprintf("is %d, but an evaluation (tasks without train) scores the given model once: set rounds: 1, or add train to tasks", p.Rounds))
	}
}

func (p *Plan) validateBestModel(v *problems) {
	b := &p.BestModel
	if strings.TrimSpace(b.Metric) == "" {
		v.add("best_model.metric", "must name a metric the validation task reports, such as accuracy or loss")
	}
	switch b.Mode {
	case ModeMax, ModeMin:
	default:
		v.add("best_model.mode", fmt.Sprintf("must be max or min, got %q", b.Mode))
	}
	switch {
	case b.Task == runner.TaskTrain:
		v.add("best_model.task", fmt.Sprintf("must be a validation task (%s or %s), not train", runner.TaskAggregatedValidation, runner.TaskLocalValidation))
	case runner.ValidateTaskName(b.Task) != nil:
		v.add("best_model.task", fmt.Sprintf("must be %s or %s, got %q", runner.TaskAggregatedValidation, runner.TaskLocalValidation, b.Task))
	case !slices.Contains(p.Tasks, b.Task):
		v.add("best_model.task", fmt.Sprintf("%s is not in tasks: add it there, or choose a validation task the plan runs", b.Task))
	}
}

// validatePrivacy checks the DP parameters as numbers; whether a site
// accepts them is its own budget's decision, at the offer. Any aggregation
// combines with DP: the noise is added at the site, and what the
// aggregator does with noised updates is post-processing.
func (p *Plan) validatePrivacy(v *problems) {
	dp := p.Privacy.DP
	if dp == nil {
		return
	}
	if !(dp.NoiseMultiplier > 0) || math.IsInf(dp.NoiseMultiplier, 0) {
		v.add("privacy.dp.noise_multiplier", fmt.Sprintf("must be a finite number > 0, the noise's standard deviation in units of clip_norm (around 1 for DP-SGD; 5 or more for client-level DP over a few sites), got %v", dp.NoiseMultiplier))
	}
	if !(dp.ClipNorm > 0) || math.IsInf(dp.ClipNorm, 0) {
		v.add("privacy.dp.clip_norm", fmt.Sprintf("must be a finite number > 0, the bound on the L2 norm of a site's update (a typical update's norm, say), got %v", dp.ClipNorm))
	}
	if !(dp.Delta >= 0 && dp.Delta < 1) {
		v.add("privacy.dp.delta", fmt.Sprintf("must be in (0,1), below 1/(records in a site's data) such as 1e-5, or left out; got %v", dp.Delta))
	}
}

type problems []Problem

func (v *problems) add(key, msg string) { *v = append(*v, Problem{Key: key, Message: msg}) }

// checkSchema walks the YAML node n against the Go type t and reports, with
// full key path and line, every key t has no field for and every
// non-integer given for an integer. The strict decoder catches unknown keys
// too, but names Go types and stops at the first per mapping; and it quietly
// truncates 1.5 to 1 for an integer field, which would turn "rounds: 1.5"
// into one round.
func checkSchema(n *yaml.Node, t reflect.Type, prefix string, out *[]Problem) {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	if t.Kind() == reflect.Pointer { // an optional section, such as privacy.dp
		t = t.Elem()
	}
	switch {
	case t == reflect.TypeFor[Duration]():
		return
	case t.Kind() == reflect.Slice && n.Kind == yaml.SequenceNode:
		for i, item := range n.Content {
			checkSchema(item, t.Elem(), fmt.Sprintf("%s[%d]", prefix, i), out)
		}
		return
	case t.Kind() >= reflect.Int && t.Kind() <= reflect.Int64:
		if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!float" {
			*out = append(*out, Problem{Key: prefix, Line: n.Line, Message: fmt.Sprintf("want an integer, got %s", n.Value)})
		}
		return
	case t.Kind() != reflect.Struct || n.Kind != yaml.MappingNode:
		return
	}
	fields := map[string]reflect.Type{}
	var known []string
	for f := range t.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "" || name == "-" {
			continue
		}
		fields[name] = f.Type
		known = append(known, name)
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := n.Content[i], n.Content[i+1]
		if k.Value == "<<" { // a merge key; the strict decoder checks what it merges
			continue
		}
		path := k.Value
		if prefix != "" {
			path = prefix + "." + k.Value
		}
		ft, ok := fields[k.Value]
		if !ok {
			where := "a plan"
			if prefix != "" {
				where = prefix
			}
			*out = append(*out, Problem{Key: path, Line: k.Line,
				Message: fmt.Sprintf("unknown key (%s takes %s)", where, strings.Join(known, ", "))})
			continue
		}
		checkSchema(val, ft, path, out)
	}
}

// typeProblems turns the decoder's "line N: cannot unmarshal ..." messages
// into problems that also name the key path, found by the line (and, when a
// flow mapping puts several keys on one line, by the value the message
// quotes).
func typeProblems(root *yaml.Node, te *yaml.TypeError) []Problem {
	values := map[int][]keyedValue{}
	indexValues(root, "", values)
	var out []Problem
	for _, msg := range te.Errors {
		var line int
		rest := msg
		if _, err := fmt.Sscanf(msg, "line %d: ", &line); err == nil {
			_, rest, _ = strings.Cut(msg, ": ")
		}
		out = append(out, Problem{Key: keyAt(values[line], rest), Line: line, Message: friendlyTypeError(rest)})
	}
	return out
}

// unmarshalMsg matches the decoder's type mismatch messages, such as
// "cannot unmarshal !!str `abc` into int".
var unmarshalMsg = regexp.MustCompile("^cannot unmarshal !!(\\w+) (`.*` )?into (.+)$")

// friendlyTypeError rewrites a type mismatch in plan terms rather than Go
// types: "want an integer, got the string `abc`".
func friendlyTypeError(msg string) string {
	m := unmarshalMsg.FindStringSubmatch(msg)
	if m == nil {
		return msg
	}
	var want string
	switch goType := m[3]; {
	case strings.HasPrefix(goType, "[]"):
		want = "a list"
	case strings.HasPrefix(goType, "int"), strings.HasPrefix(goType, "uint"):
		want = "an integer"
	case strings.HasPrefix(goType, "float"):
		want = "a number"
	case goType == "string":
		want = "a string"
	case goType == "bool":
		want = "true or false"
	default:
		want = "a mapping"
	}
	got := map[string]string{"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
		"seq": "a list", "map": "a mapping", "timestamp": "a timestamp", "binary": "binary data"}[m[1]]
	if got == "" {
		got = "!!" + m[1]
	}
	if m[2] != "" {
		got += " " + strings.TrimSpace(m[2])
	}
	return fmt.Sprintf("want %s, got %s", want, got)
}

type keyedValue struct {
	path string
	node *yaml.Node
}

// indexValues records every mapping value and sequence item under n by the
// line it starts on.
func indexValues(n *yaml.Node, prefix string, out map[int][]keyedValue) {
	switch n.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			path := k.Value
			if prefix != "" {
				path = prefix + "." + k.Value
			}
			out[v.Line] = append(out[v.Line], keyedValue{path, v})
			if k.Line != v.Line {
				out[k.Line] = append(out[k.Line], keyedValue{path, v})
			}
			indexValues(v, path, out)
		}
	case yaml.SequenceNode:
		for i, v := range n.Content {
			path := fmt.Sprintf("%s[%d]", prefix, i)
			out[v.Line] = append(out[v.Line], keyedValue{path, v})
			indexValues(v, path, out)
		}
	}
}

// keyAt picks the key path a decoder message on one line is about: the
// only candidate, or the innermost one whose value the message quotes or
// whose kind (list, mapping) it names.
func keyAt(candidates []keyedValue, msg string) string {
	if len(candidates) == 1 {
		return candidates[0].path
	}
	found := ""
	for _, c := range candidates {
		var match bool
		switch c.node.Kind {
		case yaml.ScalarNode:
			match = strings.Contains(msg, "`"+c.node.Value+"`") || strings.Contains(msg, fmt.Sprintf("%q", c.node.Value))
		case yaml.SequenceNode:
			match = strings.HasPrefix(msg, "cannot unmarshal !!seq ") || strings.HasPrefix(msg, "a list ")
		case yaml.MappingNode:
			match = strings.HasPrefix(msg, "cannot unmarshal !!map ") || strings.HasPrefix(msg, "a mapping ")
		}
		if match {
			found = c.path
		}
	}
	return found
}

func nodeKindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "mapping"
	case yaml.SequenceNode:
		return "list"
	case yaml.ScalarNode:
		return "single value"
	case yaml.AliasNode:
		return "alias"
	}
	return "document"
}

// Duration is a time.Duration written in plan.yaml as a Go duration string
// ("90s", "10m", "1h30m"). Bare numbers are refused: "deadline: 600" could
// mean seconds or nanoseconds, and guessing wrong closes rounds early.
type Duration time.Duration

// Std returns d as a time.Duration.
func (d Duration) Std() time.Duration { return time.Duration(d) }

// String writes d the way a person would: "10m" rather than "10m0s".
func (d Duration) String() string {
	s := time.Duration(d).String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}

// ParseDuration reads a Go duration string such as "90s" or "1h30m".
func ParseDuration(s string) (Duration, error) {
	d, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil {
		return 0, fmt.Errorf("%q is not a duration: write a Go duration such as 90s, 10m or 1h30m", s)
	}
	return Duration(d), nil
}

// MarshalText writes d as String does, for JSON and other text encodings.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText reads a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = v
	return nil
}

// MarshalYAML writes d as a duration string.
func (d Duration) MarshalYAML() (any, error) { return d.String(), nil }

// UnmarshalYAML reads a duration string and refuses anything else, naming
// the line. It reports through *yaml.TypeError so decoding goes on and every
// bad value in the plan is reported at once.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!str" {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %s is not a duration: write a Go duration such as 90s, 10m or 1h30m", n.Line, describeNode(n))}}
	}
	v, err := ParseDuration(n.Value)
	if err != nil {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %v", n.Line, err)}}
	}
	*d = v
	return nil
}

func describeNode(n *yaml.Node) string {
	if n.Kind == yaml.ScalarNode {
		return fmt.Sprintf("%q", n.Value)
	}
	return "a " + nodeKindName(n)
}
