package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// requireE2E skips t under -short.
func requireE2E(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test: runs real fx processes (skipped with -short)")
	}
	if fxBin == "" {
		t.Fatal("no fx binary: TestMain did not build it")
	}
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// waitFor polls cond until it reports done, fails the test when timeout
// passes (naming what was awaited and cond's last error) or when a process
// of f that must keep running has exited. cond is polled at once, then every
// 100ms: the conditions are cheap calls, never sleeps standing in for them.
func (f *fed) waitFor(timeout time.Duration, what string, cond func() (bool, error)) {
	f.t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		done, err := cond()
		if done {
			return
		}
		if err != nil {
			last = err
		}
		if p := f.crashed(); p != nil {
			f.t.Fatalf("waiting for %s: %s exited unexpectedly: %v (log: %s)", what, p.name, p.exitErr(), p.logPath)
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("waiting for %s: not within %s (last error: %v)", what, timeout, last)
		}
		<-tick.C
	}
}

// ---------------------------------------------------------------- processes

// proc is one fx process: a director or an envoy. It may be stopped,
// killed and started again with the same arguments; every run appends to
// the same log file.
type proc struct {
	name    string
	args    []string
	env     []string
	logPath string

	mu       sync.Mutex
	cmd      *exec.Cmd
	done     chan struct{}
	err      error
	expected bool // an exit now is the test's doing
}

func (p *proc) start(t *testing.T) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil && !isClosed(p.done) {
		t.Fatalf("%s is already running", p.name)
	}
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(logf, "===== e2e: %s starting at %s: fx %s\n", p.name, time.Now().UTC().Format(time.RFC3339Nano), strings.Join(p.args, " "))
	cmd := exec.Command(fxBin, p.args...)
	cmd.Env = append(baseEnv(), p.env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, so a Ctrl-C of the test run is not delivered
	// twice, and a kill reaches nothing else.
	cmd.SysProcAttr = procAttr()
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("starting %s: %v", p.name, err)
	}
	done := make(chan struct{})
	p.cmd, p.done, p.err, p.expected = cmd, done, nil, false
	go func() {
		err := cmd.Wait()
		logf.Close()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(done)
	}()
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// running says whether the process is alive.
func (p *proc) running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil && !isClosed(p.done)
}

// unexpectedExit says whether the process ended without the test asking.
func (p *proc) unexpectedExit() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil && isClosed(p.done) && !p.expected
}

func (p *proc) exitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// signal sends sig and waits up to wait for the process to end; after that
// it is killed outright. It reports whether the process ended of sig alone.
func (p *proc) signal(t *testing.T, sig syscall.Signal, wait time.Duration) bool {
	t.Helper()
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	if cmd == nil || isClosed(done) {
		p.mu.Unlock()
		return true
	}
	p.expected = true
	p.mu.Unlock()
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
		return true
	case <-time.After(wait):
	}
	_ = cmd.Process.Kill()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Errorf("%s (pid %d) did not die after SIGKILL", p.name, cmd.Process.Pid)
	}
	return false
}

// pause freezes the process (SIGSTOP), as a hung machine or a network
// partition would look to its peers, until resume; a cleanup resumes it.
func (p *proc) pause(t *testing.T) {
	t.Helper()
	p.mu.Lock()
	cmd := p.cmd
	p.mu.Unlock()
	if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatalf("pausing %s: %v", p.name, err)
	}
	t.Cleanup(func() { _ = cmd.Process.Signal(syscall.SIGCONT) })
}

// resume lets a paused process run again (SIGCONT).
func (p *proc) resume(t *testing.T) {
	t.Helper()
	p.mu.Lock()
	cmd := p.cmd
	p.mu.Unlock()
	if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatalf("resuming %s: %v", p.name, err)
	}
}

// kill ends the process with SIGKILL, as a crash would.
func (p *proc) kill(t *testing.T) { p.signal(t, syscall.SIGKILL, 10*time.Second) }

// stop ends the process gracefully (SIGTERM), or hard after 20s; a party
// that needs the hard way, or exits with an error, fails the test.
func (p *proc) stop(t *testing.T) {
	t.Helper()
	if !p.running() {
		return
	}
	if !p.signal(t, syscall.SIGTERM, 20*time.Second) {
		t.Errorf("%s did not stop within 20s of SIGTERM; it was killed", p.name)
		return
	}
	if err := p.exitErr(); err != nil {
		t.Errorf("%s exited with %v after SIGTERM, want a clean exit", p.name, err)
	}
}

// log returns what the process logged so far.
func (p *proc) log() string {
	b, _ := os.ReadFile(p.logPath)
	return string(b)
}

// baseEnv is the parties' environment: the test's, minus FX_* settings
// that would override their configuration files, with a private config
// directory so no user profile is read.
func baseEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "FX_") || strings.HasPrefix(kv, "XDG_CONFIG_HOME=") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "XDG_CONFIG_HOME="+os.TempDir()+"/fx-e2e-no-profile")
}

// ---------------------------------------------------------------- federation

// fed is one federation under test: its PKI, its director and envoys, all
// in one temporary directory.
type fed struct {
	t   *testing.T
	dir string
	ca  string // the CA directory

	addr         string // the director's host:port
	aggPort      int    // the one port aggregators listen on, 0 for any
	dataDir      string
	dirConfig    string
	director     *proc
	envoys       map[string]*proc
	envoyConfigs map[string]string
	procs        []*proc
	researchers  []string
	// scriptLayout: the PKI is scripts/pki-bootstrap.sh's (pki/director,
	// pki/envoys/NAME, pki/researcher, pki/admin), not one directory per
	// party under pki/ROLEs/.
	scriptLayout bool
}

// directorOptions shape the director's configuration file.
type directorOptions struct {
	review          string // auto (default) or manual
	maxArchiveBytes int64  // 0: the default
	fixedAggPort    bool   // aggregators on one known port
	maxConcurrent   int    // experiments offered or running at once; 0: 4
	metricsListen   string // metrics.listen (host:port); empty: off
	launcher        string // launcher: inprocess (default) or process
}

// newFed makes a directory, a CA and certificates for a director, the
// researchers and the envoys named, with the real CLI. It registers a
// cleanup that stops every process and, if the test failed, prints each
// process's log.
func newFed(t *testing.T, researchers, envoys []string) *fed {
	t.Helper()
	f := emptyFed(t, researchers)
	f.fx("pki", "init", "--dir", f.ca, "--org", "fx e2e")
	f.fx("pki", "certify", "--dir", f.ca, "--role", "director", "--name", "localhost",
		"--host", "localhost", "--host", "127.0.0.1", "--out", f.partyDir("director", "localhost"))
	for _, r := range researchers {
		f.certify("researcher", r)
	}
	for _, e := range envoys {
		f.certify("envoy", e)
	}
	return f
}

func emptyFed(t *testing.T, researchers []string) *fed {
	t.Helper()
	requireE2E(t)
	dir := t.TempDir()
	f := &fed{t: t, dir: dir, ca: filepath.Join(dir, "pki", "ca"), envoys: map[string]*proc{}, envoyConfigs: map[string]string{}, researchers: researchers}
	t.Cleanup(f.cleanup)
	return f
}

// newFedBootstrap is newFed with the PKI made by scripts/pki-bootstrap.sh:
// a CA, the director "localhost", the envoys named, one researcher and an
// admin named "ops".
func newFedBootstrap(t *testing.T, researcher string, envoys []string) *fed {
	t.Helper()
	f := emptyFed(t, []string{researcher})
	f.scriptLayout = true
	args := append([]string{"../scripts/pki-bootstrap.sh", "--dir", filepath.Join(f.dir, "pki"), "--researcher", researcher, "--admin", "ops", "--org", "fx e2e"}, envoys...)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", args...)
	cmd.Env = append(baseEnv(), "FX="+fxBin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("scripts/pki-bootstrap.sh: %v\n%s", err, out)
	}
	t.Logf("scripts/pki-bootstrap.sh:\n%s", out)
	return f
}

// certify issues a certificate for a party with `fx pki certify`.
func (f *fed) certify(role, name string) pki.Files {
	f.t.Helper()
	out := f.partyDir(role, name)
	f.fx("pki", "certify", "--dir", f.ca, "--role", role, "--name", name, "--out", out)
	return pki.PartyFiles(out, name)
}

func (f *fed) partyDir(role, name string) string {
	switch {
	case !f.scriptLayout:
		return filepath.Join(f.dir, "pki", role+"s", name)
	case role == "envoy":
		return filepath.Join(f.dir, "pki", "envoys", name)
	default:
		return filepath.Join(f.dir, "pki", role)
	}
}

// files are a party's certificate, key and root.
func (f *fed) files(role, name string) pki.Files {
	return pki.PartyFiles(f.partyDir(role, name), name)
}

// sub is f for a subtest: the same federation, with failures reported
// on t. A subtest must not start processes through it.
func (f *fed) sub(t *testing.T) *fed {
	c := *f
	c.t = t
	return &c
}

func (f *fed) cleanup() {
	for _, p := range slices.Backward(f.procs) {
		p.stop(f.t)
	}
	if !f.t.Failed() {
		return
	}
	for _, p := range f.procs {
		f.t.Logf("===== log of %s (%s) =====\n%s", p.name, p.logPath, tail(p.log(), 48<<10))
	}
}

// tail is the end of s, at most n bytes, from a line start.
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[len(s)-n:]
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return "[...]\n" + s
}

// crashed returns a process that exited without the test asking, or nil.
func (f *fed) crashed() *proc {
	for _, p := range f.procs {
		if p.unexpectedExit() {
			return p
		}
	}
	return nil
}

func (f *fed) newProc(name string, env []string, args ...string) *proc {
	p := &proc{name: name, args: args, env: env, logPath: filepath.Join(f.dir, "logs", name+".log")}
	if err := os.MkdirAll(filepath.Dir(p.logPath), 0o700); err != nil {
		f.t.Fatal(err)
	}
	f.procs = append(f.procs, p)
	return p
}

// startDirector writes the director's configuration file, starts it, and
// waits until it answers a researcher.
func (f *fed) startDirector(o directorOptions) {
	f.t.Helper()
	f.writeDirectorConfig(o)
	f.director = f.newProc("director", nil, "director", "start", "--config", f.dirConfig)
	f.restartDirector()
}

// writeDirectorConfig writes the director's configuration file to
// f.dirConfig, choosing its address.
func (f *fed) writeDirectorConfig(o directorOptions) {
	f.t.Helper()
	f.addr = fmt.Sprintf("127.0.0.1:%d", freePort(f.t))
	f.dataDir = filepath.Join(f.dir, "director-data")
	if o.review == "" {
		o.review = "auto"
	}
	if o.fixedAggPort {
		f.aggPort = freePort(f.t)
	}
	if o.maxConcurrent == 0 {
		o.maxConcurrent = 4
	}
	d := f.files("director", "localhost")
	var extra string
	if o.maxArchiveBytes > 0 {
		extra = fmt.Sprintf("max_archive_bytes: %d\n", o.maxArchiveBytes)
	}
	if o.metricsListen != "" {
		extra += fmt.Sprintf("metrics: {listen: %q}\n", o.metricsListen)
	}
	if o.launcher != "" {
		extra += fmt.Sprintf("launcher: %s\n", o.launcher)
	}
	cfg := fmt.Sprintf(`listen_address: %s
advertise:
  host: 127.0.0.1
  server_name: localhost
tls:
  cert: %s
  key: %s
  ca: %s
  crl: %s
data_dir: %s
heartbeat_period: 1s
offline_after: 4s
review_policy: %s
max_concurrent_experiments: %d
aggregator:
  host: 127.0.0.1
  port_min: %d
  port_max: %d
stop_timeout: 5s
%s`, f.addr, d.Cert, d.Key, d.CA, filepath.Join(f.ca, "crl.pem"), f.dataDir, o.review, o.maxConcurrent, f.aggPort, f.aggPort, extra)
	f.dirConfig = filepath.Join(f.dir, "director.yaml")
	if err := os.WriteFile(f.dirConfig, []byte(cfg), 0o600); err != nil {
		f.t.Fatal(err)
	}
}

// restartDirector starts the director process (again, after a stop or a
// kill) with the same configuration and waits until it serves.
func (f *fed) restartDirector() {
	f.t.Helper()
	f.director.start(f.t)
	f.waitFor(30*time.Second, "the director to serve", func() (bool, error) {
		c, err := f.dialAs("researcher", f.firstResearcher(), 2*time.Second)
		if err != nil {
			return false, err
		}
		c.Close()
		return true, nil
	})
}

func (f *fed) firstResearcher() string {
	if len(f.researchers) == 0 {
		f.t.Fatal("the federation has no researcher")
	}
	return f.researchers[0]
}

// shard is an envoy's data: its tags and its shard descriptor (YAML, the
// body of the shard: key).
type shard struct {
	tags []string
	yaml string
}

func syntheticShard(i, n int, extra string) shard {
	return shard{tags: []string{"synthetic"}, yaml: fmt.Sprintf("kind: synthetic\nshard: %d/%d\nseed: 1\n%s", i, n, extra)}
}

// startEnvoy writes an envoy's configuration file (auto review), starts
// it and returns it; wait for it with waitEnvoysOnline. env is added to
// its environment.
func (f *fed) startEnvoy(name string, s shard, env ...string) *proc {
	f.t.Helper()
	return f.startEnvoyOpts(name, s, envoyOptions{env: env})
}

// envoyOptions shape an envoy's configuration file and process.
type envoyOptions struct {
	review string // the data owner's policy; default auto
	noExec bool   // refuse exec runners (exec.allow: false)
	maxExp int    // max_experiments; 0: 2
	// allowlist is review.allowlist (with review "allowlist").
	allowlist string
	env       []string // added to the process's environment
	// shareLogs sends the runners' output to the director (exec.share_logs).
	shareLogs bool
	// noSandbox runs exec runners unconfined (exec.sandbox: false).
	noSandbox bool
	// execEnv is added to exec.env (which holds PATH=/usr/bin:/bin).
	execEnv []string
	// metricsListen is metrics.listen (host:port); empty: off.
	metricsListen string
}

// startEnvoyReview is startEnvoy with the data owner's review policy.
func (f *fed) startEnvoyReview(name string, s shard, review string) *proc {
	f.t.Helper()
	return f.startEnvoyOpts(name, s, envoyOptions{review: review})
}

// startEnvoyOpts is startEnvoy with options.
func (f *fed) startEnvoyOpts(name string, s shard, o envoyOptions) *proc {
	f.t.Helper()
	if o.review == "" {
		o.review = "auto"
	}
	if o.maxExp == 0 {
		o.maxExp = 2
	}
	e := f.files("envoy", name)
	var sh strings.Builder
	for line := range strings.SplitSeq(strings.TrimRight(s.yaml, "\n"), "\n") {
		sh.WriteString("  " + line + "\n")
	}
	cfg := fmt.Sprintf(`name: %s
director:
  address: %s
  server_name: localhost
tls:
  cert: %s
  key: %s
  ca: %s
work_dir: %s
max_experiments: %d
tags: [%s]
shard:
%sreview:
  policy: %s
  allowlist: "%s"
exec:
  allow: %t
  env: [%s]
  share_logs: %t
  sandbox: %t
rpc_timeout: 5s
retry:
  initial: 200ms
  max: 1s
metrics: {listen: %q}
`, name, f.addr, e.Cert, e.Key, e.CA, filepath.Join(f.dir, "envoys", name), o.maxExp, strings.Join(s.tags, ", "), sh.String(), o.review, o.allowlist, !o.noExec,
		strings.Join(append([]string{"PATH=/usr/bin:/bin"}, o.execEnv...), ", "), o.shareLogs, !o.noSandbox, o.metricsListen)
	file := filepath.Join(f.dir, "envoys", name+".yaml")
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		f.t.Fatal(err)
	}
	f.envoyConfigs[name] = file
	p := f.newProc(name, o.env, "envoy", "start", "--config", file)
	f.envoys[name] = p
	p.start(f.t)
	return p
}

// waitEnvoysOnline waits until the director lists every named envoy online.
func (f *fed) waitEnvoysOnline(c *experiment.Client, names ...string) {
	f.t.Helper()
	f.waitFor(60*time.Second, fmt.Sprintf("envoys %v online", names), func() (bool, error) {
		online, err := f.onlineEnvoys(c)
		if err != nil {
			return false, err
		}
		for _, n := range names {
			if !online[n] {
				return false, fmt.Errorf("online: %v", online)
			}
		}
		return true, nil
	})
}

func (f *fed) onlineEnvoys(c *experiment.Client) (map[string]bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	list, err := c.Envoys(ctx)
	if err != nil {
		return nil, err
	}
	online := map[string]bool{}
	for _, e := range list {
		online[e.GetName()] = e.GetOnline()
	}
	return online, nil
}

// ---------------------------------------------------------------- clients

// dialAs connects the Go client with a researcher's or admin's certificate.
func (f *fed) dialAs(role, name string, timeout time.Duration) (*experiment.Client, error) {
	files := f.files(role, name)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return experiment.Dial(ctx, experiment.ClientConfig{
		Director: f.addr, ServerName: "localhost",
		Cert: files.Cert, Key: files.Key, CA: files.CA,
		ConnectTimeout: timeout,
		Retry:          experiment.Retry{Initial: 100 * time.Millisecond, Max: time.Second, GiveUpAfter: time.Minute},
	})
}

// researcher is a connected Go client for a researcher, closed at cleanup.
func (f *fed) researcher(name string) *experiment.Client {
	f.t.Helper()
	c, err := f.dialAs("researcher", name, 10*time.Second)
	if err != nil {
		f.t.Fatalf("researcher %s: %v", name, err)
	}
	f.t.Cleanup(func() { c.Close() })
	return c
}

// rawConn is a gRPC connection with any party's certificate, for the calls
// the CLI and the researcher's client will not make.
func rawConn(t *testing.T, files pki.Files, addr string) *grpc.ClientConn {
	t.Helper()
	k, err := pki.NewKeyring(pki.KeyringConfig{Files: files})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pki.NewClient(addr, k, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// tlsHandshake connects to addr with plain crypto/tls, presenting any
// certificate (even one fx's own client would refuse to load) and trusting
// the root in caFile, and returns how the server answered: nil if it
// accepted the certificate, else the alert it sent. With TLS 1.3 a refusal
// arrives after the client's side of the handshake, so it reads once.
func tlsHandshake(t *testing.T, certFile, keyFile, caFile, addr string) error {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		t.Fatalf("%s holds no certificate", caFile)
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{
		// Always this certificate, even when the server asks for one
		// from other CAs.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
		RootCAs:              roots, ServerName: "localhost",
		NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS12,
	})
	if err != nil {
		return err
	}
	defer conn.Close()
	// A server that accepted the certificate sends its HTTP/2 settings;
	// one that refused it sends an alert.
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	var b [1]byte
	if _, err := conn.Read(b[:]); err != nil {
		return err
	}
	return nil
}

// ---------------------------------------------------------------- CLI

// cliResult is one finished fx command.
type cliResult struct {
	stdout, stderr string
	err            error
}

// runFx runs the fx binary with args (bounded by two minutes) and returns
// what it printed and how it ended.
func (f *fed) runFx(args ...string) cliResult {
	f.t.Helper()
	return f.runFxEnv(2*time.Minute, nil, args...)
}

// runFxEnv is runFx with a bound and extra environment variables.
func (f *fed) runFxEnv(timeout time.Duration, env []string, args ...string) cliResult {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, fxBin, args...)
	cmd.Env = append(baseEnv(), env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	return cliResult{out.String(), errOut.String(), err}
}

// fx runs an fx command that must succeed and returns its stdout.
func (f *fed) fx(args ...string) string {
	f.t.Helper()
	r := f.runFx(args...)
	if r.err != nil {
		f.t.Fatalf("fx %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.err, r.stdout, r.stderr)
	}
	return r.stdout
}

// exp runs `fx experiment ARGS` as researcher who.
func (f *fed) exp(who string, args ...string) cliResult {
	f.t.Helper()
	files := f.files("researcher", who)
	full := append([]string{"experiment"}, args...)
	full = append(full, "--director", f.addr, "--server-name", "localhost",
		"--cert", files.Cert, "--key", files.Key, "--ca", files.CA, "--timeout", "10s")
	return f.runFx(full...)
}

// mustExp is exp for a command that must succeed.
func (f *fed) mustExp(who string, args ...string) string {
	f.t.Helper()
	r := f.exp(who, args...)
	if r.err != nil {
		f.t.Fatalf("fx experiment %s (as %s): %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), who, r.err, r.stdout, r.stderr)
	}
	return r.stdout
}

// submit submits an experiment directory or archive with the CLI and
// returns the director's record.
func (f *fed) submit(who, dirOrArchive string, args ...string) *fxv1.Experiment {
	f.t.Helper()
	out := f.mustExp(who, append([]string{"submit", dirOrArchive, "--output", "json"}, args...)...)
	var e fxv1.Experiment
	if err := protojson.Unmarshal([]byte(out), &e); err != nil {
		f.t.Fatalf("fx experiment submit --output json: %v\n%s", err, out)
	}
	return &e
}

// status reads an experiment with `fx experiment status --output json`.
func (f *fed) status(who, name string) (*fxv1.Experiment, error) {
	r := f.exp(who, "status", name, "--output", "json")
	if r.err != nil {
		return nil, fmt.Errorf("%v: %s", r.err, r.stderr)
	}
	var e fxv1.Experiment
	if err := protojson.Unmarshal([]byte(r.stdout), &e); err != nil {
		return nil, err
	}
	return &e, nil
}

// watchEvents runs `fx experiment watch --output json` (from the first
// event, unless args say otherwise; it ends with the experiment) and parses
// every line.
func (f *fed) watchEvents(who, name string, args ...string) []*fxv1.MetricEvent {
	f.t.Helper()
	r := f.exp(who, append([]string{"watch", name, "--output", "json"}, args...)...)
	if r.err != nil {
		f.t.Fatalf("fx experiment watch %s: %v\n%s", name, r.err, r.stderr)
	}
	var evs []*fxv1.MetricEvent
	sc := bufio.NewScanner(strings.NewReader(r.stdout))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if strings.TrimSpace(sc.Text()) == "" {
			continue
		}
		var ev fxv1.MetricEvent
		if err := protojson.Unmarshal(sc.Bytes(), &ev); err != nil {
			f.t.Fatalf("watch output line %q: %v", sc.Text(), err)
		}
		evs = append(evs, &ev)
	}
	return evs
}

// waitState waits until the experiment is in one of the states; an ended
// experiment in another state fails the test at once.
func (f *fed) waitState(c *experiment.Client, name string, timeout time.Duration, states ...fxv1.ExperimentState) *fxv1.Experiment {
	f.t.Helper()
	var got *fxv1.Experiment
	f.waitFor(timeout, fmt.Sprintf("experiment %s in %v", name, states), func() (bool, error) {
		e, err := getExp(c, name)
		if err != nil {
			return false, err
		}
		got = e
		if slices.Contains(states, e.GetState()) {
			return true, nil
		}
		if experiment.Ended(e.GetState()) {
			f.t.Fatalf("experiment %s ended %s (%s), want %v", name, e.GetState(), e.GetReason(), states)
		}
		return false, fmt.Errorf("state %s round %d/%d", e.GetState(), e.GetRound(), e.GetRounds())
	})
	return got
}

func getExp(c *experiment.Client, name string) (*fxv1.Experiment, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.Get(ctx, name)
}

// participant returns the named participant of e, or nil.
func participant(e *fxv1.Experiment, envoy string) *fxv1.Participant {
	for _, p := range e.GetParticipants() {
		if p.GetEnvoy() == envoy {
			return p
		}
	}
	return nil
}

// writePlan makes an experiment directory holding plan.yaml.
func writePlan(t *testing.T, plan string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, experiment.PlanFile), []byte(plan), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// ---------------------------------------------------------------- metrics

// aggregates indexes the round aggregates (collaborator "") by round and
// task, and fails on a repeated one.
func aggregates(t *testing.T, evs []*fxv1.MetricEvent) map[int]map[string]map[string]float64 {
	t.Helper()
	agg := map[int]map[string]map[string]float64{}
	for _, ev := range evs {
		if ev.GetCollaborator() != "" {
			continue
		}
		r := int(ev.GetRound())
		if agg[r] == nil {
			agg[r] = map[string]map[string]float64{}
		}
		if _, dup := agg[r][ev.GetTask()]; dup {
			t.Errorf("round %d %s: aggregate published twice (sequence %d)", r, ev.GetTask(), ev.GetSequence())
		}
		agg[r][ev.GetTask()] = ev.GetMetrics()
	}
	return agg
}

// reporters are the collaborators that reported task in round.
func reporters(evs []*fxv1.MetricEvent, round int, task string) []string {
	var names []string
	for _, ev := range evs {
		if int(ev.GetRound()) == round && ev.GetTask() == task && ev.GetCollaborator() != "" {
			names = append(names, ev.GetCollaborator())
		}
	}
	slices.Sort(names)
	return names
}

// checkSequences fails unless the events' sequence numbers strictly
// increase: no event twice, none out of order.
func checkSequences(t *testing.T, evs []*fxv1.MetricEvent) {
	t.Helper()
	for i := 1; i < len(evs); i++ {
		if evs[i].GetSequence() <= evs[i-1].GetSequence() {
			t.Errorf("event %d has sequence %d after %d", i, evs[i].GetSequence(), evs[i-1].GetSequence())
		}
	}
}

// ---------------------------------------------------------------- files

// listTree lists every file and directory under root, relative, sorted,
// but for the store snapshots a director takes at every start.
func listTree(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "snapshots" {
			return filepath.SkipDir // the store's snapshots: one more at every start
		}
		if rel != "." {
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

// logLinesAfter returns the lines of a log after its n-th "e2e: ... starting"
// marker (n counts from 1).
func logLinesAfter(log string, n int) []string {
	var lines []string
	seen := 0
	for line := range strings.SplitSeq(log, "\n") {
		if strings.HasPrefix(line, "===== e2e: ") {
			seen++
			continue
		}
		if seen >= n {
			lines = append(lines, line)
		}
	}
	return lines
}

// logField is the value of key=VALUE in an hclog line, or "".
func logField(line, key string) string {
	i := strings.Index(line, " "+key+"=")
	if i < 0 {
		return ""
	}
	v := line[i+len(key)+2:]
	if j := strings.IndexByte(v, ' '); j >= 0 {
		v = v[:j]
	}
	return v
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

// checkEndedParticipants fails if an ended experiment still shows a
// participant as taking part in rounds (TRAINING, or DISCONNECTED, which is
// how TRAINING shows while the envoy is offline).
func checkEndedParticipants(t *testing.T, e *fxv1.Experiment) {
	t.Helper()
	for _, p := range e.GetParticipants() {
		if s := p.GetState(); s == fxv1.ParticipantState_TRAINING || s == fxv1.ParticipantState_DISCONNECTED {
			t.Errorf("experiment %s ended %s, but participant %s is still %s", e.GetName(), e.GetState(), p.GetEnvoy(), s)
		}
	}
}
