package envoy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fx-fl/fx/internal/backoff"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// defaultHeartbeat is used when the director names no period; minHeartbeat
// keeps a director that answers zero from turning heartbeats into a busy loop.
const (
	defaultHeartbeat = 10 * time.Second
	minHeartbeat     = 10 * time.Millisecond
)

// sessions keeps a session with the director until ctx ends: register,
// then heartbeat and watch assignments; on any failure, back off and start
// again with a registration. Registering is idempotent, so starting over is
// always safe, and it is what a director that lost the envoy (it answers
// FAILED_PRECONDITION) asks for.
func (e *Envoy) sessions(ctx context.Context) {
	b := backoff.New(e.cfg.Retry.schedule())
	for {
		var healthy atomic.Bool
		err := e.session(ctx, &healthy)
		if ctx.Err() != nil {
			return
		}
		if healthy.Load() {
			b.Reset()
		}
		e.linkDown(err)
		if !b.Wait(ctx) {
			return
		}
	}
}

// session runs one registration and what follows it until either the
// heartbeats or the assignment stream fail. healthy is set once the session
// proved itself (a heartbeat answered or an assignment arrived), so the
// next failure starts from the shortest backoff again.
func (e *Envoy) session(ctx context.Context, healthy *atomic.Bool) error {
	rctx, cancel := e.rpcContext(ctx)
	resp, err := e.client.RegisterEnvoy(rctx, &fxv1.RegisterEnvoyRequest{
		EnvoyName:      e.name,
		Shard:          e.shard,
		MaxExperiments: int32(e.cfg.MaxExperiments),
		Version:        e.cfg.Version,
	})
	cancel()
	if err != nil {
		return fmt.Errorf("registering: %w", err)
	}
	e.linkUp()

	sctx, stop := context.WithCancel(ctx)
	defer stop()
	errc := make(chan error, 2)
	go func() { errc <- e.heartbeats(sctx, resp.GetHeartbeatPeriod(), healthy) }()
	go func() { errc <- e.watch(sctx, healthy) }()
	err = <-errc
	stop()
	<-errc
	return err
}

// heartbeats tells the director the envoy is alive, at the period it asks.
func (e *Envoy) heartbeats(ctx context.Context, first *durationpb.Duration, healthy *atomic.Bool) error {
	t := time.NewTimer(period(first))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		rctx, cancel := e.rpcContext(ctx)
		resp, err := e.client.Heartbeat(rctx, &fxv1.HeartbeatRequest{EnvoyName: e.name, RunningExperiments: e.running()})
		cancel()
		if err != nil {
			return fmt.Errorf("heartbeat: %w", err)
		}
		healthy.Store(true)
		t.Reset(period(resp.GetNextHeartbeat()))
	}
}

func period(d *durationpb.Duration) time.Duration {
	if d == nil || d.AsDuration() <= 0 {
		return defaultHeartbeat
	}
	return max(d.AsDuration(), minHeartbeat)
}

// watch receives assignments until the stream fails. The director replays
// current assignments on every new stream; handle treats repeats as no-ops.
func (e *Envoy) watch(ctx context.Context, healthy *atomic.Bool) error {
	stream, err := e.client.WatchAssignments(ctx, &fxv1.WatchAssignmentsRequest{EnvoyName: e.name})
	if err != nil {
		return fmt.Errorf("watching assignments: %w", err)
	}
	for {
		a, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return errStreamClosed
		}
		if err != nil {
			return fmt.Errorf("watching assignments: %w", err)
		}
		healthy.Store(true)
		e.handle(a)
	}
}

// linkUp logs that the envoy is connected, once per change of state.
func (e *Envoy) linkUp() {
	e.mu.Lock()
	prev := e.link
	e.link = linkUp
	e.mu.Unlock()
	if prev != linkUp {
		e.log.Info("connected to the director", "address", e.cfg.Director.Address)
	}
}

// linkDown logs the loss of the director once; further failed attempts go
// to the debug level, so a long outage does not flood the log.
func (e *Envoy) linkDown(err error) {
	e.mu.Lock()
	prev := e.link
	e.link = linkDown
	e.mu.Unlock()
	switch {
	case prev == linkUp && status.Code(err) == codes.FailedPrecondition:
		e.log.Warn("the director no longer knows this envoy (it restarted?); registering again", "error", err)
	case prev == linkUp:
		e.log.Warn("disconnected from the director; reconnecting with backoff", "error", err)
	case prev == linkUnknown:
		e.log.Warn("cannot reach the director; retrying with backoff", "address", e.cfg.Director.Address, "error", err)
	default:
		e.log.Debug("director still unreachable", "error", err)
	}
}
