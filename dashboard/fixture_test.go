package dashboard

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/testfed"
	"github.com/fx-fl/fx/pki"
)

// fixture is a real federation (a director and two envoys with synthetic
// data, over mutual TLS on loopback), researcher alice's client of it, and
// a dashboard serving that client on a loopback port.
type fixture struct {
	*testfed.Federation
	t      *testing.T
	client *experiment.Client
	// addr is the dashboard's address, base its URL ("http://addr").
	addr, base string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{Federation: testfed.New(t), t: t}
	alice := f.CA.Files(pki.RoleResearcher, "alice")
	c, err := experiment.Dial(f.Ctx, experiment.ClientConfig{
		Director: f.Addr, ServerName: "localhost",
		Cert: alice.Cert, Key: alice.Key, CA: alice.CA,
		Retry: experiment.Retry{Initial: 10 * time.Millisecond, Max: 200 * time.Millisecond, GiveUpAfter: 30 * time.Second},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	f.client = c

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = l.Addr().String()
	f.base = "http://" + f.addr
	s, err := New(Config{Client: c, Addr: f.addr, Logger: f.Logger.Named("dashboard"), PollInterval: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(f.Ctx)
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})

	wctx, wcancel := context.WithTimeout(f.Ctx, 30*time.Second)
	defer wcancel()
	if err := c.WaitForEnvoys(wctx, len(testfed.Envoys)); err != nil {
		t.Fatal(err)
	}
	return f
}

// submit submits a synthetic-data experiment of the given rounds over both
// sites, and returns at once.
func (f *fixture) submit(name string, rounds int) {
	f.t.Helper()
	dir := f.t.TempDir()
	plan := fmt.Sprintf("name: %s\nrounds: %d\nparticipants: {min: 2, tags: [synthetic]}\nrunner: {kind: builtin, model: softmax, hyperparameters: {lr: 0.1, batch_size: 32}}\nstragglers: {deadline: 1m}\n", name, rounds)
	if err := os.WriteFile(filepath.Join(dir, "plan.yaml"), []byte(plan), 0o600); err != nil {
		f.t.Fatal(err)
	}
	if _, err := f.client.Submit(f.Ctx, dir, experiment.SubmitOptions{}); err != nil {
		f.t.Fatal(err)
	}
}

// wait waits for the experiment to finish.
func (f *fixture) wait(name string) {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(f.Ctx, 2*time.Minute)
	defer cancel()
	if _, err := f.client.Wait(ctx, name); err != nil {
		f.t.Fatal(err)
	}
}

// eventsPerRun is how many metric events an experiment of the given rounds
// publishes over two sites: each round 3 tasks × 2 sites + 3 aggregates,
// and the final validation round 2 results + 1 aggregate.
func eventsPerRun(rounds int) int { return rounds*9 + 3 }
