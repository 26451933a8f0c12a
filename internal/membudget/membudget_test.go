package membudget

import (
	"math"
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
