package parallel

import (
	"errors"
	"sync/atomic"
	"testing"
)

// Every piece runs once, and each worker's function is made once.
func TestEachRunsEveryPieceOnce(t *testing.T) {
	const n = 10000
	var runs [n]atomic.Int32
	var workers atomic.Int32
	err := Each(n, func() func(int) error {
		workers.Add(1)
		return func(i int) error { runs[i].Add(1); return nil }
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := range runs {
		if got := runs[i].Load(); got != 1 {
			t.Fatalf("piece %d ran %d times", i, got)
		}
	}
	if w := workers.Load(); w < 1 || int(w) > n {
		t.Fatalf("%d workers", w)
	}
}

// The first error stops the work and is returned.
func TestEachStopsAtTheFirstError(t *testing.T) {
	boom := errors.New("boom")
	var ran atomic.Int32
	err := Each(1_000_000, func() func(int) error {
		return func(i int) error {
			ran.Add(1)
			if i == 10 {
				return boom
			}
			return nil
		}
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Each returned %v, want the piece's error", err)
	}
	if ran.Load() == 1_000_000 {
		t.Fatal("every piece ran although piece 10 failed")
	}
}
