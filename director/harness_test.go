package director

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// waitTimeout bounds every wait on a condition; generous because the race
// detector and a shared machine slow everything down.
const waitTimeout = 20 * time.Second

// eventually polls cond until it holds or the deadline passes. Conditions
// are cheap reads over gRPC or of the director's state; nothing sleeps
// waiting for a fixed time.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		<-tick.C
	}
}

// ------------------------------------------------------------------ clock

type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	tickers []*fakeTicker
}

type fakeTicker struct{ c chan time.Time }

func (t *fakeTicker) C() <-chan time.Time { return t.c }
func (t *fakeTicker) Stop()               {}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) NewTicker(time.Duration) Ticker {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTicker{c: make(chan time.Time, 1)}
	c.tickers = append(c.tickers, t)
	return t
}

// Advance moves time and ticks every ticker once.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	now := c.now
	tickers := append([]*fakeTicker(nil), c.tickers...)
	c.mu.Unlock()
	for _, t := range tickers {
		select {
		case t.c <- now:
		default:
		}
	}
}

// --------------------------------------------------------------- launcher

// fakeLauncher launches fakeAggs whose rounds the test drives. Its History
// reads what fakeAgg wrote, in aggregator's file layout, so a restarted
// director (with a new fakeLauncher) sees the same history.
type fakeLauncher struct {
	mu       sync.Mutex
	aggs     map[string][]*fakeAgg
	launchFn func(LaunchSpec) error
	// serveGate, if set, holds every aggregator's Serving call until it
	// is closed: the aggregator runs but does not serve yet, as a real
	// one loading a big model.
	serveGate chan struct{}
}

func newFakeLauncher() *fakeLauncher { return &fakeLauncher{aggs: map[string][]*fakeAgg{}} }

func (l *fakeLauncher) Launch(spec LaunchSpec) (Aggregator, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.launchFn != nil {
		if err := l.launchFn(spec); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
		return nil, err
	}
	a := &fakeAgg{spec: spec, result: make(chan error, 1), running: make(chan struct{}), stopped: make(chan struct{}), serveGate: l.serveGate}
	l.aggs[spec.ExperimentID] = append(l.aggs[spec.ExperimentID], a)
	return a, nil
}

// launches returns how many times the experiment's aggregator was launched.
func (l *fakeLauncher) launches(id string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.aggs[id])
}

// agg waits for the experiment's latest aggregator to run.
func (l *fakeLauncher) agg(t testing.TB, id string, launch int) *fakeAgg {
	t.Helper()
	eventually(t, fmt.Sprintf("launch %d of experiment %s", launch, id), func() bool { return l.launches(id) >= launch })
	l.mu.Lock()
	a := l.aggs[id][launch-1]
	l.mu.Unlock()
	select {
	case <-a.running:
	case <-time.After(waitTimeout):
		t.Fatalf("aggregator of %s never ran", id)
	}
	return a
}

func (l *fakeLauncher) History(dir string) ([]aggregator.RoundSummary, *aggregator.Best, error) {
	var out []aggregator.RoundSummary
	for r := 1; ; r++ {
		data, err := os.ReadFile(aggregator.RoundPath(dir, r))
		if errors.Is(err, os.ErrNotExist) {
			break
		}
		if err != nil {
			return nil, nil, err
		}
		var s aggregator.RoundSummary
		if err := json.Unmarshal(data, &s); err != nil {
			return nil, nil, err
		}
		out = append(out, s)
	}
	var best *aggregator.Best
	if data, err := os.ReadFile(filepath.Join(dir, "best.json")); err == nil {
		best = new(aggregator.Best)
		if err := json.Unmarshal(data, best); err != nil {
			return nil, nil, err
		}
	}
	return out, best, nil
}

type fakeAgg struct {
	spec      LaunchSpec
	serveGate chan struct{}
	result    chan error
	running   chan struct{}
	stopped   chan struct{}
	once      sync.Once
	mu        sync.Mutex
	round     int
	drops     []string
}

func (a *fakeAgg) Run(ctx context.Context) error {
	defer close(a.stopped)
	defer a.spec.Listener.Close()
	a.once.Do(func() { close(a.running) })
	if a.serveGate != nil {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-a.serveGate:
		}
	}
	if a.spec.Serving != nil {
		a.spec.Serving()
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case err := <-a.result:
		return err
	}
}

// Drop records the drop; the fake's rounds are driven by the test.
func (a *fakeAgg) Drop(envoy, reason string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.drops = append(a.drops, envoy+": "+reason)
}

func (a *fakeAgg) dropped() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.drops)
}

// completeRound writes the round's model and summary as the aggregator
// does and tells the sink. Each participant reports accuracy = round/10
// for every task.
func (a *fakeAgg) completeRound(t *testing.T) aggregator.RoundSummary {
	t.Helper()
	s, best := a.writeRound(t)
	a.spec.Sink.RoundCompleted(s, best)
	return s
}

// writeRound writes the next round's files as the aggregator's checkpoint
// does, without telling the sink: what a director that dies between the
// two leaves behind.
func (a *fakeAgg) writeRound(t *testing.T) (aggregator.RoundSummary, *aggregator.Best) {
	t.Helper()
	a.mu.Lock()
	if a.round == 0 {
		hist, _, err := (&fakeLauncher{}).History(a.spec.Dir)
		if err != nil {
			t.Fatal(err)
		}
		a.round = len(hist)
	}
	a.round++
	r := a.round
	a.mu.Unlock()
	s := aggregator.RoundSummary{Round: r, Aggregates: map[string]map[string]float64{}, Reported: a.spec.Participants}
	for _, task := range a.spec.Plan.Tasks {
		for i, p := range a.spec.Participants {
			s.Results = append(s.Results, aggregator.TaskResult{Collaborator: p, Task: task, Samples: int64(100 * (i + 1)), Metrics: map[string]float64{"accuracy": float64(r) / 10}})
		}
		s.Aggregates[task] = map[string]float64{"accuracy": float64(r) / 10}
	}
	best := &aggregator.Best{Round: r, Metric: "accuracy", Value: float64(r) / 10}
	must(t, os.MkdirAll(filepath.Dir(aggregator.ModelPath(a.spec.Dir, r)), 0o700))
	must(t, os.MkdirAll(filepath.Dir(aggregator.RoundPath(a.spec.Dir, r)), 0o700))
	if r == 1 {
		must(t, os.WriteFile(aggregator.ModelPath(a.spec.Dir, 0), []byte("model-0"), 0o600))
	}
	must(t, os.WriteFile(aggregator.ModelPath(a.spec.Dir, r), []byte(fmt.Sprintf("model-%d", r)), 0o600))
	data, _ := json.Marshal(s)
	must(t, os.WriteFile(aggregator.RoundPath(a.spec.Dir, r), data, 0o600))
	data, _ = json.Marshal(best)
	must(t, os.WriteFile(filepath.Join(a.spec.Dir, "best.json"), data, 0o600))
	return s, best
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// -------------------------------------------------------------- federation

// fed is a director on loopback with real mTLS certificates from a CA made
// for the test, and clients for any party.
type fed struct {
	t        testing.TB
	ca       *pki.CA
	dataDir  string
	clock    *fakeClock
	launcher *fakeLauncher
	cfgMod   func(*Config)
	keyring  *pki.Keyring

	d      *Director
	addr   string
	cancel context.CancelFunc
	done   chan error

	mu      sync.Mutex
	clients map[string]fxv1.DirectorClient
	conns   []*grpc.ClientConn
	certDir string
}

func newFed(t testing.TB, mod func(*Config)) *fed {
	t.Helper()
	ca, err := pki.InitCA(filepath.Join(t.TempDir(), "ca"), pki.InitOptions{Organization: "test"})
	if err != nil {
		t.Fatal(err)
	}
	f := &fed{t: t, ca: ca, dataDir: t.TempDir(), clock: newFakeClock(), launcher: newFakeLauncher(),
		cfgMod: mod, clients: map[string]fxv1.DirectorClient{}, certDir: t.TempDir()}
	files := f.issue(pki.RoleDirector, "director.test", "director.test", "127.0.0.1", "localhost")
	f.keyring, err = pki.NewKeyring(pki.KeyringConfig{Files: files, CheckInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	f.start()
	t.Cleanup(func() {
		f.stop()
		for _, c := range f.conns {
			c.Close()
		}
	})
	return f
}

func (f *fed) issue(role pki.Role, name string, hosts ...string) pki.Files {
	f.t.Helper()
	iss, err := f.ca.Issue(pki.IssueRequest{Role: role, Name: name, Hosts: hosts})
	if err != nil {
		f.t.Fatal(err)
	}
	files, err := iss.WriteFiles(filepath.Join(f.certDir, string(role)+"-"+name))
	if err != nil {
		f.t.Fatal(err)
	}
	return files
}

func (f *fed) config() Config {
	dopts, aopts := ServerOptions(f.keyring)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.t.Fatal(err)
	}
	cfg := Config{
		DataDir:                 f.dataDir,
		Listener:                lis,
		ServerOptions:           dopts,
		AggregatorServerOptions: aopts,
		AdvertiseHost:           "127.0.0.1",
		AggregatorHost:          "127.0.0.1",
		ServerName:              "director.test",
		HeartbeatPeriod:         5 * time.Second,
		OfflineAfter:            15 * time.Second,
		ReviewPolicy:            ReviewAuto,
		MaxConcurrent:           4,
		Launcher:                f.launcher,
		Clock:                   f.clock,
		Logger:                  hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: io.Discard}),
		StopTimeout:             2 * time.Second,
	}
	if testing.Verbose() {
		cfg.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Debug, Output: os.Stderr})
	}
	if f.cfgMod != nil {
		f.cfgMod(&cfg)
	}
	return cfg
}

func (f *fed) start() {
	f.t.Helper()
	d, err := New(f.config())
	if err != nil {
		f.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	f.d, f.cancel, f.done = d, cancel, make(chan error, 1)
	go func() { f.done <- d.Run(ctx) }()
	f.addr = d.Addr().String()
	if d.elector != nil {
		// Alone on its database, it wins the election at once.
		eventually(f.t, "the director to lead", d.leading.Load)
	}
}

func (f *fed) stop() {
	if f.cancel == nil {
		return
	}
	f.cancel()
	if err := <-f.done; err != nil {
		f.t.Errorf("director Run: %v", err)
	}
	f.cancel = nil
}

// restart stops the director and starts a new one on the same data_dir,
// with a fresh launcher, as after a crash and restart.
func (f *fed) restart() {
	f.t.Helper()
	f.stop()
	f.launcher = newFakeLauncher()
	f.mu.Lock()
	f.clients = map[string]fxv1.DirectorClient{}
	f.mu.Unlock()
	f.start()
}

// client returns a Director client with a certificate for role and name.
func (f *fed) client(role pki.Role, name string) fxv1.DirectorClient {
	f.t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	key := string(role) + "/" + name
	if c, ok := f.clients[key]; ok {
		return c
	}
	dir := filepath.Join(f.certDir, string(role)+"-"+name)
	files := pki.PartyFiles(dir, name)
	if _, err := os.Stat(files.Cert); err != nil {
		files = f.issue(role, name)
	}
	k, err := pki.NewKeyring(pki.KeyringConfig{Files: files})
	if err != nil {
		f.t.Fatal(err)
	}
	conn, err := pki.NewClient(f.addr, k, "")
	if err != nil {
		f.t.Fatal(err)
	}
	f.conns = append(f.conns, conn)
	c := fxv1.NewDirectorClient(conn)
	f.clients[key] = c
	return c
}

func (f *fed) researcher(name string) fxv1.DirectorClient { return f.client(pki.RoleResearcher, name) }
func (f *fed) admin() fxv1.DirectorClient                 { return f.client(pki.RoleAdmin, "root") }
func (f *fed) envoy(name string) fxv1.DirectorClient      { return f.client(pki.RoleEnvoy, name) }

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	t.Cleanup(cancel)
	return ctx
}

// register registers an envoy with a shard carrying tags and heartbeats it.
func (f *fed) register(name string, tags ...string) {
	f.t.Helper()
	ctx := ctxT(f.t)
	_, err := f.envoy(name).RegisterEnvoy(ctx, &fxv1.RegisterEnvoyRequest{
		EnvoyName: name, Version: "test",
		Shard: &fxv1.DatasetShard{Tags: tags, SampleShape: []int64{28, 28}, TrainSamples: 100, ValidSamples: 10, Classes: 10},
	})
	if err != nil {
		f.t.Fatalf("RegisterEnvoy(%s): %v", name, err)
	}
}

func (f *fed) heartbeat(name string, running ...string) error {
	_, err := f.envoy(name).Heartbeat(ctxT(f.t), &fxv1.HeartbeatRequest{EnvoyName: name, RunningExperiments: running})
	return err
}

// ---------------------------------------------------------------- archives

const planTwo = `name: fashion
rounds: 2
participants: {min: 2, tags: [fashion]}
runner: {kind: builtin, model: mlp}
`

// archive packs plan (and any extra files) as an experiment archive.
func archive(t testing.TB, plan string, extra map[string]string) []byte {
	t.Helper()
	dir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(dir, experiment.PlanFile), []byte(plan), 0o600))
	for name, body := range extra {
		must(t, os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o700))
		must(t, os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600))
	}
	var buf bytes.Buffer
	must(t, experiment.Pack(dir, &buf))
	return buf.Bytes()
}

type upload struct {
	name   string
	plan   string
	data   []byte
	size   int64  // 0: len(data)
	sha    string // "": the data's digest
	noHead bool
	chunk  int // 0: 64 KiB
}

func sha(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

func submit(ctx context.Context, c fxv1.DirectorClient, u upload) (*fxv1.Experiment, error) {
	stream, err := c.SubmitExperiment(ctx)
	if err != nil {
		return nil, err
	}
	if !u.noHead {
		h := &fxv1.SubmitHeader{Name: u.name, Size: int64(len(u.data)), Sha256: sha(u.data), PlanYaml: u.plan}
		if u.size != 0 {
			h.Size = u.size
		}
		if u.sha != "" {
			h.Sha256 = u.sha
		}
		if err := stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Header{Header: h}}); err != nil {
			_, err = stream.CloseAndRecv()
			return nil, err
		}
	}
	chunk := u.chunk
	if chunk == 0 {
		chunk = 64 << 10
	}
	for off := 0; off < len(u.data); off += chunk {
		end := min(off+chunk, len(u.data))
		if err := stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: u.data[off:end]}}); err != nil {
			break // the server answered early; CloseAndRecv has its status
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return nil, err
	}
	return resp.GetExperiment(), nil
}

func (f *fed) submitPlan(owner, plan string) *fxv1.Experiment {
	f.t.Helper()
	e, err := submit(ctxT(f.t), f.researcher(owner), upload{plan: plan, data: archive(f.t, plan, nil)})
	if err != nil {
		f.t.Fatalf("submit: %v", err)
	}
	return e
}

func (f *fed) get(owner, id string) *fxv1.Experiment {
	f.t.Helper()
	e, err := f.admin().GetExperiment(ctxT(f.t), &fxv1.GetExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: id}})
	if err != nil {
		f.t.Fatalf("GetExperiment(%s): %v", id, err)
	}
	return e
}

func (f *fed) waitState(id string, want fxv1.ExperimentState) *fxv1.Experiment {
	f.t.Helper()
	var e *fxv1.Experiment
	eventually(f.t, fmt.Sprintf("experiment %s %s", id, want), func() bool {
		e = f.get("", id)
		return e.GetState() == want
	})
	return e
}

func code(err error) codes.Code { return status.Code(err) }

// watcher reads an envoy's assignment stream into a channel.
type watcher struct {
	ch     chan *fxv1.Assignment
	cancel context.CancelFunc
	errc   chan error
}

func (f *fed) watch(name string) *watcher {
	f.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := f.envoy(name).WatchAssignments(ctx, &fxv1.WatchAssignmentsRequest{EnvoyName: name})
	if err != nil {
		cancel()
		f.t.Fatal(err)
	}
	w := &watcher{ch: make(chan *fxv1.Assignment, 100), cancel: cancel, errc: make(chan error, 1)}
	go func() {
		for {
			a, err := stream.Recv()
			if err != nil {
				w.errc <- err
				close(w.ch)
				return
			}
			w.ch <- a
		}
	}()
	f.t.Cleanup(cancel)
	return w
}

// next returns the next assignment of the given kind for id, skipping others.
func (w *watcher) next(t *testing.T, id string, kind string) *fxv1.Assignment {
	t.Helper()
	timeout := time.After(waitTimeout)
	for {
		select {
		case a, ok := <-w.ch:
			if !ok {
				t.Fatalf("assignment stream ended waiting for %s of %s: %v", kind, id, <-w.errc)
			}
			if a.GetExperimentId() != id {
				continue
			}
			switch {
			case kind == "offer" && a.GetOffer() != nil,
				kind == "start" && a.GetStart() != nil,
				kind == "stop" && a.GetStop() != nil:
				return a
			}
		case <-timeout:
			t.Fatalf("no %s assignment for %s", kind, id)
		}
	}
}

func (f *fed) answer(envoy, id string, accept bool) (*fxv1.AnswerOfferResponse, error) {
	return f.envoy(envoy).AnswerOffer(ctxT(f.t), &fxv1.AnswerOfferRequest{ExperimentId: id, EnvoyName: envoy, Accept: accept, Reason: map[bool]string{false: "no thanks"}[accept]})
}

// running submits planTwo and brings it to RUNNING with envoys a and b.
func (f *fed) running(owner string) (*fxv1.Experiment, *fakeAgg) {
	f.t.Helper()
	f.register("a", "fashion")
	f.register("b", "fashion")
	e := f.submitPlan(owner, planTwo)
	f.waitState(e.Id, fxv1.ExperimentState_OFFERED)
	for _, env := range []string{"a", "b"} {
		if _, err := f.answer(env, e.Id, true); err != nil {
			f.t.Fatalf("accept %s: %v", env, err)
		}
	}
	f.waitState(e.Id, fxv1.ExperimentState_RUNNING)
	return e, f.launcher.agg(f.t, e.Id, 1)
}
