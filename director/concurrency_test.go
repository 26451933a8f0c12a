package director

import (
	"fmt"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestConcurrentSubmissions races uploads of one name (exactly one wins,
// the rest get ALREADY_EXISTS) against uploads of distinct names, answers
// and heartbeats, under the race detector.
func TestConcurrentSubmissions(t *testing.T) {
	const n = 6
	f := newFed(t, func(c *Config) { c.MaxConcurrent, c.MaxUploadsPerResearcher = 2, n })
	f.register("a", "fashion")
	f.register("b", "fashion")
	same := archive(t, planTwo, nil)
	var wg sync.WaitGroup
	results := make(chan error, n)
	for i := range n {
		wg.Add(2)
		go func() {
			defer wg.Done()
			_, err := submit(ctxT(t), f.researcher("alice"), upload{plan: planTwo, data: same})
			results <- err
		}()
		go func() {
			defer wg.Done()
			plan := strings.Replace(planTwo, "name: fashion", fmt.Sprintf("name: other-%d", i), 1)
			e, err := submit(ctxT(t), f.researcher("bob"), upload{plan: plan, data: archive(t, plan, nil)})
			if err != nil {
				t.Errorf("distinct name %d: %v", i, err)
				return
			}
			for _, env := range []string{"a", "b"} {
				_ = f.heartbeat(env)
				// The offer may not have reached this experiment yet
				// (queued) or may have closed: only the codes matter.
				if _, err := f.answer(env, e.Id, true); err != nil && code(err) != codes.NotFound && code(err) != codes.FailedPrecondition {
					t.Errorf("answer: %v", err)
				}
			}
		}()
	}
	wg.Wait()
	close(results)
	won := 0
	for err := range results {
		switch code(err) {
		case codes.OK:
			won++
		case codes.AlreadyExists:
		default:
			t.Errorf("same-name upload: %v", err)
		}
	}
	if won != 1 {
		t.Errorf("%d uploads of one name succeeded, want exactly 1", won)
	}
	resp, err := f.admin().ListExperiments(ctxT(t), &fxv1.ListExperimentsRequest{States: []fxv1.ExperimentState{fxv1.ExperimentState_OFFERED, fxv1.ExperimentState_RUNNING}})
	must(t, err)
	if len(resp.GetExperiments()) > 2 {
		t.Errorf("%d experiments offered or running, max_concurrent_experiments is 2", len(resp.GetExperiments()))
	}
}
