// Package testfed runs a federation inside one test: a real director and two
// envoys holding generated data, talking gRPC over mutual TLS on loopback with
// certificates from a test CA, exactly as `fx director start` and `fx envoy
// start` would build them. Tests that drive a whole experiment in-process use
// it; tests that need separate processes live in e2e.
package testfed

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
	"github.com/fx-fl/fx/internal/testpki"
	"github.com/fx-fl/fx/pki"
)

// Envoys are the federation's envoys, each holding one half of the same
// generated data set (tag "synthetic", 8 features, 3 classes).
var Envoys = []string{"site-1", "site-2"}

// Federation is a running director and its envoys.
type Federation struct {
	t testing.TB
	// CA issues certificates for any further party (researchers, admins).
	CA *testpki.CA
	// Root holds the director's data directory and the envoys' work
	// directories.
	Root string
	// Addr is the director's address; its certificate is for "localhost".
	Addr   string
	Logger hclog.Logger
	// Settings are the director's; a test may change them and then call
	// RestartDirector.
	Settings director.Settings
	// Ctx ends when the test does.
	Ctx context.Context

	stopDirector context.CancelFunc
	directorDone chan error
}

// New starts a federation that stops when the test ends. It skips the test
// under -short.
func New(t testing.TB) *Federation {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end federation")
	}
	f := &Federation{t: t, CA: testpki.New(t), Root: t.TempDir(), Addr: FreeAddr(t)}
	f.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: io.Discard})
	if testing.Verbose() {
		f.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Info, Output: os.Stderr})
	}
	dirFiles := f.CA.Files(pki.RoleDirector, "localhost")
	s := director.DefaultSettings()
	s.ListenAddress = f.Addr
	s.Advertise.Host, s.Aggregator.Host = "127.0.0.1", "127.0.0.1"
	s.TLS.Cert, s.TLS.Key, s.TLS.CA, s.TLS.CRL = dirFiles.Cert, dirFiles.Key, dirFiles.CA, f.CA.CA.CRLPath()
	s.DataDir = filepath.Join(f.Root, "director")
	s.ReviewPolicy = director.ReviewAuto
	s.HeartbeatPeriod, s.OfflineAfter = time.Second, 5*time.Second
	s.StopTimeout = 2 * time.Second
	f.Settings = s
	ctx, cancel := context.WithCancel(context.Background())
	f.Ctx = ctx
	envoysDone := make(chan error, len(Envoys))
	t.Cleanup(func() {
		cancel()
		if f.stopDirector != nil {
			f.stopDirector()
			<-f.directorDone
		}
		for range Envoys {
			select {
			case <-envoysDone:
			case <-time.After(30 * time.Second):
				t.Error("an envoy did not stop")
			}
		}
	})
	f.startDirector()

	for i, name := range Envoys {
		files := f.CA.Files(pki.RoleEnvoy, name)
		ec := envoy.DefaultConfig()
		ec.Director.Address, ec.Director.ServerName = f.Addr, "localhost"
		ec.TLS.Cert, ec.TLS.Key, ec.TLS.CA = files.Cert, files.Key, files.CA
		ec.WorkDir = filepath.Join(f.Root, "envoys", name)
		ec.Tags = []string{"synthetic"}
		ec.Shard = dataset.Config{Kind: "synthetic", Features: 8, Classes: 3, TrainSamples: 600, ValidSamples: 120, Shard: fmt.Sprintf("%d/%d", i+1, len(Envoys)), Seed: 7}
		ec.Logger = f.Logger.Named(name)
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

// startDirector starts a director on the federation's address and data
// directory: the first one, or a restarted one.
func (f *Federation) startDirector() {
	f.t.Helper()
	cfg, err := f.Settings.Config(f.Logger)
	if err != nil {
		f.t.Fatal(err)
	}
	d, err := director.New(cfg)
	if err != nil {
		f.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(f.Ctx)
	f.stopDirector, f.directorDone = cancel, make(chan error, 1)
	go func() { f.directorDone <- d.Run(ctx) }()
}

// StopDirector stops the director for good, as if its machine went away.
func (f *Federation) StopDirector() {
	f.t.Helper()
	if f.stopDirector == nil {
		return
	}
	f.stopDirector()
	if err := <-f.directorDone; err != nil {
		f.t.Errorf("director Run: %v", err)
	}
	f.stopDirector = nil
}

// RestartDirector stops the director and starts a new one, with the current
// Settings, on the same data directory and address.
func (f *Federation) RestartDirector() {
	f.t.Helper()
	f.stopDirector()
	if err := <-f.directorDone; err != nil {
		f.t.Fatalf("director Run: %v", err)
	}
	f.startDirector()
}

// FreeAddr is a loopback address nothing listens on now.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
