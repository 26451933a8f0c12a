package experiment_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/director"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/testfed"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/tensor"
)

// checkSequence fails unless events are numbered from+1, from+2, ...
// without a gap or a repeat.
func checkSequence(t *testing.T, events []*fxv1.MetricEvent, from int64, want int) {
	t.Helper()
	for i, ev := range events {
		if ev.GetSequence() != from+int64(i)+1 {
			t.Fatalf("event %d has sequence %d, want %d: a gap or a repeat", i, ev.GetSequence(), from+int64(i)+1)
		}
	}
	if len(events) != want {
		t.Fatalf("%d events, want %d", len(events), want)
	}
}

// TestClientExperimentLifecycle drives every call of the client against a
// real federation: submit a directory, wait for the run to finish, read its
// metrics, list and get it, download its models to memory and to a file,
// and remove it.
func TestClientExperimentLifecycle(t *testing.T) {
	f := newFederation(t)
	c := f.dial(f.config(pki.RoleResearcher, "alice"))
	ctx, cancel := context.WithTimeout(f.Ctx, 2*time.Minute)
	defer cancel()

	if id := c.Identity(); id.Name != "alice" || id.Role != pki.RoleResearcher {
		t.Errorf("identity = %v", id)
	}
	// The envoys register shortly after start; the director's own list is
	// the condition to wait on.
	var envoys []*fxv1.EnvoyInfo
	deadline := time.Now().Add(20 * time.Second)
	for len(envoys) < 2 {
		var err error
		if envoys, err = c.Envoys(ctx); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("envoys = %v, want site-1 and site-2", envoys)
		}
	}
	if got, err := c.Envoys(ctx, "synthetic"); err != nil || len(got) != 2 {
		t.Errorf("Envoys(synthetic) = %d envoys, %v", len(got), err)
	}
	if got, err := c.Envoys(ctx, "mri"); err != nil || len(got) != 0 {
		t.Errorf("Envoys(mri) = %v, %v", got, err)
	}
	if got, err := c.Search(ctx, []string{"synthetic"}, nil, nil); err != nil || len(got) != 2 {
		t.Errorf("Search(synthetic) = %v, %v", got, err)
	}
	if got, err := c.Search(ctx, []string{"synthetic"}, []int64{28, 28}, nil); err != nil || len(got) != 0 {
		t.Errorf("Search(synthetic, 28x28) = %v, %v", got, err)
	}

	var progress []int64
	var total int64
	e, err := c.Submit(ctx, planDir(t, "synth", 2, 2), experiment.SubmitOptions{Name: "run-1", Progress: func(sent, size int64) {
		progress = append(progress, sent)
		total = size
	}})
	if err != nil {
		t.Fatal(err)
	}
	if e.GetName() != "run-1" || e.GetOwner() != "alice" || e.GetArchiveSize() != total {
		t.Errorf("submitted %v (archive of %d bytes)", e, total)
	}
	if len(progress) == 0 || progress[len(progress)-1] != total {
		t.Errorf("progress %v, want it to end at %d", progress, total)
	}

	final, err := c.Wait(ctx, "run-1")
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	if final.GetState() != fxv1.ExperimentState_FINISHED || final.GetBest() == nil || final.GetRound() != 2 {
		t.Fatalf("final %v", final)
	}

	var events []*fxv1.MetricEvent
	for ev, err := range c.Metrics(ctx, "run-1", 0) {
		if err != nil {
			t.Fatal(err)
		}
		events = append(events, ev)
	}
	checkSequence(t, events, 0, eventsPerRun(2))
	var tail []*fxv1.MetricEvent
	for ev, err := range c.Metrics(ctx, "run-1", 15) {
		if err != nil {
			t.Fatal(err)
		}
		tail = append(tail, ev)
	}
	checkSequence(t, tail, 15, eventsPerRun(2)-15)

	got, err := c.Get(ctx, "run-1")
	if err != nil || got.GetId() != e.GetId() {
		t.Errorf("Get = %v, %v", got, err)
	}
	if list, err := c.List(ctx); err != nil || len(list) != 1 || list[0].GetId() != e.GetId() {
		t.Errorf("List = %v, %v", list, err)
	}
	if list, err := c.List(ctx, fxv1.ExperimentState_RUNNING); err != nil || len(list) != 0 {
		t.Errorf("List(RUNNING) = %v, %v", list, err)
	}

	best, info, err := c.Model(ctx, "run-1", experiment.SelectBest)
	if err != nil {
		t.Fatal(err)
	}
	if len(best) == 0 || info.GetRound() != final.GetBest().GetRound() {
		t.Errorf("best model: %d tensors, round %d, want round %d", len(best), info.GetRound(), final.GetBest().GetRound())
	}
	path := filepath.Join(t.TempDir(), "last.safetensors")
	info, err = c.ModelToFile(ctx, "run-1", experiment.SelectLast, path)
	if err != nil {
		t.Fatal(err)
	}
	fromFile, _, err := tensor.ReadFile(path)
	if err != nil || info.GetRound() != 2 {
		t.Fatalf("last model file: round %d, %v", info.GetRound(), err)
	}
	round2, _, err := c.Model(ctx, "run-1", experiment.SelectRound(2))
	if err != nil {
		t.Fatal(err)
	}
	if err := round2.Matches(fromFile); err != nil {
		t.Errorf("round 2 and last differ: %v", err)
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Errorf("download left %d files behind, want only the model", len(entries))
	}

	// Another researcher does not see it; an admin names it OWNER/NAME.
	bob := f.dial(f.config(pki.RoleResearcher, "bob"))
	if _, err := bob.Get(ctx, "run-1"); status.Code(err) != codes.NotFound {
		t.Errorf("bob's Get of alice's experiment: %v", err)
	}
	if list, err := bob.List(ctx); err != nil || len(list) != 0 {
		t.Errorf("bob's List = %v, %v", list, err)
	}
	admin := f.dial(f.config(pki.RoleAdmin, "root"))
	if got, err := admin.Get(ctx, "alice/run-1"); err != nil || got.GetId() != e.GetId() {
		t.Errorf("admin Get(alice/run-1) = %v, %v", got, err)
	}
	if _, err := bob.Submit(ctx, planDir(t, "run-1", 1, 3), experiment.SubmitOptions{}); err != nil {
		t.Errorf("bob may use a name alice uses: %v", err)
	}
	if list, err := admin.List(ctx); err != nil || len(list) != 2 {
		t.Errorf("admin List = %d experiments, %v; want alice's and bob's", len(list), err)
	}
	if list, err := admin.ListOf(ctx, "bob"); err != nil || len(list) != 1 || list[0].GetOwner() != "bob" {
		t.Errorf("admin ListOf(bob) = %v, %v", list, err)
	}
	if list, err := bob.ListOf(ctx, "alice"); err != nil || len(list) != 1 || list[0].GetOwner() != "bob" {
		t.Errorf("bob's ListOf(alice) = %v, %v; want only bob's own", list, err)
	}

	if _, err := c.Cancel(ctx, "run-1", "too late"); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("Cancel of a finished experiment: %v", err)
	}
	if err := c.Remove(ctx, "run-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, "run-1"); status.Code(err) != codes.NotFound {
		t.Errorf("Get after Remove: %v", err)
	}
}

// cutter is a stream interceptor that breaks WatchMetrics streams after
// given cumulative numbers of events, as a dropped connection would: the
// stream is cancelled and the receiver sees Unavailable. It records the
// after_sequence of every stream opened.
type cutter struct {
	mu     sync.Mutex
	cuts   []int // cumulative event counts to cut after, ascending
	seen   int
	afters []int64
}

func (c *cutter) intercept(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	if !strings.HasSuffix(method, "/WatchMetrics") {
		return streamer(ctx, desc, cc, method, opts...)
	}
	ctx, cancel := context.WithCancel(ctx)
	s, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		cancel()
		return nil, err
	}
	return &cutStream{ClientStream: s, c: c, cancel: cancel}, nil
}

type cutStream struct {
	grpc.ClientStream
	c      *cutter
	cancel context.CancelFunc
}

func (s *cutStream) SendMsg(m any) error {
	if req, ok := m.(*fxv1.WatchMetricsRequest); ok {
		s.c.mu.Lock()
		s.c.afters = append(s.c.afters, req.GetAfterSequence())
		s.c.mu.Unlock()
	}
	return s.ClientStream.SendMsg(m)
}

func (s *cutStream) RecvMsg(m any) error {
	s.c.mu.Lock()
	cut := len(s.c.cuts) > 0 && s.c.seen == s.c.cuts[0]
	if cut {
		s.c.cuts = s.c.cuts[1:]
	}
	s.c.mu.Unlock()
	if cut {
		s.cancel()
		return status.Error(codes.Unavailable, "test: connection cut")
	}
	err := s.ClientStream.RecvMsg(m)
	if err == nil {
		s.c.mu.Lock()
		s.c.seen++
		s.c.mu.Unlock()
	}
	return err
}

// TestClientMetricsResumeAfterCut cuts the metric stream after various
// numbers of events, once or several times: the iterator reconnects and
// resumes after the last event it delivered, so the caller sees every
// event exactly once.
func TestClientMetricsResumeAfterCut(t *testing.T) {
	f := newFederation(t)
	ctx, cancel := context.WithTimeout(f.Ctx, 2*time.Minute)
	defer cancel()
	plain := f.dial(f.config(pki.RoleResearcher, "alice"))
	if _, err := plain.Submit(ctx, planDir(t, "synth", 2, 2), experiment.SubmitOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := plain.Wait(ctx, "synth"); err != nil {
		t.Fatal(err)
	}
	total := eventsPerRun(2)

	tests := []struct {
		name  string
		after int64
		cuts  []int
	}{
		{"before the first event", 0, []int{0}},
		{"after one event", 0, []int{1}},
		{"mid-way", 0, []int{10}},
		{"twice in a row", 0, []int{5, 5}},
		{"three times", 0, []int{3, 9, 20}},
		{"resumed watch cut again", 7, []int{4}},
		{"just before the end", 0, []int{total - 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cut := &cutter{cuts: slices.Clone(tt.cuts)}
			cfg := f.config(pki.RoleResearcher, "alice")
			cfg.DialOptions = []grpc.DialOption{grpc.WithChainStreamInterceptor(cut.intercept)}
			c := f.dial(cfg)
			var events []*fxv1.MetricEvent
			for ev, err := range c.Metrics(ctx, "synth", tt.after) {
				if err != nil {
					t.Fatalf("after %d events: %v", len(events), err)
				}
				events = append(events, ev)
			}
			checkSequence(t, events, tt.after, total-int(tt.after))
			if len(cut.cuts) != 0 {
				t.Fatalf("cuts %v never happened", cut.cuts)
			}
			// Every reconnect asked for the events after the last one
			// delivered.
			want := []int64{tt.after}
			for _, n := range tt.cuts {
				want = append(want, tt.after+int64(n))
			}
			if !slices.Equal(cut.afters, want) {
				t.Errorf("streams opened after sequences %v, want %v", cut.afters, want)
			}
		})
	}
}

// TestClientWatchAcrossDirectorRestart restarts the director while a
// watcher is mid-way through a live experiment: the watcher reconnects to
// the new director and sees every event once, and Wait reports the end.
func TestClientWatchAcrossDirectorRestart(t *testing.T) {
	f := newFederation(t)
	ctx, cancel := context.WithTimeout(f.Ctx, 2*time.Minute)
	defer cancel()
	opens := &cutter{} // cuts nothing; records the streams opened
	cfg := f.config(pki.RoleResearcher, "alice")
	cfg.DialOptions = []grpc.DialOption{grpc.WithChainStreamInterceptor(opens.intercept)}
	c := f.dial(cfg)
	if _, err := c.Submit(ctx, planDir(t, "synth", 4, 2), experiment.SubmitOptions{}); err != nil {
		t.Fatal(err)
	}
	var events []*fxv1.MetricEvent
	restarted := false
	for ev, err := range c.Metrics(ctx, "synth", 0) {
		if err != nil {
			t.Fatalf("after %d events: %v", len(events), err)
		}
		events = append(events, ev)
		if !restarted && ev.GetCollaborator() == "" {
			f.RestartDirector()
			restarted = true
		}
	}
	checkSequence(t, events, 0, eventsPerRun(4))
	opens.mu.Lock()
	afters := opens.afters
	opens.mu.Unlock()
	t.Logf("metric streams opened after sequences %v", afters)
	if len(afters) < 2 || afters[0] != 0 {
		t.Errorf("metric streams opened after sequences %v: the watch never reconnected", afters)
	}
	e, err := c.Wait(ctx, "synth")
	if err != nil || e.GetState() != fxv1.ExperimentState_FINISHED {
		t.Fatalf("Wait = %v, %v", e, err)
	}
}

// TestClientWaitReportsEnds: Wait returns an *EndedError with the state and
// the director's reason for an experiment that ends other than FINISHED:
// one cancelled while it waits for a third site (the federation has two),
// and one an admin rejects at review under the manual policy.
func TestClientWaitReportsEnds(t *testing.T) {
	tests := []struct {
		name   string
		manual bool
		end    func(t *testing.T, f *federation, ctx context.Context, c *experiment.Client)
		state  fxv1.ExperimentState
		reason string
		plan   string // replaces the plan when set
	}{
		{"failed", false, func(*testing.T, *federation, context.Context, *experiment.Client) {},
			fxv1.ExperimentState_FAILED, "accept_timeout",
			"name: exp\nrounds: 1\nparticipants: {min: 3, accept_timeout: 500ms}\nrunner: {kind: builtin, model: softmax}\n"},
		{"cancelled", false, func(t *testing.T, _ *federation, ctx context.Context, c *experiment.Client) {
			if _, err := c.Cancel(ctx, "exp", "not enough sites today"); err != nil {
				t.Fatal(err)
			}
		}, fxv1.ExperimentState_CANCELLED, "not enough sites today", ""},
		{"rejected", true, func(t *testing.T, f *federation, ctx context.Context, _ *experiment.Client) {
			k := f.CA.Keyring(pki.RoleAdmin, "root")
			conn, err := pki.NewClient(f.Addr, k, "localhost")
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_, err = fxv1.NewDirectorClient(conn).RejectExperiment(ctx, &fxv1.ReviewExperimentRequest{
				Experiment: &fxv1.ExperimentRef{Name: "exp", Owner: "alice"}, Reason: "uses too much memory"})
			if err != nil {
				t.Fatal(err)
			}
		}, fxv1.ExperimentState_REJECTED, "uses too much memory", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFederation(t)
			if tt.manual {
				f.Settings.ReviewPolicy = director.ReviewManual
				f.RestartDirector()
			}
			ctx, cancel := context.WithTimeout(f.Ctx, time.Minute)
			defer cancel()
			c := f.dial(f.config(pki.RoleResearcher, "alice"))
			dir := planDir(t, "exp", 1, 3)
			if tt.plan != "" {
				if err := os.WriteFile(filepath.Join(dir, "plan.yaml"), []byte(tt.plan), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := c.Submit(ctx, dir, experiment.SubmitOptions{}); err != nil {
				t.Fatal(err)
			}
			type result struct {
				e   *fxv1.Experiment
				err error
			}
			done := make(chan result, 1)
			go func() {
				e, err := c.Wait(ctx, "exp")
				done <- result{e, err}
			}()
			tt.end(t, f, ctx, c)
			r := <-done
			var ended *experiment.EndedError
			if !errors.As(r.err, &ended) || ended.State != tt.state || !strings.Contains(r.err.Error(), tt.reason) || r.e.GetState() != tt.state {
				t.Fatalf("Wait = %v, %v; want %v with the reason", r.e, r.err, tt.state)
			}
			t.Log(r.err)
		})
	}
}

// TestClientBadInput: every mistake reaches the caller as a message that
// names the problem, and none of them hangs.
func TestClientBadInput(t *testing.T) {
	f := newFederation(t)
	ctx, cancel := context.WithTimeout(f.Ctx, time.Minute)
	defer cancel()
	c := f.dial(f.config(pki.RoleResearcher, "alice"))
	if _, err := c.Submit(ctx, planDir(t, "taken", 1, 3), experiment.SubmitOptions{}); err != nil {
		t.Fatal(err)
	}
	noPlan := t.TempDir()
	if err := os.WriteFile(filepath.Join(noPlan, "train.py"), []byte("print(1)\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	badPlan := planDir(t, "x", 1, 1)
	if err := os.WriteFile(filepath.Join(badPlan, "plan.yaml"), []byte("name: x\nrounds: 0\nrunner: {kind: builtin, model: softmax}\ncolour: blue\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	unreachable := f.config(pki.RoleResearcher, "alice")
	unreachable.Director = testfed.FreeAddr(t)
	unreachable.ConnectTimeout = 500 * time.Millisecond

	tests := []struct {
		name     string
		call     func() error
		code     codes.Code // when the director answered
		contains []string
	}{
		{"directory without plan.yaml", func() error {
			_, err := c.Submit(ctx, noPlan, experiment.SubmitOptions{})
			return err
		}, codes.Unknown, []string{noPlan, "has no plan.yaml"}},
		{"path that does not exist", func() error {
			_, err := experiment.PrepareUpload(filepath.Join(noPlan, "nope"))
			return err
		}, codes.Unknown, []string{"does not exist"}},
		{"invalid plan", func() error {
			_, err := c.Submit(ctx, badPlan, experiment.SubmitOptions{})
			return err
		}, codes.Unknown, []string{"colour", "unknown key"}},
		{"name already taken", func() error {
			_, err := c.Submit(ctx, planDir(t, "taken", 1, 3), experiment.SubmitOptions{})
			return err
		}, codes.AlreadyExists, []string{"taken"}},
		{"bad name", func() error {
			_, err := c.Submit(ctx, planDir(t, "ok", 1, 1), experiment.SubmitOptions{Name: "../etc"})
			return err
		}, codes.Unknown, []string{"../etc"}},
		{"get unknown experiment", func() error { _, err := c.Get(ctx, "ghost"); return err }, codes.NotFound, []string{"ghost"}},
		{"cancel unknown experiment", func() error { _, err := c.Cancel(ctx, "ghost", ""); return err }, codes.NotFound, []string{"ghost"}},
		{"remove unknown experiment", func() error { return c.Remove(ctx, "ghost") }, codes.NotFound, []string{"ghost"}},
		{"remove running experiment", func() error { return c.Remove(ctx, "taken") }, codes.FailedPrecondition, []string{"taken"}},
		{"model of unknown experiment", func() error { _, _, err := c.Model(ctx, "ghost", experiment.SelectBest); return err }, codes.NotFound, []string{"ghost"}},
		{"model before any round", func() error {
			_, err := c.ModelToFile(ctx, "taken", experiment.SelectLast, filepath.Join(t.TempDir(), "m.safetensors"))
			return err
		}, codes.NotFound, []string{"taken"}},
		{"watch unknown experiment", func() error {
			for _, err := range c.Metrics(ctx, "ghost", 0) {
				return err
			}
			return nil
		}, codes.NotFound, []string{"ghost"}},
		{"wait on unknown experiment", func() error { _, err := c.Wait(ctx, "ghost"); return err }, codes.NotFound, []string{"ghost"}},
		{"envoy certificate", func() error {
			_, err := experiment.Dial(ctx, f.config(pki.RoleEnvoy, "site-1"))
			if !errors.Is(err, experiment.ErrWrongRole) {
				t.Errorf("error %v does not match ErrWrongRole", err)
			}
			return err
		}, codes.Unknown, []string{"envoy", "site-1", "researcher"}},
		{"unreachable director", func() error {
			start := time.Now()
			_, err := experiment.Dial(ctx, unreachable)
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("Dial took %s with a 500ms connect timeout", d)
			}
			return err
		}, codes.Unknown, []string{unreachable.Director, "cannot reach"}},
		{"nothing listens: refused at once", func() error {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			cfg := f.config(pki.RoleResearcher, "alice")
			cfg.Director = l.Addr().String()
			l.Close()
			cfg.ConnectTimeout = time.Hour // a refused connection does not wait for it
			start := time.Now()
			_, err = experiment.Dial(ctx, cfg)
			if d := time.Since(start); d > time.Minute || !errors.Is(err, experiment.ErrUnreachable) {
				t.Errorf("Dial took %s, error %v; want ErrUnreachable at once", d, err)
			}
			return err
		}, codes.Unknown, []string{"connection refused", "is the director running"}},
		{"wrong server name: refused at once", func() error {
			cfg := f.config(pki.RoleResearcher, "alice")
			cfg.ServerName = "director.example.org"
			cfg.ConnectTimeout = time.Hour
			start := time.Now()
			_, err := experiment.Dial(ctx, cfg)
			if d := time.Since(start); d > time.Minute || !errors.Is(err, experiment.ErrUnreachable) {
				t.Errorf("Dial took %s, error %v; want ErrUnreachable at once", d, err)
			}
			return err
		}, codes.Unknown, []string{"does not carry the name", "director.example.org", "--server-name"}},
		{"missing certificate", func() error {
			cfg := f.config(pki.RoleResearcher, "alice")
			cfg.Cert = filepath.Join(noPlan, "alice.crt")
			_, err := experiment.Dial(ctx, cfg)
			return err
		}, codes.Unknown, []string{"alice.crt"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if err == nil {
				t.Fatal("no error")
			}
			t.Log(err)
			if got := status.Code(err); got != tt.code {
				t.Errorf("code %v, want %v (error %v)", got, tt.code, err)
			}
			for _, s := range tt.contains {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
		})
	}
}

// TestClientMetricsGivesUp: when the director goes away for good, the
// metric stream retries with bounded backoff and then reports the loss,
// naming the sequence to resume after, instead of retrying forever.
func TestClientMetricsGivesUp(t *testing.T) {
	f := newFederation(t)
	ctx, cancel := context.WithTimeout(f.Ctx, time.Minute)
	defer cancel()
	cfg := f.config(pki.RoleResearcher, "alice")
	cfg.Retry = experiment.Retry{Initial: 10 * time.Millisecond, Max: 100 * time.Millisecond, GiveUpAfter: time.Second}
	c := f.dial(cfg)
	if _, err := c.Submit(ctx, planDir(t, "synth", 50, 2), experiment.SubmitOptions{}); err != nil {
		t.Fatal(err)
	}
	var last int64
	var stoppedAt time.Time
	var final error
	for ev, err := range c.Metrics(ctx, "synth", 0) {
		if err != nil {
			final = err
			break
		}
		last = ev.GetSequence()
		if stoppedAt.IsZero() {
			f.StopDirector()
			stoppedAt = time.Now()
		}
	}
	if final == nil || !strings.Contains(final.Error(), "gave up reconnecting") || !strings.Contains(final.Error(), fmt.Sprintf("after sequence %d", last)) {
		t.Fatalf("after the director went away: %v (last sequence %d)", final, last)
	}
	if d := time.Since(stoppedAt); d > 20*time.Second {
		t.Errorf("gave up after %s with GiveUpAfter 1s", d)
	}
	t.Log(final)
}

// TestClientSubmitStreamsChunks: a directory with a few MiB of
// incompressible data goes up in chunks of at most ChunkSize, with progress
// after each, and the director records the size and digest PrepareUpload
// computed; the packed archive itself can be submitted as well.
func TestClientSubmitStreamsChunks(t *testing.T) {
	f := newFederation(t)
	ctx, cancel := context.WithTimeout(f.Ctx, time.Minute)
	defer cancel()
	c := f.dial(f.config(pki.RoleResearcher, "alice"))
	dir := planDir(t, "big", 1, 3)
	blob := make([]byte, 3*experiment.ChunkSize+12345)
	rand.New(rand.NewSource(1)).Read(blob)
	if err := os.WriteFile(filepath.Join(dir, "weights.bin"), blob, 0o600); err != nil {
		t.Fatal(err)
	}
	u, err := experiment.PrepareUpload(dir)
	if err != nil {
		t.Fatal(err)
	}
	var sent []int64
	e, err := c.SubmitUpload(ctx, u, experiment.SubmitOptions{Progress: func(n, total int64) {
		if total != u.Size {
			t.Errorf("progress total %d, archive %d bytes", total, u.Size)
		}
		sent = append(sent, n)
	}})
	if err != nil {
		t.Fatal(err)
	}
	if e.GetArchiveSize() != u.Size || e.GetArchiveSha256() != u.SHA256 || e.GetName() != "big" {
		t.Errorf("recorded %d bytes sha256 %s as %q, uploaded %d bytes sha256 %s", e.GetArchiveSize(), e.GetArchiveSha256(), e.GetName(), u.Size, u.SHA256)
	}
	if len(sent) < 4 || sent[len(sent)-1] != u.Size {
		t.Fatalf("progress %v for %d bytes", sent, u.Size)
	}
	for i := 1; i < len(sent); i++ {
		if d := sent[i] - sent[i-1]; d <= 0 || d > experiment.ChunkSize {
			t.Errorf("chunk %d is %d bytes", i, d)
		}
	}

	// The same archive, given as a file, under another name.
	archive := filepath.Join(t.TempDir(), "big.tar.gz")
	data, err := os.ReadFile(u.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(archive, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := u.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(u.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Close left the packed archive behind: %v", err)
	}
	e2, err := c.Submit(ctx, archive, experiment.SubmitOptions{Name: "big-2"})
	if err != nil {
		t.Fatal(err)
	}
	if e2.GetArchiveSha256() != e.GetArchiveSha256() {
		t.Errorf("the archive file was recorded with sha256 %s, the packed directory %s", e2.GetArchiveSha256(), e.GetArchiveSha256())
	}
	if _, err := os.Stat(archive); err != nil {
		t.Errorf("Submit removed the caller's archive: %v", err)
	}
}

// TestClientRevokedCertificate: a researcher whose certificate the CA has
// revoked is refused in the handshake, and Dial says so at once instead of
// waiting out ConnectTimeout as if the director were unreachable.
func TestClientRevokedCertificate(t *testing.T) {
	f := newFederation(t)
	cfg := f.config(pki.RoleResearcher, "mallory")
	cfg.ConnectTimeout = time.Minute
	if _, err := f.CA.CA.RevokeName("mallory"); err != nil {
		t.Fatal(err)
	}
	// The director looks at its CRL file at most once a second, so the
	// first connections may still be accepted; each Dial is a new one.
	deadline := time.Now().Add(20 * time.Second)
	for {
		start := time.Now()
		c, err := experiment.Dial(f.Ctx, cfg)
		if err == nil {
			c.Close()
			if time.Now().After(deadline) {
				t.Fatal("the revoked certificate is still accepted")
			}
			continue
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("Dial took %s to report a refused certificate", d)
		}
		if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "revoked") {
			t.Fatalf("Dial with a revoked certificate: %v", err)
		}
		t.Log(err)
		return
	}
}

// cutProxy forwards TCP connections to a target and can sever every
// connection it carries at once, as a network failure would.
type cutProxy struct {
	l      net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	opened int
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{l: l, target: target}
	t.Cleanup(func() { l.Close(); p.cut() })
	go p.serve()
	return p
}

func (p *cutProxy) serve() {
	for {
		in, err := p.l.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			in.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, in, out)
		p.opened++
		p.mu.Unlock()
		go func() { io.Copy(out, in); out.Close() }()
		go func() { io.Copy(in, out); in.Close() }()
	}
}

// cut closes every connection the proxy carries; new ones are accepted.
func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func (p *cutProxy) connections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.opened
}

// TestClientMetricsSurviveCutConnection watches a live experiment through
// a proxy that severs the TCP connection after the first event and again
// later: the watch reconnects through the proxy and delivers every event
// exactly once.
func TestClientMetricsSurviveCutConnection(t *testing.T) {
	f := newFederation(t)
	ctx, cancel := context.WithTimeout(f.Ctx, 2*time.Minute)
	defer cancel()
	proxy := newCutProxy(t, f.Addr)
	cfg := f.config(pki.RoleResearcher, "alice")
	cfg.Director = proxy.l.Addr().String()
	c := f.dial(cfg)
	const rounds = 20
	if _, err := c.Submit(ctx, planDir(t, "synth", rounds, 2), experiment.SubmitOptions{}); err != nil {
		t.Fatal(err)
	}
	var events []*fxv1.MetricEvent
	for ev, err := range c.Metrics(ctx, "synth", 0) {
		if err != nil {
			t.Fatalf("after %d events: %v", len(events), err)
		}
		events = append(events, ev)
		// The first cut comes while the experiment has most of its rounds
		// ahead, so the stream is surely still open.
		if len(events) == 1 || len(events) == 60 {
			proxy.cut()
		}
	}
	checkSequence(t, events, 0, eventsPerRun(rounds))
	t.Logf("the proxy carried %d connections", proxy.connections())
	if n := proxy.connections(); n < 2 {
		t.Errorf("the proxy carried %d connection(s): the watch never reconnected", n)
	}
}
