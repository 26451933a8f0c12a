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
)

// fakeAggregator answers GetTasks with one fixed answer, over mTLS with the
// director's certificate, as a real aggregator presents it.
type fakeAggregator struct {
	fxv1.UnimplementedAggregatorServer
	quit string
	err  error

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
	if a.err != nil {
		return nil, a.err
	}
	return &fxv1.GetTasksResponse{Action: fxv1.GetTasksResponse_QUIT, Reason: a.quit}, nil
}

func startAggregator(t *testing.T, a *fakeAggregator) string {
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
	return lis.Addr().String()
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
			addr := startAggregator(t, tc.agg)
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
