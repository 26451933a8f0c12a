package aggregator

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"slices"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/fx-fl/fx/internal/telemetry"
	"github.com/fx-fl/fx/internal/tracing"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/membudget"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// DefaultPollWindow is how long GetTasks holds a call with nothing to hand out.
const DefaultPollWindow = 20 * time.Second

// DefaultRejoinGrace is how long the round an aggregator resumes from a
// checkpoint (after a director restart) waits for its participants to come
// back before its deadline starts to count. Envoys find a restarted
// director within their retry.max (30s by default) and then need the new
// aggregator's address and a runner; without the grace a round with a
// short deadline would close before anyone could report, and fail.
const DefaultRejoinGrace = 2 * time.Minute

// StageBudget decides where train uploads wait between arriving and being
// folded into the round's sum: in memory (the received chunks themselves,
// no copy) while the uploads staged there take no more than this, else
// each in a file (an unlinked temporary, read back once from the page
// cache), so memory stays near two models however many collaborators
// upload a large model at once. It is one model of modelBytes (at least
// MinStageBudget): the director's goal is two models and 128 MiB, the
// round's sum and one upload, plus the process's own needs (membudget.Base
// and the runtime's). One upload in memory is what makes the fold fast:
// uploads that arrive one after another never touch the disk, and folding
// a kept upload is several times as fast as folding a spilled one, whose
// bytes go through the page cache (BenchmarkFold: first touches of new
// page-cache pages cost more than the fold on virtual machines).
func StageBudget(modelBytes int64) int64 { return max(MinStageBudget, modelBytes) }

// MinStageBudget is the least StageBudget gives: small models' uploads
// stage in memory even when several arrive at once.
const MinStageBudget = 32 << 20

// Config is what an aggregator needs to run one experiment.
type Config struct {
	ExperimentID string
	Plan         *experiment.Plan
	// Participants are the accepted envoys' names (their certificates' CNs).
	Participants []string
	// Registered are the sample counts each participant registered with
	// the director, as they stood when the experiment started; every
	// participant needs an entry. A participant's results may claim no
	// more samples than it registered for the task, so that it cannot
	// inflate its weight in FedAvg or in the aggregated metrics, and they
	// bound its updates' weights (see experiment.Aggregation.Weights).
	Registered map[string]SampleCounts
	// InitialModel is round 0's model; ignored when Dir holds a checkpoint.
	InitialModel tensor.Model
	// Dir holds checkpoints, models and round summaries (see the package doc).
	Dir string
	// Listener is where the Aggregator service is served; Run closes it.
	Listener net.Listener
	// ServerOptions secure the server: TLS credentials and the pki
	// interceptors that authenticate callers and enforce AggregatorRoles.
	ServerOptions []grpc.ServerOption
	Sink          Sink
	Logger        hclog.Logger
	// PollWindow bounds a GetTasks long poll; DefaultPollWindow when zero.
	PollWindow time.Duration
	// RejoinGrace is how long a resumed round waits for its participants
	// before its deadline counts; DefaultRejoinGrace when zero.
	RejoinGrace time.Duration
	// Now is the clock; time.Now when nil.
	Now func() time.Time
	// DiskReserve is what the file system under Dir must keep free besides
	// a round's files: a round starts only when there is room for both
	// (see checkRoom).
	DiskReserve int64
	// PauseRetry is how often a paused aggregator tries again what paused
	// it (see persist); DefaultPauseRetry when zero.
	PauseRetry time.Duration
	// Serving, if set, is called once Run has loaded (or resumed) the
	// model and serves on Listener. Whoever tells collaborators where the
	// aggregator is should tell them only then: the listener accepts
	// connections from the start, but a TLS handshake waits unanswered
	// while the model loads, which takes as long as the model is big.
	Serving func()
	// Metrics, if set, receive the rounds' durations, folds, checkpoints
	// and bytes moved (see internal/telemetry).
	Metrics *telemetry.Metrics
	// Trace is the experiment's span, the parent of the rounds' (see
	// internal/tracing); invalid when tracing is off.
	Trace trace.SpanContext
}

// DefaultPauseRetry is how often a paused experiment checks whether its
// cause is gone.
const DefaultPauseRetry = 30 * time.Second

// SampleCounts are the samples an envoy registered: its dataset shard's
// train_samples and valid_samples.
type SampleCounts struct {
	Train int64 `json:"train"`
	Valid int64 `json:"valid"`
}

// Aggregator runs one experiment's rounds.
type Aggregator struct {
	cfg  Config
	log  hclog.Logger
	plan *experiment.Plan
	// layout holds the names, dtypes and shapes of the tensors that are
	// aggregated, no data: the whole model's, less the sites' local ones
	// (see local.go), which whole has too.
	layout, whole tensor.Model
	// local are the global model's local tensors (aggregation.local), at
	// their initial values; nil when the plan keeps none.
	local tensor.Model
	// acc sums the round's train updates (FedAvg and the server optimisers).
	acc *tensor.Accumulator
	// opt is the server optimiser; nil unless the plan names one.
	opt *tensor.Optimizer
	// strategy is the registered strategy the plan names; nil for a
	// built-in algorithm.
	strategy Strategy
	// maxTotalWeight is what the participants' train updates can weigh
	// together at most in a round: the accumulator folds weights as
	// fractions of it, so no accepted weight can overflow the sum.
	maxTotalWeight float64
	// modelBytes is the size of the model's data.
	modelBytes int64
	// buffer is K, the train updates that close an asynchronous step
	// (aggregation.mode async, fedbuff.go); unused in synchronous rounds.
	buffer int
	// initialDigest is the initial model's tensor.Digest, which round 1's
	// download announces (empty once round 1 is past at start).
	initialDigest string

	closeReq chan struct{} // a report arrived: check whether the round may close

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every state change
	// model is the global model the current round started from, held in
	// memory only while a server optimiser needs it (keepsModel); else it
	// is nil and served from its round file, which the round wrote anyway:
	// the aggregator then holds the running sum and not the model too.
	model tensor.Model
	// pending is the save of the last round's files while this round
	// runs (see writebehind.go); nil before the first.
	pending *pendingSave
	// holdSaves, when set (by tests, export_test.go), keeps write-behind
	// saves from starting until it is closed, or Run is cancelled: then
	// the save does not happen, as after a crash.
	holdSaves <-chan struct{}
	round     *roundState
	parts     map[string]*participant
	best      *Best
	ended     bool   // no more rounds: pollers get QUIT
	endWhy    string // the reason QUIT carries
	stopping  bool   // Run was cancelled: pollers get UNAVAILABLE, never QUIT
	optSteps  int
	// resumed: Run resumed from a checkpoint, so its first round waits
	// for the participants to rejoin (see RejoinGrace).
	resumed bool
	// modelSHA and initialSHA are the digests of the files of model and
	// of round 0's model, for the checkpoint; only the loop changes them.
	modelSHA, initialSHA string
}

type participant struct {
	name      string
	dropped   string // why, when dropped
	task      string
	lastRound int
	quitSeen  bool
}

// New checks the configuration and prepares the directory. The model is
// loaded, or the initial one written, by Run.
func New(cfg Config) (*Aggregator, error) {
	switch {
	case cfg.ExperimentID == "":
		return nil, errors.New("aggregator: experiment id is empty")
	case cfg.Plan == nil:
		return nil, errors.New("aggregator: no plan")
	case len(cfg.Participants) == 0:
		return nil, errors.New("aggregator: no participants")
	case cfg.Dir == "":
		return nil, errors.New("aggregator: no directory for checkpoints")
	case cfg.Listener == nil:
		return nil, errors.New("aggregator: no listener")
	}
	if err := cfg.Plan.Validate(); err != nil {
		return nil, fmt.Errorf("aggregator: %w", err)
	}
	for _, name := range cfg.Participants {
		reg, ok := cfg.Registered[name]
		if !ok || reg.Train < 0 || reg.Valid < 0 {
			return nil, fmt.Errorf("aggregator: participant %s has no registered sample counts: they bound what its results may claim", name)
		}
	}
	var strategy Strategy
	if alg := cfg.Plan.Aggregation.Algorithm; !experiment.BuiltinAlgorithm(alg) {
		s, ok := strategyFor(alg)
		if !ok {
			return nil, fmt.Errorf("aggregator: aggregation.algorithm %s is registered as a plan algorithm but not as an aggregator strategy: register it with aggregator.RegisterStrategy", alg)
		}
		strategy = s
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.PollWindow <= 0 {
		cfg.PollWindow = DefaultPollWindow
	}
	if cfg.RejoinGrace <= 0 {
		cfg.RejoinGrace = DefaultRejoinGrace
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Sink == nil {
		cfg.Sink = nopSink{}
	}
	if cfg.PauseRetry <= 0 {
		cfg.PauseRetry = DefaultPauseRetry
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("aggregator: %w", err)
	}
	a := &Aggregator{
		cfg:      cfg,
		log:      cfg.Logger.Named("aggregator").With("experiment", cfg.ExperimentID),
		plan:     cfg.Plan,
		strategy: strategy,
		closeReq: make(chan struct{}, 1),
		changed:  make(chan struct{}),
		parts:    map[string]*participant{},
		buffer:   cfg.Plan.BufferFor(len(cfg.Participants)),
	}
	for _, name := range cfg.Participants {
		a.parts[name] = &participant{name: name, lastRound: -1}
		a.maxTotalWeight += float64(a.maxWeight(name))
	}
	if a.maxTotalWeight == 0 {
		return nil, fmt.Errorf("aggregator: none of the participants (%v) registered any train samples, so none can report a train result", cfg.Participants)
	}
	return a, nil
}

// maxWeight is the largest weight a participant's train update can have
// under the plan's aggregation.weights: its registered train samples, which
// also bound the samples it may report, or 1 with equal weights.
func (a *Aggregator) maxWeight(name string) int64 {
	if a.plan.Aggregation.Weights == experiment.WeightsEqual {
		return 1
	}
	return a.cfg.Registered[name].Train
}

// weight is a train update's FedAvg weight under the plan's
// aggregation.weights. checkSamples has bounded the reported samples by
// the registered ones, so it is at most maxWeight.
//
// A stale update of an asynchronous step weighs that times the plan's
// staleness function, at most 1, so the bound holds (fedbuff.go).
func (a *Aggregator) weight(r TaskResult) float64 {
	f := a.plan.StalenessWeight(r.Staleness)
	switch a.plan.Aggregation.Weights {
	case experiment.WeightsEqual:
		return f
	case experiment.WeightsRegistered:
		return f * float64(a.cfg.Registered[r.Collaborator].Train)
	}
	return f * float64(r.Samples)
}

// Run serves the experiment until every round is complete (nil), a round
// fails (an error saying why), or ctx is cancelled (ctx's error).
func (a *Aggregator) Run(ctx context.Context) error {
	if err := a.restore(ctx); err != nil {
		a.cfg.Listener.Close()
		return err
	}
	defer membudget.Reserve(a.memoryNeed())()
	if a.acc != nil {
		defer a.acc.Close() // its kept stage files; runs after the server stops
	}
	srv := grpc.NewServer(a.cfg.ServerOptions...)
	fxv1.RegisterAggregatorServer(srv, &service{a: a})
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(a.cfg.Listener) }()
	defer stopServer(srv, 5*time.Second)
	if a.cfg.Serving != nil {
		a.cfg.Serving()
	}

	err := a.loop(ctx)
	if serr := a.awaitSave(); err == nil {
		err = serr // no file is written after Run returns
	}
	if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		// Stopped from outside (the director shutting down or cancelling):
		// the experiment has not ended, so collaborators must not be told
		// to quit. Pending polls answer UNAVAILABLE and the collaborators
		// retry until an aggregator serves the experiment again.
		a.mu.Lock()
		a.stopping = true
		a.broadcast()
		a.mu.Unlock()
		return err
	}
	a.finish(err)
	a.lingerForQuit(ctx, serveErr)
	return err
}

// memoryNeed is the most this aggregator holds, for the process's memory
// budget, and how much of it it holds already (the model, and a server
// optimiser's moments, restored): the running sum, which becomes the next
// model at the round's close and whose memory the next sum reuses; the
// upload stages it keeps in memory (StageBudget); a server optimiser's
// global model, two moments and the copies a checkpoint writes of them. Median and trimmed
// mean hold every update instead of a sum; a registered strategy holds the
// global model besides. Secure aggregation (secure.go) holds no plain sum
// but the round's secure sum, 4 bytes an element, allocated in the round
// and given back once its mean is added to the global model at the close
// (the model is then written behind the next round, whose sum is
// allocated afresh); its masked uploads, 4 bytes an element too, stage in
// memory up to StageBudget and on disk beyond.
func (a *Aggregator) memoryNeed() (need, held int64) {
	p, n := a.modelBytes, int64(len(a.parts))
	if a.strategy != nil {
		return (n + 2) * p, p
	}
	if a.collects() {
		return (n + 1) * p, 0
	}
	need, held = p+min(StageBudget(p), n*p), p
	if a.plan.Aggregation.Secure {
		s := secureSumBytes(a.layout)
		need, held = p+s+min(StageBudget(p), n*s), 0
	}
	switch {
	case a.plan.Async():
		need, held = need+p, held+p // the global model the step starts from
	case a.keepsModel():
		need, held = need+5*p, held+3*p
	}
	return need, held
}

// keepsModel reports whether the global model stays in memory between
// rounds: a server optimiser steps from it, and a strategy is given it.
func (a *Aggregator) keepsModel() bool {
	// SCAFFOLD steps x and c from it (scaffold.go), an asynchronous step
	// x (fedbuff.go).
	return a.opt != nil || a.strategy != nil || a.plan.Scaffold() || a.plan.Async()
}

// lastRound is the number of the final round: the plan's training rounds,
// plus one validation-only round that scores the final model when the plan
// validates the aggregated model. An evaluation has no training round, so
// that validation of the initial model is its one round.
func (a *Aggregator) lastRound() int {
	if slices.Contains(a.plan.Tasks, runner.TaskAggregatedValidation) {
		return a.plan.TrainingRounds() + 1
	}
	return a.plan.TrainingRounds()
}

// tasksFor is the task list of a round.
func (a *Aggregator) tasksFor(round int) []string {
	if round > a.plan.TrainingRounds() {
		return []string{runner.TaskAggregatedValidation}
	}
	return a.plan.Tasks
}

// startRound opens round n. Its deadline counts from now, except in the
// first round of a resumed aggregator: the participants are away until
// they learn where it is, so its deadline counts from when the last of
// them is back, or from RejoinGrace from now, whichever comes first.
// Callers hold a.mu.
func (a *Aggregator) startRound(n int) {
	switch p := a.pending; {
	case a.acc == nil:
	case p != nil && !p.released && !a.keepsModel():
		a.acc.ResetForGiveBack() // the model being written is the next sum (see writebehind.go)
	default:
		a.acc.Reset()
	}
	now := a.cfg.Now()
	deadline := a.plan.Stragglers.Deadline.Std()
	r := newRoundState(n, a.tasksFor(n), now.Add(deadline))
	r.opened = time.Now()
	if a.round != nil {
		a.round.span.End() // a round that did not close (a resumed one)
	}
	r.ctx, r.span = tracing.Start(trace.ContextWithRemoteSpanContext(context.Background(), a.cfg.Trace), fmt.Sprintf("round %d", n),
		attribute.Int("round", n), attribute.StringSlice("tasks", r.tasks))
	if a.resumed {
		a.resumed = false
		r.deadline = now.Add(a.cfg.RejoinGrace + deadline)
		r.rejoining = map[string]bool{}
		for _, name := range a.active() {
			r.rejoining[name] = true
		}
		// Its deadline counts once its participants are back, at the
		// latest after the rejoin grace.
		a.log.Info("round started", "round", n, "tasks", r.tasks, "resumed", true,
			"participants", a.active(), "rejoin_grace", a.cfg.RejoinGrace, "deadline", a.plan.Stragglers.Deadline)
	} else {
		a.log.Info("round started", "round", n, "tasks", r.tasks)
	}
	a.round = r
	a.broadcast()
}

// rejoined notes that a participant called the aggregator; once every
// active participant of a resumed round has, its deadline counts from now.
// Callers hold a.mu.
func (a *Aggregator) rejoined(name string) {
	r := a.round
	if r == nil || r.rejoining == nil {
		return
	}
	delete(r.rejoining, name)
	for _, n := range a.active() {
		if r.rejoining[n] {
			return
		}
	}
	r.rejoining = nil
	if d := a.cfg.Now().Add(a.plan.Stragglers.Deadline.Std()); d.Before(r.deadline) {
		r.deadline = d
	}
	a.log.Info("every participant is back; the round's deadline counts from now", "round", r.number, "deadline", r.deadline)
	a.requestClose() // the loop re-arms its timer
}

// broadcast wakes every long poll. Callers hold a.mu.
func (a *Aggregator) broadcast() {
	close(a.changed)
	a.changed = make(chan struct{})
}

// loop closes rounds one after another.
func (a *Aggregator) loop(ctx context.Context) error {
	for {
		a.mu.Lock()
		if a.ended {
			a.mu.Unlock()
			return nil
		}
		r := a.round
		deadline := r.deadline // rejoined moves it, under a.mu
		a.mu.Unlock()

		timer := time.NewTimer(max(0, deadline.Sub(a.cfg.Now())))
		atDeadline := false
	wait:
		for {
			select {
			case <-ctx.Done():
				timer.Stop()
				return ctx.Err()
			case <-timer.C:
				atDeadline = true
				break wait
			case <-a.closeReq:
				if err := a.saveFailed(); err != nil {
					timer.Stop()
					return err
				}
				a.mu.Lock()
				ready := a.readyToClose(r)
				deadline := r.deadline
				a.mu.Unlock()
				if ready {
					timer.Stop()
					break wait
				}
				// A resumed round's deadline moves when its
				// participants are back.
				timer.Reset(max(0, deadline.Sub(a.cfg.Now())))
			}
		}
		if err := a.closeRound(ctx, r, atDeadline); err != nil {
			return err
		}
	}
}

// active lists the participants that have not been dropped. Callers hold a.mu.
func (a *Aggregator) active() []string {
	var out []string
	for name, p := range a.parts {
		if p.dropped == "" {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// readyToClose applies the straggler policy before the deadline: the round
// closes once every active participant has reported all its tasks, or once
// the plan's percentage of them has (and at least min_reporting). Callers
// hold a.mu.
func (a *Aggregator) readyToClose(r *roundState) bool {
	if a.plan.Async() && r.number <= a.plan.TrainingRounds() {
		return a.asyncReady(r) // K updates close a step (fedbuff.go)
	}
	active := a.active()
	complete := 0
	for _, name := range active {
		if r.completedAll(name) {
			complete++
		}
	}
	if len(active) > 0 && complete == len(active) {
		return true
	}
	need := max(a.plan.Stragglers.MinReporting, int(math.Ceil(a.plan.Stragglers.Percent*float64(len(active))-1e-9)))
	return complete >= need && complete > 0
}

// Drop removes a participant that failed: the current round stops waiting
// for it and it gets no more tasks.
func (a *Aggregator) Drop(collaborator, reason string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.parts[collaborator]
	if p == nil || p.dropped != "" {
		return
	}
	if reason == "" {
		reason = "dropped"
	}
	p.dropped = reason
	a.log.Warn("participant dropped", "collaborator", collaborator, "reason", reason)
	a.rejoined(collaborator) // a resumed round no longer waits for it
	a.broadcast()
	a.requestClose()
}

// requestClose asks the loop to re-check the round. Never blocks.
func (a *Aggregator) requestClose() {
	select {
	case a.closeReq <- struct{}{}:
	default:
	}
}

// closeRound turns the round's reports into the next model, persists it, and
// opens the next round or ends the experiment.
func (a *Aggregator) closeRound(ctx context.Context, r *roundState, atDeadline bool) error {
	a.mu.Lock()
	r.closed = true // uploads from now on are late
	r.dropPartials()
	a.mu.Unlock()
	closing := time.Now()
	r.committing.Wait() // the last results' folds
	if err := a.awaitSave(); err != nil {
		return err // the last round's files; see writebehind.go
	}

	a.mu.Lock()
	if err := r.commitErr; err != nil {
		a.mu.Unlock()
		return fmt.Errorf("round %d: %w", r.number, err)
	}
	results := slices.Clone(r.results)
	trainers := sortedKeys(r.trainers)
	var missing []string
	for _, name := range a.active() {
		if !r.completedAll(name) {
			missing = append(missing, name)
		}
	}
	a.mu.Unlock()

	training := r.number <= a.plan.TrainingRounds()
	if a.plan.Evaluation() {
		// No train result: the evaluation's reports are its sites'
		// scores, and min_reporting bounds those.
		trainers = reporters(results)
		if len(trainers) < a.plan.Stragglers.MinReporting {
			return fmt.Errorf("the evaluation closed with results from %d of the %d sites stragglers.min_reporting requires (missing: %v)",
				len(trainers), a.plan.Stragglers.MinReporting, missing)
		}
	}
	if training && len(trainers) < a.plan.Stragglers.MinReporting {
		why := "deadline"
		if !atDeadline {
			why = "loss of participants"
		}
		return fmt.Errorf("round %d closed at its %s with %d of the %d train results stragglers.min_reporting requires (missing: %v)",
			r.number, why, len(trainers), a.plan.Stragglers.MinReporting, missing)
	}

	model := a.model
	var foldTook time.Duration
	if training {
		start := time.Now()
		_, fold := tracing.Start(r.ctx, "fold", attribute.Int("results", len(trainers)))
		next, err := a.aggregate(ctx, r)
		fold.End()
		if err != nil {
			return fmt.Errorf("round %d: aggregation failed: %w", r.number, err)
		}
		foldTook = time.Since(closing)
		a.cfg.Metrics.Phase(telemetry.PhaseFold, time.Since(start))
		model = a.withLocal(next)
	}
	summary := RoundSummary{
		Round:      r.number,
		Results:    results,
		Aggregates: aggregateMetrics(results),
		Reported:   trainers,
		Missing:    missing,
	}
	a.mu.Lock()
	participants := len(a.active())
	a.mu.Unlock()
	best := a.scoreBest(summary, participants)
	saved := &savedRound{r: r, summary: summary, best: best, fold: foldTook}
	last := r.number >= a.lastRound()
	if !last && training && a.roomFor(2) == nil {
		// Write the round's files while the next round runs (see
		// writebehind.go): its collaborators download the model from
		// memory meanwhile. The disk has room for both rounds' files;
		// short of it the round's files are written first, as below, so
		// that a full disk pauses the experiment before the next round.
		a.mu.Lock()
		defer a.mu.Unlock()
		a.model, a.best = model, best
		a.writeBehind(ctx, saved, model)
		a.startRound(r.number + 1)
		return nil
	}
	if err := a.save(ctx, saved, model, training); err != nil {
		return err
	}
	if !last {
		if err := a.checkRoom(ctx, r.number+1); err != nil {
			return err
		}
	}

	a.mu.Lock()
	a.model, a.best = model, best
	var giveBack tensor.Model
	if !a.keepsModel() {
		a.model = nil // its round file serves it (see the field)
		if training && a.acc != nil {
			giveBack = model // the next round's sum reuses its memory
		}
	}
	a.mu.Unlock()
	if giveBack != nil {
		a.acc.GiveBack(giveBack)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if last {
		a.ended, a.endWhy = true, "the experiment has finished"
		a.broadcast()
		return nil
	}
	a.startRound(r.number + 1)
	return nil
}

// reporters lists, in order, the collaborators with a result among results.
func reporters(results []TaskResult) []string {
	seen := map[string]bool{}
	for _, r := range results {
		seen[r.Collaborator] = true
	}
	return sortedKeys(seen)
}

// scoreBest updates the best model from a round's aggregates. The aggregated
// model validation of round n scores the model round n started from (round
// n-1's); the other tasks score round n's own.
//
// A score counts only when every participant still taking part reported
// it: a mean over the sites that happened to report (a straggler's
// validation missing) is not comparable with the others, and would make the
// best model the one scored on the easiest data.
func (a *Aggregator) scoreBest(s RoundSummary, participants int) *Best {
	rule := a.plan.BestModel
	value, ok := s.Aggregates[rule.Task][rule.Metric]
	if !ok {
		return a.best
	}
	scored := map[string]bool{}
	for _, r := range s.Results {
		if _, has := r.Metrics[rule.Metric]; has && r.Task == rule.Task {
			scored[r.Collaborator] = true
		}
	}
	if len(scored) < participants {
		a.log.Info("round's score leaves out participants: not a candidate for the best model", "round", s.Round,
			"metric", rule.Metric, "scored_by", len(scored), "participants", participants)
		return a.best
	}
	round := s.Round
	if rule.Task == runner.TaskAggregatedValidation {
		round--
	}
	if round > a.plan.Rounds {
		return a.best
	}
	better := a.best == nil ||
		(rule.Mode == "max" && value > a.best.Value) ||
		(rule.Mode == "min" && value < a.best.Value)
	if !better {
		return a.best
	}
	return &Best{Round: round, Metric: rule.Metric, Value: value}
}

// finish marks the experiment ended, finished or failed, so pollers get QUIT.
func (a *Aggregator) finish(err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.ended {
		a.ended = true
		a.endWhy = "the experiment has finished"
		if err != nil {
			a.endWhy = "the experiment failed: " + err.Error()
		}
	}
	a.broadcast()
}

// lingerForQuit keeps serving briefly so that every collaborator still
// polling hears QUIT instead of finding the aggregator gone.
func (a *Aggregator) lingerForQuit(ctx context.Context, serveErr <-chan error) {
	deadline := time.NewTimer(min(a.cfg.PollWindow, 5*time.Second))
	defer deadline.Stop()
	for {
		a.mu.Lock()
		all := true
		for _, p := range a.parts {
			if p.dropped == "" && !p.quitSeen {
				all = false
			}
		}
		ch := a.changed
		a.mu.Unlock()
		if all {
			return
		}
		select {
		case <-ch:
		case <-deadline.C:
			return
		case <-ctx.Done():
			return
		case <-serveErr:
			return
		}
	}
}

func stopServer(srv *grpc.Server, timeout time.Duration) {
	done := make(chan struct{})
	go func() { srv.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout):
		srv.Stop()
	}
}

// layoutOf keeps a model's names, dtypes and shapes without its data.
func layoutOf(m tensor.Model) tensor.Model {
	out := make(tensor.Model, len(m))
	for i, t := range m {
		out[i] = &tensor.Tensor{Name: t.Name, DType: t.DType, Shape: slices.Clone(t.Shape)}
	}
	return out
}

type nopSink struct{}

func (nopSink) RoundCompleted(RoundSummary, *Best) {}
func (nopSink) Progress(Progress)                  {}
func (nopSink) Paused(string)                      {}
func (nopSink) Resumed()                           {}
