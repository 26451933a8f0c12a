// Package membudget sets the process's Go memory limit from what its
// parties say they hold, so that a director or an envoy handling models of
// P bytes stays near what it needs without the operator tuning GOMEMLIMIT.
//
// Left alone, Go lets the heap grow to about twice what is live before it
// collects, and every 1 MiB frame a model arrives in becomes garbage: a
// process holding two models of 1 GiB reached four. With a memory limit
// the collector runs as the heap nears it instead; the cost is small,
// because model arrays hold no pointers to scan.
//
// Each party reserves what it holds at most (an aggregator its global
// model, the round's running sum and the upload stages it keeps in memory;
// a collaborator the round's model and its trained weights) and releases
// it when it ends. The limit is the sum of the reservations plus what the
// process needs besides: Base, and what else was live when the first
// reservation was made (a director's registry of thousands of envoys, say).
// With nothing reserved there is no limit, as Go's default. A GOMEMLIMIT in the
// environment is the operator's word: then this package changes nothing.
package membudget

import (
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
)

// Base is the least the process is given besides its reservations: gRPC's
// buffers and frames in flight, the logs, the garbage between two
// collections. It is what is left of the 128 MiB a process may hold besides
// two models once the binary's own pages are counted: `fx version` peaks
// at about 50 MiB resident (44 MiB before the Kubernetes launcher, 74 MiB
// while it linked client-go's typed clientset; see director/kubeapi.go).
// With 48 MiB and the 74 MiB binary, fxbench large measured 2 × P + 117–120
// MiB at 64 MiB and 2 × P + 98–121 MiB at 512 MiB; 64 MiB went past
// 2 × P + 128 at 64 MiB then, and 32 MiB made 512 MiB rounds slower
// (collections back to back near the limit).
const Base = 48 << 20

var (
	mu       sync.Mutex
	reserved int64
	base     int64
	// operator is set when GOMEMLIMIT was in the environment at start.
	_, operator = os.LookupEnv("GOMEMLIMIT")
)

// Reserve adds n bytes to the process's memory limit until the returned
// function is called (once; later calls do nothing). held is how much of
// n the caller holds already (a model it has loaded), so that it is not
// counted twice: once in n, and once as what else the process holds.
func Reserve(n, held int64) (release func()) {
	if n <= 0 || operator {
		return func() {}
	}
	mu.Lock()
	if reserved == 0 {
		// Collect first: the last collection may have found live what is
		// garbage now (an aggregator's initial model, written to its round
		// file and dropped), which would stay in the limit for good.
		runtime.GC()
		base = Base + max(0, liveHeap()-held)
	}
	reserved += n
	apply()
	mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			mu.Lock()
			reserved -= n
			apply()
			mu.Unlock()
		})
	}
}

func limitLocked() int64 {
	if reserved == 0 || operator {
		return math.MaxInt64
	}
	return base + reserved
}

// apply sets the limit; the caller holds mu.
func apply() {
	if !operator {
		debug.SetMemoryLimit(limitLocked())
	}
}

// liveHeap is the heap the last collection found live.
func liveHeap() int64 {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return int64(s[0].Value.Uint64())
}
