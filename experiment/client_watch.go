package experiment

import (
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// ErrGap is matched by the error Metrics yields if the director skipped a
// sequence number; the director promises it never does, so this means a
// director that lost part of its state.
var ErrGap = errors.New("gap in the metric sequence")

// Metrics yields the experiment's metric events in sequence order, starting
// after afterSequence (0 for all), and ends when the experiment has ended
// and its last event was yielded. A dropped connection or a restarting
// director does not end it: it reconnects with bounded exponential backoff
// and resumes after the last event it yielded, so the caller sees every
// event exactly once. It yields a non-nil error, and then stops, when the
// director refuses the watch (an unknown experiment: NotFound), when
// reconnecting has failed for Retry.GiveUpAfter, or when ctx ends.
//
// Break out of the loop to stop watching early; resume later with the last
// sequence seen.
func (c *Client) Metrics(ctx context.Context, name string, afterSequence int64) iter.Seq2[*fxv1.MetricEvent, error] {
	return func(yield func(*fxv1.MetricEvent, error) bool) {
		last := afterSequence
		bo := newBackoff(c.cfg.Retry)
		lastProgress := time.Now()
		for {
			done, progressed, err := c.watchOnce(ctx, name, &last, yield)
			if progressed {
				bo.reset()
				lastProgress = time.Now()
			}
			if done {
				return
			}
			switch {
			case err == nil:
				// The director ended the stream cleanly: the experiment has
				// ended and every event was sent.
				return
			case ctx.Err() != nil:
				yield(nil, fmt.Errorf("watching experiment %s after sequence %d: %w", name, last, ctx.Err()))
				return
			case errors.Is(err, ErrGap) || !retryable(err):
				yield(nil, err)
				return
			case time.Since(lastProgress) > c.cfg.Retry.GiveUpAfter:
				yield(nil, fmt.Errorf("gave up reconnecting after %s (resume after sequence %d): %w", c.cfg.Retry.GiveUpAfter, last, err))
				return
			}
			if bo.wait(ctx) != nil {
				yield(nil, fmt.Errorf("watching experiment %s after sequence %d: %w", name, last, ctx.Err()))
				return
			}
		}
	}
}

// watchOnce reads one WatchMetrics stream after *last, yielding new events
// and advancing *last. done is true when the caller's loop stopped (yield
// returned false). progressed says whether any event arrived.
func (c *Client) watchOnce(ctx context.Context, name string, last *int64, yield func(*fxv1.MetricEvent, error) bool) (done, progressed bool, err error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	op := fmt.Sprintf("watching experiment %s", name)
	// Fail fast rather than wait for ready: while the director is away the
	// attempt fails at once and Metrics' own backoff paces the retries and
	// gives up after Retry.GiveUpAfter, instead of blocking unboundedly.
	stream, err := c.rpc.WatchMetrics(sctx, &fxv1.WatchMetricsRequest{Experiment: Ref(name), AfterSequence: *last})
	if err != nil {
		return false, false, c.wrap(op, err)
	}
	for {
		ev, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return false, progressed, nil
		}
		if err != nil {
			return false, progressed, c.wrap(op, err)
		}
		seq := ev.GetSequence()
		switch {
		case seq <= *last:
			continue // already yielded; a director never resends, but a duplicate must not reach the caller
		case seq != *last+1:
			return false, progressed, fmt.Errorf("%s: %w: expected sequence %d, the director sent %d", op, ErrGap, *last+1, seq)
		}
		*last = seq
		progressed = true
		if !yield(ev, nil) {
			return true, progressed, nil
		}
	}
}

// EndedError is what Wait returns for an experiment that ended other than
// FINISHED: FAILED, CANCELLED or REJECTED, with the director's reason.
type EndedError struct {
	Name   string
	State  fxv1.ExperimentState
	Reason string
}

func (e *EndedError) Error() string {
	if e.Reason == "" {
		return fmt.Sprintf("experiment %s ended %s", e.Name, e.State)
	}
	return fmt.Sprintf("experiment %s ended %s: %s", e.Name, e.State, e.Reason)
}

// Ended reports whether an experiment in state s is over.
func Ended(s fxv1.ExperimentState) bool {
	switch s {
	case fxv1.ExperimentState_FINISHED, fxv1.ExperimentState_FAILED, fxv1.ExperimentState_CANCELLED, fxv1.ExperimentState_REJECTED:
		return true
	}
	return false
}

// Wait blocks until the experiment has ended and returns it. The error is
// an *EndedError carrying the reason when it ended FAILED, CANCELLED or
// REJECTED; nil when it FINISHED. It follows the metric stream, which the
// director ends when the experiment ends, so it survives dropped
// connections as Metrics does and costs no polling.
func (c *Client) Wait(ctx context.Context, name string) (*fxv1.Experiment, error) {
	return c.Follow(ctx, name, 0, nil)
}

// WaitFunc is Wait that also hands every metric event to each (when not
// nil) as it arrives: for a live view.
func (c *Client) WaitFunc(ctx context.Context, name string, each func(*fxv1.MetricEvent)) (*fxv1.Experiment, error) {
	return c.Follow(ctx, name, 0, each)
}

// Follow is WaitFunc for a watch that resumes: each sees the events after
// afterSequence, each exactly once.
func (c *Client) Follow(ctx context.Context, name string, afterSequence int64, each func(*fxv1.MetricEvent)) (*fxv1.Experiment, error) {
	last := afterSequence
	bo := newBackoff(c.cfg.Retry)
	for {
		for ev, err := range c.Metrics(ctx, name, last) {
			if err != nil {
				return nil, err
			}
			last = ev.GetSequence()
			if each != nil {
				each(ev)
			}
		}
		e, err := c.Get(ctx, name)
		if err != nil {
			return nil, err
		}
		if !Ended(e.GetState()) {
			// The stream ended cleanly but the experiment goes on, which
			// a director does not do; follow the next stream after a
			// pause rather than report an end that did not happen.
			if err := bo.wait(ctx); err != nil {
				return e, fmt.Errorf("waiting for experiment %s: %w", name, err)
			}
			continue
		}
		if e.GetState() != fxv1.ExperimentState_FINISHED {
			return e, &EndedError{Name: name, State: e.GetState(), Reason: e.GetReason()}
		}
		return e, nil
	}
}
