package e2e

import (
	"fmt"
	"net"
	"os"
	osexec "os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner/sandbox"
)

// hostileRunner is an experiment's code that tries to steal what a site
// keeps from it: the envoy's key and configuration (found through the
// envoy's /proc entries, as a real attacker would, or named by the plan),
// other experiments' files, the network. It reports what worked as the
// metrics of its first validation, 1 for every theft that succeeded.
const hostileRunner = `import os, socket
from fx import site

hp = site.hyperparameters()
envoy = os.getppid()

def works(f):
    try:
        f()
        return 1.0
    except Exception:
        return 0.0

def read(path):
    with open(path, "rb") as fh:
        fh.read()

def connect():
    s = socket.create_connection(("127.0.0.1", hp["port"]), timeout=5)
    s.close()

stolen = {
    "key": works(lambda: read(hp["key"])),
    "config": works(lambda: read(hp["config"])),
    "proc_cmdline": works(lambda: read(f"/proc/{envoy}/cmdline")),
    "proc_environ": works(lambda: read(f"/proc/{envoy}/environ")),
    "proc_cwd": works(lambda: os.listdir(f"/proc/{envoy}/cwd")),
    "other_experiment": works(lambda: os.listdir(hp["experiments"])),
    "network": works(connect),
}
print("stolen:", stolen, flush=True)
for task in site.tasks():
    m = task.model()
    if task.train:
        task.send(m, samples=1)
    else:
        task.send(samples=1, metrics=stolen)
`

// TestHostileRunnerIsContained: an experiment's code cannot read the
// envoy's key, its configuration, its /proc entries or other experiments,
// nor connect to a loopback listener; the same code on a site that opted
// out of the sandbox reads all of it, which shows the test sees a theft.
func TestHostileRunnerIsContained(t *testing.T) {
	if _, err := sandbox.Check(); err != nil {
		t.Skipf("this system cannot sandbox runners: %v", err)
	}
	if err := osexec.Command("/usr/bin/python3", "-c", "import numpy").Run(); err != nil {
		t.Skipf("/usr/bin/python3 cannot import numpy (%v)", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()

	f := newFed(t, []string{"alice"}, []string{"guarded", "open"})
	f.startDirector(directorOptions{})
	f.startEnvoy("guarded", syntheticShard(1, 2, ""))
	f.startEnvoyOpts("open", syntheticShard(2, 2, ""), envoyOptions{noSandbox: true})
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "guarded", "open")
	if log := f.envoys["guarded"].log(); !strings.Contains(log, "exec runners run sandboxed") {
		t.Errorf("the guarded envoy did not say at start that it sandboxes runners")
	}
	if log := f.envoys["open"].log(); !strings.Contains(log, "exec runners run UNSANDBOXED") {
		t.Errorf("the open envoy did not warn at start that it runs runners unsandboxed")
	}

	for _, site := range []string{"guarded", "open"} {
		key := f.files("envoy", site).Key
		work := filepath.Join(f.dir, "envoys", site)
		dir := writePlan(t, fmt.Sprintf(`name: steal-%s
rounds: 1
participants: {min: 1, envoys: [%s]}
runner: {kind: exec, command: [python3, steal.py], timeout: 2m, hyperparameters: {key: %q, config: %q, experiments: %q, port: %d}}
stragglers: {deadline: 2m, min_reporting: 1}
`, site, site, key, f.envoyConfigs[site], filepath.Join(work, "experiments"), l.Addr().(*net.TCPAddr).Port))
		writeSoftmaxModel(t, dir)
		if err := os.WriteFile(filepath.Join(dir, "steal.py"), []byte(hostileRunner), 0o644); err != nil {
			t.Fatal(err)
		}
		f.submit("alice", dir)
		f.waitState(c, "steal-"+site, 2*time.Minute, fxv1.ExperimentState_FINISHED)
		stolen := map[string]float64{}
		for _, ev := range f.watchEvents("alice", "steal-"+site) {
			if ev.GetCollaborator() == site && ev.GetTask() == "aggregated_model_validation" {
				stolen = ev.GetMetrics()
			}
		}
		t.Logf("%s: %v", site, stolen)
		if len(stolen) != 7 {
			t.Fatalf("%s: the runner reported %v", site, stolen)
		}
		for what, v := range stolen {
			switch {
			case site == "guarded" && v != 0:
				t.Errorf("a sandboxed runner got at %s", what)
			case site == "open" && v != 1 && what != "proc_environ" && what != "proc_cwd":
				// The envoy is non-dumpable, which keeps even an
				// unsandboxed runner of the same user from its environ and
				// cwd; everything else is open to it.
				t.Errorf("an unsandboxed runner could not get at %s: the test does not see the theft it guards against", what)
			}
		}
	}
}
