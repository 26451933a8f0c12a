package membudget

import (
	"math"
	"runtime"
	"runtime/debug"
	"testing"
)

// goLimit is the memory limit the runtime holds now.
func goLimit() int64 { return debug.SetMemoryLimit(-1) }

func TestReservationsSetTheLimit(t *testing.T) {
	if operator {
		t.Skip("GOMEMLIMIT is set in this environment")
	}
	before := goLimit()
	defer debug.SetMemoryLimit(before)
	if goLimit() != math.MaxInt64 {
		t.Fatalf("limit %d with nothing reserved, want none", goLimit())
	}
	a := Reserve(1<<30, 0)
	if got := goLimit(); got != base+1<<30 || base < Base {
		t.Fatalf("one reservation of 1 GiB: limit %d, base %d", got, base)
	}
	b := Reserve(512<<20, 0)
	if got := goLimit(); got != base+1<<30+512<<20 {
		t.Fatalf("two reservations: limit %d", got)
	}
	a()
	a() // a second release changes nothing
	if got := goLimit(); got != base+512<<20 {
		t.Fatalf("after releasing the first: limit %d", got)
	}
	b()
	if got := goLimit(); got != math.MaxInt64 {
		t.Fatalf("after releasing both: limit %d, want none", got)
	}
}

func TestOperatorsLimitWins(t *testing.T) {
	saved := operator
	defer func() { operator = saved }()
	operator = true
	before := goLimit()
	release := Reserve(1<<30, 0)
	defer release()
	if got := goLimit(); got != before {
		t.Fatalf("with GOMEMLIMIT set, a reservation changed the limit from %d to %d", before, got)
	}
}

// sink keeps a test's allocation reachable until the test drops it.
var sink []byte

// A model the process held when the runtime last collected, and has
// dropped since, is garbage: the first reservation must not count it as
// what the process needs besides, or the limit keeps it for good.
func TestGarbageIsNotCountedInTheBase(t *testing.T) {
	if operator {
		t.Skip("GOMEMLIMIT is set in this environment")
	}
	before := goLimit()
	defer debug.SetMemoryLimit(before)
	const model = 256 << 20
	sink = make([]byte, model)
	for i := range sink {
		sink[i] = 1
	}
	runtime.GC() // the last collection finds the model live
	sink = nil
	release := Reserve(1<<30, 0)
	defer release()
	if base >= Base+model {
		t.Fatalf("base %d MiB counts the dropped %d MiB model (Base %d MiB)", base>>20, model>>20, Base>>20)
	}
}
