package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/director"
	"github.com/fx-fl/fx/envoy"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// directorPKI makes a CA and the director, researcher and admin certificates
// in the layout of scripts/pki-bootstrap.sh under dir.
func directorPKI(t *testing.T, dir string) {
	t.Helper()
	ca, err := pki.InitCA(filepath.Join(dir, "pki", "ca"), pki.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []struct {
		role      pki.Role
		name, out string
		hosts     []string
	}{
		{pki.RoleDirector, "localhost", "director", []string{"localhost", "127.0.0.1"}},
		{pki.RoleResearcher, "researcher", "researcher", nil},
		{pki.RoleAdmin, "admin", "admin", nil},
	} {
		iss, err := ca.Issue(pki.IssueRequest{Role: p.role, Name: p.name, Hosts: p.hosts})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := iss.WriteFiles(filepath.Join(dir, "pki", p.out)); err != nil {
			t.Fatal(err)
		}
	}
}

// inDir runs the test from dir, as a user runs fx from the repository root.
func inDir(t *testing.T, dir string) {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chdir(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Chdir(wd) })
}

func TestDirectorStartBadSettings(t *testing.T) {
	dir := t.TempDir()
	directorPKI(t, dir)
	example, err := os.ReadFile(filepath.Join("..", "..", "configs", "director.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	inDir(t, dir)
	tests := []struct {
		name    string
		edit    func(string) string
		args    []string
		wantKey string
	}{
		{"unknown key", func(s string) string { return s + "colour: blue\n" }, nil, `"colour"`},
		{"bad policy", func(s string) string { return strings.Replace(s, "review_policy: manual", "review_policy: often", 1) }, nil, "review_policy"},
		{"bad duration", func(s string) string { return strings.Replace(s, "offline_after: 30s", "offline_after: soon", 1) }, nil, "offline_after"},
		{"grace too short", func(s string) string { return strings.Replace(s, "offline_after: 30s", "offline_after: 5s", 1) }, nil, "offline_after"},
		{"port range", func(s string) string { return strings.Replace(s, "port_min: 0", "port_min: 900", 1) }, nil, "aggregator.port_min"},
		{"missing cert", func(s string) string { return strings.Replace(s, "pki/director/localhost.crt", "pki/nope.crt", 1) }, nil, "tls.cert"},
		{"server name not in certificate", func(s string) string {
			return strings.Replace(s, `server_name: ""`, "server_name: nope.example", 1)
		}, nil, "advertise.server_name"},
		{"flag over file", func(s string) string { return s }, []string{"--review-policy", "maybe"}, "review_policy"},
		{"not a director certificate", func(s string) string {
			return strings.NewReplacer("pki/director/localhost.crt", "pki/admin/admin.crt", "pki/director/localhost.key", "pki/admin/admin.key").Replace(s)
		}, nil, "tls.cert"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := filepath.Join(t.TempDir(), "director.yaml")
			if err := os.WriteFile(cfg, []byte(tt.edit(string(example))), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := run(t, append([]string{"director", "start", "--config", cfg}, tt.args...)...)
			if err == nil || !strings.Contains(err.Error(), tt.wantKey) {
				t.Fatalf("error = %v, want it to name %s", err, tt.wantKey)
			}
		})
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// TestDirectorStartAndReview runs configs/director.yaml as is (only the
// listen address moved to a free port) against certificates in the
// pki-bootstrap layout, submits an experiment as the researcher, and
// approves and rejects through `fx director approve|reject`.
func TestDirectorStartAndReview(t *testing.T) {
	dir := t.TempDir()
	directorPKI(t, dir)
	cfgPath, err := filepath.Abs(filepath.Join("..", "..", "configs", "director.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	inDir(t, dir)
	addr := freePort(t)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		cmd := newRootCommand()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(&out)
		cmd.SetArgs([]string{"--log-level", "warn", "director", "start", "--config", cfgPath, "--listen", addr})
		done <- cmd.ExecuteContext(ctx)
	}()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("director start: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("the director did not stop")
		}
	}()

	k, err := pki.NewKeyring(pki.KeyringConfig{Files: pki.PartyFiles(filepath.Join("pki", "researcher"), "researcher")})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pki.NewClient(addr, k, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := fxv1.NewDirectorClient(conn)
	submit := func(name string) {
		t.Helper()
		plan := "name: " + name + "\nrounds: 1\nrunner: {kind: builtin, model: softmax}\n"
		src := t.TempDir()
		if err := os.WriteFile(filepath.Join(src, "plan.yaml"), []byte(plan), 0o600); err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if err := experiment.Pack(src, &buf); err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(buf.Bytes())
		deadline := time.Now().Add(20 * time.Second)
		for {
			sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
			stream, err := client.SubmitExperiment(sctx, waitForReady())
			if err == nil {
				err = stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Header{Header: &fxv1.SubmitHeader{
					Size: int64(buf.Len()), Sha256: hex.EncodeToString(sum[:]), PlanYaml: plan}}})
			}
			if err == nil {
				err = stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: buf.Bytes()}})
			}
			if err == nil {
				_, err = stream.CloseAndRecv()
			}
			scancel()
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("submit %s: %v", name, err)
			}
		}
	}
	submit("first")
	submit("second")

	common := []string{"--director", addr, "--server-name", "localhost"}
	out, err := run(t, append([]string{"director", "approve", "first", "--owner", "researcher"}, common...)...)
	if err != nil || !strings.Contains(out, "researcher/first") || !strings.Contains(out, "OFFERED") {
		t.Errorf("approve = %q, %v", out, err)
	}
	out, err = run(t, append([]string{"director", "reject", "second", "--owner", "researcher", "--reason", "not now"}, common...)...)
	if err != nil || !strings.Contains(out, "REJECTED") {
		t.Errorf("reject = %q, %v", out, err)
	}
	if _, err := run(t, append([]string{"director", "reject", "first", "--owner", "researcher"}, common...)...); err == nil || !strings.Contains(err.Error(), "--reason") {
		t.Errorf("reject without reason: %v", err)
	}
	if _, err := run(t, append([]string{"director", "approve", "second", "--owner", "researcher"}, common...)...); err == nil || !strings.Contains(err.Error(), "FailedPrecondition") {
		t.Errorf("approve a rejected experiment: %v", err)
	}
	if _, err := run(t, append([]string{"director", "approve", "ghost"}, common...)...); err == nil || !strings.Contains(err.Error(), "NotFound") {
		t.Errorf("approve a missing experiment: %v", err)
	}
}

func waitForReady() grpc.CallOption { return grpc.WaitForReady(true) }

// TestFederationEndToEnd runs a whole federation in one process: a
// director, two envoys holding halves of a synthetic data set, and a
// researcher who submits a two-round experiment, watches its metrics to
// the end and downloads the best model. Everything talks gRPC over mutual
// TLS on loopback with certificates from a CA made here.
func TestFederationEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end federation")
	}
	root := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(root, "ca"), pki.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	issue := func(role pki.Role, name string, hosts ...string) pki.Files {
		iss, err := ca.Issue(pki.IssueRequest{Role: role, Name: name, Hosts: hosts})
		if err != nil {
			t.Fatal(err)
		}
		files, err := iss.WriteFiles(filepath.Join(root, string(role), name))
		if err != nil {
			t.Fatal(err)
		}
		return files
	}
	logger := hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: io.Discard})
	if testing.Verbose() {
		logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Info, Output: os.Stderr})
	}

	// The director.
	dirFiles := issue(pki.RoleDirector, "localhost", "localhost", "127.0.0.1")
	s := director.DefaultSettings()
	s.ListenAddress = "127.0.0.1:0"
	s.Advertise.Host = "127.0.0.1"
	s.Aggregator.Host = "127.0.0.1"
	s.TLS.Cert, s.TLS.Key, s.TLS.CA = dirFiles.Cert, dirFiles.Key, dirFiles.CA
	s.DataDir = filepath.Join(root, "director")
	s.ReviewPolicy = director.ReviewAuto
	s.HeartbeatPeriod, s.OfflineAfter = time.Second, 5*time.Second
	cfg, err := s.Config(logger)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listener = lis
	d, err := director.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 3)
	go func() { done <- d.Run(ctx) }()
	addr := lis.Addr().String()

	// Two envoys, each with half of one synthetic data set.
	for i, name := range []string{"site-1", "site-2"} {
		files := issue(pki.RoleEnvoy, name)
		ec := envoy.DefaultConfig()
		ec.Director.Address = addr
		ec.Director.ServerName = "localhost"
		ec.TLS.Cert, ec.TLS.Key, ec.TLS.CA = files.Cert, files.Key, files.CA
		ec.WorkDir = filepath.Join(root, "envoys", name)
		ec.Tags = []string{"synthetic"}
		ec.Shard = dataset.Config{Kind: "synthetic", Features: 8, Classes: 3, TrainSamples: 600, ValidSamples: 120, Shard: fmt.Sprintf("%d/2", i+1), Seed: 7}
		ec.Logger = logger.Named(name)
		ec.RPCTimeout = 10 * time.Second
		ec.Retry.Initial, ec.Retry.Max = 50*time.Millisecond, time.Second
		e, err := envoy.New(ec)
		if err != nil {
			t.Fatalf("envoy %s: %v", name, err)
		}
		go func() { done <- e.Run(ctx) }()
	}

	// The researcher.
	rf := issue(pki.RoleResearcher, "alice")
	k, err := pki.NewKeyring(pki.KeyringConfig{Files: rf})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pki.NewClient(addr, k, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := fxv1.NewDirectorClient(conn)
	tctx, tcancel := context.WithTimeout(ctx, 2*time.Minute)
	defer tcancel()
	waitEnvoys(t, tctx, c, 2)

	plan := `name: synth
rounds: 2
participants: {min: 2, tags: [synthetic]}
runner: {kind: builtin, model: softmax, hyperparameters: {lr: 0.1, epochs: 1, batch_size: 32}}
stragglers: {deadline: 1m}
`
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "plan.yaml"), []byte(plan), 0o600); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := experiment.Pack(src, &buf); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(buf.Bytes())
	stream, err := c.SubmitExperiment(tctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Header{Header: &fxv1.SubmitHeader{
		Size: int64(buf.Len()), Sha256: hex.EncodeToString(sum[:]), PlanYaml: plan}}}); err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: buf.Bytes()}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		t.Fatal(err)
	}
	ref := &fxv1.ExperimentRef{Id: resp.GetExperiment().GetId()}

	// Metrics stream until the experiment ends.
	ms, err := c.WatchMetrics(tctx, &fxv1.WatchMetricsRequest{Experiment: ref})
	if err != nil {
		t.Fatal(err)
	}
	var events []*fxv1.MetricEvent
	for {
		ev, err := ms.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("WatchMetrics after %d events: %v", len(events), err)
		}
		events = append(events, ev)
	}
	got, err := c.GetExperiment(tctx, &fxv1.GetExperimentRequest{Experiment: ref})
	if err != nil {
		t.Fatal(err)
	}
	if got.GetState() != fxv1.ExperimentState_FINISHED {
		t.Fatalf("experiment ended %v: %s (participants %v)", got.GetState(), got.GetReason(), got.GetParticipants())
	}
	for i, ev := range events {
		if ev.GetSequence() != int64(i+1) {
			t.Fatalf("event %d has sequence %d", i, ev.GetSequence())
		}
	}
	if len(events) == 0 || got.GetBest() == nil {
		t.Fatalf("%d events, best %v", len(events), got.GetBest())
	}
	ds, err := c.DownloadModel(tctx, &fxv1.DownloadModelRequest{Experiment: ref, Selector: fxv1.ModelSelector_BEST})
	if err != nil {
		t.Fatal(err)
	}
	var model bytes.Buffer
	var info *fxv1.ModelInfo
	for {
		m, err := ds.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if m.GetInfo() != nil {
			info = m.GetInfo()
		}
		model.Write(m.GetChunk())
	}
	msum := sha256.Sum256(model.Bytes())
	if info == nil || info.GetSize() != int64(model.Len()) || info.GetSha256() != hex.EncodeToString(msum[:]) {
		t.Errorf("model info %v for %d bytes", info, model.Len())
	}
	t.Logf("finished: %d metric events, best %s = %.3f at round %d, model %d bytes",
		len(events), got.GetBest().GetMetric(), got.GetBest().GetValue(), got.GetBest().GetRound(), model.Len())

	cancel()
	for range 3 {
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Fatal("the federation did not stop")
		}
	}
}

// waitEnvoys waits until n envoys are online.
func waitEnvoys(t *testing.T, ctx context.Context, c fxv1.DirectorClient, n int) {
	t.Helper()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		resp, err := c.ListEnvoys(ctx, &fxv1.ListEnvoysRequest{OnlineOnly: true})
		if err == nil && len(resp.GetEnvoys()) == n {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("envoys online: %v (%v)", resp.GetEnvoys(), err)
		case <-tick.C:
		}
	}
}
