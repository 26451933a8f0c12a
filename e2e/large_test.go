package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// timeoutOrRetry matches what a party logs when a call timed out, stalled,
// failed, or is being retried.
var timeoutOrRetry = regexp.MustCompile(`(?i)retrying|reconnecting|handshake|deadline exceeded|timed out|stalled|\[ERROR\]`)

// TestLargeModelNoTimeouts: a 64 MiB model goes through a director and three envoys,
// as fxbench large runs it (bench/large/rewrite.py, a Python runner that
// rewrites every weight each round), and the experiment finishes with no
// call that timed out or was retried on the way: the aggregator is
// announced only once it serves, and transfers are judged by their
// progress, not by how long a model of this size takes. (The speed and
// memory figures are fxbench large's; this test asserts no time.)
func TestLargeModelNoTimeouts(t *testing.T) {
	requireE2E(t)
	if out, err := exec.Command(systemPython, "-c", "import numpy").CombinedOutput(); err != nil {
		t.Skipf("%s cannot import numpy (apt-get install python3-numpy): %v %s", systemPython, err, out)
	}
	const (
		sites  = 3
		rounds = 2
		size   = 64 << 20
	)
	exp := t.TempDir()
	script, err := os.ReadFile(filepath.Join("..", "bench", "large", "rewrite.py"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(exp, "rewrite.py"), script, 0o600); err != nil {
		t.Fatal(err)
	}
	var model tensor.Model
	for i := range 8 {
		model = append(model, tensor.New(fmt.Sprintf("layer%d.weight", i), tensor.F32, []int64{size / 32}))
	}
	if err := tensor.WriteFile(filepath.Join(exp, "model.safetensors"), model, nil); err != nil {
		t.Fatal(err)
	}
	plan := fmt.Sprintf(`name: large
rounds: %d
participants: {min: %d, tags: [synthetic]}
runner: {kind: exec, command: [python3, rewrite.py], timeout: 30m}
aggregation: {algorithm: fedavg}
stragglers: {deadline: 30m, min_reporting: %d}
`, rounds, sites, sites)
	if err := os.WriteFile(filepath.Join(exp, experiment.PlanFile), []byte(plan), 0o600); err != nil {
		t.Fatal(err)
	}

	var names []string
	for i := 1; i <= sites; i++ {
		names = append(names, fmt.Sprintf("site-%d", i))
	}
	f := newFed(t, []string{"alice"}, names)
	f.startDirector(directorOptions{})
	for i, name := range names {
		f.startEnvoy(name, syntheticShard(i+1, sites, ""))
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, names...)
	// Only what the parties log while the experiment runs counts.
	from := map[string]int{"director": len(f.director.log())}
	for _, name := range names {
		from[name] = len(f.envoys[name].log())
	}
	start := time.Now()
	e := f.submit("alice", exp)
	final := f.waitState(c, e.GetName(), 20*time.Minute, fxv1.ExperimentState_FINISHED)
	t.Logf("%d rounds of a %d MiB model over %d envoys in %s", rounds, size>>20, sites, time.Since(start).Round(100*time.Millisecond))
	if final.GetRound() != rounds {
		t.Errorf("finished at round %d, want %d", final.GetRound(), rounds)
	}
	evs := f.watchEvents("alice", e.GetName())
	for r := 1; r <= rounds; r++ {
		if got := reporters(evs, r, runner.TaskTrain); !slices.Equal(got, names) {
			t.Errorf("round %d: train reported by %v, want every site", r, got)
		}
	}
	logs := map[string]string{"director": f.director.log()}
	for _, name := range names {
		logs[name] = f.envoys[name].log()
	}
	for who, log := range logs {
		for line := range strings.SplitSeq(log[min(from[who], len(log)):], "\n") {
			if timeoutOrRetry.MatchString(line) {
				t.Errorf("%s logged a timeout or a retry while the experiment ran: %s", who, line)
			}
		}
	}
}
