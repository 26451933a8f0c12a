package aggregator

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/internal/disk"
	"github.com/fx-fl/fx/tensor"
)

// Durable files and how a resume trusts them. Every file is written
// atomically (a temporary file, synced, renamed), a round's model and
// optimiser state before its summary, the summary before checkpoint.json,
// so the checkpoint names a complete round. Each file is also checked when
// it is read back: a round's summary records the sha256 of the round's
// model and optimiser state, the checkpoint that of the model a resume
// loads, and both JSON files carry a checksum of their own content; every
// model loaded must hold finite values only. A resume (see resume) starts
// from the checkpoint's round if its files check out, and otherwise from
// the newest round whose files do, rebuilding the checkpoint from that
// round's summary: a missing or damaged checkpoint, or a damaged latest
// model, costs the rounds after the newest intact one, never the
// experiment. Files written before fx kept digests are accepted unchecked.

// checkpoint is the durable record of an aggregator's progress.
type checkpoint struct {
	ExperimentID string `json:"experiment_id"`
	// Completed is the last completed round; 0 when only the initial model exists.
	Completed int   `json:"completed"`
	Best      *Best `json:"best,omitempty"`
	// OptimizerStep counts server-optimiser steps taken (fedadam & co.).
	OptimizerStep int `json:"optimizer_step,omitempty"`
	// Participants are the collaborators the aggregator ran with, for a
	// director that lost its store (see director.Recover).
	Participants []string `json:"participants,omitempty"`
	// ModelSHA256 is the digest of the model a resume loads, round
	// min(Completed, rounds)'s; InitialSHA256 that of round 0's.
	ModelSHA256   string `json:"model_sha256,omitempty"`
	InitialSHA256 string `json:"initial_sha256,omitempty"`
	Checksum      string `json:"checksum,omitempty"`
}

// roundFile is a round's summary as kept in rounds/: with what a checkpoint
// of the round holds, so that one can be rebuilt from it.
type roundFile struct {
	RoundSummary
	Best          *Best `json:"best,omitempty"`
	OptimizerStep int   `json:"optimizer_step,omitempty"`
	// ModelSHA256 and OptimizerSHA256 are the digests of the round's model
	// and optimiser state files; empty for the final validation-only
	// round, which trains nothing.
	ModelSHA256     string `json:"model_sha256,omitempty"`
	OptimizerSHA256 string `json:"optimizer_sha256,omitempty"`
	Checksum        string `json:"checksum,omitempty"`
}

// errDamaged marks a file whose contents do not check out.
var errDamaged = errors.New("damaged")

// seal sets *sum to the checksum of v's JSON encoding without it.
func seal(v any, sum *string) error {
	*sum = ""
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	*sum = digest(b)
	return nil
}

// checkSeal verifies what seal set; an empty sum (a file from before fx
// sealed them) passes.
func checkSeal(v any, sum *string) error {
	want := *sum
	if want == "" {
		return nil
	}
	*sum = ""
	b, err := json.Marshal(v)
	*sum = want
	if err != nil {
		return err
	}
	if digest(b) != want {
		return fmt.Errorf("its checksum does not match its contents: %w", errDamaged)
	}
	return nil
}

func digest(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

// readSealed reads a JSON file written by writeSealed. A missing file is
// (false, nil).
func readSealed(path string, v any, sum *string) (bool, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return false, fmt.Errorf("%s is not valid JSON (%v): %w", path, err, errDamaged)
	}
	if err := checkSeal(v, sum); err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	return true, nil
}

func writeSealed(path string, v any, sum *string) error {
	if err := seal(v, sum); err != nil {
		return err
	}
	return atomicfile.WriteJSON(path, v)
}

func readCheckpoint(dir string) (*checkpoint, error) {
	var c checkpoint
	ok, err := readSealed(checkpointPath(dir), &c, &c.Checksum)
	if !ok || err != nil {
		return nil, err
	}
	return &c, nil
}

func writeCheckpoint(dir string, c *checkpoint) error {
	return writeSealed(checkpointPath(dir), c, &c.Checksum)
}

func readRoundFile(dir string, round int) (*roundFile, error) {
	var rf roundFile
	ok, err := readSealed(RoundPath(dir, round), &rf, &rf.Checksum)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%s is missing", RoundPath(dir, round))
	}
	if rf.Round != round {
		return nil, fmt.Errorf("%s holds round %d: %w", RoundPath(dir, round), rf.Round, errDamaged)
	}
	return &rf, nil
}

func writeRoundFile(dir string, rf *roundFile) error {
	return writeSealed(RoundPath(dir, rf.Round), rf, &rf.Checksum)
}

// writeTensors writes a safetensors file durably and returns its sha256.
func writeTensors(path string, m tensor.Model, metadata map[string]string) (string, error) {
	h := sha256.New()
	err := atomicfile.Stream(path, func(w io.Writer) error {
		return tensor.Write(io.MultiWriter(w, h), m, metadata)
	})
	if err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// readTensors reads a safetensors file, checks its digest (unless want is
// empty) and that every value is finite.
func readTensors(path, want string) (tensor.Model, map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	h := sha256.New()
	tee := io.TeeReader(f, h)
	m, meta, err := tensor.Read(tee)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %v: %w", path, err, errDamaged)
	}
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return nil, nil, err
	}
	if got := hex.EncodeToString(h.Sum(nil)); want != "" && got != want {
		return nil, nil, fmt.Errorf("%s: its sha256 is %s, not %s as recorded: %w", path, got, want, errDamaged)
	}
	for _, t := range m {
		if err := t.CheckFinite(); err != nil {
			return nil, nil, fmt.Errorf("%s: %v: %w", path, err, errDamaged)
		}
	}
	return m, meta, nil
}

// writeModel stores a round's global model and returns its digest.
func writeModel(dir string, round int, m tensor.Model) (string, error) {
	return writeTensors(ModelPath(dir, round), m, map[string]string{"fx.round": strconv.Itoa(round)})
}

// optimizerRoundPath is where the server optimiser's state after round is
// kept: per round, so that a resume can fall back a round.
func optimizerRoundPath(dir string, round int) string {
	return filepath.Join(dir, "optimizer", fmt.Sprintf("round-%06d.safetensors", round))
}

// resumePoint is where a resume starts: a checkpoint whose files checked
// out, with the model (and optimiser state) it names.
type resumePoint struct {
	cp       checkpoint
	model    tensor.Model
	optState tensor.Model
	optMeta  map[string]string
	// rebuilt says why the stored checkpoint was not used as it was, when
	// it was not: it is missing or damaged, or names a round whose files
	// are not intact.
	rebuilt []string
}

// resume finds where an aggregator directory resumes from: nil with no
// error for a directory that holds no round yet (a new experiment). It only
// reads.
func resume(dir string, rounds int, experimentID string, usesOptimizer bool) (*resumePoint, error) {
	c, cerr := readCheckpoint(dir)
	if cerr != nil && !errors.Is(cerr, errDamaged) {
		return nil, cerr
	}
	if c != nil && c.ExperimentID != experimentID {
		return nil, fmt.Errorf("aggregator: %s holds experiment %s's checkpoint, not %s's", dir, c.ExperimentID, experimentID)
	}
	top, err := newestRoundFile(dir)
	if err != nil {
		return nil, err
	}
	var why []string
	start := top
	switch {
	case c != nil:
		start = c.Completed
	case cerr != nil:
		why = append(why, cerr.Error())
	case top > 0:
		why = append(why, checkpointPath(dir)+" is missing")
	default:
		return nil, nil // nothing completed, nothing to resume
	}
	for k := start; k >= 0; k-- {
		var at *checkpoint
		if c != nil && k == c.Completed {
			at = c
		}
		p, err := loadRound(dir, k, rounds, at, c, usesOptimizer)
		if err == nil {
			p.rebuilt = why
			return p, nil
		}
		why = append(why, fmt.Sprintf("round %d: %v", k, err))
	}
	return nil, fmt.Errorf("aggregator: no intact round to resume from in %s: %s", dir, strings.Join(why, "; "))
}

// loadRound loads the state after round k. at is the checkpoint naming k,
// if one does; stored is the checkpoint on disk, for the initial model's
// digest and the participants.
func loadRound(dir string, k, rounds int, at, stored *checkpoint, usesOptimizer bool) (*resumePoint, error) {
	p := &resumePoint{}
	if at != nil {
		p.cp = *at
	} else {
		p.cp.Completed = k
		if stored != nil {
			p.cp.ExperimentID, p.cp.InitialSHA256, p.cp.Participants = stored.ExperimentID, stored.InitialSHA256, stored.Participants
		}
		if k >= 1 {
			rf, err := readRoundFile(dir, k)
			if err != nil {
				return nil, err
			}
			p.cp.Best, p.cp.OptimizerStep = rf.Best, rf.OptimizerStep
			if len(p.cp.Participants) == 0 {
				p.cp.Participants = slices.Sorted(slices.Values(append(slices.Clone(rf.Reported), rf.Missing...)))
			}
		}
	}
	modelRound := min(k, rounds)
	want, optWant := p.cp.ModelSHA256, ""
	switch {
	case modelRound == 0:
		want = p.cp.InitialSHA256
	case at == nil || usesOptimizer:
		rf, err := readRoundFile(dir, modelRound)
		if err != nil {
			return nil, err
		}
		if at == nil {
			want = rf.ModelSHA256
		}
		optWant = rf.OptimizerSHA256
	}
	m, _, err := readTensors(ModelPath(dir, modelRound), want)
	if err != nil {
		return nil, fmt.Errorf("model: %w", err)
	}
	p.model, p.cp.ModelSHA256 = m, want
	if usesOptimizer && p.cp.OptimizerStep > 0 {
		path := optimizerRoundPath(dir, modelRound)
		if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) && at != nil && optWant == "" {
			path = legacyOptimizerPath(dir) // written before fx kept it per round
		}
		if p.optState, p.optMeta, err = readTensors(path, optWant); err != nil {
			return nil, fmt.Errorf("optimiser state: %w", err)
		}
	}
	return p, nil
}

// newestRoundFile is the highest round with a file in rounds/, 0 if none.
func newestRoundFile(dir string) (int, error) {
	n := 0
	err := forNumbered(filepath.Dir(RoundPath(dir, 0)), ".json", func(r int) { n = max(n, r) })
	return n, err
}

// forNumbered calls fn with the round of every round-NNNNNN<suffix> file
// in dir; a missing dir has none.
func forNumbered(dir, suffix string, fn func(round int)) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		num, ok := strings.CutPrefix(e.Name(), "round-")
		num, ok2 := strings.CutSuffix(num, suffix)
		if r, err := strconv.Atoi(num); ok && ok2 && err == nil && r >= 0 {
			fn(r)
		}
	}
	return nil
}

// setAside moves the files of rounds after keep into discarded/, where an
// operator can look at them; a resume that fell back runs those rounds
// again.
func setAside(dir string, keep int) error {
	to := filepath.Join(dir, "discarded", time.Now().UTC().Format("20060102T150405.000Z"))
	for _, d := range []struct{ dir, suffix string }{
		{filepath.Dir(ModelPath(dir, 0)), ".safetensors"},
		{filepath.Dir(RoundPath(dir, 0)), ".json"},
		{filepath.Dir(optimizerRoundPath(dir, 0)), ".safetensors"},
	} {
		var late []int
		if err := forNumbered(d.dir, d.suffix, func(r int) {
			if r > keep {
				late = append(late, r)
			}
		}); err != nil {
			return err
		}
		for _, r := range late {
			name := fmt.Sprintf("round-%06d%s", r, d.suffix)
			dst := filepath.Join(to, filepath.Base(d.dir), name)
			if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
				return err
			}
			if err := os.Rename(filepath.Join(d.dir, name), dst); err != nil {
				return err
			}
		}
	}
	return nil
}

// prune deletes the models no longer kept after round completed (see
// experiment.Retention: round 0, the best, the last two and every Nth are
// kept) and the optimiser states but the last two.
func prune(dir string, completed, rounds, every int, best *Best) error {
	last := min(completed, rounds)
	keepModel := func(r int) bool {
		return r == 0 || r >= last-1 || (best != nil && r == best.Round) || (every > 0 && r%every == 0)
	}
	var errs []error
	for _, d := range []struct {
		dir  string
		keep func(int) bool
	}{
		{filepath.Dir(ModelPath(dir, 0)), keepModel},
		{filepath.Dir(optimizerRoundPath(dir, 0)), func(r int) bool { return r >= last-1 }},
	} {
		errs = append(errs, forNumbered(d.dir, ".safetensors", func(r int) {
			if !d.keep(r) {
				if err := os.Remove(filepath.Join(d.dir, fmt.Sprintf("round-%06d.safetensors", r))); err != nil {
					errs = append(errs, err)
				}
			}
		}))
	}
	return errors.Join(errs...)
}

// History returns the completed rounds kept in an aggregator directory, in
// order, and the best model so far. A directory without rounds has no
// history. The director uses it to rebuild an experiment's metric log after a
// restart: it is derived from the same files the aggregator resumes from, so
// nothing is lost or repeated. A round file that is damaged is left out and
// named in the error, which comes with the rounds that could be read.
func History(dir string) ([]RoundSummary, *Best, error) {
	c, cerr := readCheckpoint(dir)
	if cerr != nil && !errors.Is(cerr, errDamaged) {
		return nil, nil, cerr
	}
	top, err := newestRoundFile(dir)
	if err != nil {
		return nil, nil, err
	}
	var best *Best
	if c != nil {
		top, best = c.Completed, c.Best
	}
	out := make([]RoundSummary, 0, top)
	errs := []error{cerr}
	for r := 1; r <= top; r++ {
		rf, err := readRoundFile(dir, r)
		if err != nil {
			errs = append(errs, fmt.Errorf("round %d: %w", r, err))
			continue
		}
		out = append(out, rf.RoundSummary)
		if c == nil {
			best = rf.Best
		}
	}
	return out, best, errors.Join(errs...)
}

// Participants returns the collaborators an aggregator directory's
// experiment ran with, as its checkpoint (or, without one, its newest
// readable round) recorded them; none if it never completed a round.
func Participants(dir string) ([]string, error) {
	c, err := readCheckpoint(dir)
	if err == nil && c != nil && len(c.Participants) > 0 {
		return c.Participants, nil
	}
	top, err := newestRoundFile(dir)
	if err != nil || top == 0 {
		return nil, err
	}
	for r := top; r >= 1; r-- {
		if rf, err := readRoundFile(dir, r); err == nil {
			return slices.Sorted(slices.Values(append(slices.Clone(rf.Reported), rf.Missing...))), nil
		}
	}
	return nil, nil
}

// restore loads the newest intact round from Dir (see resume), or writes
// the initial model. A resume that could not use the checkpoint as it was
// says why in the log, sets aside the files of the rounds it could not
// trust (they run again) and writes the checkpoint anew.
func (a *Aggregator) restore(ctx context.Context) error {
	if err := a.addControlVariates(); err != nil { // SCAFFOLD's server variate (scaffold.go)
		return err
	}
	p, err := resume(a.cfg.Dir, a.plan.TrainingRounds(), a.cfg.ExperimentID, a.usesOptimizer())
	if err != nil {
		return err
	}
	completed := 0
	if p == nil {
		if len(a.cfg.InitialModel) == 0 {
			return errors.New("aggregator: no initial model and no checkpoint to resume from")
		}
		if err := a.cfg.InitialModel.Validate(); err != nil {
			return fmt.Errorf("initial model: %w", err)
		}
		a.model = a.cfg.InitialModel
		if err := a.persist(ctx, "write the initial model", func() (err error) {
			a.initialSHA, err = writeModel(a.cfg.Dir, 0, a.cfg.InitialModel)
			return err
		}); err != nil {
			return err
		}
		a.modelSHA = a.initialSHA
		if err := a.persist(ctx, "write the checkpoint", func() error { return writeCheckpoint(a.cfg.Dir, a.checkpointAt(0, nil)) }); err != nil {
			return err
		}
	} else {
		completed = p.cp.Completed
		a.model, a.best, a.optSteps = p.model, p.cp.Best, p.cp.OptimizerStep
		a.modelSHA, a.initialSHA = p.cp.ModelSHA256, p.cp.InitialSHA256
		if len(p.rebuilt) > 0 {
			a.log.Warn("the checkpoint cannot be used as it is: resuming from the newest intact round; the files of later rounds are set aside under discarded/ and those rounds run again",
				"resume_after_round", completed, "problems", strings.Join(p.rebuilt, "; "))
			if err := setAside(a.cfg.Dir, completed); err != nil {
				return fmt.Errorf("aggregator: set aside the rounds after %d: %w", completed, err)
			}
			if err := a.persist(ctx, "write the checkpoint", func() error { return writeCheckpoint(a.cfg.Dir, a.checkpointAt(completed, a.best)) }); err != nil {
				return err
			}
		}
		a.resumed = true
		a.log.Info("resuming from checkpoint", "completed_round", completed)
	}
	local, err := a.splitLocal(a.model)
	if err != nil {
		return err
	}
	a.local = local
	a.whole, a.layout = layoutOf(a.model), layoutOf(a.shared(a.model))
	a.modelBytes = a.model.Bytes()
	if completed == 0 {
		// Round 1 starts from the initial model, which the collaborators
		// may hold already: the archive's model.safetensors.
		a.initialDigest = tensor.Digest(a.model)
	}
	a.cfg.InitialModel = nil // written as round 0's file; not needed again
	if err := a.restoreOptimizer(p); err != nil {
		return err
	}
	if !a.collects() && !a.plan.Aggregation.Secure { // secure rounds sum in secagg's ring (secure.go)
		spill := filepath.Join(a.cfg.Dir, "spool")
		if err := os.MkdirAll(spill, 0o700); err != nil {
			return err
		}
		acc, err := tensor.NewAccumulator(tensor.AccumulatorConfig{
			Layout: a.shared(a.model), SpillDir: spill, MemoryBudget: StageBudget(a.shared(a.model).Bytes()), MaxTotalWeight: a.maxTotalWeight})
		if err != nil {
			return fmt.Errorf("aggregator: %w", err)
		}
		a.acc = acc
	}
	if !a.keepsModel() {
		a.model = nil // its round file serves it (see the field)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if completed >= a.lastRound() {
		a.ended, a.endWhy = true, "the experiment has finished"
		return nil
	}
	a.startRound(completed + 1)
	return nil
}

// checkpointAt is the checkpoint after round completed.
func (a *Aggregator) checkpointAt(completed int, best *Best) *checkpoint {
	return &checkpoint{
		ExperimentID: a.cfg.ExperimentID, Completed: completed, Best: best, OptimizerStep: a.optSteps,
		Participants: a.cfg.Participants, ModelSHA256: a.modelSHA, InitialSHA256: a.initialSHA,
	}
}

// saveRound writes a completed round's files: the model and optimiser
// state of a training round, then the summary, then the checkpoint that
// names the round; then it deletes the models the plan's retention no
// longer keeps. A full or failing disk pauses it (see persist) with the
// round's model in memory, until the writes succeed.
func (a *Aggregator) saveRound(ctx context.Context, s RoundSummary, model tensor.Model, training bool, best *Best) error {
	rf := roundFile{RoundSummary: s, Best: best, OptimizerStep: a.optSteps}
	modelSHA := a.modelSHA
	if training {
		if err := a.persist(ctx, fmt.Sprintf("round %d: write model", s.Round), func() (err error) {
			modelSHA, err = writeModel(a.cfg.Dir, s.Round, model)
			return err
		}); err != nil {
			return err
		}
		rf.ModelSHA256 = modelSHA
		if a.opt != nil {
			if err := a.persist(ctx, fmt.Sprintf("round %d: write optimiser state", s.Round), func() (err error) {
				rf.OptimizerSHA256, err = writeTensors(optimizerRoundPath(a.cfg.Dir, s.Round), a.opt.State(), a.opt.Metadata())
				return err
			}); err != nil {
				return err
			}
		}
	}
	if err := a.persist(ctx, fmt.Sprintf("round %d: write summary", s.Round), func() error { return writeRoundFile(a.cfg.Dir, &rf) }); err != nil {
		return err
	}
	a.modelSHA = modelSHA
	if err := a.persist(ctx, fmt.Sprintf("round %d: write checkpoint", s.Round), func() error {
		return writeCheckpoint(a.cfg.Dir, a.checkpointAt(s.Round, best))
	}); err != nil {
		return err
	}
	if err := prune(a.cfg.Dir, s.Round, a.plan.Rounds, a.plan.Retention.Every, best); err != nil {
		a.log.Warn("cannot delete the models the retention policy no longer keeps", "error", err)
	}
	return nil
}

// usesOptimizer reports whether the plan's algorithm is a server optimiser.
func (a *Aggregator) usesOptimizer() bool {
	switch tensor.OptimizerKind(a.plan.Aggregation.Algorithm) {
	case tensor.FedAdam, tensor.FedYogi, tensor.FedAdagrad:
		return true
	}
	return false
}

// restoreOptimizer sets up the plan's server optimiser, from the state p
// loaded when resuming. Plan hyper-parameters left at zero take the
// optimiser's defaults.
func (a *Aggregator) restoreOptimizer(p *resumePoint) error {
	if !a.usesOptimizer() {
		return nil
	}
	cfg := tensor.DefaultOptimizerConfig(tensor.OptimizerKind(a.plan.Aggregation.Algorithm))
	pa := a.plan.Aggregation
	for _, o := range []struct {
		dst *float64
		v   float64
	}{{&cfg.LR, pa.LR}, {&cfg.Beta1, pa.Beta1}, {&cfg.Beta2, pa.Beta2}, {&cfg.Tau, pa.Tau}} {
		if o.v != 0 {
			*o.dst = o.v
		}
	}
	if p != nil && p.optState != nil {
		opt, err := tensor.RestoreOptimizer(cfg, a.layout, p.optState, p.optMeta)
		if err != nil {
			return fmt.Errorf("aggregator: resume optimiser state: %w", err)
		}
		a.opt = opt
		return nil
	}
	opt, err := tensor.NewOptimizer(cfg, a.layout)
	if err != nil {
		return fmt.Errorf("aggregator: %w", err)
	}
	a.opt = opt
	return nil
}

// persist runs step until it succeeds. A resource error (a full disk, a
// quota, a failing disk) pauses the experiment rather than failing it: the
// sink hears why, and step is tried again every PauseRetry until it
// succeeds, when the sink hears that the experiment runs again, or ctx
// ends. Any other error is returned.
func (a *Aggregator) persist(ctx context.Context, what string, step func() error) error {
	paused := false
	for {
		err := step()
		if err == nil {
			if paused {
				a.log.Info("resumed", "after", what)
				a.cfg.Sink.Resumed()
			}
			return nil
		}
		if !disk.IsResourceError(err) && !errors.Is(err, errNoRoom) {
			return fmt.Errorf("%s: %w", what, err)
		}
		if !paused {
			paused = true
			reason := fmt.Sprintf("%s: %v. It resumes by itself once there is room (free space on the disk under %s)", what, err, a.cfg.Dir)
			a.log.Warn("experiment paused", "reason", reason, "retry_every", a.cfg.PauseRetry)
			a.cfg.Sink.Paused(reason)
		}
		t := time.NewTimer(a.cfg.PauseRetry)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// roundBytes bounds what a round of model adds to the directory before
// pruning: the model, the optimiser's two moments, and a margin for the
// summary and checkpoint.
func (a *Aggregator) roundBytes() int64 {
	n := a.modelBytes
	if a.opt != nil {
		n *= 3
	}
	return n + 1<<20 + int64(len(a.parts))*4<<10
}

// errNoRoom: the disk has too little room for a round beside the reserve.
var errNoRoom = errors.New("no room for it")

// checkRoom is the disk-budget check before a round: the file system under
// Dir must have room for the round's files and DiskReserve besides, or the
// experiment pauses (see persist) until it has.
func (a *Aggregator) checkRoom(ctx context.Context, round int) error {
	return a.persist(ctx, fmt.Sprintf("before round %d", round), func() error { return a.roomFor(1) })
}

// roomFor reports whether the disk has room for rounds rounds' files
// beside the reserve (errNoRoom if not).
func (a *Aggregator) roomFor(rounds int64) error {
	need := rounds * a.roundBytes()
	free, ok := disk.Free(a.cfg.Dir)
	if !ok || free-need >= a.cfg.DiskReserve {
		return nil
	}
	return fmt.Errorf("%d bytes are free; the round needs up to %d and %d are kept in reserve (disk_reserve_bytes): %w",
		free, need, a.cfg.DiskReserve, errNoRoom)
}

// aggregateMetrics is, per task, the sample-weighted mean of each metric over
// the results that reported it. A task whose results all have zero samples is
// averaged unweighted.
func aggregateMetrics(results []TaskResult) map[string]map[string]float64 {
	type term struct{ value, weight float64 }
	terms := map[string]map[string][]term{}
	for _, r := range results {
		for k, v := range r.Metrics {
			if terms[r.Task] == nil {
				terms[r.Task] = map[string][]term{}
			}
			terms[r.Task][k] = append(terms[r.Task][k], term{v, float64(r.Samples)})
		}
	}
	out := map[string]map[string]float64{}
	for task, metrics := range terms {
		out[task] = map[string]float64{}
		for k, ts := range metrics {
			var total float64
			for _, t := range ts {
				total += t.weight
			}
			// Each weight is made a fraction before it multiplies, so finite
			// metrics give a finite mean however many samples the results
			// claim: Σ w·v would overflow for 2^62 samples of a loss of 1e300.
			// The exact mean lies within the values' range; the clamp takes
			// back only what rounding carries past the largest float64.
			var mean float64
			for _, t := range ts {
				frac := 1 / float64(len(ts))
				if total > 0 {
					frac = t.weight / total
				}
				mean += frac * t.value
			}
			out[task][k] = max(-math.MaxFloat64, min(math.MaxFloat64, mean))
		}
	}
	return out
}
