// Package exec implements runner.Runner by running the experiment's own
// command at the site, through the language-neutral runner protocol that
// docs/runner-protocol.md specifies. In the default, persistent mode one
// process serves every task of the experiment: fx starts it once, hands it
// each task as a JSON message on a pipe and the models as safetensors
// files, and it answers each task with a JSON message (and, for train, a
// safetensors file). In the per-task mode, kept for runners written against
// protocol 1, the command is started afresh for every task in a task
// directory holding the input model and a task description. Either way
// nothing crosses the boundary as code or pickles, so a site runs a
// researcher's program without ever deserialising something that could
// execute.
//
// The command is untrusted by the envoy, and the runner guards against it:
// it gets a clean environment (never the envoy's own, which may hold
// secrets), it is bounded in time (the whole process group is killed at the
// task's timeout or when the context is cancelled) and in output, it can be
// contained by the site's sandbox (Config.Contain), and everything it
// returns is checked (shapes and dtypes against the input model, finite
// values, well-formed metrics) before it leaves the site.
package exec

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	osexec "os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// Protocol versions, written into every task.json or setup message (and
// FX_PROTOCOL), so a runner can refuse a protocol it does not speak instead
// of misreading it. Version 1 is the per-task protocol, version 2 the
// persistent one.
const (
	ProtocolVersion           = 1
	PersistentProtocolVersion = 2
)

// The protocol's environment variables. Every name starting with FX_ is
// reserved for the protocol: Config.Env may not set one.
const (
	EnvProtocol      = "FX_PROTOCOL"
	EnvExperimentDir = "FX_EXPERIMENT_DIR"
	// Persistent mode: the descriptors of the control pipes.
	EnvControlIn  = "FX_CONTROL_IN"
	EnvControlOut = "FX_CONTROL_OUT"
	// Per-task mode: the task and its files.
	EnvTask          = "FX_TASK"
	EnvRound         = "FX_ROUND"
	EnvSeed          = "FX_SEED"
	EnvTaskDir       = "FX_TASK_DIR"
	EnvTaskJSON      = "FX_TASK_JSON"
	EnvInputModel    = "FX_INPUT_MODEL"
	EnvOutputDir     = "FX_OUTPUT_DIR"
	EnvOutputModel   = "FX_OUTPUT_MODEL"
	EnvOutputMetrics = "FX_OUTPUT_METRICS"
)

// Modes of running the command (Config.Mode, the plan's runner.mode).
const (
	// ModePersistent starts one process for the experiment and feeds it
	// every task: interpreters start and libraries load once.
	ModePersistent = "persistent"
	// ModePerTask starts the command afresh for every task (protocol 1).
	ModePerTask = "per_task"
)

// Defaults for the Config fields left zero.
const (
	// DefaultTimeout bounds one task, as the plan's runner.timeout does.
	DefaultTimeout = 30 * time.Minute
	// DefaultKillGrace is how long a command has to exit after SIGTERM
	// before its process group is killed outright: enough to flush a log or
	// remove a temporary file, short enough not to hold up a round.
	DefaultKillGrace = 5 * time.Second
	// DefaultPath is the child's PATH unless the site sets one in
	// Config.Env: the system directories only, never the envoy's PATH,
	// which may point into a user's home.
	DefaultPath = "/usr/local/bin:/usr/bin:/bin"
	// DefaultMaxOutputBytes bounds what a command may print during one
	// task. Progress lines and tracebacks are far smaller; a runner that
	// prints more is broken or flooding the site's logs.
	DefaultMaxOutputBytes = 64 << 20
)

// Errors a task can fail with, wrapped in a *TaskError; test them with
// errors.Is. A cancelled context is reported by wrapping the context's error
// (context.Canceled), not one of these.
var (
	// ErrTimeout: the command ran longer than Config.Timeout and was killed.
	ErrTimeout = errors.New("task timed out")
	// ErrExit: the command exited with a non-zero status, was killed by a
	// signal it did not get from fx, or (persistent mode) exited while it
	// had a task.
	ErrExit = errors.New("runner command failed")
	// ErrOutput: the command's outputs are missing or malformed.
	ErrOutput = errors.New("bad runner output")
	// ErrStart: the command could not be started at all.
	ErrStart = errors.New("cannot start runner command")
	// ErrFlood: the command wrote more than Config.MaxOutputBytes to
	// stdout and stderr during one task and was killed.
	ErrFlood = errors.New("runner command flooded its output")
	// ErrReported: the command reported that the task failed (persistent
	// mode); its message follows.
	ErrReported = errors.New("the runner reported a failure")
)

// Config describes an exec runner for one experiment at one site.
type Config struct {
	// Dir is the unpacked experiment directory. The command runs there, and
	// a command path with a slash is resolved inside it.
	Dir string
	// Command is the plan's runner.command: the program and its arguments.
	// A program name without a slash is looked up in the runner's PATH
	// (Env's PATH if it sets one, else DefaultPath), except python and
	// python3, which mean Python when it is set; one with a slash is
	// relative to Dir and may not leave it; an absolute one names a program
	// installed at the site. The arguments are passed as they are.
	Command []string
	// Mode is ModePersistent (the default when empty) or ModePerTask.
	Mode string
	// Python is the site's interpreter for commands whose program is
	// python or python3 (the envoy's exec.python): the site, not the
	// envoy's PATH, decides which installation and packages run.
	Python string
	// Timeout bounds each task; zero means DefaultTimeout. In persistent
	// mode the process's start-up counts against its first task.
	Timeout time.Duration
	// KillGrace is how long the command has to exit after SIGTERM (at a
	// timeout or cancellation) before SIGKILL; zero means DefaultKillGrace.
	KillGrace time.Duration
	// MaxOutputBytes bounds what the command may write to stdout and
	// stderr during one task; zero means DefaultMaxOutputBytes.
	MaxOutputBytes int64
	// Hyperparameters are the plan's runner.hyperparameters, handed to the
	// command as they are. They must encode as JSON.
	Hyperparameters map[string]any
	// Seed is the plan's runner.seed.
	Seed int64
	// ProximalMu is the plan's training.proximal_mu, FedProx's μ, handed
	// to the command with every task (proximal_mu): its train task should
	// add (μ/2)·‖w − w_global‖² to the loss. fx cannot add it for the
	// command, which owns its training loop.
	ProximalMu float64
	// Data is the site's data settings (the shard descriptor: kind, path,
	// shard, shapes, classes...), handed to the command as they are. They
	// must encode as JSON.
	Data map[string]any
	// Dataset is the site's data as the envoy loaded and cut it. When set,
	// it is written once into WorkDir as safetensors (DataFileName) and the
	// command is given its path, so no runner re-implements fx's loaders
	// and shuffling.
	Dataset *dataset.Dataset
	// PythonLibrary, when set, is a Python package tree (fx's site
	// library) written once into WorkDir and put first on the command's
	// PYTHONPATH, so `from fx import site` imports the library of this
	// fx's version whatever the site installed.
	PythonLibrary fs.FS
	// Env holds extra KEY=VALUE variables the site allows the command to
	// see (a CUDA_VISIBLE_DEVICES, a PYTHONPATH, a PATH). Names starting
	// with FX_ are reserved for the protocol.
	Env []string
	// Logger receives the command's output line by line; nil discards it.
	Logger hclog.Logger
	// Output, when set, also receives every line the command writes (the
	// envoy shares them with the researcher where the site allows it). It
	// is called from the goroutines that read the command's output and
	// must not block.
	Output func(OutputLine)
	// Contain, when set, adapts every command before it starts: the site's
	// sandbox. It may rewrite the program and arguments but must keep the
	// environment, directory and extra files.
	Contain func(*osexec.Cmd) error
	// WorkDir is where the runner's scratch files go (created if missing):
	// task directories, the models handed to a persistent process, the
	// data file; empty means the system's temporary directory. They hold
	// models trained on the site's data and the data itself, so it should
	// be private to the envoy.
	WorkDir string
	// KeepFailed keeps the task directory of a failed per-task run for
	// inspection (its path is in the error); by default every task
	// directory is removed when the task ends, so failed tasks do not fill
	// the disk with copies of the model.
	KeepFailed bool
}

// OutputLine is one line the command wrote.
type OutputLine struct {
	// Stream is "stdout" or "stderr".
	Stream string
	// Task and Round are the task the command was running (a persistent
	// process: the last one it was given), or empty and 0 before its
	// first.
	Task  string
	Round int
	Text  string
}

// Runner runs an experiment's tasks through its own command. A collaborator
// runs one task at a time; a Runner is safe for concurrent use all the
// same (persistent tasks then wait for each other). A persistent Runner
// holds a process between tasks: Close stops it.
type Runner struct {
	dir        string
	path       string   // the resolved program
	argv       []string // argv, with argv[0] replaced by path
	mode       string
	timeout    time.Duration
	grace      time.Duration
	maxOutput  int64
	hyper      json.RawMessage
	proxMu     float64
	data       json.RawMessage
	dataset    *dataset.Dataset
	seed       int64
	env        []envVar // the site's variables, in the order given
	log        hclog.Logger
	output     func(OutputLine)
	contain    func(*osexec.Cmd) error
	workDir    string
	keepFailed bool

	library    fs.FS
	sharedOnce sync.Once
	shared     shared
	sharedErr  error

	// persistent is the process of ModePersistent and its files.
	persistent *persistent

	// recycled is trained weights the collaborator handed back (Recycle):
	// the next trained model is read into their memory.
	recycledMu sync.Mutex
	recycled   tensor.Model
}

var (
	_ runner.Runner   = (*Runner)(nil)
	_ runner.Recycler = (*Runner)(nil)
	_ runner.Rewriter = (*Runner)(nil)
)

// Recycle keeps m, trained weights the collaborator is done with, for the
// next trained model to be read into.
func (r *Runner) Recycle(m tensor.Model) {
	r.recycledMu.Lock()
	r.recycled = m
	r.recycledMu.Unlock()
}

// Rewritten drops the file a persistent process trained m into, if it is
// kept: its values are no longer m's. The file becomes a spare, so the
// next model written (m's new values, for the local validation) goes over
// the weights the site trained rather than beside them. A per-task runner
// keeps no files.
func (r *Runner) Rewritten(m tensor.Model) {
	ps := r.persistent
	if ps == nil {
		return
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	for i, f := range ps.files {
		if f.is(m) {
			ps.files = append(ps.files[:i], ps.files[i+1:]...)
			ps.spare.keep(f.path)
			return
		}
	}
}

// takeRecycled hands over the recycled model, if any, once.
func (r *Runner) takeRecycled() tensor.Model {
	r.recycledMu.Lock()
	defer r.recycledMu.Unlock()
	m := r.recycled
	r.recycled = nil
	return m
}

// New checks the configuration and resolves the command, so that a plan
// that cannot run at this site fails before its first task rather than in
// the middle of a round. It starts nothing.
func New(c Config) (*Runner, error) {
	if c.Dir == "" {
		return nil, errors.New("exec runner: no experiment directory")
	}
	dir, err := filepath.Abs(c.Dir)
	if err != nil {
		return nil, fmt.Errorf("exec runner: experiment directory: %w", err)
	}
	if fi, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("exec runner: experiment directory: %w", err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("exec runner: experiment directory %s is not a directory", dir)
	}
	mode := c.Mode
	switch mode {
	case "":
		mode = ModePersistent
	case ModePersistent, ModePerTask:
	default:
		return nil, fmt.Errorf("exec runner: mode %q: use %s or %s", c.Mode, ModePersistent, ModePerTask)
	}
	if c.Timeout < 0 {
		return nil, fmt.Errorf("exec runner: timeout %s is negative", c.Timeout)
	}
	if c.KillGrace < 0 {
		return nil, fmt.Errorf("exec runner: kill grace %s is negative", c.KillGrace)
	}
	if c.MaxOutputBytes < 0 {
		return nil, fmt.Errorf("exec runner: output limit %d is negative", c.MaxOutputBytes)
	}
	env, err := parseEnv(c.Env)
	if err != nil {
		return nil, err
	}
	searchPath, ok := lookupEnv(env, "PATH")
	if !ok {
		searchPath = DefaultPath
	}
	path, err := resolveCommand(dir, c.Command, searchPath, c.Python)
	if err != nil {
		return nil, err
	}
	if !(c.ProximalMu >= 0) || math.IsInf(c.ProximalMu, 0) {
		return nil, fmt.Errorf("exec runner: proximal μ %v: want a finite number ≥ 0 (training.proximal_mu)", c.ProximalMu)
	}
	hyper, err := encodeSettings("hyperparameters", c.Hyperparameters)
	if err != nil {
		return nil, err
	}
	data, err := encodeSettings("data settings", c.Data)
	if err != nil {
		return nil, err
	}
	workDir := c.WorkDir
	if workDir == "" {
		workDir = os.TempDir()
	}
	if workDir, err = filepath.Abs(workDir); err != nil {
		return nil, fmt.Errorf("exec runner: work directory: %w", err)
	}
	if err := os.MkdirAll(workDir, 0o700); err != nil {
		return nil, fmt.Errorf("exec runner: work directory: %w", err)
	}
	r := &Runner{
		dir:        dir,
		path:       path,
		argv:       append([]string{path}, c.Command[1:]...),
		mode:       mode,
		timeout:    cmp0(c.Timeout, DefaultTimeout),
		grace:      cmp0(c.KillGrace, DefaultKillGrace),
		maxOutput:  cmp0(c.MaxOutputBytes, DefaultMaxOutputBytes),
		hyper:      hyper,
		proxMu:     c.ProximalMu,
		data:       data,
		dataset:    c.Dataset,
		library:    c.PythonLibrary,
		seed:       c.Seed,
		env:        env,
		log:        c.Logger,
		output:     c.Output,
		contain:    c.Contain,
		workDir:    workDir,
		keepFailed: c.KeepFailed,
	}
	if r.log == nil {
		r.log = hclog.NewNullLogger()
	}
	r.log = r.log.Named("exec")
	if mode == ModePersistent {
		r.persistent = &persistent{}
	}
	return r, nil
}

// cmp0 returns v, or def when v is zero.
func cmp0[T time.Duration | int64](v, def T) T {
	if v == 0 {
		return def
	}
	return v
}

// encodeSettings turns a settings map into the JSON object handed to the
// command; nil becomes {} so a runner can always index it.
func encodeSettings(what string, m map[string]any) (json.RawMessage, error) {
	if m == nil {
		return json.RawMessage("{}"), nil
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("exec runner: %s cannot be handed to the command as JSON: %w", what, err)
	}
	return b, nil
}

// Command returns the argv the runner starts, with the program resolved to
// an absolute path: what a site operator reviews.
func (r *Runner) Command() []string { return slices.Clone(r.argv) }

// Mode is ModePersistent or ModePerTask.
func (r *Runner) Mode() string { return r.mode }

// Train runs the train task and returns the model the command wrote.
func (r *Runner) Train(ctx context.Context, task runner.Task, model tensor.Model) (runner.Result, error) {
	if !runner.IsTrain(task.Name) {
		return runner.Result{}, fmt.Errorf("exec runner: Train called for task %q; only %q trains", task.Name, runner.TaskTrain)
	}
	if task.Scaffold != nil && r.persistent == nil {
		return runner.Result{}, errors.New("exec runner: SCAFFOLD's gradient correction is handed to the command by the persistent protocol only (aggregation.algorithm scaffold needs runner.mode persistent)")
	}
	return r.run(ctx, task, model)
}

// Validate runs a validation task and returns its metrics.
func (r *Runner) Validate(ctx context.Context, task runner.Task, model tensor.Model) (runner.Result, error) {
	if err := runner.ValidateTaskName(task.Name); err != nil {
		return runner.Result{}, fmt.Errorf("exec runner: %w", err)
	}
	if runner.IsTrain(task.Name) {
		return runner.Result{}, fmt.Errorf("exec runner: Validate called for task %q; use Train", task.Name)
	}
	return r.run(ctx, task, model)
}

// run checks what every task needs and hands it to the mode.
func (r *Runner) run(ctx context.Context, task runner.Task, model tensor.Model) (runner.Result, error) {
	if len(model) == 0 {
		return runner.Result{}, fmt.Errorf("exec runner: %s round %d: no input model", task.Name, task.Round)
	}
	if err := ctx.Err(); err != nil {
		return runner.Result{}, fmt.Errorf("exec runner: %s round %d not started: %w", task.Name, task.Round, err)
	}
	if r.persistent != nil {
		return r.runPersistent(ctx, task, model)
	}
	return r.runPerTask(ctx, task, model)
}

// Close stops a persistent runner's process (asking it to exit, then
// killing its process group after the grace period) and removes its
// scratch files. A per-task runner holds nothing between tasks. The Runner
// may be used again after Close: the next task starts a new process.
func (r *Runner) Close() error {
	if r.persistent == nil {
		return nil
	}
	return r.closePersistent()
}

// shared are the files every command of the runner is given: the site's
// data and the Python site library.
type shared struct {
	dataFile string // "" when the runner was given no data set
	libDir   string // "" when the runner was given no library
}

// prepareShared writes the shared files into the work directory, once.
func (r *Runner) prepareShared() (shared, error) {
	r.sharedOnce.Do(func() {
		if r.dataset != nil {
			p := filepath.Join(r.workDir, DataFileName)
			if err := WriteDataFile(p, r.dataset); err != nil {
				r.sharedErr = fmt.Errorf("exec runner: writing the site's data for the command: %w", err)
				return
			}
			r.shared.dataFile = p
		}
		if r.library != nil {
			dir := filepath.Join(r.workDir, LibraryDirName)
			if err := writeLibrary(dir, r.library); err != nil {
				r.sharedErr = fmt.Errorf("exec runner: writing the Python site library for the command: %w", err)
				return
			}
			r.shared.libDir = dir
		}
	})
	return r.shared, r.sharedErr
}

// LibraryDirName is the directory in the work directory that holds
// Config.PythonLibrary; it is put first on the command's PYTHONPATH.
const LibraryDirName = "pylib"

// writeLibrary copies a library's files into dir, replacing what an earlier
// runner left there.
func writeLibrary(dir string, lib fs.FS) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	return fs.WalkDir(lib, ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		dst := filepath.Join(dir, filepath.FromSlash(path))
		if d.IsDir() {
			return os.MkdirAll(dst, 0o700)
		}
		b, err := fs.ReadFile(lib, path)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, b, 0o600)
	})
}

// TaskError is the error of a task that ran (or tried to) and failed: what
// went wrong, and the last lines the command wrote to stderr, which usually
// say why.
type TaskError struct {
	Task  string
	Round int
	// Err says what went wrong; it wraps ErrTimeout, ErrExit, ErrOutput,
	// ErrStart, ErrFlood, ErrReported or the context's error.
	Err error
	// Reported is the message of a runner that reported the failure itself
	// (ErrReported).
	Reported string
	// Stderr holds the command's last stderr lines (at most StderrTail).
	Stderr []string
	// KeptDir is the task directory kept for inspection (Config.KeepFailed),
	// or empty.
	KeptDir string
}

// StderrTail is how many of the command's last stderr lines a TaskError
// carries: enough for a Python traceback's end, short enough for a status
// message.
const StderrTail = 20

// Error says what went wrong with everything the command said about it:
// for the site's own log.
func (e *TaskError) Error() string {
	var b strings.Builder
	b.WriteString(e.Summary())
	if e.Reported != "" {
		b.WriteString(": ")
		b.WriteString(e.Reported)
	}
	if len(e.Stderr) == 0 {
		b.WriteString("; the command wrote nothing to stderr")
	} else {
		b.WriteString("; the command's last stderr lines:")
		for _, l := range e.Stderr {
			b.WriteString("\n\t")
			b.WriteString(l)
		}
	}
	if e.KeptDir != "" {
		fmt.Fprintf(&b, "\n(task files kept in %s)", e.KeptDir)
	}
	return b.String()
}

// Summary says what went wrong in fx's own words, without anything the
// command wrote: what a site sends off-site when it does not share its
// runners' output, since a runner's output may quote the site's data.
func (e *TaskError) Summary() string {
	if e.Task == "" {
		return fmt.Sprintf("exec runner: starting the runner: %v", e.Err)
	}
	return fmt.Sprintf("exec runner: %s round %d: %v", e.Task, e.Round, e.Err)
}

func (e *TaskError) Unwrap() error { return e.Err }
