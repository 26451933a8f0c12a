package envoy

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner/sandbox"
)

// waitTimeout bounds every wait on a condition in these tests.
const waitTimeout = 20 * time.Second

// ---------------------------------------------------------------- PKI

// testPKI is a CA made once for the package's tests, with certificate files
// issued on demand.
type testPKI struct {
	dir      string
	ca       *pki.CA
	mu       sync.Mutex
	issued   map[string]pki.Files
	director pki.Files
}

var (
	pkiOnce   sync.Once
	sharedPKI *testPKI
	pkiErr    error
)

func TestMain(m *testing.M) {
	sandbox.Main() // exec runners' sandbox trampoline: this test binary
	code := m.Run()
	if sharedPKI != nil {
		os.RemoveAll(sharedPKI.dir)
	}
	os.Exit(code)
}

func getPKI(t *testing.T) *testPKI {
	t.Helper()
	pkiOnce.Do(func() {
		dir, err := os.MkdirTemp("", "envoy-pki-")
		if err != nil {
			pkiErr = err
			return
		}
		ca, err := pki.InitCA(filepath.Join(dir, "ca"), pki.InitOptions{})
		if err != nil {
			pkiErr = err
			return
		}
		sharedPKI = &testPKI{dir: dir, ca: ca, issued: map[string]pki.Files{}}
		sharedPKI.director, pkiErr = sharedPKI.issue(pki.RoleDirector, "director", "127.0.0.1", "localhost")
	})
	if pkiErr != nil {
		t.Fatalf("test CA: %v", pkiErr)
	}
	return sharedPKI
}

func (p *testPKI) issue(role pki.Role, name string, hosts ...string) (pki.Files, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	key := string(role) + "/" + name
	if f, ok := p.issued[key]; ok {
		return f, nil
	}
	iss, err := p.ca.Issue(pki.IssueRequest{Role: role, Name: name, Hosts: hosts})
	if err != nil {
		return pki.Files{}, err
	}
	f, err := iss.WriteFiles(filepath.Join(p.dir, string(role)))
	if err != nil {
		return pki.Files{}, err
	}
	p.issued[key] = f
	return f, nil
}

func (p *testPKI) files(t *testing.T, role pki.Role, name string) pki.Files {
	t.Helper()
	f, err := p.issue(role, name)
	if err != nil {
		t.Fatalf("issuing %s %s: %v", role, name, err)
	}
	return f
}

// ---------------------------------------------------------- fake director

// fakeDirector implements the envoy side of the Director service the way the
// protocol describes it, with knobs to break it: it forgets registrations
// when restarted, cuts or corrupts downloads, and records every call. Every
// change of state is broadcast on changed, so tests wait on conditions
// rather than sleeping.
type fakeDirector struct {
	fxv1.UnimplementedDirectorServer

	t     *testing.T
	keyng *pki.Keyring
	addr  string
	srv   *grpc.Server

	mu      sync.Mutex
	changed chan struct{}
	period  time.Duration

	registrations map[string]int
	registered    map[string]*fxv1.RegisterEnvoyRequest
	heartbeats    map[string]int
	running       map[string][]string
	streams       map[string]int
	queues        map[string]chan *fxv1.Assignment
	// assignments are replayed on every new stream of an envoy.
	assignments map[string][]*fxv1.Assignment
	archives    map[string][]byte
	corrupt     map[string]bool
	cutAfter    map[string]int64
	// stallAfter makes the first download of an experiment go silent
	// after this many bytes, until the client gives up.
	stallAfter map[string]int64
	downloads  []download
	answers    map[string]*fxv1.AnswerOfferRequest
	failures   []*fxv1.ReportFailureRequest
	// ended experiments are answered with a Stop when a heartbeat lists
	// them, as the director does.
	ended map[string]bool
}

type download struct {
	id     string
	offset int64
}

func newFakeDirector(t *testing.T) *fakeDirector {
	t.Helper()
	p := getPKI(t)
	k, err := pki.NewKeyring(pki.KeyringConfig{Files: p.director})
	if err != nil {
		t.Fatalf("director keyring: %v", err)
	}
	f := &fakeDirector{
		t:             t,
		keyng:         k,
		changed:       make(chan struct{}),
		period:        50 * time.Millisecond,
		registrations: map[string]int{},
		registered:    map[string]*fxv1.RegisterEnvoyRequest{},
		heartbeats:    map[string]int{},
		running:       map[string][]string{},
		streams:       map[string]int{},
		queues:        map[string]chan *fxv1.Assignment{},
		assignments:   map[string][]*fxv1.Assignment{},
		archives:      map[string][]byte{},
		corrupt:       map[string]bool{},
		cutAfter:      map[string]int64{},
		stallAfter:    map[string]int64{},
		answers:       map[string]*fxv1.AnswerOfferRequest{},
		ended:         map[string]bool{},
	}
	f.serve("127.0.0.1:0")
	t.Cleanup(func() { f.stop() })
	return f
}

func (f *fakeDirector) serve(addr string) {
	f.t.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		f.t.Fatalf("listen %s: %v", addr, err)
	}
	srv := grpc.NewServer(pki.ServerOptions(f.keyng, pki.RulesFromProto(fxv1.DirectorRoles()))...)
	fxv1.RegisterDirectorServer(srv, f)
	f.mu.Lock()
	f.addr = lis.Addr().String()
	f.srv = srv
	f.mu.Unlock()
	go srv.Serve(lis)
}

func (f *fakeDirector) stop() {
	f.mu.Lock()
	srv := f.srv
	f.mu.Unlock()
	if srv != nil {
		srv.Stop()
	}
}

// restart stops the server, forgets every registration and open stream, as
// a director that lost its session state would, and serves again on the
// same address.
func (f *fakeDirector) restart() {
	f.stop()
	f.update(func() {
		f.registered = map[string]*fxv1.RegisterEnvoyRequest{}
		f.queues = map[string]chan *fxv1.Assignment{}
	})
	f.serve(f.addr)
}

// update changes the state under the lock and wakes every waiter.
func (f *fakeDirector) update(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn()
	close(f.changed)
	f.changed = make(chan struct{})
}

// waitFor blocks until cond (called under the lock) holds.
func (f *fakeDirector) waitFor(what string, cond func() bool) {
	f.t.Helper()
	timeout := time.NewTimer(waitTimeout)
	defer timeout.Stop()
	for {
		f.mu.Lock()
		ok := cond()
		ch := f.changed
		f.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-timeout.C:
			f.t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func (f *fakeDirector) answer(envoy, id string) *fxv1.AnswerOfferRequest {
	f.t.Helper()
	var a *fxv1.AnswerOfferRequest
	f.waitFor(fmt.Sprintf("%s to answer the offer of %s", envoy, id), func() bool {
		a = f.answers[envoy+"/"+id]
		return a != nil
	})
	return a
}

// push sends an assignment on the envoy's live stream, if any, and keeps it
// for replay when replay is set.
func (f *fakeDirector) push(envoy string, a *fxv1.Assignment, replay bool) {
	f.update(func() {
		if replay {
			f.assignments[envoy] = append(f.assignments[envoy], a)
		}
		if q := f.queues[envoy]; q != nil {
			q <- a
		}
	})
}

// setReplay replaces what a new stream of the envoy replays.
func (f *fakeDirector) setReplay(envoy string, as ...*fxv1.Assignment) {
	f.update(func() { f.assignments[envoy] = as })
}

func (f *fakeDirector) RegisterEnvoy(ctx context.Context, req *fxv1.RegisterEnvoyRequest) (*fxv1.RegisterEnvoyResponse, error) {
	if err := pki.RequireCaller(ctx, req.GetEnvoyName()); err != nil {
		return nil, err
	}
	if len(req.GetShard().GetSampleShape()) == 0 || req.GetShard().GetTrainSamples() <= 0 {
		return nil, status.Error(codes.InvalidArgument, "shard without shapes or samples")
	}
	f.update(func() {
		f.registrations[req.GetEnvoyName()]++
		f.registered[req.GetEnvoyName()] = req
	})
	return &fxv1.RegisterEnvoyResponse{HeartbeatPeriod: durationpb.New(f.period), OfflineAfter: durationpb.New(10 * f.period)}, nil
}

func (f *fakeDirector) Heartbeat(ctx context.Context, req *fxv1.HeartbeatRequest) (*fxv1.HeartbeatResponse, error) {
	if err := pki.RequireCaller(ctx, req.GetEnvoyName()); err != nil {
		return nil, err
	}
	var known bool
	f.update(func() {
		if _, known = f.registered[req.GetEnvoyName()]; known {
			f.heartbeats[req.GetEnvoyName()]++
			f.running[req.GetEnvoyName()] = req.GetRunningExperiments()
			for _, id := range req.GetRunningExperiments() {
				if q := f.queues[req.GetEnvoyName()]; f.ended[id] && q != nil {
					q <- stopAssignment(id)
				}
			}
		}
	})
	if !known {
		return nil, status.Error(codes.FailedPrecondition, "envoy not registered: call RegisterEnvoy")
	}
	return &fxv1.HeartbeatResponse{NextHeartbeat: durationpb.New(f.period)}, nil
}

func (f *fakeDirector) WatchAssignments(req *fxv1.WatchAssignmentsRequest, stream grpc.ServerStreamingServer[fxv1.Assignment]) error {
	name := req.GetEnvoyName()
	if err := pki.RequireCaller(stream.Context(), name); err != nil {
		return err
	}
	q := make(chan *fxv1.Assignment, 64)
	var replay []*fxv1.Assignment
	var known bool
	f.update(func() {
		if _, known = f.registered[name]; !known {
			return
		}
		replay = slices.Clone(f.assignments[name])
		f.queues[name] = q
		f.streams[name]++
	})
	if !known {
		return status.Error(codes.FailedPrecondition, "envoy not registered: call RegisterEnvoy")
	}
	for _, a := range replay {
		if err := stream.Send(a); err != nil {
			return err
		}
	}
	for {
		select {
		case a := <-q:
			if err := stream.Send(a); err != nil {
				return err
			}
		case <-stream.Context().Done():
			return nil
		}
	}
}

// archiveChunk is small so that tests see several chunks per archive.
const archiveChunk = 1024

func (f *fakeDirector) DownloadArchive(req *fxv1.DownloadArchiveRequest, stream grpc.ServerStreamingServer[fxv1.ArchiveChunk]) error {
	id := req.GetExperimentId()
	var data []byte
	var cut, stall int64
	f.update(func() {
		stall = f.stallAfter[id]
		delete(f.stallAfter, id)
		data = f.archives[id]
		if f.corrupt[id] && data != nil {
			data = bytes.Clone(data)
			data[len(data)/2] ^= 0xff
		}
		cut = f.cutAfter[id]
		delete(f.cutAfter, id)
		f.downloads = append(f.downloads, download{id: id, offset: req.GetOffset()})
	})
	if data == nil {
		return status.Errorf(codes.NotFound, "experiment %s was not offered to this envoy", id)
	}
	if req.GetOffset() < 0 || req.GetOffset() > int64(len(data)) {
		return status.Errorf(codes.OutOfRange, "offset %d beyond the archive's %d bytes", req.GetOffset(), len(data))
	}
	for off := req.GetOffset(); off < int64(len(data)); off += archiveChunk {
		if cut > 0 && off >= cut {
			return status.Error(codes.Unavailable, "connection reset (test)")
		}
		if stall > 0 && off >= stall {
			<-stream.Context().Done()
			return stream.Context().Err()
		}
		end := min(off+archiveChunk, int64(len(data)))
		if err := stream.Send(&fxv1.ArchiveChunk{Offset: off, Data: data[off:end]}); err != nil {
			return err
		}
	}
	return nil
}

func (f *fakeDirector) AnswerOffer(ctx context.Context, req *fxv1.AnswerOfferRequest) (*fxv1.AnswerOfferResponse, error) {
	if err := pki.RequireCaller(ctx, req.GetEnvoyName()); err != nil {
		return nil, err
	}
	if !req.GetAccept() && req.GetReason() == "" {
		return nil, status.Error(codes.InvalidArgument, "a rejection needs a reason")
	}
	f.update(func() { f.answers[req.GetEnvoyName()+"/"+req.GetExperimentId()] = req })
	return &fxv1.AnswerOfferResponse{State: fxv1.ExperimentState_OFFERED}, nil
}

func (f *fakeDirector) ReportFailure(ctx context.Context, req *fxv1.ReportFailureRequest) (*fxv1.ReportFailureResponse, error) {
	if err := pki.RequireCaller(ctx, req.GetEnvoyName()); err != nil {
		return nil, err
	}
	if req.GetReason() == "" {
		return nil, status.Error(codes.InvalidArgument, "empty reason")
	}
	f.update(func() { f.failures = append(f.failures, req) })
	return &fxv1.ReportFailureResponse{}, nil
}

// offer stores an archive and returns the assignment offering it.
func (f *fakeDirector) offer(id string, archive []byte, planYAML string) *fxv1.Assignment {
	f.update(func() { f.archives[id] = archive })
	sum := sha256.Sum256(archive)
	name := id
	if p, err := experiment.ParsePlan([]byte(planYAML)); err == nil {
		name = p.Name
	}
	return &fxv1.Assignment{ExperimentId: id, Kind: &fxv1.Assignment_Offer{Offer: &fxv1.Offer{
		Name:          name,
		Owner:         "alice",
		ArchiveSize:   int64(len(archive)),
		ArchiveSha256: hex.EncodeToString(sum[:]),
		PlanYaml:      planYAML,
	}}}
}

func startAssignment(id string) *fxv1.Assignment {
	return &fxv1.Assignment{ExperimentId: id, Kind: &fxv1.Assignment_Start{Start: &fxv1.Start{
		AggregatorAddress: "127.0.0.1:1", AggregatorServerName: "director", Round: 1,
	}}}
}

func stopAssignment(id string) *fxv1.Assignment {
	return &fxv1.Assignment{ExperimentId: id, Kind: &fxv1.Assignment_Stop{Stop: &fxv1.Stop{
		State: fxv1.ExperimentState_FINISHED, Reason: "done",
	}}}
}

// ------------------------------------------------------------- archives

const softmaxPlan = `name: %s
rounds: 2
participants: {min: 1}
runner: {kind: builtin, model: softmax, hyperparameters: {lr: 0.1, batch_size: 8}}
`

const execPlan = `name: %s
rounds: 1
runner: {kind: exec, command: [sh, run.sh]}
`

// readyRunner is a persistent runner in sh that says it is ready and
// serves no task: enough for a review, which starts the runner once.
const readyRunner = `#!/bin/sh
read -r setup <&3
echo '{"type": "ready", "protocol": 2}' >&4
while read -r msg <&3; do :; done
`

// makeArchive packs a plan, an incompressible file of extra bytes (to take
// several chunks) and the named files given as name, content pairs.
func makeArchive(t *testing.T, planYAML string, extra int, files ...string) []byte {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, experiment.PlanFile), []byte(planYAML), 0o644); err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(files); i += 2 {
		if err := os.WriteFile(filepath.Join(dir, files[i]), []byte(files[i+1]), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if extra > 0 {
		noise := make([]byte, extra)
		rand.Read(noise)
		if err := os.WriteFile(filepath.Join(dir, "blob.bin"), noise, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var buf bytes.Buffer
	if err := experiment.Pack(dir, &buf); err != nil {
		t.Fatalf("packing: %v", err)
	}
	return buf.Bytes()
}

func digest(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// -------------------------------------------------------- fake collaborator

// fakeCollaborators records the collaborators an envoy starts and lets the
// test end them.
type fakeCollaborators struct {
	mu      sync.Mutex
	changed chan struct{}
	starts  []CollaboratorSpec
	active  map[string]bool
	finish  map[string]chan error
}

func newFakeCollaborators() *fakeCollaborators {
	return &fakeCollaborators{changed: make(chan struct{}), active: map[string]bool{}, finish: map[string]chan error{}}
}

func (c *fakeCollaborators) update(fn func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fn()
	close(c.changed)
	c.changed = make(chan struct{})
}

func (c *fakeCollaborators) finishCh(id string) chan error {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch, ok := c.finish[id]
	if !ok {
		ch = make(chan error, 1)
		c.finish[id] = ch
	}
	return ch
}

func (c *fakeCollaborators) run(ctx context.Context, spec CollaboratorSpec) error {
	if spec.Runner == nil || spec.Plan == nil || len(spec.DialOptions) == 0 {
		return errors.New("fake collaborator: incomplete spec")
	}
	ch := c.finishCh(spec.ExperimentID)
	c.update(func() {
		c.starts = append(c.starts, spec)
		c.active[spec.ExperimentID] = true
	})
	defer c.update(func() { c.active[spec.ExperimentID] = false })
	select {
	case <-ctx.Done():
		return ctx.Err()
	case err := <-ch:
		return err
	}
}

func (c *fakeCollaborators) waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	timeout := time.NewTimer(waitTimeout)
	defer timeout.Stop()
	for {
		c.mu.Lock()
		ok := cond()
		ch := c.changed
		c.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-timeout.C:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// ---------------------------------------------------------------- envoys

// syncBuffer collects an envoy's log for assertions.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type site struct {
	envoy  *Envoy
	cfg    Config
	log    *syncBuffer
	collab *fakeCollaborators
	cancel context.CancelFunc
	done   chan error
}

// testConfig is a valid configuration for an envoy of the fake director,
// with small synthetic data and short retries.
func testConfig(t *testing.T, d *fakeDirector, name string) Config {
	t.Helper()
	files := getPKI(t).files(t, pki.RoleEnvoy, name)
	cfg := DefaultConfig()
	cfg.Director.Address = d.addr
	cfg.TLS = TLSConfig{Cert: files.Cert, Key: files.Key, CA: files.CA}
	cfg.WorkDir = t.TempDir()
	cfg.Tags = []string{"synthetic"}
	cfg.Shard = dataset.Config{Kind: dataset.KindSynthetic, Features: 4, Classes: 2, TrainSamples: 40, ValidSamples: 10, Seed: 1}
	cfg.RPCTimeout = 5 * time.Second
	cfg.Retry = RetryConfig{Initial: 10 * time.Millisecond, Max: 200 * time.Millisecond}
	return cfg
}

// startSite runs an envoy until the test ends.
func startSite(t *testing.T, cfg Config, collab *fakeCollaborators) *site {
	t.Helper()
	if collab == nil {
		collab = newFakeCollaborators()
	}
	s := &site{cfg: cfg, log: &syncBuffer{}, collab: collab, done: make(chan error, 1)}
	cfg.Logger = hclog.New(&hclog.LoggerOptions{Output: s.log, Level: hclog.Debug})
	cfg.RunCollaborator = collab.run
	e, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	s.envoy = e
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	go func() { s.done <- e.Run(ctx) }()
	t.Cleanup(func() { s.stop(t) })
	return s
}

// stop cancels the envoy and waits for Run to return.
func (s *site) stop(t *testing.T) {
	t.Helper()
	s.cancel()
	select {
	case err := <-s.done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
		s.done <- nil
	case <-time.After(waitTimeout):
		t.Fatalf("envoy did not stop within %s", waitTimeout)
	}
}

// eventually polls a condition of the envoy's own state, which has no
// notification, until it holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		<-tick.C
	}
}

func mustContain(t *testing.T, what, got string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(got, w) {
			t.Errorf("%s = %q, want it to contain %q", what, got, w)
		}
	}
}

// writeIDX writes a tiny MNIST-format data set of 3x3 images with labels
// 0..3 and returns its directory.
func writeIDX(t *testing.T, train, test int) string {
	t.Helper()
	dir := t.TempDir()
	write := func(name string, dims []uint32, data []byte) {
		var b bytes.Buffer
		b.Write([]byte{0, 0, 0x08, byte(len(dims))})
		for _, d := range dims {
			b.Write([]byte{byte(d >> 24), byte(d >> 16), byte(d >> 8), byte(d)})
		}
		b.Write(data)
		if err := os.WriteFile(filepath.Join(dir, name), b.Bytes(), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, split := range []struct {
		prefix string
		n      int
	}{{"train", train}, {"t10k", test}} {
		pixels := make([]byte, split.n*9)
		labels := make([]byte, split.n)
		for i := range split.n {
			labels[i] = byte(i % 4)
			for j := range 9 {
				pixels[i*9+j] = byte((i*31 + j*17) % 256)
			}
		}
		write(split.prefix+"-images-idx3-ubyte", []uint32{uint32(split.n), 3, 3}, pixels)
		write(split.prefix+"-labels-idx1-ubyte", []uint32{uint32(split.n)}, labels)
	}
	return dir
}

func idxShard(dir, shard string) dataset.Config {
	return dataset.Config{Kind: dataset.KindIDX, Path: dir, Shard: shard, Seed: 7}
}
