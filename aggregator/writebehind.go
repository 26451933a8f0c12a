package aggregator

import (
	"context"
	"time"

	"github.com/fx-fl/fx/internal/telemetry"
	"github.com/fx-fl/fx/internal/tracing"
	"github.com/fx-fl/fx/tensor"
)

// Write-behind: a round's files are written while the next round runs.
//
// Writing a large model durably takes seconds (3 s for 512 MiB on fx's
// benchmark machine, most of it the page cache's first touch of new
// pages), and the collaborators would wait for it: the next round's model
// is the one being written. So closeRound opens the next round at once and
// writes the round's model, summary and checkpoint beside it, serving the
// next round's downloads from the model in memory meanwhile. Only once the
// checkpoint is durable is the round completed: logged, counted, and
// reported to the sink (the director records it then). A crash before
// that resumes from the round before, which then runs again: a round is
// never reported completed without its files, and none is lost.
//
// Memory stays at two models. The model is the running sum TakeMean
// handed over; the next round's sum is not allocated but is that memory
// again (tensor.Accumulator.ResetForGiveBack): once the save has ended and
// no download is streaming the model from memory, it goes back to the
// accumulator, and downloads read the round file. Uploads come after a
// download and the tasks, so the sum is usually back before the first
// upload is whole; one that comes first waits, staged (in memory up to
// StageBudget, then on disk), and its fold goes on once the sum is back.
//
// One save runs at a time: the next round's close waits for it, so the
// files of rounds are written in order and the checkpoint names them in
// order. The last round's files are written before the experiment ends,
// and a disk without room for two rounds' files gets them written first
// (closeRound), so that a full disk pauses before the next round.

// savedRound is what a round's close hands to its save.
type savedRound struct {
	r       *roundState
	summary RoundSummary
	best    *Best
	fold    time.Duration // the last results' fold, for the log
}

// pendingSave is a round's save running beside the next round.
type pendingSave struct {
	model tensor.Model // the round's model, served from memory until released
	done  chan struct{}
	err   error // the save's outcome, set before done is closed
	// Under Aggregator.mu:
	ended    bool // the save ended (err says how)
	readers  int  // callers using model outside the lock (useModel)
	released bool // model went back to the accumulator
}

// save writes a closed round's files and then completes it: the log line,
// the metrics, the sink.
func (a *Aggregator) save(ctx context.Context, s *savedRound, model tensor.Model, training bool) error {
	start := time.Now()
	_, span := tracing.Start(s.r.ctx, "checkpoint")
	err := a.saveRound(ctx, s.summary, model, training, s.best)
	span.End()
	if err != nil {
		return err
	}
	took := time.Since(start)
	a.cfg.Metrics.Phase(telemetry.PhaseCheckpoint, took)
	a.cfg.Metrics.RoundCompleted(time.Since(s.r.opened))
	s.r.span.End()
	// Where the end of the round went: the last results' fold and the
	// round's files (the operator's first question when rounds are slow).
	a.log.Info("round completed", "round", s.summary.Round, "reported", len(s.summary.Reported), "missing", s.summary.Missing,
		"metrics", s.summary.Aggregates, "took", time.Since(s.r.opened).Round(time.Millisecond),
		"fold", s.fold.Round(time.Millisecond), "checkpoint", took.Round(time.Millisecond))
	a.cfg.Sink.RoundCompleted(s.summary, s.best)
	return nil
}

// writeBehind starts saving a closed training round beside the next one,
// whose downloads model serves until the save has ended. Callers hold
// a.mu, and have set a.model to model.
func (a *Aggregator) writeBehind(ctx context.Context, s *savedRound, model tensor.Model) {
	p := &pendingSave{model: model, done: make(chan struct{})}
	a.pending = p
	hold := a.holdSaves
	go func() {
		var err error
		if hold != nil { // a test holds saves
			select {
			case <-hold:
			case <-ctx.Done():
				err = ctx.Err()
			}
		}
		if err == nil {
			err = a.save(ctx, s, model, true)
		}
		a.mu.Lock()
		p.err, p.ended = err, true
		giveBack := a.release(p)
		a.mu.Unlock()
		if giveBack != nil {
			a.acc.GiveBack(giveBack)
		}
		close(p.done)
		a.requestClose() // the loop learns how the save went
	}()
}

// useModel returns the model the current round started from when it is
// in memory (nil when its round file serves it), and what to call once
// done with it: until then its memory is not handed back to the
// accumulator. Callers hold a.mu; the returned function takes it.
func (a *Aggregator) useModel() (tensor.Model, func()) {
	p := a.pending
	if a.model == nil || p == nil || p.released {
		return a.model, func() {}
	}
	p.readers++
	return a.model, func() {
		a.mu.Lock()
		p.readers--
		giveBack := a.release(p)
		a.mu.Unlock()
		if giveBack != nil {
			a.acc.GiveBack(giveBack)
		}
	}
}

// release marks p's model released once its save has ended (a failed one
// too: the experiment ends then, and folds waiting for the sum must not
// wait for good) and nothing reads it, and returns it for the caller to
// give back to the accumulator after unlocking (GiveBack waits for folds
// in progress); from then on the round file serves downloads. A server
// optimiser or a strategy keeps the model, so nothing is given back.
// Callers hold a.mu.
func (a *Aggregator) release(p *pendingSave) tensor.Model {
	if !p.ended || p.readers > 0 || p.released {
		return nil
	}
	p.released = true
	if a.keepsModel() || a.acc == nil {
		return nil
	}
	if len(a.model) > 0 && len(p.model) > 0 && a.model[0] == p.model[0] {
		a.model = nil // its round file serves it (see the field)
	}
	return p.model
}

// awaitSave waits for the save running beside the round, if one is, and
// returns its error.
func (a *Aggregator) awaitSave() error {
	a.mu.Lock()
	p := a.pending
	a.mu.Unlock()
	if p == nil {
		return nil
	}
	<-p.done
	return p.err
}

// saveFailed reports the error of a save that has ended, if it failed.
func (a *Aggregator) saveFailed() error {
	a.mu.Lock()
	p := a.pending
	a.mu.Unlock()
	if p == nil {
		return nil
	}
	select {
	case <-p.done:
		return p.err
	default:
		return nil
	}
}
