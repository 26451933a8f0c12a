package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/tensor"
)

// readmeStep is one command block of the README, as its marker comment
// says to run it:
//
//	<!-- readme-test: build -->            in the repository root
//	<!-- readme-test: run -->              in the federation's directory, to its end
//	<!-- readme-test: background NAME -->  there too, a party that runs until stopped
type readmeStep struct {
	kind, name, script string
	line               int
}

var readmeMarker = regexp.MustCompile(`^<!-- readme-test: (build|run|background) ?([\w.-]*) -->$`)

// readmeSteps returns the marked blocks of README.md's section under
// heading, in order. A marker must be followed by a fenced sh block.
func readmeSteps(t *testing.T, readme, heading string) []readmeStep {
	t.Helper()
	data, err := os.ReadFile(readme)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(data), "\n")
	var steps []readmeStep
	in := false
	for i := 0; i < len(lines); i++ {
		l := strings.TrimRight(lines[i], " ")
		if strings.HasPrefix(l, "## ") {
			in = l == heading
			continue
		}
		m := readmeMarker.FindStringSubmatch(l)
		if !in || m == nil {
			continue
		}
		if i+1 >= len(lines) || lines[i+1] != "```sh" {
			t.Fatalf("README.md:%d: a readme-test marker must be followed by a ```sh block", i+1)
		}
		var body []string
		j := i + 2
		for ; j < len(lines) && lines[j] != "```"; j++ {
			body = append(body, lines[j])
		}
		if j == len(lines) {
			t.Fatalf("README.md:%d: the block never ends", i+2)
		}
		steps = append(steps, readmeStep{kind: m[1], name: m[2], script: strings.Join(body, "\n"), line: i + 3})
		i = j
	}
	if len(steps) == 0 {
		t.Fatalf("README.md has no readme-test blocks under %q", heading)
	}
	return steps
}

// TestReadmeRealFederation runs the commands of README.md's "Running a real
// federation" as written, read from the README itself, on this machine: the
// build in the repository root; the rest in a directory holding copies of
// configs/ and scripts/ (which those commands read), so that nothing lands
// in the repository. Only the director's port moves, from 50051 to a free
// one, in those copies and for the CLI (FX_DIRECTOR). The parties run as
// a reader would run them in terminals of their own; the experiment must
// finish and its best model be downloaded.
func TestReadmeRealFederation(t *testing.T) {
	requireE2E(t)
	if _, err := os.Stat(fashionMNIST); err != nil {
		t.Skipf("the README's federation trains on Fashion-MNIST: apt-get install dataset-fashion-mnist (%v)", err)
	}
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	steps := readmeSteps(t, filepath.Join(repo, "README.md"), "## Running a real federation")
	kinds := map[string]int{}
	for _, s := range steps {
		kinds[s.kind]++
	}
	if kinds["build"] != 1 || kinds["background"] < 3 || kinds["run"] < 3 {
		t.Fatalf("the README's steps are %v: want a build, a director and two envoys, and the researcher's and admin's commands", kinds)
	}

	port := fmt.Sprint(freePort(t))
	addr := "localhost:" + port
	work := t.TempDir()
	for _, dir := range []string{"configs", "scripts"} {
		copyTree(t, filepath.Join(repo, dir), filepath.Join(work, dir), func(b []byte) []byte {
			return bytes.ReplaceAll(b, []byte("50051"), []byte(port))
		})
	}
	// baseEnv hides the user's FX_* settings and profile.
	env := append(baseEnv(), "FX_DIRECTOR="+addr)
	if _, err := exec.LookPath("go"); err != nil {
		env = append(env, "PATH="+filepath.Join(runtime.GOROOT(), "bin")+":"+os.Getenv("PATH"))
	}

	parties := map[string]*readmeParty{}
	t.Cleanup(func() {
		for _, p := range parties {
			p.stop(t)
		}
		if t.Failed() {
			for name, p := range parties {
				t.Logf("----- %s (%s):\n%s", name, p.log, tail(readFile(p.log), 60))
			}
		}
	})
	envoysOnline := false
	for _, s := range steps {
		script := strings.ReplaceAll(s.script, "50051", port)
		switch s.kind {
		case "build":
			env = runReadmeStep(t, s, repo, env, script)
		case "background":
			p := startReadmeParty(t, s, work, env, script)
			parties[s.name] = p
			if s.name == "director" {
				waitListening(t, "127.0.0.1:"+port, p)
			}
		case "run":
			if len(parties) > 1 && !envoysOnline {
				// A reader types the next command once the sites are up.
				waitReadmeEnvoys(t, work, addr, len(parties)-1, parties)
				envoysOnline = true
			}
			env = runReadmeStep(t, s, work, env, script)
		}
	}

	m, _, err := tensor.ReadFile(filepath.Join(work, "best.safetensors"))
	if err != nil || len(m) == 0 {
		t.Fatalf("the downloaded best model: %v", err)
	}
	c := readmeResearcher(t, work, addr)
	defer c.Close()
	e, err := c.Get(context.Background(), "fashion-mlp")
	if err != nil || e.GetState() != fxv1.ExperimentState_FINISHED {
		t.Fatalf("fashion-mlp is %v (%v), want FINISHED", e.GetState(), err)
	}
	t.Logf("fashion-mlp FINISHED: best %v", e.GetBest())
}

// runReadmeStep runs one block in dir as a terminal would, with every
// line's failure failing it, and returns the environment it leaves (an
// export carries over to the next block, as in the same terminal).
func runReadmeStep(t *testing.T, s readmeStep, dir string, env []string, script string) []string {
	t.Helper()
	envFile := filepath.Join(t.TempDir(), "env")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-e", "-o", "pipefail", "-c", script+"\nenv -0 > "+envFile)
	cmd.Dir, cmd.Env = dir, env
	cmd.SysProcAttr = procAttr()
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	start := time.Now()
	out, err := cmd.CombinedOutput()
	t.Logf("README.md:%d (%s, %s):\n$ %s\n%s", s.line, s.kind, time.Since(start).Round(100*time.Millisecond), strings.ReplaceAll(script, "\n", "\n$ "), out)
	if err != nil {
		t.Fatalf("README.md:%d: %v", s.line, err)
	}
	data, err := os.ReadFile(envFile)
	if err != nil {
		t.Fatal(err)
	}
	var next []string
	for _, kv := range strings.Split(string(data), "\x00") {
		if kv != "" {
			next = append(next, kv)
		}
	}
	return next
}

// readmeParty is a long-running block: a director or an envoy.
type readmeParty struct {
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func startReadmeParty(t *testing.T, s readmeStep, dir string, env []string, script string) *readmeParty {
	t.Helper()
	log := filepath.Join(dir, s.name+".log")
	f, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("bash", "-e", "-c", script)
	cmd.Dir, cmd.Env = dir, env
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = procAttr()
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("README.md:%d: %v", s.line, err)
	}
	p := &readmeParty{cmd: cmd, log: log, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p
}

// exited says whether the party ended, and how.
func (p *readmeParty) exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// stop ends the party as Ctrl-C in its terminal would, and kills it if it
// does not end within half a minute.
func (p *readmeParty) stop(t *testing.T) {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGINT)
	select {
	case <-p.done:
		return
	case <-time.After(30 * time.Second):
	}
	t.Errorf("%s did not stop within 30s of SIGINT", p.log)
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// waitListening waits until addr accepts connections.
func waitListening(t *testing.T, addr string, p *readmeParty) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if done, perr := p.exited(); done {
			t.Fatalf("the director exited (%v) before listening on %s:\n%s", perr, addr, readFile(p.log))
		}
		if time.Now().After(deadline) {
			t.Fatalf("the director does not listen on %s after 2 minutes: %v", addr, err)
		}
		time.Sleep(100 * time.Millisecond) // polling a port: there is nothing to wait on
	}
}

func readmeResearcher(t *testing.T, work, addr string) *experiment.Client {
	t.Helper()
	r := filepath.Join(work, "pki", "researcher")
	c, err := experiment.Dial(context.Background(), experiment.ClientConfig{
		Director: addr, Cert: filepath.Join(r, "researcher.crt"), Key: filepath.Join(r, "researcher.key"), CA: filepath.Join(r, "ca.crt"),
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// waitReadmeEnvoys waits until n envoys are online, failing at once if a
// party exits.
func waitReadmeEnvoys(t *testing.T, work, addr string, n int, parties map[string]*readmeParty) {
	t.Helper()
	c := readmeResearcher(t, work, addr)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- c.WaitForEnvoys(ctx, n) }()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("the README's envoys: %v", err)
			}
			return
		case <-tick.C:
			for name, p := range parties {
				if ended, err := p.exited(); ended {
					t.Fatalf("%s exited (%v):\n%s", name, err, tail(readFile(p.log), 40))
				}
			}
		}
	}
}

// copyTree copies the regular files under src to dst, passing each
// through edit.
func copyTree(t *testing.T, src, dst string, edit func([]byte) []byte) {
	t.Helper()
	err := filepath.Walk(src, func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		target := filepath.Join(dst, rel)
		if fi.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		if !fi.Mode().IsRegular() {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(target, edit(data), fi.Mode().Perm())
	})
	if err != nil {
		t.Fatal(err)
	}
}

func readFile(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	return string(b)
}

// TestReadmeQuickstartOutput runs `fx quickstart` as README.md's first
// section shows it and checks that it prints what the README says, line
// for line, up to the numbers (metrics, port, id, sizes, time): a change
// of the output has to change the README too.
func TestReadmeQuickstartOutput(t *testing.T) {
	requireE2E(t)
	requireFashionMNIST(t)
	data, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, block, ok := strings.Cut(string(data), "<!-- readme-test: quickstart-output -->\n```\n")
	if !ok {
		t.Fatal("README.md has no quickstart-output block")
	}
	block, _, _ = strings.Cut(block, "```")
	lines := strings.Split(strings.TrimSpace(block), "\n")
	if !strings.HasPrefix(lines[0], "$ ") || !strings.HasSuffix(lines[0], " quickstart") {
		t.Fatalf("the README's sample starts %q, want the command", lines[0])
	}
	want := lines[1:]

	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, fxBin, "quickstart")
	cmd.Dir, cmd.Env = dir, baseEnv()
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("fx quickstart: %v\n%s", err, out)
	}
	got := strings.Split(strings.TrimSpace(string(out)), "\n")
	numbers := regexp.MustCompile(`\(([a-z0-9]{26})\)|\d+(\.\d+)?`)
	mask := func(l string) string { return numbers.ReplaceAllString(l, "#") }
	for i := range max(len(want), len(got)) {
		var w, g string
		if i < len(want) {
			w = mask(want[i])
		}
		if i < len(got) {
			g = mask(got[i])
		}
		if w != g {
			t.Errorf("line %d: the README shows\n\t%q\nfx quickstart printed\n\t%q", i+1, w, g)
		}
	}
	// The README says what the quickstart reaches; it must.
	m := regexp.MustCompile(`(?m)^test: .* accuracy=(0\.\d+)`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("no test accuracy in:\n%s", out)
	}
	if acc, _ := strconv.ParseFloat(m[1], 64); acc < 0.84 {
		t.Errorf("the quickstart's best model scores %.4f on the test images, the README promises about 0.85", acc)
	}
	if t.Failed() {
		t.Logf("fx quickstart printed:\n%s", out)
	}
}
