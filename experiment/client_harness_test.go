package experiment_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/director"
	"github.com/fx-fl/fx/envoy"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/testpki"
	"github.com/fx-fl/fx/pki"
)

// federation is a real director and two envoys holding halves of a
// synthetic data set, in this process, over mutual TLS on loopback with
// certificates from a CA made for the test. Experiments really run: the
// director starts aggregators and the envoys collaborators.
type federation struct {
	t      *testing.T
	ca     *testpki.CA
	root   string
	addr   string
	logger hclog.Logger
	cfg    director.Settings
	ctx    context.Context

	stopDirector context.CancelFunc
	directorDone chan error
}

func newFederation(t *testing.T) *federation {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end federation")
	}
	f := &federation{t: t, ca: testpki.New(t), root: t.TempDir()}
	f.logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: io.Discard})
	if testing.Verbose() {
		f.logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Info, Output: os.Stderr})
	}
	dirFiles := f.ca.Files(pki.RoleDirector, "localhost")
	f.addr = freeAddr(t)
	s := director.DefaultSettings()
	s.ListenAddress = f.addr
	s.Advertise.Host = "127.0.0.1"
	s.Aggregator.Host = "127.0.0.1"
	s.TLS.Cert, s.TLS.Key, s.TLS.CA, s.TLS.CRL = dirFiles.Cert, dirFiles.Key, dirFiles.CA, f.ca.CA.CRLPath()
	s.DataDir = filepath.Join(f.root, "director")
	s.ReviewPolicy = director.ReviewAuto
	s.HeartbeatPeriod, s.OfflineAfter = time.Second, 5*time.Second
	s.StopTimeout = 2 * time.Second
	f.cfg = s
	ctx, cancel := context.WithCancel(context.Background())
	f.ctx = ctx
	envoysDone := make(chan error, 2)
	t.Cleanup(func() {
		cancel()
		if f.stopDirector != nil {
			f.stopDirector()
			<-f.directorDone
		}
		for range 2 {
			select {
			case <-envoysDone:
			case <-time.After(30 * time.Second):
				t.Error("an envoy did not stop")
			}
		}
	})
	f.startDirector()

	for i, name := range []string{"site-1", "site-2"} {
		files := f.ca.Files(pki.RoleEnvoy, name)
		ec := envoy.DefaultConfig()
		ec.Director.Address = f.addr
		ec.Director.ServerName = "localhost"
		ec.TLS.Cert, ec.TLS.Key, ec.TLS.CA = files.Cert, files.Key, files.CA
		ec.WorkDir = filepath.Join(f.root, "envoys", name)
		ec.Tags = []string{"synthetic"}
		ec.Shard = dataset.Config{Kind: "synthetic", Features: 8, Classes: 3, TrainSamples: 600, ValidSamples: 120, Shard: fmt.Sprintf("%d/2", i+1), Seed: 7}
		ec.Logger = f.logger.Named(name)
		ec.RPCTimeout = 10 * time.Second
		ec.Retry.Initial, ec.Retry.Max = 20*time.Millisecond, 500*time.Millisecond
		e, err := envoy.New(ec)
		if err != nil {
			t.Fatalf("envoy %s: %v", name, err)
		}
		go func() { envoysDone <- e.Run(ctx) }()
	}
	return f
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// startDirector starts a director on the federation's address and data
// directory: the first one, or a restarted one.
func (f *federation) startDirector() {
	f.t.Helper()
	cfg, err := f.cfg.Config(f.logger)
	if err != nil {
		f.t.Fatal(err)
	}
	d, err := director.New(cfg)
	if err != nil {
		f.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(f.ctx)
	f.stopDirector, f.directorDone = cancel, make(chan error, 1)
	go func() { f.directorDone <- d.Run(ctx) }()
}

// restartDirector stops the director and starts a new one on the same data
// directory and address.
func (f *federation) restartDirector() {
	f.t.Helper()
	f.stopDirector()
	if err := <-f.directorDone; err != nil {
		f.t.Fatalf("director Run: %v", err)
	}
	f.startDirector()
}

// config is a researcher's client configuration for this federation.
func (f *federation) config(role pki.Role, name string) experiment.ClientConfig {
	files := f.ca.Files(role, name)
	return experiment.ClientConfig{
		Director:   f.addr,
		ServerName: "localhost",
		Cert:       files.Cert, Key: files.Key, CA: files.CA,
		Retry: experiment.Retry{Initial: 10 * time.Millisecond, Max: 200 * time.Millisecond, GiveUpAfter: 30 * time.Second},
	}
}

// dial connects as researcher alice (or the given config).
func (f *federation) dial(cfg experiment.ClientConfig) *experiment.Client {
	f.t.Helper()
	c, err := experiment.Dial(f.ctx, cfg)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { c.Close() })
	return c
}

const synthPlan = `name: %s
rounds: %d
participants: {min: %d, tags: [synthetic]}
runner: {kind: builtin, model: softmax, hyperparameters: {lr: 0.1, epochs: 1, batch_size: 32}}
stragglers: {deadline: 1m}
`

// planDir writes an experiment directory whose plan has the given name,
// rounds and participants.min.
func planDir(t *testing.T, name string, rounds, min int) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "plan.yaml"), fmt.Appendf(nil, synthPlan, name, rounds, min), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// eventsPerRun is how many metric events an experiment of the given rounds
// publishes over two sites: each round 3 tasks × 2 sites + 3 aggregates,
// and the final validation round 2 results + 1 aggregate.
func eventsPerRun(rounds int) int { return rounds*9 + 3 }
