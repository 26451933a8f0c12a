package idle

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestProgressKeepsItGoing(t *testing.T) {
	// Progress every 10 ms for 1.5 s in all, past d: only a pause of a
	// whole second between two calls could end it.
	ctx, progress, stop := Watch(context.Background(), time.Second)
	defer stop()
	for range 150 {
		time.Sleep(10 * time.Millisecond)
		progress()
	}
	if ctx.Err() != nil || Stalled(ctx) != nil {
		t.Fatalf("a transfer that kept making progress was cancelled: %v", context.Cause(ctx))
	}
}

func TestStandingStillEndsIt(t *testing.T) {
	ctx, _, stop := Watch(context.Background(), 10*time.Millisecond)
	defer stop()
	<-ctx.Done()
	if err := Stalled(ctx); !errors.Is(err, ErrStalled) {
		t.Fatalf("Stalled = %v, want ErrStalled", err)
	}
}

func TestParentOrStopIsNoStall(t *testing.T) {
	parent, cancel := context.WithCancel(context.Background())
	ctx, _, stop := Watch(parent, time.Hour)
	defer stop()
	cancel()
	<-ctx.Done()
	if err := Stalled(ctx); err != nil {
		t.Fatalf("a cancelled parent reads as a stall: %v", err)
	}
	ctx2, _, stop2 := Watch(context.Background(), time.Hour)
	stop2()
	if err := Stalled(ctx2); err != nil || ctx2.Err() == nil {
		t.Fatalf("after stop: err %v, stall %v", ctx2.Err(), err)
	}
}
