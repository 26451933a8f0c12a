package sandbox_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fx-fl/fx/runner/sandbox"
)

// TestMain makes the test binary its own trampoline (Main) and its own
// hostile command (probeMain).
func TestMain(m *testing.M) {
	sandbox.Main()
	switch os.Getenv(probeEnv) {
	case "probe":
		os.Exit(probeMain())
	case "echo":
		os.Exit(echoMain())
	case "protect":
		os.Exit(protectMain())
	case "starter":
		os.Exit(starterMain())
	}
	os.Exit(m.Run())
}

// landlockABI skips the test where this kernel cannot sandbox.
func landlockABI(t *testing.T) int {
	t.Helper()
	s, err := sandbox.Check()
	if err != nil {
		t.Skipf("no sandbox on this machine: %v", err)
	}
	return s.ABI
}

// testBinary is this test binary, which the probes run as.
func testBinary(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

// site is an envoy's files laid out as a site would have them, in a
// temporary root.
type site struct {
	root    string
	siteDir string // the envoy's configuration directory
	key     string // the envoy's TLS key: hidden
	cert    string // its certificate: hidden
	config  string // envoy.yaml: hidden
	caCert  string // beside them, not hidden
	work    string // the envoy's work directory: hidden
	expA    string // this command's experiment, inside work
	expB    string // another experiment, inside work
	task    string // this command's task directory, inside work
	data    string // the site's data
	outside string // a file outside everything
	link    string // a symbolic link to siteDir, outside it
	nextDir string // where the envoy will write its next key
	nextKey string // that key, hidden but not yet written
}

func newSite(t *testing.T) site {
	t.Helper()
	root, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	s := site{root: root, siteDir: filepath.Join(root, "etc-fx"), work: filepath.Join(root, "work"), data: filepath.Join(root, "data")}
	s.key = filepath.Join(s.siteDir, "tls.key")
	s.cert = filepath.Join(s.siteDir, "tls.crt")
	s.config = filepath.Join(s.siteDir, "envoy.yaml")
	s.caCert = filepath.Join(s.siteDir, "ca.crt")
	s.expA = filepath.Join(s.work, "experiments", "exp-a")
	s.expB = filepath.Join(s.work, "experiments", "exp-b")
	s.task = filepath.Join(s.work, "tasks", "exp-a")
	s.outside = filepath.Join(root, "outside.txt")
	s.link = filepath.Join(root, "link-to-etc-fx")
	s.nextDir = filepath.Join(root, "pki-next")
	s.nextKey = filepath.Join(s.nextDir, "next.key")
	for _, d := range []string{s.siteDir, s.expA, s.expB, s.task, s.data, s.nextDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string]string{
		s.key: "-----BEGIN PRIVATE KEY-----", s.cert: "cert", s.config: "tls: {key: tls.key}",
		s.caCert: "ca", filepath.Join(s.expA, "train.py"): "print('train')",
		filepath.Join(s.expB, "secret.txt"): "exp-b", filepath.Join(s.data, "train.csv"): "1,2,3\n",
		s.outside: "outside", filepath.Join(s.nextDir, "README"): "keys go here",
	}
	for name, body := range files {
		if err := os.WriteFile(name, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(s.siteDir, s.link); err != nil {
		t.Fatal(err)
	}
	return s
}

// hidden is what an envoy hides.
func (s site) hidden() []string { return []string{s.key, s.cert, s.config, s.work, s.nextKey} }

// runProbes runs the probes in the hostile command, under p or (nil)
// unconfined, and returns each probe's result ("" or an errno name). If
// the probes hold a "wait:", between runs once those before it have
// answered, and the command goes on when it returns.
func runProbes(t *testing.T, p *sandbox.Policy, dir string, probes []string, between func()) map[string]string {
	t.Helper()
	cmd := exec.Command(testBinary(t), probes...)
	cmd.Dir = dir
	cmd.Env = []string{probeEnv + "=probe", "PATH=/usr/bin:/bin"}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if p != nil {
		if err := p.Apply(cmd); err != nil {
			t.Fatal(err)
		}
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	sc := bufio.NewScanner(stdout)
	read := func(n int) {
		for len(got) < n && sc.Scan() {
			var r probeResult
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				t.Errorf("probe output %q: %v", sc.Text(), err)
				return
			}
			got[r.Probe] = r.Err
		}
	}
	if i := slices.Index(probes, "wait:"); i >= 0 {
		read(i)
		between()
	}
	_, _ = stdin.Write([]byte("\n"))
	_ = stdin.Close()
	read(len(probes))
	if err := cmd.Wait(); err != nil {
		t.Fatalf("probe command: %v\nstderr:\n%s", err, stderr.String())
	}
	if len(got) != len(probes) {
		t.Fatalf("probe command answered %d of %d probes; stderr:\n%s", len(got), len(probes), stderr.String())
	}
	return got
}

// denied is how the kernel refuses: EACCES from Landlock's file and
// network rules and the seccomp filter, EPERM from its ptrace and scope
// rules.
func denied(errName string) bool { return errName == "EACCES" || errName == "EPERM" }

// listeners opens what the hostile command tries to reach: a TCP and a
// UDP socket on loopback, a pathname and an abstract unix socket.
type listeners struct{ tcp, udp, unixPath, unixAbstract string }

func listen(t *testing.T, dir string) listeners {
	t.Helper()
	tl, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tl.Close() })
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	ul, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ul.Close() })
	l := listeners{tcp: tl.Addr().String(), udp: ul.LocalAddr().String(), unixPath: filepath.Join(dir, "envoy.sock")}
	pl, err := net.Listen("unix", l.unixPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pl.Close() })
	l.unixAbstract = fmt.Sprintf("@fx-sandbox-test-%d", os.Getpid())
	al, err := net.Listen("unix", l.unixAbstract)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { al.Close() })
	return l
}

// expect is one probe and whether the sandbox must deny it; minABI says
// from which Landlock ABI on (below it the probe is not checked, only
// logged: a documented gap). mayFailFree marks a probe that the machine
// itself may refuse to an unconfined command (ptrace of the parent under
// Yama).
type expect struct {
	probe       string
	deny        bool
	minABI      int
	mayFailFree bool
}

// TestHostileCommand runs a command that tries what researcher code could
// do to steal the site's identity or another experiment's data, first
// unconfined (every access works, so the files and processes are really
// there) and then sandboxed (every one of them fails), together with what
// a training command needs (which keeps working).
func TestHostileCommand(t *testing.T) {
	abi := landlockABI(t)
	s := newSite(t)
	l := listen(t, s.root)
	bin := filepath.Dir(testBinary(t))

	// What every policy below must deny and allow.
	common := []expect{
		// The envoy's identity and configuration.
		{probe: "read:" + s.key, deny: true},
		{probe: "read:" + s.cert, deny: true},
		{probe: "read:" + s.config, deny: true},
		{probe: "read:" + filepath.Join(s.link, "tls.key"), deny: true},
		// The envoy process: where its configuration is, its
		// environment, its memory and files.
		{probe: "read:/proc/PPID/cmdline", deny: true},
		{probe: "read:/proc/PPID/environ", deny: true},
		{probe: "readlink:/proc/PPID/cwd", deny: true},
		{probe: "read:/proc/PPID/cwd/sandbox.go", deny: true}, // the test's directory, through its link
		{probe: "read:/proc/PPID/status", deny: true},
		{probe: "read:/proc/PPID/maps", deny: true},
		{probe: "open:/proc/PPID/mem", deny: true},
		{probe: "read:/proc/PPID/fd", deny: true},
		{probe: "read:/proc", deny: true},
		{probe: "read:/proc/1/cmdline", deny: true},
		{probe: "ptrace:PPID", deny: true, mayFailFree: true},
		{probe: "signal:PPID", deny: true, minABI: 6},
		// Other experiments and the rest of the work directory.
		{probe: "read:" + filepath.Join(s.expB, "secret.txt"), deny: true},
		{probe: "read:" + s.expB, deny: true},
		{probe: "read:" + filepath.Join(s.work, "experiments"), deny: true},
		// Writing anywhere but the task directory.
		{probe: "create:" + filepath.Join(s.expA, "planted-RUN.py"), deny: true},
		{probe: "create:" + filepath.Join(s.data, "planted-RUN"), deny: true},
		{probe: "create:" + filepath.Join(s.root, "planted-RUN"), deny: true},
		{probe: "mkdir:" + filepath.Join(s.root, "dir-RUN"), deny: true},
		{probe: "append:" + filepath.Join(s.data, "train.csv"), deny: true},
		{probe: "truncate:" + filepath.Join(s.expA, "train.py"), deny: true, minABI: 3},
		// The network.
		{probe: "tcp-connect:" + l.tcp, deny: true},
		{probe: "tcp-bind:127.0.0.1:0", deny: true},
		{probe: "mptcp-connect:" + l.tcp, deny: true},
		{probe: "udp-send:" + l.udp, deny: true},
		{probe: "unix-connect:" + l.unixAbstract, deny: true, minABI: 6},
		{probe: "unix-connect:" + l.unixPath, deny: true, minABI: 9},

		// What a training command needs.
		{probe: "read:" + filepath.Join(s.expA, "train.py")},
		{probe: "read:" + s.expA},
		{probe: "read:" + filepath.Join(s.data, "train.csv")},
		{probe: "read:" + s.data},
		{probe: "create:" + filepath.Join(s.task, "model-RUN.safetensors")},
		{probe: "mkdir:" + filepath.Join(s.task, "sub-RUN")},
		{probe: "create:" + filepath.Join(s.task, "moved-RUN")},
		{probe: "rename:" + filepath.Join(s.task, "moved-RUN") + ">" + filepath.Join(s.root, "moved-RUN"), deny: true},
		{probe: "rename:" + filepath.Join(s.task, "model-RUN.safetensors") + ">" + filepath.Join(s.task, "sub-RUN", "model.safetensors")},
		{probe: "create:/dev/shm/fx-sandbox-test-RUN"},
		{probe: "remove:/dev/shm/fx-sandbox-test-RUN"},
		{probe: "read:/etc/passwd"},
		{probe: "read:/usr/bin"},
		{probe: "exec:/bin/true"},
		{probe: "read:/proc/self/status"},
		{probe: "read:/proc/self/fd"},
		{probe: "read:/proc/thread-self/comm"},
		{probe: "read:/proc/cpuinfo"},
		{probe: "read:/proc/meminfo"},
		{probe: "read:/sys/devices/system/cpu/online"},
		{probe: "read:/dev/urandom"},
		{probe: "append:/dev/null"},
	}
	// A site that lists its data and experiment precisely, and one that
	// declares a broad directory holding its keys and work directory:
	// the hidden paths are carved out of it.
	cases := []struct {
		name   string
		policy sandbox.Policy
		extra  []expect
	}{{
		name: "narrow",
		policy: sandbox.Policy{
			ReadOnly:  []string{s.expA, s.data, bin},
			ReadWrite: []string{s.task},
			Hidden:    s.hidden(),
		},
		extra: []expect{
			{probe: "read:" + s.caCert, deny: true},
			{probe: "read:" + s.outside, deny: true},
			{probe: "read:" + s.siteDir, deny: true},
		},
	}, {
		name: "broad",
		policy: sandbox.Policy{
			ReadOnly:  []string{s.root, s.expA, bin},
			ReadWrite: []string{s.task},
			Hidden:    s.hidden(),
		},
		extra: []expect{
			// The hidden paths' neighbours stay readable, through
			// the link too; the directory holding them cannot be
			// listed.
			{probe: "read:" + s.caCert},
			{probe: "read:" + filepath.Join(s.link, "ca.crt")},
			{probe: "read:" + s.outside},
			{probe: "read:" + s.siteDir, deny: true},
			{probe: "read:" + s.work, deny: true},
			// A hidden key written after the command started, in
			// a directory that held no hidden file until then.
			{probe: "read:" + filepath.Join(s.nextDir, "README")},
			{probe: "wait:"},
			{probe: "read:" + s.nextKey, deny: true},
		},
	}}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			exps := append(slices.Clone(common), tc.extra...)
			run := func(p *sandbox.Policy, id string) map[string]string {
				_ = os.Remove(s.nextKey)
				probes := make([]string, len(exps))
				for j, e := range exps {
					probes[j] = strings.ReplaceAll(e.probe, "RUN", id)
				}
				got := runProbes(t, p, s.task, probes, func() {
					if err := os.WriteFile(s.nextKey, []byte("next key"), 0o600); err != nil {
						t.Error(err)
					}
				})
				out := map[string]string{}
				for j, e := range exps {
					out[e.probe] = got[probes[j]]
				}
				return out
			}
			free := run(nil, fmt.Sprintf("free%d", i))
			for _, e := range exps {
				if free[e.probe] != "" && e.mayFailFree {
					t.Logf("unconfined, %s failed (%s): only the sandboxed denial is checked", e.probe, free[e.probe])
				} else if free[e.probe] != "" {
					t.Errorf("unconfined, %s failed (%s): the test cannot show the sandbox denies it", e.probe, free[e.probe])
				}
			}
			boxed := run(&tc.policy, fmt.Sprintf("boxed%d", i))
			for _, e := range exps {
				got := boxed[e.probe]
				switch {
				case e.deny && abi < e.minABI:
					t.Logf("Landlock ABI %d: %s is not denied before ABI %d (result: %q)", abi, e.probe, e.minABI, got)
				case e.deny && !denied(got):
					t.Errorf("sandboxed, %s: got %q, want it denied (EACCES or EPERM)", e.probe, got)
				case !e.deny && got != "":
					t.Errorf("sandboxed, %s: got %s, want it allowed", e.probe, got)
				}
			}
		})
	}
}

// TestHiddenSystemPaths shows Hidden applied to the system directories
// the sandbox allows by default: a hidden file in /etc is carved out of
// it, and a hidden directory holding a default one (/sys/devices/system
// holds .../cpu) takes it along.
func TestHiddenSystemPaths(t *testing.T) {
	landlockABI(t)
	dir := t.TempDir()
	p := sandbox.Policy{
		ReadOnly: []string{filepath.Dir(testBinary(t))},
		Hidden:   []string{"/etc/passwd", "/sys/devices/system"},
	}
	probes := map[string]bool{
		"read:/etc/passwd":                    true,
		"read:/sys/devices/system/cpu/online": true,
		"read:/etc/group":                     false,
		"read:/usr/bin":                       false,
	}
	var list []string
	for pr := range probes {
		list = append(list, pr)
	}
	free := runProbes(t, nil, dir, list, nil)
	boxed := runProbes(t, &p, dir, list, nil)
	for pr, deny := range probes {
		switch {
		case free[pr] != "":
			t.Errorf("unconfined, %s failed (%s)", pr, free[pr])
		case deny && !denied(boxed[pr]):
			t.Errorf("sandboxed, %s: got %q, want it denied", pr, boxed[pr])
		case !deny && boxed[pr] != "":
			t.Errorf("sandboxed, %s: got %s, want it allowed", pr, boxed[pr])
		}
	}
}

// TestAllowNetwork shows the network switch: a policy that allows the
// network connects to the loopback listener the default policy cannot
// reach (TestHostileCommand).
func TestAllowNetwork(t *testing.T) {
	landlockABI(t)
	dir := t.TempDir()
	l := listen(t, dir)
	p := sandbox.Policy{ReadOnly: []string{filepath.Dir(testBinary(t))}, AllowNetwork: true}
	probes := []string{"tcp-connect:" + l.tcp, "mptcp-connect:" + l.tcp, "udp-send:" + l.udp}
	got := runProbes(t, &p, dir, probes, nil)
	for _, pr := range probes {
		if got[pr] != "" {
			t.Errorf("with AllowNetwork, %s: %s", pr, got[pr])
		}
	}
	got = runProbes(t, &sandbox.Policy{ReadOnly: p.ReadOnly}, dir, probes, nil)
	for _, pr := range probes {
		if !denied(got[pr]) {
			t.Errorf("without AllowNetwork, %s: got %q, want it denied", pr, got[pr])
		}
	}
}

// TestRootHasNoCapabilities shows that a command started by root runs
// without capabilities, so that what Landlock does not cover (BPF, perf,
// raw I/O, modules) stays closed to it too.
func TestRootHasNoCapabilities(t *testing.T) {
	landlockABI(t)
	if os.Geteuid() != 0 {
		t.Skip("only root has capabilities to drop")
	}
	dir := t.TempDir()
	if got := runProbes(t, nil, dir, []string{"caps"}, nil)["caps"]; got == "" {
		t.Fatal("unconfined, the command holds no capabilities: the test shows nothing")
	}
	p := sandbox.Policy{ReadOnly: []string{filepath.Dir(testBinary(t))}}
	if got := runProbes(t, &p, dir, []string{"caps"}, nil)["caps"]; got != "" {
		t.Errorf("sandboxed, the command %s", got)
	}
}

// echoMain reports what the command was started with, for
// TestApplyKeepsTheCommand.
func echoMain() int {
	wd, _ := os.Getwd()
	fd3, err := os.ReadFile("/proc/self/fd/3")
	if err != nil {
		fd3 = []byte("error: " + err.Error())
	}
	var fds []int
	if entries, err := os.ReadDir("/proc/self/fd"); err == nil {
		for _, e := range entries {
			n, _ := strconv.Atoi(e.Name())
			fds = append(fds, n)
		}
	}
	pgid, _ := syscall.Getpgid(0)
	stdin, _ := bufio.NewReader(os.Stdin).ReadString('\n')
	_ = json.NewEncoder(os.Stdout).Encode(echo{
		Args: os.Args, Env: os.Environ(), Dir: wd, FD3: string(fd3), Stdin: stdin,
		PgidIsPid: pgid == os.Getpid(), FDs: fds,
	})
	code, _ := strconv.Atoi(os.Getenv("EXIT"))
	return code
}

type echo struct {
	Args      []string
	Env       []string
	Dir       string
	FD3       string
	Stdin     string
	PgidIsPid bool
	FDs       []int
}

// TestApplyKeepsTheCommand checks that the command Apply starts is the
// one it was given: program and arguments, environment (without the
// trampoline's policy), directory, standard input, extra files, process
// attributes and exit status.
func TestApplyKeepsTheCommand(t *testing.T) {
	landlockABI(t)
	dir := t.TempDir()
	extra := filepath.Join(dir, "extra")
	if err := os.WriteFile(extra, []byte("extra file"), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(extra)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	exe := testBinary(t)
	// A relative program name, resolved against Dir as exec.Cmd would.
	rel, err := filepath.Rel(dir, exe)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(rel, "two words", "", "-x")
	cmd.Dir = dir
	cmd.Env = []string{probeEnv + "=echo", "EXIT=7", "KEEP=me"}
	cmd.Stdin = strings.NewReader("to stdin\n")
	cmd.ExtraFiles = []*os.File{f}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// A descriptor this process holds without close-on-exec, as an
	// envoy may have inherited one: it must not reach the command.
	const leaked = 77
	if err := syscall.Dup2(int(f.Fd()), leaked); err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(leaked)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	p := sandbox.Policy{ReadOnly: []string{filepath.Dir(exe), extra}, ReadWrite: []string{dir}}
	if err := p.Apply(cmd); err != nil {
		t.Fatal(err)
	}
	if err := p.Apply(cmd); err == nil {
		t.Error("a second Apply on the same command succeeded")
	}
	err = cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 7 {
		t.Fatalf("exit: %v (want status 7); stderr:\n%s", err, stderr.String())
	}
	var got echo
	if err := json.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatalf("%v: %q", err, out.String())
	}
	if want := []string{rel, "two words", "", "-x"}; !slices.Equal(got.Args, want) {
		t.Errorf("args %q, want %q", got.Args, want)
	}
	if want := []string{probeEnv + "=echo", "EXIT=7", "KEEP=me"}; !slices.Equal(got.Env, want) {
		t.Errorf("environment %q, want %q (the policy must not reach the command)", got.Env, want)
	}
	if got.Dir != dir {
		t.Errorf("directory %s, want %s", got.Dir, dir)
	}
	if got.FD3 != "extra file" {
		t.Errorf("fd 3 holds %q, want the extra file", got.FD3)
	}
	if got.Stdin != "to stdin\n" {
		t.Errorf("stdin %q", got.Stdin)
	}
	if !got.PgidIsPid {
		t.Error("Setpgid did not reach the command")
	}
	// 0-3, those the command opened itself (the Go runtime's poller, the
	// listing of /proc/self/fd: low numbers), and the /proc/<pid> pin at
	// 100 or above; nothing inherited beyond them.
	var others []int
	for _, fd := range got.FDs {
		if fd > 3 && fd < 100 && fd != leaked {
			continue
		}
		if fd > 3 {
			others = append(others, fd)
		}
	}
	if len(others) != 1 || others[0] < 100 {
		t.Errorf("the command holds descriptors %v; want 0-3, the one listing them, and one of 100 or more (not the leaked %d)", got.FDs, leaked)
	}
}

// TestApplyRefuses checks the policy errors a site can make, and that a
// command that cannot be found stays an error.
func TestApplyRefuses(t *testing.T) {
	landlockABI(t)
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		p    sandbox.Policy
		want string
	}{
		{"relative", sandbox.Policy{ReadOnly: []string{"data"}}, `ReadOnly path "data" is not absolute`},
		{"missing", sandbox.Policy{ReadWrite: []string{filepath.Join(dir, "nope")}}, "create it, or leave it out"},
		{"relative hidden", sandbox.Policy{Hidden: []string{"key"}}, `hidden path "key" is not absolute`},
		{"both", sandbox.Policy{ReadOnly: []string{dir}, Hidden: []string{dir}}, "is also hidden"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.p.Apply(exec.Command("/bin/true"))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Apply: %v, want an error saying %q", err, tc.want)
			}
		})
	}
	if err := (sandbox.Policy{}).Apply(exec.Command("fx-sandbox-no-such-program")); !errors.Is(err, exec.ErrNotFound) {
		t.Errorf("Apply of a missing program: %v, want exec.ErrNotFound", err)
	}
}

// TestSetupFailureDoesNotRun shows the trampoline failing closed: a path
// of the policy vanishes between Apply and the start, and the command
// does not run (it would have created a file) and exits with
// ExitSetupFailed, saying why.
func TestSetupFailureDoesNotRun(t *testing.T) {
	landlockABI(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	if err := os.Mkdir(data, 0o755); err != nil {
		t.Fatal(err)
	}
	marker := filepath.Join(dir, "ran")
	cmd := exec.Command("/bin/sh", "-c", "echo ran > "+marker)
	p := sandbox.Policy{ReadOnly: []string{data}, ReadWrite: []string{dir}}
	if err := p.Apply(cmd); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(data); err != nil {
		t.Fatal(err)
	}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != sandbox.ExitSetupFailed {
		t.Fatalf("got %v, want exit status %d; output:\n%s", err, sandbox.ExitSetupFailed, out)
	}
	if !strings.Contains(string(out), data) || !strings.Contains(string(out), "did not run") {
		t.Errorf("the trampoline's message does not say what failed: %q", out)
	}
	if _, err := os.Stat(marker); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the command ran although its sandbox failed (%v)", err)
	}
}

// TestShellScript runs a /bin/sh script as a site's exec runner might: by
// its own #! line from the experiment directory and through /bin/sh,
// reading data, using pipes, subprocesses and a temporary file, writing
// its output to the task directory.
func TestShellScript(t *testing.T) {
	landlockABI(t)
	s := newSite(t)
	script := `#!/bin/sh
set -eu
tmp=$(mktemp)
wc -l < "$DATA/train.csv" | tr -d ' ' > "$tmp"
n=$(cat "$tmp")
rm "$tmp"
echo "rows=$n cpus=$(nproc)" > out.txt
if cat "$KEY" 2>/dev/null; then echo "read the key"; exit 3; fi
echo done
`
	if err := os.WriteFile(filepath.Join(s.expA, "run.sh"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	p := sandbox.Policy{ReadOnly: []string{s.expA, s.data}, ReadWrite: []string{s.task}, Hidden: s.hidden()}
	for _, argv := range [][]string{{filepath.Join(s.expA, "run.sh")}, {"/bin/sh", filepath.Join(s.expA, "run.sh")}} {
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Dir = s.task
		cmd.Env = []string{"PATH=/usr/bin:/bin", "TMPDIR=" + s.task, "DATA=" + s.data, "KEY=" + s.key}
		if err := p.Apply(cmd); err != nil {
			t.Fatal(err)
		}
		out, err := cmd.CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "done" {
			t.Fatalf("%q: %v\n%s", argv, err, out)
		}
		b, err := os.ReadFile(filepath.Join(s.task, "out.txt"))
		if err != nil || !strings.HasPrefix(string(b), "rows=1 cpus=") {
			t.Errorf("%q wrote %q (%v)", argv, b, err)
		}
	}
}

// TestPythonTorch runs the real workload: Debian's python3 importing
// numpy and torch, training a step with a multi-process data loader
// (shared memory, worker processes), writing a temporary file and its
// output under the task directory, under the default policy.
func TestPythonTorch(t *testing.T) {
	landlockABI(t)
	const python = "/usr/bin/python3"
	if _, err := os.Stat(python); err != nil {
		t.Skipf("%s is not installed", python)
	}
	if out, err := exec.Command(python, "-c", "import numpy, torch").CombinedOutput(); err != nil {
		t.Skipf("%s cannot import numpy and torch (apt-get install python3-torch python3-numpy): %v\n%s", python, err, out)
	}
	s := newSite(t)
	train := `
import os, tempfile, numpy, torch
from torch.utils.data import DataLoader, TensorDataset
print("sum", torch.ones(3).sum().item(), int(numpy.arange(4).sum()))
torch.manual_seed(0)
x = torch.randn(64, 4); y = x @ torch.tensor([1.0, -2.0, 3.0, 0.5])
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for xb, yb in DataLoader(TensorDataset(x, y), batch_size=16, num_workers=2):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(xb).squeeze(1), yb)
    loss.backward(); opt.step()
with tempfile.NamedTemporaryFile() as f:
    torch.save(model.state_dict(), f.name)
torch.save(model.state_dict(), "model.pt")
try:
    open(os.environ["KEY"]).read(); print("read the key")
except PermissionError:
    print("key denied")
print("trained", loss.item() > 0)
`
	if err := os.WriteFile(filepath.Join(s.expA, "train.py"), []byte(train), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(python, filepath.Join(s.expA, "train.py"))
	cmd.Dir = s.task
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + s.task, "TMPDIR=" + s.task, "KEY=" + s.key}
	p := sandbox.Policy{ReadOnly: []string{s.expA, s.data}, ReadWrite: []string{s.task}, Hidden: s.hidden()}
	if err := p.Apply(cmd); err != nil {
		t.Fatal(err)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, want := range []string{"sum 3.0 6", "key denied", "trained True"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if _, err := os.Stat(filepath.Join(s.task, "model.pt")); err != nil {
		t.Error(err)
	}
}

// TestProcSelfOutlivesCacheEviction shows that a long-running command
// keeps its /proc/self when the kernel evicts the dentry cache, as it
// does under memory pressure: Landlock's rule is on the inode of the
// command's /proc/<pid>, and procfs would make a new one. It needs root
// to drop the caches.
func TestProcSelfOutlivesCacheEviction(t *testing.T) {
	landlockABI(t)
	if os.Geteuid() != 0 {
		t.Skip("dropping the dentry cache needs root")
	}
	dir := t.TempDir()
	got := runProbes(t, &sandbox.Policy{ReadOnly: []string{filepath.Dir(testBinary(t))}}, dir,
		[]string{"read:/proc/self/status", "wait:", "read:/proc/self/stat"}, func() {
			// A dentry used lately survives one pass of the
			// shrinker; three make its eviction dependable.
			for range 3 {
				if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("2"), 0); err != nil {
					t.Fatal(err)
				}
			}
		})
	if got["read:/proc/self/status"] != "" || got["read:/proc/self/stat"] != "" {
		t.Errorf("/proc/self before and after the dentry cache was dropped: %q", got)
	}
}

// TestProgramOutsideThePolicy shows what a site sees when the command's
// program lies where the policy does not reach: the exec is refused and
// the message says where programs must be.
func TestProgramOutsideThePolicy(t *testing.T) {
	landlockABI(t)
	dir := t.TempDir()
	prog := filepath.Join(dir, "run.sh")
	if err := os.WriteFile(prog, []byte("#!/bin/sh\necho ran\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(prog)
	if err := (sandbox.Policy{}).Apply(cmd); err != nil {
		t.Fatal(err)
	}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != sandbox.ExitSetupFailed || !strings.Contains(string(out), "ReadOnly paths") {
		t.Errorf("got %v and %q, want exit status %d and a message naming ReadOnly", err, out, sandbox.ExitSetupFailed)
	}
}

// starterMain starts a sandboxed sleep that is to die with its starter
// (Pdeathsig), prints its pid and waits for standard input to close, for
// TestCommandDiesWithItsStarter.
func starterMain() int {
	cmd := exec.Command("/bin/sleep", "300")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	p := sandbox.Policy{ReadWrite: []string{os.TempDir()}}
	if err := p.Apply(cmd); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(cmd.Process.Pid)
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// TestCommandDiesWithItsStarter: a sandboxed command started with
// Pdeathsig dies when the process that started it is killed, as an
// unsandboxed one does, although the trampoline's Go runtime may execve
// from a thread other than the one the kernel recorded the setting on.
// (An envoy killed mid-task must not leave the experiment's code running
// unsupervised.) Several rounds, since which thread execve's varies.
func TestCommandDiesWithItsStarter(t *testing.T) {
	landlockABI(t)
	for i := range 8 {
		starter := exec.Command(testBinary(t))
		starter.Env = append(os.Environ(), probeEnv+"=starter", "TMPDIR="+t.TempDir())
		stdin, err := starter.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr bytes.Buffer
		starter.Stderr = &stderr
		out, err := starter.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := starter.Start(); err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(out).ReadString('\n')
		pid, perr := strconv.Atoi(strings.TrimSpace(line))
		if err != nil || perr != nil {
			_ = starter.Process.Kill()
			_ = starter.Wait()
			t.Fatalf("the starter printed %q (%v); stderr:\n%s", line, err, stderr.String())
		}
		// Killed only once the trampoline has become the sleep: the
		// kernel's setting must survive its execve.
		for c := comm(pid); c != "sleep\n"; c = comm(pid) {
			if c == "" {
				_ = starter.Process.Kill()
				_ = starter.Wait()
				t.Fatalf("the sandboxed command exited before it ran; the starter's stderr:\n%s", stderr.String())
			}
			time.Sleep(time.Millisecond)
		}
		_ = starter.Process.Kill()
		_ = starter.Wait()
		_ = stdin.Close()
		// Killed by the kernel, the sleep becomes a zombie of the
		// process that adopts it, or vanishes; either way it is no
		// longer sleeping. Five minutes is the sleep's own length: a
		// bound far past any scheduling delay.
		deadline := time.Now().Add(5 * time.Minute)
		for alive(pid) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if alive(pid) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("round %d: the sandboxed command (pid %d) outlived the process that started it", i+1, pid)
		}
	}
}

// comm is the name of pid's program ("" once it has gone).
func comm(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return string(b)
}

// alive reports whether pid is a process that has not exited (a zombie
// has).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command name in parentheses.
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z' && s[i+2] != 'X'
	}
	return true
}
