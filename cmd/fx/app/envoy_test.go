package app

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/envoy"
	"github.com/fx-fl/fx/internal/config"
	"github.com/fx-fl/fx/pki"
)

// envoyCerts issues an envoy and a researcher certificate from a new CA.
func envoyCerts(t *testing.T) (envoyFiles, researcher pki.Files) {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), pki.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	issue := func(role pki.Role, name string) pki.Files {
		iss, err := ca.Issue(pki.IssueRequest{Role: role, Name: name})
		if err != nil {
			t.Fatal(err)
		}
		f, err := iss.WriteFiles(filepath.Join(dir, string(role)))
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	return issue(pki.RoleEnvoy, "envoy-1"), issue(pki.RoleResearcher, "rita")
}

// parkedCollaborator stands in for an envoy's collaborators in tests that
// talk to its admin socket, not its rounds: it waits to be stopped.
func parkedCollaborator(ctx context.Context, _ envoy.CollaboratorSpec) error {
	<-ctx.Done()
	return ctx.Err()
}

// startEnvoy runs an envoy from cfg until the test ends; with checkRun, Run
// must then return nil. Run's result arrives on the channel returned, which
// is closed after it, so a test may watch for an envoy that ends early.
func startEnvoy(t *testing.T, cfg envoy.Config, checkRun bool) <-chan error {
	t.Helper()
	e, err := envoy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- e.Run(ctx)
		close(done)
	}()
	t.Cleanup(func() {
		cancel()
		if err, ok := <-done; ok && checkRun && err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return done
}

func writeEnvoyConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "envoy.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestEnvoyStartRefusesBadSettings(t *testing.T) {
	good, researcher := envoyCerts(t)
	base := func(f pki.Files, extra string) string {
		return "director: {address: 127.0.0.1:1}\n" +
			"tls: {cert: " + f.Cert + ", key: " + f.Key + ", ca: " + f.CA + "}\n" +
			"work_dir: " + t.TempDir() + "\n" + extra
	}
	synthetic := "shard: {kind: synthetic, train_samples: 20, valid_samples: 4}\n"
	tests := []struct {
		name string
		file string
		args []string
		want []string
	}{
		{"no such file", filepath.Join(t.TempDir(), "missing.yaml"), nil, []string{"missing.yaml", "does not exist"}},
		{"unknown key", writeEnvoyConfig(t, base(good, synthetic+"shard_colour: blue\n")), nil, []string{`unknown key "shard_colour"`}},
		{"malformed yaml", writeEnvoyConfig(t, base(good, synthetic+"tags: [unclosed\n")), nil, []string{"envoy.yaml"}},
		{"wrong type", writeEnvoyConfig(t, base(good, synthetic+"max_experiments: lots\n")), nil, []string{"max_experiments"}},
		{"missing data", writeEnvoyConfig(t, base(good, "shard: {kind: idx, path: /nonexistent/fashion}\n")), nil, []string{"shard", "/nonexistent/fashion"}},
		{"certificate of another role", writeEnvoyConfig(t, base(researcher, synthetic)), nil, []string{`role "researcher"`}},
		{"name not the CN", writeEnvoyConfig(t, base(good, synthetic+"name: envoy-2\n")), nil, []string{"envoy-2", "envoy-1"}},
		{"bad policy from a flag", writeEnvoyConfig(t, base(good, synthetic)), []string{"--review-policy", "sometimes"}, []string{"review.policy", "sometimes"}},
		{"bad shard from a flag", writeEnvoyConfig(t, base(good, synthetic)), []string{"--shard", "3/2"}, []string{"shard", "3/2"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"envoy", "start", "--config", tc.file}, tc.args...)
			_, err := run(t, args...)
			if err == nil {
				t.Fatal("fx envoy start succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestExampleEnvoyConfigLoads(t *testing.T) {
	cfg, err := loadEnvoyConfig(filepath.Join("..", "..", "..", "configs", "envoy.yaml"), nil)
	if err != nil {
		t.Fatalf("configs/envoy.yaml: %v", err)
	}
	if cfg.Name != "site-a" || cfg.Shard.Kind != dataset.KindIDX || cfg.Review.Policy != envoy.PolicyAuto || cfg.Retry.Max != 30*time.Second {
		t.Errorf("configs/envoy.yaml loaded as %+v", cfg)
	}
	if err := cfg.Shard.Validate(); err != nil {
		t.Errorf("configs/envoy.yaml shard: %v", err)
	}
}

func TestEnvoyAdminCommands(t *testing.T) {
	files, _ := envoyCerts(t)
	work, err := os.MkdirTemp("", "fx-envoy-cmd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	cfgFile := writeEnvoyConfig(t, "director: {address: 127.0.0.1:1}\n"+
		"tls: {cert: "+files.Cert+", key: "+files.Key+", ca: "+files.CA+"}\n"+
		"work_dir: "+work+"\nreview: {policy: manual}\n"+
		"shard: {kind: synthetic, train_samples: 20, valid_samples: 4}\n")
	cfg, err := loadEnvoyConfig(cfgFile, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg.RunCollaborator = parkedCollaborator
	done := startEnvoy(t, cfg, true)

	// The envoy serves its socket even while the director is unreachable;
	// wait for it to appear.
	socket := cfg.AdminSocketPath()
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := run(t, "envoy", "pending", "--config", cfgFile)
		if err == nil {
			if !strings.Contains(out, "no offers await a decision") {
				t.Errorf("fx envoy pending = %q", out)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fx envoy pending: %v", err)
		}
		select {
		case err := <-done:
			t.Fatalf("envoy ended: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	out, err := run(t, "envoy", "status", "--socket", socket)
	if err != nil || !strings.Contains(out, "envoy envoy-1, not connected to the director at 127.0.0.1:1") || !strings.Contains(out, "no experiments") {
		t.Errorf("fx envoy status = %q, %v", out, err)
	}
	out, err = run(t, "envoy", "pending", "--socket", socket, "--json")
	if err != nil || strings.TrimSpace(out) != "[]" {
		t.Errorf("fx envoy pending --json = %q, %v", out, err)
	}
	out, err = run(t, "envoy", "status", "--socket", socket, "--output", "yaml")
	if err != nil || !strings.HasPrefix(out, "---\n") || !strings.Contains(out, "name: envoy-1") {
		t.Errorf("fx envoy status --output yaml = %q, %v", out, err)
	}
	if _, err := run(t, "envoy", "status", "--socket", socket, "--output", "xml"); exitCode(err) != exitUsage {
		t.Errorf("fx envoy status --output xml: %v, want a usage error", err)
	}
	if _, err := run(t, "envoy", "approve", "study", "--socket", socket); err == nil || !strings.Contains(err.Error(), "no offer awaits a decision") {
		t.Errorf("fx envoy approve with nothing pending: %v", err)
	}
	if _, err := run(t, "envoy", "reject", "study"); err == nil || !strings.Contains(err.Error(), "--config") {
		t.Errorf("fx envoy reject without a socket: %v", err)
	}
	if _, err := run(t, "envoy", "pending", "--socket", filepath.Join(work, "nope.sock")); err == nil || !strings.Contains(err.Error(), "is the envoy running") {
		t.Errorf("fx envoy pending on a dead socket: %v", err)
	}
}

func TestEnvoyStartRunsUntilCancelled(t *testing.T) {
	files, _ := envoyCerts(t)
	work, err := os.MkdirTemp("", "fx-envoy-start-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	cfgFile := writeEnvoyConfig(t, "director: {address: 127.0.0.1:1}\n"+
		"tls: {cert: "+files.Cert+", key: "+files.Key+", ca: "+files.CA+"}\n"+
		"work_dir: "+work+"\n"+
		"shard: {kind: synthetic, train_samples: 20, valid_samples: 4}\n")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := newRootCommand()
	var out envoyLogBuffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs([]string{"--log-level", "debug", "envoy", "start", "--config", cfgFile, "--tags", "a,b"})
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()

	// Wait until the envoy serves its admin socket and has tried the
	// (unreachable) director.
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), "cannot reach the director") {
		if time.Now().After(deadline) {
			t.Fatalf("envoy did not start:\n%s", out.String())
		}
		select {
		case err := <-done:
			t.Fatalf("fx envoy start ended: %v\n%s", err, out.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
	if _, err := run(t, "envoy", "pending", "--socket", filepath.Join(work, "admin", "envoy.sock")); err != nil {
		t.Errorf("fx envoy pending against the started envoy: %v", err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("fx envoy start after cancellation: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("fx envoy start did not stop")
	}
	if !strings.Contains(out.String(), "envoy stopped") || !strings.Contains(out.String(), "envoy=envoy-1") {
		t.Errorf("log:\n%s", out.String())
	}
}

// envoyLogBuffer is a bytes.Buffer safe for the logger's goroutines.
type envoyLogBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *envoyLogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *envoyLogBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestPrintPending(t *testing.T) {
	offers := []envoy.PendingOffer{{
		ID: "id1", Name: "fashion-mlp", Owner: "alice", ArchiveSHA256: strings.Repeat("ab", 32), ArchiveSize: 1234,
		Summary: "10 rounds; runner builtin mlp", Plan: "name: fashion-mlp\nrounds: 10\n",
	}}
	var b bytes.Buffer
	if err := printPending(&b, offers, true); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"fashion-mlp", "alice", "id1", "1234", strings.Repeat("ab", 32), "10 rounds; runner builtin mlp", "rounds: 10", "fx envoy approve NAME"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, b.String())
		}
	}
}

func TestEnvoyReadsFXDirector(t *testing.T) {
	tests := []struct {
		env  []string
		want string
	}{
		{[]string{"FX_DIRECTOR=d.example.org:50051"}, "d.example.org:50051"},
		{[]string{"FX_DIRECTOR=cli:1", "FX_DIRECTOR_ADDRESS=envoy:2"}, "envoy:2"},
		{[]string{"PATH=/bin"}, ""},
	}
	for _, tc := range tests {
		cfg := envoy.DefaultConfig()
		if err := config.Load(config.Source{Environ: envoyEnviron(tc.env)}, &cfg); err != nil {
			t.Fatal(err)
		}
		if cfg.Director.Address != tc.want {
			t.Errorf("environment %v: director.address %q, want %q", tc.env, cfg.Director.Address, tc.want)
		}
	}
}
