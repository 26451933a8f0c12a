package director

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/backoff"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/tensor"
)

// The process launcher's tests start this test binary as the aggregator
// process: with fakeModeEnv set, TestMain acts as `fx aggregator run` would
// in one of the ways below, never running the tests.
const (
	fakeModeEnv   = "FX_TEST_FAKE_AGGREGATOR"
	fakeStartsEnv = "FX_TEST_FAKE_AGGREGATOR_STARTS"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(fakeModeEnv); mode != "" {
		os.Exit(fakeAggregator(mode))
	}
	os.Exit(m.Run())
}

// realAggregator is `fx aggregator run`: RunAggregatorProcess, stopped by
// SIGTERM as fx's main stops it.
func realAggregator() int {
	if len(os.Args) != 5 || os.Args[3] != "--spec" {
		fmt.Fprintf(os.Stderr, "aggregator: unexpected arguments %q\n", os.Args[1:])
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := RunAggregatorProcess(ctx, os.Args[4], hclog.New(&hclog.LoggerOptions{Name: "fx", Output: os.Stderr})); err != nil {
		fmt.Fprintln(os.Stderr, "aggregator:", err)
		return 1
	}
	return 0
}

// fakeAggregator is an aggregator process for the launcher's tests. It
// reads its spec, checks the socket it inherited, records its start, then:
// crash exits 3; crash-once crashes at its first start and finishes at the
// next; fail ends the experiment failed; term waits for SIGTERM and exits
// 0; stubborn ignores SIGTERM.
func fakeAggregator(mode string) int {
	if mode == "real" {
		return realAggregator()
	}
	if len(os.Args) != 5 || os.Args[1] != "aggregator" || os.Args[2] != "run" || os.Args[3] != "--spec" {
		fmt.Fprintf(os.Stderr, "fake aggregator: unexpected arguments %q\n", os.Args[1:])
		return 2
	}
	spec, err := ReadProcessSpec(os.Args[4])
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake aggregator:", err)
		return 2
	}
	lis, err := processListener(spec)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake aggregator:", err)
		return 2
	}
	lis.Close()
	// Signals are set up before the start is recorded, which the tests
	// wait for before they cancel.
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	f, err := os.OpenFile(os.Getenv(fakeStartsEnv), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake aggregator:", err)
		return 2
	}
	fmt.Fprintln(f, os.Getpid())
	f.Close()
	starts := countLines(os.Getenv(fakeStartsEnv))
	finish := func(o ProcessOutcome) int {
		if err := writeOutcome(spec.Outcome, o); err != nil {
			fmt.Fprintln(os.Stderr, "fake aggregator:", err)
			return 2
		}
		return 0
	}
	switch mode {
	case "crash":
		fmt.Fprintln(os.Stderr, "fake aggregator: crashing on purpose")
		return 3
	case "crash-once":
		if starts == 1 {
			fmt.Fprintln(os.Stderr, "fake aggregator: crashing on purpose")
			return 3
		}
		return finish(ProcessOutcome{Finished: true})
	case "fail":
		return finish(ProcessOutcome{Failed: "round 3 failed: only 1 of the 2 participants reported"})
	case "term":
		<-term
		fmt.Fprintln(os.Stderr, "fake aggregator: stopping on SIGTERM")
		return 0
	case "stubborn":
		<-term
		fmt.Fprintln(os.Stderr, "fake aggregator: ignoring SIGTERM")
		select {}
	}
	fmt.Fprintln(os.Stderr, "fake aggregator: unknown mode", mode)
	return 2
}

func countLines(path string) int {
	data, _ := os.ReadFile(path)
	return strings.Count(string(data), "\n")
}

// recordingSink records what an aggregator reports.
type recordingSink struct {
	mu       sync.Mutex
	rounds   []int
	best     []*aggregator.Best
	progress []aggregator.Progress
	pauses   []string
}

func (s *recordingSink) RoundCompleted(summary aggregator.RoundSummary, best *aggregator.Best) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rounds = append(s.rounds, summary.Round)
	s.best = append(s.best, best)
}

func (s *recordingSink) Progress(p aggregator.Progress) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.progress = append(s.progress, p)
}

func (s *recordingSink) Paused(reason string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pauses = append(s.pauses, reason)
}

func (s *recordingSink) Resumed() { s.Paused("") }

func (s *recordingSink) snapshot() (rounds []int, pauses []string, progress []aggregator.Progress) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int(nil), s.rounds...), append([]string(nil), s.pauses...), append([]aggregator.Progress(nil), s.progress...)
}

// processFixture is a Process whose children are fake aggregators in
// mode, and a LaunchSpec of a built-in softmax experiment for it.
func processFixture(t *testing.T, mode string) (*Process, LaunchSpec, string) {
	t.Helper()
	const planYAML = "name: s\nrounds: 3\nrunner: {kind: builtin, model: softmax}\n"
	plan, err := experiment.ParsePlan([]byte(planYAML))
	must(t, err)
	starts := filepath.Join(t.TempDir(), "starts")
	p := &Process{
		Executable:     os.Args[0],
		Identity:       "localhost",
		TLS:            pki.Files{Cert: "c.pem", Key: "k.pem", CA: "ca.pem"},
		MaxRestarts:    2,
		RestartWindow:  time.Hour,
		RestartBackoff: backoff.Config{Initial: 10 * time.Millisecond, Max: 50 * time.Millisecond},
		StopGrace:      500 * time.Millisecond,
		Env:            []string{fakeModeEnv + "=" + mode, fakeStartsEnv + "=" + starts},
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	t.Cleanup(func() { lis.Close() })
	expDir := filepath.Join(t.TempDir(), "exp")
	must(t, os.MkdirAll(expDir, 0o700))
	spec := LaunchSpec{
		ExperimentID:    "e1",
		Plan:            plan,
		Participants:    []string{"a", "b"},
		Registered:      map[string]aggregator.SampleCounts{"a": {Train: 10, Valid: 2}, "b": {Train: 20, Valid: 4}},
		Shards:          map[string]*fxv1.DatasetShard{"a": {SampleShape: []int64{4}, Classes: 3, TrainSamples: 10}, "b": {SampleShape: []int64{4}, Classes: 3, TrainSamples: 20}},
		ArchivePath:     writeArchive(t, planYAML, nil),
		Dir:             filepath.Join(expDir, "aggregator"),
		Listener:        lis,
		Sink:            &recordingSink{},
		Logger:          hclog.NewNullLogger(),
		DirectorAddress: "127.0.0.1:1",
		ServerName:      "localhost",
	}
	return p, spec, starts
}

func TestProcessSpecRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "spec.json")
	want := &ProcessSpec{
		ExperimentID: "e1", Plan: "name: s\nrounds: 2\n", Participants: []string{"a", "b"},
		Registered:   map[string]aggregator.SampleCounts{"a": {Train: 1, Valid: 2}, "b": {Train: 3}},
		InitialModel: "/m.safetensors", Dir: "/agg", ListenFD: 3,
		TLS:      pki.Files{Cert: "c", Key: "k", CA: "ca", CRL: "crl"},
		Director: "127.0.0.1:7000", ServerName: "localhost", Token: "t0k", Outcome: "/o.json",
		DiskReserve: 5, PauseRetry: time.Second, DirectorGrace: time.Minute,
	}
	must(t, WriteProcessSpec(path, want))
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("spec file: %v, mode %v; want 0600 (it holds the token)", err, fi.Mode())
	}
	got, err := ReadProcessSpec(path)
	must(t, err)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("read back %+v\nwant %+v", got, want)
	}

	// A spec missing what the process cannot do without names it.
	partial := *want
	partial.Token, partial.ListenFD, partial.Participants = "", 0, nil
	must(t, WriteProcessSpec(path, &partial))
	_, err = ReadProcessSpec(path)
	for _, key := range []string{"token", "listen_fd or listen", "participants"} {
		if err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("a spec without %s: error %v, want one naming it", key, err)
		}
	}
}

// Launch writes what the child needs: the initial model, which the built-in
// model's initialiser makes when the archive has none, and a spec whose
// plan is the experiment's and whose socket is the inherited descriptor 3.
func TestProcessLaunchSpecForChild(t *testing.T) {
	p, spec, starts := processFixture(t, "crash-once")
	agg, err := p.Launch(spec)
	must(t, err)
	if err := agg.Run(context.Background()); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if n := countLines(starts); n != 2 {
		t.Errorf("%d starts, want 2 (a crash, then a finish)", n)
	}
	expDir := filepath.Dir(spec.Dir)
	child, err := ReadProcessSpec(filepath.Join(expDir, ProcessSpecFile))
	must(t, err)
	plan, err := experiment.ParseStoredPlan([]byte(child.Plan))
	must(t, err)
	if plan.Name != spec.Plan.Name || plan.Rounds != spec.Plan.Rounds || plan.Runner.Model != "softmax" {
		t.Errorf("the child's plan is %+v, want the experiment's", plan)
	}
	if child.ListenFD != 3 || child.Director != "127.0.0.1:1" || child.ServerName != "localhost" || len(child.Token) != 64 ||
		child.Dir != spec.Dir || child.Outcome != filepath.Join(expDir, ProcessOutcomeFile) || !reflect.DeepEqual(child.TLS, p.TLS) ||
		!reflect.DeepEqual(child.Registered, spec.Registered) || !reflect.DeepEqual(child.Participants, spec.Participants) {
		t.Errorf("child spec %+v", child)
	}
	if child.InitialModel != filepath.Join(expDir, ProcessInitialFile) {
		t.Errorf("initial model %q, want the file Launch writes", child.InitialModel)
	}
	// The file served its purpose once Run returned, and so did the pid file.
	for _, f := range []string{ProcessInitialFile, ProcessPIDFile} {
		if _, err := os.Stat(filepath.Join(expDir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after Run: %v, want it removed", f, err)
		}
	}
}

// The initial model Launch writes is the built-in model's, readable as
// safetensors; with a checkpoint there is none to write.
func TestProcessInitialModel(t *testing.T) {
	_, spec, _ := processFixture(t, "crash")
	path := filepath.Join(t.TempDir(), "initial.safetensors")
	got, err := prepareInitialModel(spec, path)
	must(t, err)
	m, _, err := tensor.ReadFile(got)
	must(t, err)
	var names []string
	for _, x := range m {
		names = append(names, x.Name)
	}
	if slices.Sort(names); !slices.Equal(names, []string{"fc0.bias", "fc0.weight"}) {
		t.Errorf("initial model holds %v, want the softmax's fc0.weight and fc0.bias", names)
	}
	must(t, os.MkdirAll(spec.Dir, 0o700))
	must(t, os.WriteFile(filepath.Join(spec.Dir, "checkpoint.json"), []byte("{}"), 0o600))
	if got, err := prepareInitialModel(spec, path); err != nil || got != "" {
		t.Errorf("with a checkpoint: %q, %v; want no initial model", got, err)
	}
}

// A child that keeps dying is started again MaxRestarts times; the next
// death fails the experiment, naming the deaths, the child's last words and
// its log.
func TestProcessLauncherGivesUp(t *testing.T) {
	p, spec, starts := processFixture(t, "crash")
	agg, err := p.Launch(spec)
	must(t, err)
	err = agg.Run(context.Background())
	if err == nil {
		t.Fatal("Run succeeded with a child that always crashes")
	}
	for _, want := range []string{"died 3 times within 1h0m0s", "exit status 3", "crashing on purpose", filepath.Join(filepath.Dir(spec.Dir), ProcessLogFile)} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if n := countLines(starts); n != 3 {
		t.Errorf("%d starts, want 3 (the first and MaxRestarts 2)", n)
	}
}

// A child that ends the experiment failed is not restarted: its reason is
// the experiment's.
func TestProcessLauncherOutcomeFailed(t *testing.T) {
	p, spec, starts := processFixture(t, "fail")
	agg, err := p.Launch(spec)
	must(t, err)
	err = agg.Run(context.Background())
	if err == nil || err.Error() != "round 3 failed: only 1 of the 2 participants reported" {
		t.Errorf("Run: %v, want the child's reason", err)
	}
	if n := countLines(starts); n != 1 {
		t.Errorf("%d starts, want 1", n)
	}
}

// Cancelling Run stops the child with SIGTERM, or, when it ignores that,
// with SIGKILL after StopGrace; either way Run returns only once it is gone.
func TestProcessLauncherCancel(t *testing.T) {
	for _, mode := range []string{"term", "stubborn"} {
		t.Run(mode, func(t *testing.T) {
			p, spec, starts := processFixture(t, mode)
			agg, err := p.Launch(spec)
			must(t, err)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- agg.Run(ctx) }()
			pidPath := filepath.Join(filepath.Dir(spec.Dir), ProcessPIDFile)
			var pid int
			waitUntil(t, 30*time.Second, "the child to start", func() bool {
				data, err := os.ReadFile(pidPath)
				if err != nil || countLines(starts) == 0 {
					return false
				}
				pid, err = strconv.Atoi(strings.TrimSpace(string(data)))
				return err == nil
			})
			cancel()
			select {
			case err := <-done:
				if !errors.Is(err, context.Canceled) {
					t.Errorf("Run: %v, want context.Canceled", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("Run did not return after cancel")
			}
			if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("the child %d is still there after Run returned (%v)", pid, err)
			}
			if n := countLines(starts); n != 1 {
				t.Errorf("%d starts, want 1: a stopped child is not restarted", n)
			}
			log, _ := os.ReadFile(filepath.Join(filepath.Dir(spec.Dir), ProcessLogFile))
			want := map[string]string{"term": "stopping on SIGTERM", "stubborn": "ignoring SIGTERM"}[mode]
			if !strings.Contains(string(log), want) {
				t.Errorf("the child's log does not say %q: the SIGTERM did not reach it:\n%s", want, log)
			}
		})
	}
}

func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: not within %s", what, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// fakeChannel is the director's end of an AggregatorChannel stream.
type fakeChannel struct {
	grpc.ServerStream
	ctx context.Context
	in  chan *fxv1.AggregatorReport
	out chan *fxv1.AggregatorCommand
}

func (f *fakeChannel) Context() context.Context { return f.ctx }

func (f *fakeChannel) Recv() (*fxv1.AggregatorReport, error) {
	select {
	case r, ok := <-f.in:
		if !ok {
			return nil, io.EOF
		}
		return r, nil
	case <-f.ctx.Done():
		return nil, f.ctx.Err()
	}
}

func (f *fakeChannel) Send(c *fxv1.AggregatorCommand) error {
	select {
	case f.out <- c:
		return nil
	case <-f.ctx.Done():
		return f.ctx.Err()
	}
}

// TestAggregatorChannel: only the director's own certificate, naming a
// running aggregator process with its current token, opens a channel; an
// open one passes the child's events to the Sink (a round once, serving
// once) and takes Drop to the child, those made before it opened first.
func TestAggregatorChannel(t *testing.T) {
	p := &Process{Identity: "localhost"}
	sink := &recordingSink{}
	var served int
	var servedMu sync.Mutex
	a := &procAggregator{
		chans: &p.chans, log: hclog.NewNullLogger(), token: "tok", dropsChanged: make(chan struct{}),
		spec: LaunchSpec{ExperimentID: "e1", Dir: t.TempDir(), Sink: sink, Serving: func() {
			servedMu.Lock()
			served++
			servedMu.Unlock()
		}},
	}
	p.register(a)
	a.Drop("site-3", "its runner crashed")
	shutdown := make(chan struct{})
	open := func(name, id, token string) (*fakeChannel, chan error) {
		ctx, cancel := context.WithCancel(pki.ContextWithIdentity(context.Background(), pki.Identity{Name: name, Role: pki.RoleDirector}))
		t.Cleanup(cancel)
		ch := &fakeChannel{ctx: ctx, in: make(chan *fxv1.AggregatorReport, 16), out: make(chan *fxv1.AggregatorCommand, 16)}
		ch.in <- &fxv1.AggregatorReport{ExperimentId: id, LaunchToken: token}
		done := make(chan error, 1)
		go func() { done <- p.serveChannel(ch, shutdown) }()
		return ch, done
	}
	for _, tt := range []struct {
		name, caller, id, token string
		code                    codes.Code
	}{
		{"another director's certificate", "director-2", "e1", "tok", codes.PermissionDenied},
		{"no such aggregator", "localhost", "e2", "tok", codes.NotFound},
		{"a stale token", "localhost", "e1", "old", codes.PermissionDenied},
	} {
		_, done := open(tt.caller, tt.id, tt.token)
		if err := <-done; status.Code(err) != tt.code {
			t.Errorf("%s: %v, want %s", tt.name, err, tt.code)
		}
	}

	ch, done := open("localhost", "e1", "tok")
	recvCmd := func() *fxv1.AggregatorCommand {
		t.Helper()
		select {
		case c := <-ch.out:
			return c
		case err := <-done:
			t.Fatalf("the channel ended: %v", err)
		case <-time.After(10 * time.Second):
			t.Fatal("no command within 10s")
		}
		return nil
	}
	if c := recvCmd(); c.GetCommand() != nil {
		t.Fatalf("first command %v, want the empty acceptance", c)
	}
	if d := recvCmd().GetDrop(); d.GetCollaborator() != "site-3" || d.GetReason() != "its runner crashed" {
		t.Errorf("first drop %v, want the one made before the channel opened", d)
	}
	a.Drop("site-1", "left")
	if d := recvCmd().GetDrop(); d.GetCollaborator() != "site-1" {
		t.Errorf("drop %v, want site-1's", d)
	}

	round := func(n int) *fxv1.AggregatorReport {
		s, _ := json.Marshal(aggregator.RoundSummary{Round: n})
		b, _ := json.Marshal(aggregator.Best{Round: n, Metric: "accuracy", Value: 0.5})
		return &fxv1.AggregatorReport{Event: &fxv1.AggregatorReport_RoundCompleted{RoundCompleted: &fxv1.AggregatorRoundCompleted{Summary: s, Best: b}}}
	}
	serving := &fxv1.AggregatorReport{Event: &fxv1.AggregatorReport_Serving{Serving: &fxv1.AggregatorServing{}}}
	for _, r := range []*fxv1.AggregatorReport{
		serving, serving, round(1), round(1), round(2),
		{Event: &fxv1.AggregatorReport_Progress{Progress: &fxv1.AggregatorProgress{Collaborator: "site-1", Round: 2, Task: "train", LastRound: 1}}},
		{Event: &fxv1.AggregatorReport_Pause{Pause: &fxv1.AggregatorPause{Reason: "disk full"}}},
		{Event: &fxv1.AggregatorReport_Pause{Pause: &fxv1.AggregatorPause{}}},
	} {
		ch.in <- r
	}
	waitUntil(t, 10*time.Second, "the events in the sink", func() bool {
		_, pauses, _ := sink.snapshot()
		return len(pauses) == 2
	})
	rounds, pauses, progress := sink.snapshot()
	if !reflect.DeepEqual(rounds, []int{1, 2}) {
		t.Errorf("rounds %v reached the sink, want [1 2]: each once", rounds)
	}
	if !reflect.DeepEqual(pauses, []string{"disk full", ""}) {
		t.Errorf("pauses %q, want paused then resumed", pauses)
	}
	if len(progress) != 1 || progress[0] != (aggregator.Progress{Collaborator: "site-1", Round: 2, Task: "train", LastRound: 1}) {
		t.Errorf("progress %+v", progress)
	}
	servedMu.Lock()
	if served != 1 {
		t.Errorf("Serving called %d times, want once", served)
	}
	servedMu.Unlock()

	// The director stopping ends the channel.
	close(shutdown)
	select {
	case err := <-done:
		if status.Code(err) != codes.Unavailable {
			t.Errorf("channel at shutdown: %v, want Unavailable", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the channel outlived the director's shutdown")
	}
}

// TestRealAggregatorProcess runs an experiment with the process launcher
// and a real aggregator process (this binary, running RunAggregatorProcess):
// it reports serving over its channel, so the envoys get the Start
// assignment, and it serves them over mutual TLS with the director's
// certificate; a participant the director drops is dropped by the child
// (its next poll is told to quit); cancelling the experiment stops the
// child.
func TestRealAggregatorProcess(t *testing.T) {
	proc := &Process{
		Executable: os.Args[0],
		Identity:   "director.test",
		Env:        []string{fakeModeEnv + "=real"},
	}
	f := newFed(t, func(c *Config) { c.Launcher = proc })
	proc.TLS = pki.PartyFiles(filepath.Join(f.certDir, string(pki.RoleDirector)+"-director.test"), "director.test")
	ctx := ctxT(t)
	for _, n := range []string{"a", "b", "c"} {
		f.register(n, "fashion")
	}
	w := f.watch("a")
	e := f.submitPlan("alice", planTwo)
	f.waitState(e.Id, fxv1.ExperimentState_OFFERED)
	for _, n := range []string{"a", "b", "c"} {
		_, err := f.answer(n, e.Id, true)
		must(t, err)
	}
	start := w.next(t, e.Id, "start").GetStart()
	expDir := filepath.Join(f.dataDir, "experiments", e.Id)
	logPath := filepath.Join(expDir, ProcessLogFile)
	defer func() {
		if t.Failed() {
			log, _ := os.ReadFile(logPath)
			t.Logf("the aggregator's log:\n%s", log)
		}
	}()
	if pid, err := os.ReadFile(filepath.Join(expDir, ProcessPIDFile)); err != nil || strings.TrimSpace(string(pid)) == strconv.Itoa(os.Getpid()) {
		t.Fatalf("pid file: %q, %v; want a child's", pid, err)
	}

	poll := func(name string) (*fxv1.GetTasksResponse, error) {
		k, err := pki.NewKeyring(pki.KeyringConfig{Files: pki.PartyFiles(filepath.Join(f.certDir, "envoy-"+name), name)})
		must(t, err)
		conn, err := pki.NewClient(start.GetAggregatorAddress(), k, start.GetAggregatorServerName())
		must(t, err)
		t.Cleanup(func() { conn.Close() })
		return fxv1.NewAggregatorClient(conn).GetTasks(ctx, &fxv1.GetTasksRequest{ExperimentId: e.Id, Collaborator: name})
	}
	tasks, err := poll("a")
	must(t, err)
	if tasks.GetAction() != fxv1.GetTasksResponse_RUN || tasks.GetRound() != 1 || len(tasks.GetTasks()) != 3 {
		t.Fatalf("GetTasks = %v", tasks)
	}

	_, err = f.envoy("b").ReportFailure(ctx, &fxv1.ReportFailureRequest{ExperimentId: e.Id, EnvoyName: "b", Round: 1, Reason: "its runner crashed"})
	must(t, err)
	quit, err := poll("b")
	must(t, err)
	if quit.GetAction() != fxv1.GetTasksResponse_QUIT || !strings.Contains(quit.GetReason(), "its runner crashed") {
		t.Errorf("GetTasks of the dropped envoy = %v, want QUIT with the director's reason", quit)
	}

	_, err = f.researcher("alice").CancelExperiment(ctx, &fxv1.CancelExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: e.Id}})
	must(t, err)
	f.d.mu.Lock()
	last := f.d.exps[e.Id].lastRun
	f.d.mu.Unlock()
	select {
	case <-last.done:
	case <-time.After(time.Minute):
		t.Fatal("the aggregator process did not stop within a minute of the cancellation")
	}
	if _, err := os.Stat(filepath.Join(expDir, ProcessPIDFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pid file after the child stopped: %v", err)
	}
	log, _ := os.ReadFile(logPath)
	for _, want := range []string{"the director drops a participant", "aggregator process stopped"} {
		if !strings.Contains(string(log), want) {
			t.Errorf("the aggregator's log does not say %q", want)
		}
	}
}
