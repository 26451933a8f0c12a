package director

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/internal/backoff"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/tensor"
)

// Launchers (the director setting launcher).
const (
	// LauncherInProcess runs aggregators as goroutines of the director.
	LauncherInProcess = "inprocess"
	// LauncherProcess runs each as a child process (Process).
	LauncherProcess = "process"
)

// Process launcher defaults.
const (
	// DefaultMaxRestarts aggregator processes that die within
	// DefaultRestartWindow are started again; one more fails the
	// experiment.
	DefaultMaxRestarts   = 5
	DefaultRestartWindow = 10 * time.Minute
	// DefaultStopGrace is how long an aggregator process has to stop after
	// SIGTERM before it is killed.
	DefaultStopGrace = 30 * time.Second
)

// DefaultRestartBackoff spaces the restarts of a dying aggregator process.
var DefaultRestartBackoff = backoff.Config{Initial: time.Second, Max: 30 * time.Second}

// Files an aggregator process keeps in its experiment's directory, beside
// the aggregator directory.
const (
	ProcessSpecFile    = "aggregator.spec.json"
	ProcessLogFile     = "aggregator.log"
	ProcessPIDFile     = "aggregator.pid"
	ProcessOutcomeFile = "aggregator.outcome.json"
	// ProcessInitialFile is the initial model the director writes for a
	// process that has no checkpoint to resume from.
	ProcessInitialFile = "aggregator.initial.safetensors"
)

// Process runs each experiment's aggregator as a child process, `fx
// aggregator run --spec FILE` (see RunAggregatorProcess), on the director's
// host: its memory is its own (internal/membudget sets its limit from its
// model alone), and a crash takes down one experiment's aggregator, not the
// director. The director binds the aggregator's port and hands the socket
// to the child, so the address the participants know survives a restart.
// A child that dies (a signal, an exit without an outcome) is started
// again, by DefaultRestartBackoff's schedule, and resumes from its
// checkpoint; more than MaxRestarts deaths within RestartWindow fail the
// experiment with the last death and the child's log named. Cancelling the
// aggregator's Run sends SIGTERM, then SIGKILL after StopGrace. The child
// reports to the director over Director.AggregatorChannel, presenting the
// director's certificate (TLS), and only Identity's may open one. Use a
// *Process: it tracks its children.
type Process struct {
	// Executable is the fx binary children run; os.Executable() when
	// empty.
	Executable string
	// TLS are the director's certificate and key (which the children
	// present, to participants and to the director), the root and CRL.
	TLS pki.Files
	// Identity is the CN of the director's certificate: the only caller
	// whose aggregator channel is accepted. Required.
	Identity string
	// MaxRestarts and RestartWindow bound restarts; the defaults when
	// zero.
	MaxRestarts   int
	RestartWindow time.Duration
	// RestartBackoff spaces restarts; DefaultRestartBackoff when zero.
	RestartBackoff backoff.Config
	// StopGrace: see DefaultStopGrace.
	StopGrace time.Duration
	// Env is added to the children's environment (the director's, less
	// GOMEMLIMIT: that limit is the director's; a child sets its own).
	Env []string
	// DirectorGrace: see ProcessSpec.
	DirectorGrace time.Duration

	chans channels
}

// History implements Launcher: the children write where the director reads.
func (*Process) History(dir string) ([]aggregator.RoundSummary, *aggregator.Best, error) {
	return aggregator.History(dir)
}

// Launch implements Launcher. It prepares the initial model (when the
// aggregator directory holds no checkpoint) and the socket; Run starts the
// child.
func (p *Process) Launch(spec LaunchSpec) (Aggregator, error) {
	if p.Identity == "" {
		return nil, errors.New("process launcher: no director identity to accept aggregator channels from")
	}
	exe := p.Executable
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("process launcher: the fx binary: %w", err)
		}
	}
	if spec.DirectorAddress == "" {
		return nil, errors.New("process launcher: the director's address is unknown")
	}
	fl, ok := spec.Listener.(interface{ File() (*os.File, error) })
	if !ok {
		return nil, fmt.Errorf("process launcher: a %T cannot be handed to a child process", spec.Listener)
	}
	expDir := filepath.Dir(spec.Dir)
	child, log, err := newChildSpec(spec, p.Identity, expDir)
	if err != nil {
		return nil, err
	}
	lisFile, err := fl.File()
	if err != nil {
		return nil, fmt.Errorf("process launcher: the aggregator's socket: %w", err)
	}
	child.ListenFD = 3 // the first of ExtraFiles
	child.TLS = p.TLS
	child.Director = spec.DirectorAddress
	child.DirectorGrace = p.DirectorGrace
	a := &procAggregator{
		chans:        &p.chans,
		policy:       newRestartPolicy(p.MaxRestarts, p.RestartWindow, p.RestartBackoff, "aggregator process", LauncherProcess),
		spec:         spec,
		log:          log.Named("aggregator-process"),
		outcome:      child.Outcome,
		child:        child,
		dropsChanged: make(chan struct{}),
	}
	a.starter = &procStarter{p: p, a: a, exe: exe, lisFile: lisFile, expDir: expDir, initial: child.InitialModel}
	return a, nil
}

// newChildSpec is what every launcher's launch spec holds alike, with the
// director's paths (expDir is the experiment's directory): the initial
// model prepared (prepareInitialModel; InitialModel is "" when there is a
// checkpoint) and the outcome file beside the aggregator directory. The
// launcher adds where the aggregator listens and reaches the director. It
// returns the logger too (spec.Logger, or a null one).
func newChildSpec(spec LaunchSpec, identity, expDir string) (ProcessSpec, hclog.Logger, error) {
	initial, err := prepareInitialModel(spec, filepath.Join(expDir, ProcessInitialFile))
	if err != nil {
		return ProcessSpec{}, nil, err
	}
	plan, err := spec.Plan.Marshal()
	if err != nil {
		return ProcessSpec{}, nil, fmt.Errorf("plan: %w", err)
	}
	serverName := spec.ServerName
	if serverName == "" {
		serverName = identity
	}
	log := spec.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return ProcessSpec{
		ExperimentID: spec.ExperimentID,
		Plan:         string(plan),
		Participants: spec.Participants,
		Registered:   spec.Registered,
		InitialModel: initial,
		Dir:          spec.Dir,
		ServerName:   serverName,
		Outcome:      filepath.Join(expDir, ProcessOutcomeFile),
		DiskReserve:  spec.DiskReserve,
		PauseRetry:   spec.PauseRetry,
	}, log, nil
}

// prepareInitialModel writes round 0's model to path for a child that has
// no checkpoint to resume from, and returns the file to name in its spec
// ("" when there is a checkpoint): an earlier launch's round-0 file, the
// archive's model.safetensors (moved out of the unpacked archive, never
// read here), or the built-in model's initial weights.
func prepareInitialModel(spec LaunchSpec, path string) (string, error) {
	if fileExists(filepath.Join(spec.Dir, "checkpoint.json")) {
		return "", nil
	}
	if r0 := aggregator.ModelPath(spec.Dir, 0); fileExists(r0) {
		return r0, nil
	}
	man, err := experiment.Inspect(spec.ArchivePath, spec.Limits)
	if err != nil {
		return "", fmt.Errorf("archive: %w", err)
	}
	if slices.ContainsFunc(man.Files, func(f experiment.FileInfo) bool { return f.Path == InitialModelFile }) {
		scratch := filepath.Join(filepath.Dir(spec.Dir), "unpack")
		if err := os.RemoveAll(scratch); err != nil {
			return "", err
		}
		defer os.RemoveAll(scratch)
		if _, err := experiment.Unpack(spec.ArchivePath, scratch, spec.Limits); err != nil {
			return "", fmt.Errorf("archive: %w", err)
		}
		if err := os.Rename(filepath.Join(scratch, InitialModelFile), path); err != nil {
			return "", fmt.Errorf("archive's %s: %w", InitialModelFile, err)
		}
		return path, nil
	}
	m, err := builtinInitialModel(spec)
	if err != nil {
		return "", err
	}
	if err := tensor.WriteFile(path, m, nil); err != nil {
		return "", fmt.Errorf("initial model: %w", err)
	}
	return path, nil
}

// register makes a the aggregator of its experiment whose channel Process
// accepts.
func (p *Process) register(a *procAggregator) { p.chans.register(a) }

// channels are a launcher's running aggregators, by experiment id: those
// whose Director.AggregatorChannel it accepts.
type channels struct {
	mu      sync.Mutex
	running map[string]*procAggregator
}

func (c *channels) register(a *procAggregator) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.running == nil {
		c.running = map[string]*procAggregator{}
	}
	c.running[a.spec.ExperimentID] = a
}

func (c *channels) unregister(a *procAggregator) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.running[a.spec.ExperimentID] == a {
		delete(c.running, a.spec.ExperimentID)
	}
}

func (c *channels) lookup(id string) *procAggregator {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.running[id]
}

// restartPolicy bounds how often a launched aggregator (what, of launcher)
// is started again: more than max deaths within window fail its
// experiment, and backoff spaces the starts.
type restartPolicy struct {
	max            int
	window         time.Duration
	backoff        backoff.Config
	what, launcher string
}

// newRestartPolicy is a launcher's policy, with the defaults for the
// settings left zero.
func newRestartPolicy(maxRestarts int, window time.Duration, b backoff.Config, what, launcher string) restartPolicy {
	r := restartPolicy{max: maxRestarts, window: window, backoff: b, what: what, launcher: launcher}
	if r.max <= 0 {
		r.max = DefaultMaxRestarts
	}
	if r.window <= 0 {
		r.window = DefaultRestartWindow
	}
	if r.backoff.Initial <= 0 || r.backoff.Max <= 0 {
		r.backoff = DefaultRestartBackoff
	}
	return r
}

func stopGrace(d time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return DefaultStopGrace
}

// procAggregator is one experiment's aggregator outside the director (a
// child process, a pod), as the director drives it: Run starts it, through
// its starter, and starts it again when it dies, as its policy allows; its
// channel brings its events to the LaunchSpec's Sink and Serving, and takes
// Drop's to it.
type procAggregator struct {
	chans   *channels
	policy  restartPolicy
	starter starter
	spec    LaunchSpec
	log     hclog.Logger
	child   ProcessSpec
	// outcome is the director's path of the outcome file that child.Outcome
	// names.
	outcome string
	// ownReadiness: the starter calls announce when the aggregator can be
	// reached (a pod's readiness), rather than its channel's serving
	// report.
	ownReadiness bool
	// address is where the participants reach the aggregator when the
	// starter decides it (a Service), set before announce.
	address string

	mu           sync.Mutex
	token        string // the running start's; "" between starts
	drops        [][2]string
	dropsChanged chan struct{}
	served       bool

	// sinkMu orders the calls into the Sink, from the channel and from
	// catchUp; lastRound is the last round handed to it.
	sinkMu    sync.Mutex
	lastRound int
}

// starter runs an aggregator for a procAggregator: one start at a time.
type starter interface {
	// start runs the aggregator with spec (its token new) until it ends,
	// or until ctx ends and it has been stopped. It returns how it ended
	// ("exit status 2", "signal: killed"), and an error only when it could
	// not be started.
	start(ctx context.Context, spec ProcessSpec) (how string, err error)
	// why is how it ended with what it last said and where its log is.
	why(how string) string
	// close releases what the launch holds, after the last start.
	close()
}

// Drop implements Aggregator: the drop reaches the running child at once,
// and every child started later when its channel opens.
func (a *procAggregator) Drop(collaborator, reason string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.drops = append(a.drops, [2]string{collaborator, reason})
	close(a.dropsChanged)
	a.dropsChanged = make(chan struct{})
}

// Run implements Aggregator.
func (a *procAggregator) Run(ctx context.Context) error {
	defer a.starter.close()
	a.chans.register(a)
	defer a.chans.unregister(a)
	var deaths []time.Time
	b := backoff.New(a.policy.backoff)
	window := a.policy.window
	for {
		started := time.Now()
		how, err := a.startOnce(ctx)
		// Rounds the child completed but could not report.
		a.catchUp()
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		outcome, err := readOutcome(a.outcome)
		switch {
		case err != nil:
			a.log.Error("the "+a.policy.what+"'s outcome cannot be read; taking it for a crash", "error", err)
		case outcome != nil && outcome.Finished:
			return nil
		case outcome != nil:
			return errors.New(outcome.Failed)
		}
		now := time.Now()
		deaths = append(slices.DeleteFunc(deaths, func(t time.Time) bool { return now.Sub(t) > window }), now)
		why := a.starter.why(how)
		if len(deaths) > a.policy.max {
			return fmt.Errorf("the %s died %d times within %s, the most the %s launcher restarts (last: %s)",
				a.policy.what, len(deaths), window, a.policy.launcher, why)
		}
		if now.Sub(started) > window {
			b.Reset()
		}
		delay := b.Next()
		a.log.Warn("the "+a.policy.what+" died; starting it again from its checkpoint", "how", why, "deaths_in_window", len(deaths), "after", delay)
		if !backoff.Sleep(ctx, delay) {
			return ctx.Err()
		}
	}
}

// startOnce runs one start with a new token, from a cleared outcome.
func (a *procAggregator) startOnce(ctx context.Context) (string, error) {
	token, err := newToken()
	if err != nil {
		return "", err
	}
	spec := a.child
	spec.Token = token
	if err := os.Remove(a.outcome); err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("cannot clear the aggregator's outcome: %w", err)
	}
	a.mu.Lock()
	a.token = token
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.token = ""
		a.mu.Unlock()
	}()
	return a.starter.start(ctx, spec)
}

// Address is where the participants reach the aggregator, when its
// launcher decides it (a Kubernetes Service), or "": at the listener the
// director bound.
func (a *procAggregator) Address() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.address
}

// announce tells the director, once, that the aggregator serves.
func (a *procAggregator) announce() {
	a.mu.Lock()
	first := !a.served
	a.served = true
	a.mu.Unlock()
	if first && a.spec.Serving != nil {
		a.spec.Serving()
	}
}

// procStarter runs an aggregator as a child process of the director.
type procStarter struct {
	p       *Process
	a       *procAggregator
	exe     string
	lisFile *os.File
	expDir  string
	initial string // the initial model file written for the child, if any
}

func (s *procStarter) close() {
	s.a.spec.Listener.Close()
	s.lisFile.Close()
	removeInitialModel(s.initial, s.a.spec.Dir)
}

// removeInitialModel removes the initial model file written for a launch,
// unless it is the aggregator directory's own round-0 model.
func removeInitialModel(initial, dir string) {
	if initial != "" && initial != aggregator.ModelPath(dir, 0) {
		os.Remove(initial)
	}
}

func (s *procStarter) why(how string) string {
	logPath := filepath.Join(s.expDir, ProcessLogFile)
	if last := lastLogLine(logPath); last != "" {
		how += "; it last logged: " + last
	}
	return how + "; its log: " + logPath
}

// start starts a child and waits until it exits, or ctx ends and it has
// been stopped.
func (s *procStarter) start(ctx context.Context, spec ProcessSpec) (string, error) {
	specPath := filepath.Join(s.expDir, ProcessSpecFile)
	if err := WriteProcessSpec(specPath, &spec); err != nil {
		return "", fmt.Errorf("cannot write the aggregator's launch spec: %w", err)
	}
	logPath := filepath.Join(s.expDir, ProcessLogFile)
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return "", fmt.Errorf("cannot open the aggregator's log: %w", err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "===== fx director: starting the aggregator process at %s: %s aggregator run --spec %s\n", time.Now().UTC().Format(time.RFC3339Nano), s.exe, specPath)
	cmd := exec.Command(s.exe, "aggregator", "run", "--spec", specPath)
	cmd.Env = childEnv(s.p.Env)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{s.lisFile}
	cmd.SysProcAttr = childProcAttr()

	started, exited := make(chan error, 1), make(chan error, 1)
	go func() {
		// The child's death signal (childProcAttr) follows the thread
		// that started it, which must live as long as the child does.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		exited <- cmd.Wait()
	}()
	if err := <-started; err != nil {
		return "", fmt.Errorf("cannot start the aggregator process (%s): %w", s.exe, err)
	}
	log := s.a.log
	pidPath := filepath.Join(s.expDir, ProcessPIDFile)
	if err := atomicfile.Replace(pidPath, []byte(strconv.Itoa(cmd.Process.Pid)+"\n")); err != nil {
		log.Warn("cannot write the aggregator process's pid file", "error", err)
	}
	defer os.Remove(pidPath)
	log.Info("aggregator process started", "pid", cmd.Process.Pid, "log", logPath)
	select {
	case <-exited:
	case <-ctx.Done():
		_ = cmd.Process.Signal(syscall.SIGTERM)
		grace := stopGrace(s.p.StopGrace)
		t := time.NewTimer(grace)
		select {
		case <-exited:
			t.Stop()
		case <-t.C:
			log.Warn("the aggregator process did not stop in time after SIGTERM; killing it", "pid", cmd.Process.Pid, "grace", grace)
			_ = cmd.Process.Kill()
			<-exited
		}
	}
	how := cmd.ProcessState.String()
	log.Info("aggregator process ended", "pid", cmd.Process.Pid, "how", how)
	return how, nil
}

func newToken() (string, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return hex.EncodeToString(b[:]), nil
}

// childEnv is the director's environment less GOMEMLIMIT, plus extra.
func childEnv(extra []string) []string {
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "GOMEMLIMIT=") })
	return append(env, extra...)
}

// lastLogLine is the last line a child logged (not the director's
// markers), clipped, or "".
func lastLogLine(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const tailBytes = 8 << 10
	if fi, err := f.Stat(); err == nil && fi.Size() > tailBytes {
		_, _ = f.Seek(fi.Size()-tailBytes, io.SeekStart)
	}
	data, _ := io.ReadAll(f)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	for _, l := range slices.Backward(lines) {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "=====") {
			return fxv1.Clip(l, 512)
		}
	}
	return ""
}

// catchUp hands the Sink the rounds on disk that it has not had: those a
// child completed but whose report a broken channel or its death lost.
// History reads the same files the child resumes from.
func (a *procAggregator) catchUp() {
	summaries, best, err := aggregator.History(a.spec.Dir)
	if err != nil {
		a.log.Debug("reading the completed rounds", "error", err)
	}
	a.sinkMu.Lock()
	defer a.sinkMu.Unlock()
	for i, s := range summaries {
		if s.Round <= a.lastRound {
			continue
		}
		var b *aggregator.Best
		if i == len(summaries)-1 {
			b = best
		}
		a.spec.Sink.RoundCompleted(s, b)
		a.lastRound = s.Round
	}
}

// handle passes one of the child's events on.
func (a *procAggregator) handle(r *fxv1.AggregatorReport) error {
	switch ev := r.GetEvent().(type) {
	case *fxv1.AggregatorReport_Serving:
		if !a.ownReadiness {
			a.announce()
		}
	case *fxv1.AggregatorReport_RoundCompleted:
		var s aggregator.RoundSummary
		if err := json.Unmarshal(ev.RoundCompleted.GetSummary(), &s); err != nil {
			return fmt.Errorf("round summary: %w", err)
		}
		var best *aggregator.Best
		if b := ev.RoundCompleted.GetBest(); len(b) > 0 {
			best = &aggregator.Best{}
			if err := json.Unmarshal(b, best); err != nil {
				return fmt.Errorf("best model: %w", err)
			}
		}
		a.sinkMu.Lock()
		defer a.sinkMu.Unlock()
		if s.Round > a.lastRound {
			a.spec.Sink.RoundCompleted(s, best)
			a.lastRound = s.Round
		}
	case *fxv1.AggregatorReport_Progress:
		p := ev.Progress
		a.spec.Sink.Progress(aggregator.Progress{Collaborator: p.GetCollaborator(), Round: int(p.GetRound()), Task: p.GetTask(), LastRound: int(p.GetLastRound())})
	case *fxv1.AggregatorReport_Pause:
		if reason := ev.Pause.GetReason(); reason != "" {
			a.spec.Sink.Paused(reason)
		} else {
			a.spec.Sink.Resumed()
		}
	default:
		return errors.New("a report without an event after the first")
	}
	return nil
}

// channelServer is a launcher whose aggregators report over
// Director.AggregatorChannel.
type channelServer interface {
	serveChannel(stream grpc.BidiStreamingServer[fxv1.AggregatorReport, fxv1.AggregatorCommand], shutdown <-chan struct{}) error
}

// AggregatorChannel implements the Director service: it hands the channel
// to the launcher, which alone knows its aggregator processes.
func (s *service) AggregatorChannel(stream grpc.BidiStreamingServer[fxv1.AggregatorReport, fxv1.AggregatorCommand]) error {
	cs, ok := s.d.cfg.Launcher.(channelServer)
	if !ok {
		return status.Error(codes.FailedPrecondition, "this director runs its aggregators in its own process (launcher: inprocess): no aggregator process reports to it")
	}
	return cs.serveChannel(stream, s.d.shutdown)
}

// serveChannel hands the channel to the process launcher's aggregators.
func (p *Process) serveChannel(stream grpc.BidiStreamingServer[fxv1.AggregatorReport, fxv1.AggregatorCommand], shutdown <-chan struct{}) error {
	return p.chans.serve(p.Identity, stream, shutdown)
}

// serve checks who opens a channel (identity's certificate only) and for
// which launch, then passes its events on and sends it the drops, until
// the aggregator goes, the director stops, or it sends what cannot be
// read.
func (c *channels) serve(identity string, stream grpc.BidiStreamingServer[fxv1.AggregatorReport, fxv1.AggregatorCommand], shutdown <-chan struct{}) error {
	ctx := stream.Context()
	id, ok := pki.IdentityFromContext(ctx)
	if !ok {
		return status.Error(codes.Unauthenticated, "no caller identity")
	}
	if id.Name != identity {
		return status.Errorf(codes.PermissionDenied, "an aggregator channel is open only to this director's own certificate (%s), not %s", identity, id)
	}
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	a := c.lookup(first.GetExperimentId())
	if a == nil {
		return status.Errorf(codes.NotFound, "no aggregator process of experiment %q runs under this director", first.GetExperimentId())
	}
	a.mu.Lock()
	current := a.token
	a.mu.Unlock()
	if current == "" || !tokenEqual(current, first.GetLaunchToken()) {
		return status.Errorf(codes.PermissionDenied, "the launch token is not that of experiment %s's running aggregator process", first.GetExperimentId())
	}
	if err := stream.Send(&fxv1.AggregatorCommand{}); err != nil {
		return err
	}
	a.log.Debug("aggregator process channel open")
	a.catchUp()
	recvErr := make(chan error, 1)
	go func() {
		for {
			r, err := stream.Recv()
			if err == nil {
				err = a.handle(r)
			}
			if err != nil {
				recvErr <- err
				return
			}
		}
	}()
	sent := 0
	for {
		a.mu.Lock()
		drops, changed := slices.Clone(a.drops[sent:]), a.dropsChanged
		a.mu.Unlock()
		for _, d := range drops {
			if err := stream.Send(&fxv1.AggregatorCommand{Command: &fxv1.AggregatorCommand_Drop{Drop: &fxv1.AggregatorDrop{Collaborator: d[0], Reason: d[1]}}}); err != nil {
				return err
			}
			sent++
		}
		select {
		case <-changed:
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return nil
			}
			if _, ok := status.FromError(err); ok && status.Code(err) != codes.Unknown {
				return err
			}
			return status.Errorf(codes.InvalidArgument, "aggregator channel: %v", err)
		case <-shutdown:
			return status.Error(codes.Unavailable, "the director is stopping")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// localAddress is an address of a listener that this host can dial: an
// unspecified host (0.0.0.0, ::) becomes loopback.
func localAddress(addr net.Addr) string {
	tcp, ok := addr.(*net.TCPAddr)
	if !ok {
		return addr.String()
	}
	host := tcp.IP
	switch {
	case host == nil || host.IsUnspecified() && host.To4() != nil:
		host = net.IPv4(127, 0, 0, 1)
	case host.IsUnspecified():
		host = net.IPv6loopback
	}
	return net.JoinHostPort(host.String(), strconv.Itoa(tcp.Port))
}
