// Package idle bounds a transfer by its progress rather than by its
// length: a stream of a model or an archive may take as long as its size
// needs, but not stand still. A fixed deadline would either cut off a
// model big enough or wait that long for a hung peer.
package idle

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// ErrStalled is the cause of a context Watch cancelled.
var ErrStalled = errors.New("the transfer made no progress")

// Watch returns a context that is cancelled, with cause ErrStalled, once d
// passes without a call to progress. Call stop when the transfer ends.
func Watch(ctx context.Context, d time.Duration) (wctx context.Context, progress func(), stop func()) {
	wctx, cancel := context.WithCancelCause(ctx)
	t := time.AfterFunc(d, func() { cancel(fmt.Errorf("%w for %s", ErrStalled, d)) })
	return wctx, func() { t.Reset(d) }, func() { t.Stop(); cancel(context.Canceled) }
}

// Stalled returns the stall that ended wctx (a context from Watch), or nil
// if it did not stall: the parent ended, or it is still going.
func Stalled(wctx context.Context) error {
	if err := context.Cause(wctx); errors.Is(err, ErrStalled) {
		return err
	}
	return nil
}
