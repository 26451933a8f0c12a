package envoy

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// fakeAggregator answers GetTasks with one fixed answer, over mTLS with the
// director's certificate, as a real aggregator presents it; with hold it
// answers nothing and holds every poll until the caller or the server goes.
type fakeAggregator struct {
	fxv1.UnimplementedAggregatorServer
	quit string
	err  error
	hold bool

	mu      sync.Mutex
	callers []string
}

func (a *fakeAggregator) GetTasks(ctx context.Context, req *fxv1.GetTasksRequest) (*fxv1.GetTasksResponse, error) {
	if err := pki.RequireCaller(ctx, req.GetCollaborator()); err != nil {
		return nil, err
	}
	a.mu.Lock()
	a.callers = append(a.callers, req.GetCollaborator())
	a.mu.Unlock()
	if a.hold {
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if a.err != nil {
		return nil, a.err
	}
	return &fxv1.GetTasksResponse{Action: fxv1.GetTasksResponse_QUIT, Reason: a.quit}, nil
}

func (a *fakeAggregator) called() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.callers)
}

// startAggregator serves a on a port of its own until the test ends or
// stop is called.
func startAggregator(t *testing.T, a *fakeAggregator) (addr string, stop func()) {
	t.Helper()
	d := getPKI(t)
	k, err := pki.NewKeyring(pki.KeyringConfig{Files: d.director})
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(pki.ServerOptions(k, pki.RulesFromProto(fxv1.AggregatorRoles()))...)
	fxv1.RegisterAggregatorServer(srv, a)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	return lis.Addr().String(), srv.Stop
}

// TestRealCollaborator runs the collaborator package with the built-in
// runner on the site's data against an aggregator over mTLS: QUIT is the
// normal end, a refusal is reported to the director.
func TestRealCollaborator(t *testing.T) {
	tests := []struct {
		name       string
		agg        *fakeAggregator
		wantReport string
	}{
		{"aggregator says quit", &fakeAggregator{quit: "finished"}, ""},
		{"aggregator refuses", &fakeAggregator{err: status.Error(codes.PermissionDenied, "not a participant")}, "not a participant"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := newFakeDirector(t)
			addr, _ := startAggregator(t, tc.agg)
			name := fmt.Sprintf("site-c%d", i)
			cfg := testConfig(t, d, name)
			cfg.Logger = nil
			e, err := New(cfg) // the default runner and collaborator
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- e.Run(ctx) }()
			defer func() {
				cancel()
				if err := <-done; err != nil {
					t.Errorf("Run: %v", err)
				}
			}()
			plan := fmt.Sprintf(softmaxPlan, "real")
			d.push(name, d.offer("exp-c", makeArchive(t, plan, 0), plan), true)
			d.answer(name, "exp-c")
			start := startAssignment("exp-c")
			start.GetStart().AggregatorAddress = addr
			start.GetStart().AggregatorServerName = "localhost"
			d.push(name, start, false)

			eventually(t, "the collaborator to end", func() bool {
				e.mu.Lock()
				defer e.mu.Unlock()
				x := e.exps["exp-c"]
				return x != nil && (x.phase == phaseFinished || x.phase == phaseFailed)
			})
			tc.agg.mu.Lock()
			callers := tc.agg.callers
			tc.agg.mu.Unlock()
			if len(callers) == 0 || callers[0] != name {
				t.Errorf("aggregator saw callers %v, want %s", callers, name)
			}
			if tc.wantReport == "" {
				d.mu.Lock()
				defer d.mu.Unlock()
				if len(d.failures) != 0 {
					t.Errorf("failures reported after QUIT: %v", d.failures)
				}
				return
			}
			d.waitFor("a failure report", func() bool { return len(d.failures) == 1 })
			d.mu.Lock()
			defer d.mu.Unlock()
			if !strings.Contains(d.failures[0].GetReason(), tc.wantReport) {
				t.Errorf("reported %q, want it to contain %q", d.failures[0].GetReason(), tc.wantReport)
			}
		})
	}
}

// TestCollaboratorFollowsMovedAggregator: a restarted director serves the
// experiment from an aggregator on a new port and says so in a new Start.
// The envoy moves its collaborator there instead of restarting it: the
// runner is built once (a task in progress would go on, and results
// already computed are sent to the new aggregator), and the experiment
// ends there normally. Meanwhile the old port may be gone, or serve
// another experiment's aggregator, which answers NOT_FOUND: neither fails
// the collaborator.
func TestCollaboratorFollowsMovedAggregator(t *testing.T) {
	for _, tc := range []struct {
		name string
		old  *fakeAggregator
		stop bool
	}{
		{"the old aggregator is gone", &fakeAggregator{hold: true}, true},
		{"the old port serves another experiment", &fakeAggregator{err: status.Error(codes.NotFound, "envoy site-f takes part in no experiment \"exp-f\" served here")}, false},
	} {
		t.Run(tc.name, func(t *testing.T) { testFollow(t, tc.old, tc.stop) })
	}
}

func testFollow(t *testing.T, old *fakeAggregator, stop bool) {
	d := newFakeDirector(t)
	oldAddr, stopOld := startAggregator(t, old)
	moved := &fakeAggregator{quit: "the experiment has finished"}
	newAddr, _ := startAggregator(t, moved)

	name := "site-f"
	cfg := testConfig(t, d, name)
	var mu sync.Mutex
	builds := 0
	cfg.NewRunner = func(in RunnerInput) (runner.Runner, error) {
		mu.Lock()
		builds++
		mu.Unlock()
		return DefaultRunner(in)
	}
	e, err := New(cfg) // the default collaborator
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	plan := fmt.Sprintf(softmaxPlan, "follow")
	d.push(name, d.offer("exp-f", makeArchive(t, plan, 0), plan), true)
	d.answer(name, "exp-f")
	start := startAssignment("exp-f")
	start.GetStart().AggregatorAddress = oldAddr
	start.GetStart().AggregatorServerName = "localhost"
	d.push(name, start, false)
	eventually(t, "the collaborator polling the first aggregator", func() bool { return old.called() > 0 })
	mu.Lock()
	before := builds // the review builds one too, to check the plan
	mu.Unlock()

	if stop {
		stopOld() // the director (and its aggregator) went away
	}
	again := startAssignment("exp-f")
	again.GetStart().AggregatorAddress = newAddr
	again.GetStart().AggregatorServerName = "localhost"
	again.GetStart().Round = 3
	d.push(name, again, false)

	eventually(t, "the collaborator to end", func() bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		x := e.exps["exp-f"]
		return x != nil && (x.phase == phaseFinished || x.phase == phaseFailed)
	})
	e.mu.Lock()
	phase := e.exps["exp-f"].phase
	e.mu.Unlock()
	if phase != phaseFinished {
		t.Errorf("the collaborator ended %s, want finished (the moved aggregator said QUIT)", phase)
	}
	if moved.called() == 0 {
		t.Error("the moved aggregator was never called")
	}
	mu.Lock()
	defer mu.Unlock()
	if builds != before {
		t.Errorf("the runner was built again after the move (%d builds, %d before): the collaborator was restarted instead of moved", builds, before)
	}
}
