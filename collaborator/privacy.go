package collaborator

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/fx-fl/fx/privacy"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// Privacy is client-level differential privacy applied at the site: the
// update of every trained model (trained − the round's global model) is
// clipped to Clip and noised with N(0, (Noise·Clip)²) before it can leave,
// whatever the runner did, since the runner is the experiment's code and
// the site's promise cannot depend on it.
type Privacy struct {
	// Noise is the noise multiplier σ and Clip the clip norm C, from the
	// plan; Delta is the plan's stated δ, kept in the ledger for the record.
	Noise, Clip, Delta float64
	// Ledger, if set, is charged for every release on Dataset within
	// Budget, durably and before the release can leave: a charge the
	// budget refuses fails the train task (an error matching
	// privacy.ErrRefused), and nothing is uploaded. Nil: the update is
	// noised but not accounted (the site keeps no budget).
	Ledger  *privacy.Ledger
	Dataset string
	Budget  privacy.Budget
	// Name is the experiment as people know it (owner/name), for the
	// ledger's readers.
	Name string
}

// releasedFile keeps the round's released (noised) model in the work
// directory: a collaborator restarted before its upload went through
// sends these very bytes again, already charged, instead of training and
// spending the budget again.
const releasedFile = "released.safetensors"

// Metadata keys of releasedFile.
const (
	releasedRound   = "fx.round"
	releasedSamples = "fx.samples"
)

// trainPrivately runs the train task under Privacy: the release of the
// round is the trained model, charged, then clipped and noised in place,
// so the upload, its retries, a re-upload to a restarted aggregator and
// the local validation all see the same noised bytes. The train metrics
// (loss and accuracy as the runner trained on the raw data) are dropped:
// they are not part of what the noise protects.
//
// The noise waits for the round's charge (chargeFor), which runRound
// started with the round, so the ε is charged before the update can leave
// the site; a charge the budget refuses stops the training.
func (c *Collaborator) trainPrivately(ctx context.Context, task runner.Task) (runner.Result, error) {
	p := c.cfg.Privacy
	// A charge made ahead means the round had no release to send again
	// (chargeAhead): the ledger holds the charge of the new one.
	if ch := c.charging; ch == nil || ch.round != task.Round {
		if res, ok := c.replayRelease(task.Round); ok {
			c.log.Info("sending the update released before the restart; the round is charged already", "round", task.Round)
			return res, nil
		}
	}
	ch := c.chargeFor(task.Round)
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		select {
		case <-ch.done:
			if ch.err != nil {
				cancel(ch.err)
			}
		case <-ctx.Done():
		}
	}()
	res, err := c.train(ctx, task)
	trained := time.Now()
	<-ch.done
	if ch.err != nil {
		return runner.Result{}, fmt.Errorf("differential privacy: the trained update stays at this site: %w", ch.err)
	}
	if err != nil {
		return res, err
	}
	noising := time.Now()
	// From here the update may leave the site: another attempt at the
	// round needs a charge of its own.
	c.charging = nil
	// Only what leaves the site: its local tensors (local.go) do not.
	rel, err := privacy.ClipAndNoise(c.shared(c.model), c.shared(res.Model), p.Clip, p.Noise)
	if rw, ok := c.cfg.Runner.(runner.Rewriter); ok {
		rw.Rewritten(res.Model) // its copy holds the raw trained weights
	}
	if err != nil {
		return runner.Result{}, fmt.Errorf("differential privacy: the trained update stays at this site: %w", err)
	}
	res.Metrics = nil
	c.keepRelease(task.Round, res)
	// The raw norm is computed from the data without noise: it stays in
	// the site's log.
	c.log.Info("update clipped and noised", "round", task.Round, "norm", rel.Norm, "scale", rel.Scale, "noise_std", rel.Std, "reset", rel.Reset,
		"charge_wait", noising.Sub(trained).Round(time.Millisecond), "noise_took", time.Since(noising).Round(time.Millisecond))
	return res, nil
}

// charge is a round's charge to the site's budget.
type charge struct {
	round int
	done  chan struct{} // closed once err is set
	err   error
}

// chargeFor returns the round's charge, starting it unless one is in
// flight or was made for an attempt of the round that released nothing.
//
// The charge is a durable write — fsyncs that take seconds on a disk busy
// with models — and depends on nothing the round computes, so it runs
// beside the round's download and tasks instead of after the training. A
// charge whose training then failed stands (nothing in this process
// released it, but after a crash the ledger cannot know that), and another
// attempt at the round in this process uses it rather than charging again.
func (c *Collaborator) chargeFor(round int) *charge {
	if ch := c.charging; ch != nil && ch.round == round {
		select {
		case <-ch.done:
			if ch.err == nil {
				return ch
			}
		default:
			return ch // in flight
		}
	}
	ch := &charge{round: round, done: make(chan struct{})}
	c.charging = ch
	p := c.cfg.Privacy
	go func() {
		defer close(ch.done)
		if p.Ledger == nil {
			return
		}
		_, ch.err = p.Ledger.Charge(p.Dataset, p.Budget, privacy.Charge{
			Experiment: c.cfg.ExperimentID, Name: p.Name, Round: round,
			SampledGaussian: privacy.SampledGaussian{Noise: p.Noise, Rate: 1, Steps: 1},
			Clip:            p.Clip, Delta: p.Delta,
		})
	}()
	return ch
}

// chargeAhead starts the round's charge as the round starts, if the round
// will train under a budget and has no update to send again (one computed
// before and kept in memory, or one released before a restart).
func (c *Collaborator) chargeAhead(round int, tasks []string) {
	p := c.cfg.Privacy
	if p == nil || p.Ledger == nil || !slices.ContainsFunc(tasks, runner.IsTrain) {
		return
	}
	if _, ok := c.results[runner.TaskTrain]; ok && c.resultsRound == round {
		return
	}
	if c.releaseKept(round) {
		return
	}
	c.chargeFor(round)
}

// keepRelease writes the released model to the work directory for
// replayRelease, in the background: the upload and the local validation
// read the same memory meanwhile, and what waits for it is whatever
// reuses that memory or reads the file (dropResults, replayRelease, the
// end of Run). Without the file a restart costs a round of budget more,
// not privacy — a release that left without its file is charged again
// when the round is trained again — so a failure is only logged. It need
// not survive a crash of the machine either: the page cache's copy serves
// a restarted process.
//
// The last round's file is removed before this one is written rather than
// replaced by the rename: ext4 (auto_da_alloc) forces a file that replaces
// another to the disk at the next journal commit (within 5 s, or at any
// fsync, such as the ledger's), which at ten sites × 100 MB a round took a
// gigabyte of disk writes and their kernel CPU from every DP round (issue
// 20). A file that replaces none stays in the page cache until the
// writeback's 30 s expiry, and since the next round removes it, it is
// seldom written out at all.
func (c *Collaborator) keepRelease(round int, res runner.Result) {
	meta := map[string]string{releasedRound: strconv.Itoa(round), releasedSamples: strconv.FormatInt(res.Samples, 10)}
	path := filepath.Join(c.cfg.WorkDir, releasedFile)
	c.keeping.Go(func() {
		start := time.Now()
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			c.log.Warn("cannot remove the update released in an earlier round", "error", err)
		}
		if err := tensor.WriteScratchFile(path, res.Model, meta); err != nil {
			c.log.Warn("cannot keep the released update for a restart; a restart before its upload will train and charge the round again", "round", round, "error", err)
			return
		}
		c.log.Debug("released update kept for a restart", "round", round, "took", time.Since(start).Round(time.Millisecond))
	})
}

// replayRelease returns the model released for round before a restart, if
// the work directory holds it and the ledger holds its charge: bytes the
// ledger does not know of (it was restored from an older backup) are not
// sent, and the round is trained and charged again.
func (c *Collaborator) replayRelease(round int) (runner.Result, bool) {
	if !c.releaseKept(round) {
		return runner.Result{}, false
	}
	m, meta, err := tensor.ReadFile(filepath.Join(c.cfg.WorkDir, releasedFile))
	if err != nil {
		c.log.Warn("cannot read the update released before a restart; training the round again", "error", err)
		return runner.Result{}, false
	}
	samples, err := strconv.ParseInt(meta[releasedSamples], 10, 64)
	if meta[releasedRound] != strconv.Itoa(round) || err != nil || c.model.Matches(m) != nil {
		return runner.Result{}, false // another round's, or not this model's
	}
	return runner.Result{Samples: samples, Model: m}, true
}

// releaseKept reports whether the work directory holds the update released
// for round and the ledger its charge. The file is nearly always the last
// round's, left by an upload that went through: its header says so without
// reading the whole model, which costs as much as a pass over it, every
// round, at every site.
func (c *Collaborator) releaseKept(round int) bool {
	c.keeping.Wait()
	h, err := tensor.ReadHeaderFile(filepath.Join(c.cfg.WorkDir, releasedFile))
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			c.log.Warn("cannot read the update released before a restart; training the round again", "error", err)
		}
		return false
	}
	if h.Metadata[releasedRound] != strconv.Itoa(round) {
		return false
	}
	if p := c.cfg.Privacy; p.Ledger != nil {
		charged, err := p.Ledger.Charged(p.Dataset, c.cfg.ExperimentID, round)
		if err != nil || !charged {
			return false
		}
	}
	return true
}
