package backoff

import (
	"testing"
	"time"
)

func TestBackoffGrowsToCapWithJitter(t *testing.T) {
	b := New(Config{Initial: 100 * time.Millisecond, Max: time.Second})
	wantCeil := []time.Duration{100, 200, 400, 800, 1000, 1000, 1000}
	for i, ceil := range wantCeil {
		ceil *= time.Millisecond
		d := b.Next()
		if d < ceil/2 || d > ceil {
			t.Errorf("attempt %d: delay %s outside [%s, %s]", i, d, ceil/2, ceil)
		}
	}
	b.Reset()
	if d := b.Next(); d > 100*time.Millisecond {
		t.Errorf("after reset: delay %s, want at most the initial 100ms", d)
	}
}
