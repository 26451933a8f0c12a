// Package parallel spreads independent pieces of work over every core:
// the one worker pool fx's folds, noise and unmasking use.
package parallel

import (
	"runtime"
	"sync"
	"sync/atomic"
)

// Each runs the work of pieces 0 … n−1 on every core. Each worker gets its
// function from worker(), once, so that it may keep scratch memory of its
// own between pieces. The first error stops the handing out of pieces and
// is returned (pieces already running finish).
func Each(n int, worker func() func(i int) error) error {
	var (
		next    atomic.Int64
		stopped atomic.Bool
		wg      sync.WaitGroup
		once    sync.Once
		first   error
	)
	for range min(runtime.GOMAXPROCS(0), n) {
		wg.Go(func() {
			do := worker()
			for i := int(next.Add(1) - 1); i < n && !stopped.Load(); i = int(next.Add(1) - 1) {
				if err := do(i); err != nil {
					once.Do(func() { first = err })
					stopped.Store(true)
					return
				}
			}
		})
	}
	wg.Wait()
	return first
}
