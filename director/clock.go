package director

import "time"

// Clock is the director's source of time. Liveness (an envoy is offline
// after a grace period) and offer deadlines depend on it, and tests replace
// it so they can move time forward instead of sleeping.
type Clock interface {
	Now() time.Time
	// NewTicker delivers ticks every d, as time.NewTicker does.
	NewTicker(d time.Duration) Ticker
}

// Ticker is the part of *time.Ticker the director uses.
type Ticker interface {
	C() <-chan time.Time
	Stop()
}

// SystemClock is the wall clock.
type SystemClock struct{}

// Now implements Clock.
func (SystemClock) Now() time.Time { return time.Now() }

// NewTicker implements Clock.
func (SystemClock) NewTicker(d time.Duration) Ticker { return systemTicker{time.NewTicker(d)} }

type systemTicker struct{ t *time.Ticker }

func (s systemTicker) C() <-chan time.Time { return s.t.C }
func (s systemTicker) Stop()               { s.t.Stop() }
