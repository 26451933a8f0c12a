package experiment_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/testfed"
	"github.com/fx-fl/fx/pki"
)

// federation is a real director and two envoys holding halves of a
// synthetic data set, in this process, over mutual TLS on loopback with
// certificates from a CA made for the test. Experiments really run: the
// director starts aggregators and the envoys collaborators.
type federation struct {
	*testfed.Federation
	t *testing.T
}

func newFederation(t *testing.T) *federation {
	return &federation{Federation: testfed.New(t), t: t}
}

// config is a researcher's client configuration for this federation.
func (f *federation) config(role pki.Role, name string) experiment.ClientConfig {
	files := f.CA.Files(role, name)
	return experiment.ClientConfig{
		Director:   f.Addr,
		ServerName: "localhost",
		Cert:       files.Cert, Key: files.Key, CA: files.CA,
		Retry: experiment.Retry{Initial: 10 * time.Millisecond, Max: 200 * time.Millisecond, GiveUpAfter: 30 * time.Second},
	}
}

// dial connects as researcher alice (or the given config).
func (f *federation) dial(cfg experiment.ClientConfig) *experiment.Client {
	f.t.Helper()
	c, err := experiment.Dial(f.Ctx, cfg)
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
