package envoy

import (
	"context"
	"fmt"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner/exec"
)

// What a site shares of its runners' output (exec.share_logs) is bounded
// here, before it leaves: a runner that prints in a tight loop costs the
// director and the researcher a line count, not a flood.
const (
	// shareRate and shareBurst are the token bucket of shared lines: on
	// average shareRate lines a second, shareBurst at once.
	shareRate  = 20
	shareBurst = 200
	// shareBuffer bounds the lines waiting to be sent; more are dropped.
	shareBuffer = 1000
	// shareBatch bounds one push.
	shareBatch = 200
	// shareLineBytes cuts longer lines.
	shareLineBytes = 1 << 10
	// shareFlush is how long a line may wait for others to share its push.
	shareFlush = time.Second
)

// logShipper sends one experiment's runner output to the director, best
// effort: lines over the rate or while the director is away are counted
// and announced as dropped, never retried at the runner's expense.
type logShipper struct {
	e  *Envoy
	id string

	mu      sync.Mutex
	buf     []*fxv1.RunnerLogLine
	dropped int
	tokens  float64
	refill  time.Time
	wake    chan struct{}
}

// shareOutput returns the runner output hook for experiment id and a stop
// function that sends what is left; nil and a no-op where the site does
// not share its runners' output.
func (e *Envoy) shareOutput(ctx context.Context, id string) (output func(exec.OutputLine), stop func()) {
	if !e.cfg.Exec.ShareLogs {
		return nil, func() {}
	}
	s := &logShipper{e: e, id: id, tokens: shareBurst, refill: time.Now(), wake: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.run(ctx)
	}()
	return s.add, func() {
		cancel()
		<-done
	}
}

// add takes a line if the rate allows; it never blocks the runner.
func (s *logShipper) add(l exec.OutputLine) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	s.tokens = min(shareBurst, s.tokens+now.Sub(s.refill).Seconds()*shareRate)
	s.refill = now
	if s.tokens < 1 || len(s.buf) >= shareBuffer {
		s.dropped++
		return
	}
	s.tokens--
	text := l.Text
	if len(text) > shareLineBytes {
		text = text[:shareLineBytes] + " …[cut]"
	}
	s.buf = append(s.buf, &fxv1.RunnerLogLine{
		Time: timestamppb.New(now), Task: l.Task, Round: int32(l.Round), Stream: l.Stream, Text: text,
	})
	if len(s.buf) >= shareBatch {
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
}

// take removes the next batch, with a note of the lines dropped before it.
func (s *logShipper) take() []*fxv1.RunnerLogLine {
	s.mu.Lock()
	defer s.mu.Unlock()
	var batch []*fxv1.RunnerLogLine
	if s.dropped > 0 {
		batch = append(batch, &fxv1.RunnerLogLine{Time: timestamppb.Now(), Stream: "fx",
			Text: fmt.Sprintf("%d lines of runner output not shared: over the site's limit of %d lines a second", s.dropped, shareRate)})
		s.dropped = 0
	}
	n := min(len(s.buf), shareBatch-len(batch))
	batch = append(batch, s.buf[:n]...)
	s.buf = s.buf[n:]
	return batch
}

// run pushes batches every shareFlush (or when one is full) until ctx
// ends, then sends what is left.
func (s *logShipper) run(ctx context.Context) {
	t := time.NewTicker(shareFlush)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			// A last push, bounded: the experiment is over for this site.
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.e.cfg.RPCTimeout)
			s.push(fctx)
			cancel()
			return
		case <-t.C:
		case <-s.wake:
		}
		s.push(ctx)
	}
}

// push sends what is waiting; lines the director does not take are
// counted as dropped.
func (s *logShipper) push(ctx context.Context) {
	for {
		batch := s.take()
		if len(batch) == 0 {
			return
		}
		rctx, cancel := s.e.rpcContext(ctx)
		_, err := s.e.client.PushRunnerLogs(rctx, &fxv1.PushRunnerLogsRequest{ExperimentId: s.id, EnvoyName: s.e.name, Lines: batch})
		cancel()
		if err != nil {
			s.e.log.Debug("runner output not shared", "experiment", s.id, "lines", len(batch), "error", err)
			s.mu.Lock()
			for _, l := range batch {
				if l.GetStream() != "fx" {
					s.dropped++
				}
			}
			s.mu.Unlock()
			return
		}
	}
}
