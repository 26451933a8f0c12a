// Package backoff is a site's one retry schedule: capped exponential delays
// with jitter. The envoy's session with the director, its calls, its
// collaborators' calls to aggregators and the gRPC connections under all of
// them wait by it, so the site's retry.max bounds every pause between two
// attempts to reach a party that went away, whichever layer notices first.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"

	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
)

// Config is a schedule: the first delay and the largest.
type Config struct {
	Initial, Max time.Duration
}

// Backoff is one retry loop's position in its schedule.
type Backoff struct {
	cfg     Config
	attempt int
}

// New starts a loop at cfg.Initial.
func New(cfg Config) *Backoff { return &Backoff{cfg: cfg} }

// Next returns the delay before the next attempt: a uniform draw from
// [d/2, d] where d doubles from Initial up to Max. Jitter spreads the
// retries of many sites after a director restart, so they do not all knock
// at the same instant.
func (b *Backoff) Next() time.Duration {
	d := b.cfg.Initial
	for i := 0; i < b.attempt && d < b.cfg.Max; i++ {
		d *= 2
	}
	d = min(d, b.cfg.Max)
	b.attempt++
	half := d / 2
	if half <= 0 {
		return d
	}
	return half + rand.N(d-half+1)
}

// Reset starts the next failure from the initial delay again.
func (b *Backoff) Reset() { b.attempt = 0 }

// Wait sleeps for the next delay or until ctx ends; it reports whether ctx
// is still alive.
func (b *Backoff) Wait(ctx context.Context) bool { return Sleep(ctx, b.Next()) }

// Sleep waits for d or until ctx ends; it reports whether ctx is still
// alive.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// grpcJitter is the jitter of gRPC's reconnection delays: each is its
// capped delay times a factor in [1-grpcJitter, 1+grpcJitter].
const grpcJitter = 0.2

// DialOption makes a gRPC connection reconnect on this schedule. Without
// it gRPC waits up to 2 minutes between attempts to reach a server that
// went away, whatever the caller's own loop does (a call on a connection
// that is waiting to reconnect fails at once), so a director back after a
// minute's outage would not be found for another minute. The cap is set so
// that the jittered delay stays within Max.
func (c Config) DialOption() grpc.DialOption {
	maxDelay := time.Duration(float64(c.Max) / (1 + grpcJitter))
	return grpc.WithConnectParams(grpc.ConnectParams{
		Backoff: grpcbackoff.Config{
			BaseDelay:  min(c.Initial, maxDelay),
			Multiplier: 1.6,
			Jitter:     grpcJitter,
			MaxDelay:   maxDelay,
		},
		// gRPC's default: how long one attempt may take to connect.
		MinConnectTimeout: 20 * time.Second,
	})
}
