package envoy

import (
	"context"
	"math/rand/v2"
	"time"
)

// backoff is a capped exponential delay with jitter. Jitter spreads the
// retries of many envoys after a director restart, so they do not all knock
// at the same instant.
type backoff struct {
	initial, max time.Duration
	attempt      int
}

func newBackoff(r RetryConfig) *backoff { return &backoff{initial: r.Initial, max: r.Max} }

// next returns the delay before the next attempt: a uniform draw from
// [d/2, d] where d doubles from initial up to max.
func (b *backoff) next() time.Duration {
	d := b.initial
	for i := 0; i < b.attempt && d < b.max; i++ {
		d *= 2
	}
	d = min(d, b.max)
	b.attempt++
	half := d / 2
	if half <= 0 {
		return d
	}
	return half + rand.N(d-half+1)
}

// reset starts the next failure from the initial delay again.
func (b *backoff) reset() { b.attempt = 0 }

// wait sleeps for the next delay or until ctx ends; it reports whether ctx
// is still alive.
func (b *backoff) wait(ctx context.Context) bool {
	t := time.NewTimer(b.next())
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
