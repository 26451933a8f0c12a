package app

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/testfed"
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
	example, err := os.ReadFile(filepath.Join("..", "..", "..", "configs", "director.yaml"))
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
		{"bad launcher", func(s string) string { return strings.Replace(s, "launcher: inprocess", "launcher: processes", 1) }, nil,
			`launcher: "processes": use inprocess (aggregators run inside the director), process (`},
		{"bad launcher flag", func(s string) string { return s }, []string{"--launcher", "docker"}, `launcher: "docker": use inprocess`},
		{"kubernetes launcher without its block", func(s string) string { return s }, []string{"--launcher", "kubernetes"}, "kubernetes.image: is required with launcher kubernetes"},
		{"not a director certificate", func(s string) string {
			return strings.NewReplacer("pki/director/localhost.crt", "pki/admin/admin.crt", "pki/director/localhost.key", "pki/admin/admin.key").Replace(s)
		}, nil, "tls.cert"},
	}
	t.Run("environment over file", func(t *testing.T) {
		t.Setenv("FX_MAX_CONCURRENT_EXPERIMENTS", "0")
		cfg := filepath.Join(t.TempDir(), "director.yaml")
		if err := os.WriteFile(cfg, example, 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := run(t, "director", "start", "--config", cfg)
		if err == nil || !strings.Contains(err.Error(), "max_concurrent_experiments") {
			t.Fatalf("error = %v, want it to name max_concurrent_experiments", err)
		}
	})
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

// TestDirectorStartAndReview runs configs/director.yaml as is (only the
// listen address moved to a free port) against certificates in the
// pki-bootstrap layout, submits an experiment as the researcher, and
// approves and rejects through `fx director approve|reject`.
func TestDirectorStartAndReview(t *testing.T) {
	dir := t.TempDir()
	directorPKI(t, dir)
	cfgPath, err := filepath.Abs(filepath.Join("..", "..", "..", "configs", "director.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	inDir(t, dir)
	addr := testfed.FreeAddr(t)

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

	ca, err := pki.OpenCA(filepath.Join("pki", "ca"))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ca.IssueTo(filepath.Join("pki", "bob"), pki.IssueRequest{Role: pki.RoleResearcher, Name: "bob"}); err != nil {
		t.Fatal(err)
	}
	clientOf := func(name string) fxv1.DirectorClient {
		t.Helper()
		k, err := pki.NewKeyring(pki.KeyringConfig{Files: pki.PartyFiles(filepath.Join("pki", name), name)})
		if err != nil {
			t.Fatal(err)
		}
		conn, err := pki.NewClient(addr, k, "localhost")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return fxv1.NewDirectorClient(conn)
	}
	researcher, bob := clientOf("researcher"), clientOf("bob")
	submit := func(client fxv1.DirectorClient, name string) {
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
	submit(researcher, "first")
	submit(researcher, "second")
	submit(researcher, "shared")
	submit(bob, "shared")

	// The connection settings are fx experiment's (flags, FX_*, a
	// profile), with the admin's files in the pki-bootstrap layout as
	// defaults; an experiment is named as its researcher named it.
	t.Setenv("FX_DIRECTOR", addr)
	t.Setenv("FX_SERVER_NAME", "localhost")
	out, err := run(t, "director", "approve", "first")
	if err != nil || !strings.Contains(out, "researcher/first") || !strings.Contains(out, "OFFERED") {
		t.Errorf("approve = %q, %v", out, err)
	}
	admin := pki.PartyFiles(filepath.Join("pki", "admin"), "admin")
	out, err = run(t, "director", "reject", "researcher/second", "--reason", "not now", "--cert", admin.Cert, "--key", admin.Key, "--ca", admin.CA)
	if err != nil || !strings.Contains(out, "REJECTED") {
		t.Errorf("reject = %q, %v", out, err)
	}
	if _, err := run(t, "director", "reject", "first"); err == nil || !strings.Contains(err.Error(), "--reason") || exitCode(err) != exitUsage {
		t.Errorf("reject without reason: %v", err)
	}
	if _, err := run(t, "director", "approve", "second", "--tls-cert", admin.Cert, "--tls-key", admin.Key, "--tls-ca", admin.CA); err == nil || !strings.Contains(err.Error(), "FailedPrecondition") {
		t.Errorf("approve a rejected experiment: %v", err)
	}
	if _, err := run(t, "director", "approve", "ghost"); err == nil || !strings.Contains(err.Error(), "NotFound") || exitCode(err) != exitNotFound {
		t.Errorf("approve a missing experiment: %v (exit status %d)", err, exitCode(err))
	}
	// Two researchers' experiments of one name: the admin says whose.
	if _, err := run(t, "director", "approve", "shared"); err == nil || !strings.Contains(err.Error(), "bob/shared (PENDING)") || !strings.Contains(err.Error(), "researcher/shared (PENDING)") {
		t.Errorf("approve an ambiguous name: %v, want both named", err)
	}
	if out, err := run(t, "director", "approve", "shared", "--owner", "bob"); err != nil || !strings.Contains(out, "bob/shared") {
		t.Errorf("approve --owner bob = %q, %v", out, err)
	}
	// Now only one of them is PENDING: the name is enough.
	if out, err := run(t, "director", "approve", "shared"); err != nil || !strings.Contains(out, "researcher/shared") {
		t.Errorf("approve the one pending = %q, %v", out, err)
	}
}

func waitForReady() grpc.CallOption { return grpc.WaitForReady(true) }

// federation is a director and two envoys holding halves of a synthetic
// data set, in one process, talking gRPC over mutual TLS on loopback with
// certificates from a CA made for the test.
type federation struct {
	*testfed.Federation
	t      *testing.T
	client fxv1.DirectorClient
}

func newFederation(t *testing.T) *federation {
	f := &federation{Federation: testfed.New(t), t: t}
	k := f.CA.Keyring(pki.RoleResearcher, "alice")
	conn, err := pki.NewClient(f.Addr, k, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	f.client = fxv1.NewDirectorClient(conn)
	return f
}

const federationPlan = `name: synth
rounds: %d
participants: {min: 2, tags: [synthetic]}
runner: {kind: builtin, model: softmax, hyperparameters: {lr: 0.1, epochs: 1, batch_size: 32}}
stragglers: {deadline: 15s}
`

// submit uploads a plan of rounds rounds and returns its reference.
func (f *federation) submit(ctx context.Context, rounds int) *fxv1.ExperimentRef {
	f.t.Helper()
	plan := fmt.Sprintf(federationPlan, rounds)
	src := f.t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "plan.yaml"), []byte(plan), 0o600); err != nil {
		f.t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := experiment.Pack(src, &buf); err != nil {
		f.t.Fatal(err)
	}
	sum := sha256.Sum256(buf.Bytes())
	stream, err := f.client.SubmitExperiment(ctx, grpc.WaitForReady(true))
	if err != nil {
		f.t.Fatal(err)
	}
	if err := stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Header{Header: &fxv1.SubmitHeader{
		Size: int64(buf.Len()), Sha256: hex.EncodeToString(sum[:]), PlanYaml: plan}}}); err != nil {
		f.t.Fatal(err)
	}
	if err := stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: buf.Bytes()}}); err != nil {
		f.t.Fatal(err)
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		f.t.Fatal(err)
	}
	return &fxv1.ExperimentRef{Id: resp.GetExperiment().GetId()}
}

// watch reads metric events after seq until the stream ends (nil) or
// fails, calling each(event) for every one.
func (f *federation) watch(ctx context.Context, ref *fxv1.ExperimentRef, after int64, each func(*fxv1.MetricEvent) bool) error {
	ms, err := f.client.WatchMetrics(ctx, &fxv1.WatchMetricsRequest{Experiment: ref, AfterSequence: after}, grpc.WaitForReady(true))
	if err != nil {
		return err
	}
	for {
		ev, err := ms.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if !each(ev) {
			return nil
		}
	}
}

// finished checks the experiment ended FINISHED and its best model downloads
// intact.
func (f *federation) finished(ctx context.Context, ref *fxv1.ExperimentRef) *fxv1.Experiment {
	f.t.Helper()
	got, err := f.client.GetExperiment(ctx, &fxv1.GetExperimentRequest{Experiment: ref})
	if err != nil {
		f.t.Fatal(err)
	}
	if got.GetState() != fxv1.ExperimentState_FINISHED || got.GetBest() == nil {
		f.t.Fatalf("experiment ended %v: %s (best %v, participants %v)", got.GetState(), got.GetReason(), got.GetBest(), got.GetParticipants())
	}
	ds, err := f.client.DownloadModel(ctx, &fxv1.DownloadModelRequest{Experiment: ref, Selector: fxv1.ModelSelector_BEST})
	if err != nil {
		f.t.Fatal(err)
	}
	var model bytes.Buffer
	var info *fxv1.ModelInfo
	for {
		m, err := ds.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			f.t.Fatal(err)
		}
		if m.GetInfo() != nil {
			info = m.GetInfo()
		}
		model.Write(m.GetChunk())
	}
	sum := sha256.Sum256(model.Bytes())
	if info == nil || info.GetSize() != int64(model.Len()) || info.GetSha256() != hex.EncodeToString(sum[:]) {
		f.t.Errorf("model info %v for %d bytes", info, model.Len())
	}
	return got
}

// TestFederationEndToEnd: a researcher submits a two-round experiment to a
// federation of two envoys, watches its metrics to the end and downloads
// the best model.
func TestFederationEndToEnd(t *testing.T) {
	f := newFederation(t)
	ctx, cancel := context.WithTimeout(f.Ctx, 2*time.Minute)
	defer cancel()
	ref := f.submit(ctx, 2)
	var events []*fxv1.MetricEvent
	if err := f.watch(ctx, ref, 0, func(ev *fxv1.MetricEvent) bool { events = append(events, ev); return true }); err != nil {
		t.Fatalf("WatchMetrics after %d events: %v", len(events), err)
	}
	got := f.finished(ctx, ref)
	for i, ev := range events {
		if ev.GetSequence() != int64(i+1) {
			t.Fatalf("event %d has sequence %d", i, ev.GetSequence())
		}
	}
	// Two rounds of 3 tasks × 2 sites + 3 aggregates, and the final
	// validation round: 2 results + 1 aggregate.
	if len(events) != 21 {
		t.Errorf("%d metric events, want 21", len(events))
	}
	t.Logf("finished: %d metric events, best %s = %.3f at round %d", len(events), got.GetBest().GetMetric(), got.GetBest().GetValue(), got.GetBest().GetRound())
}

// TestFederationSurvivesDirectorRestart stops the director as soon as the
// first round has completed and starts a new one on the same data
// directory: the experiment resumes (envoys reconnect and rejoin the
// relaunched aggregator) and finishes, and the metric stream, resumed from
// the last sequence seen, has neither gaps nor repeats.
func TestFederationSurvivesDirectorRestart(t *testing.T) {
	f := newFederation(t)
	ctx, cancel := context.WithTimeout(f.Ctx, 2*time.Minute)
	defer cancel()
	ref := f.submit(ctx, 4)
	var events []*fxv1.MetricEvent
	_ = f.watch(ctx, ref, 0, func(ev *fxv1.MetricEvent) bool {
		events = append(events, ev)
		return ev.GetCollaborator() != "" // stop at the first aggregate
	})
	f.RestartDirector()
	after := events[len(events)-1].GetSequence()
	deadline := time.Now().Add(time.Minute)
	for {
		err := f.watch(ctx, ref, after, func(ev *fxv1.MetricEvent) bool {
			events = append(events, ev)
			after = ev.GetSequence()
			return true
		})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("WatchMetrics after the restart: %v", err)
		}
	}
	f.finished(ctx, ref)
	for i, ev := range events {
		if ev.GetSequence() != int64(i+1) {
			t.Fatalf("event %d has sequence %d: a gap or a repeat across the restart", i, ev.GetSequence())
		}
	}
	// Four rounds of 9 events and the final validation round's 3.
	if len(events) != 39 {
		t.Errorf("%d metric events, want 39", len(events))
	}
}
