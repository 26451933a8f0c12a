// Package exec implements runner.Runner by running the experiment's own
// command at the site, through the language-neutral runner protocol that
// docs/runner-protocol.md specifies: for every task the command is started
// afresh in the unpacked experiment directory with a task directory holding
// the input model (safetensors) and a task description (JSON), and it answers
// with an output model (safetensors, train only) and metrics (JSON). Nothing
// crosses the boundary as code or pickles, so a site runs a researcher's
// program without ever deserialising something that could execute.
//
// The command is untrusted by the envoy in three ways the runner guards
// against: it gets a clean environment (never the envoy's own, which may hold
// secrets), it is bounded in time (the whole process group is killed at the
// task's timeout or when the context is cancelled), and everything it returns
// is checked (shapes and dtypes against the input model, finite values,
// well-formed metrics) before it leaves the site.
package exec

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// ProtocolVersion is the version of the runner protocol written into every
// task.json (and FX_PROTOCOL), so a runner can refuse a protocol it does not
// speak instead of misreading it.
const ProtocolVersion = 1

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
)

// Names inside a task directory. The full paths are also handed to the
// command in FX_* variables and in task.json; runners should use those.
const (
	InputDirName    = "input"
	OutputDirName   = "output"
	TmpDirName      = "tmp"
	TaskFileName    = "task.json"
	ModelFileName   = "model.safetensors"
	MetricsFileName = "metrics.json"
)

// The protocol's environment variables. Every name starting with FX_ is
// reserved for the protocol: Config.Env may not set one.
const (
	EnvProtocol      = "FX_PROTOCOL"
	EnvTask          = "FX_TASK"
	EnvRound         = "FX_ROUND"
	EnvSeed          = "FX_SEED"
	EnvExperimentDir = "FX_EXPERIMENT_DIR"
	EnvTaskDir       = "FX_TASK_DIR"
	EnvTaskJSON      = "FX_TASK_JSON"
	EnvInputModel    = "FX_INPUT_MODEL"
	EnvOutputDir     = "FX_OUTPUT_DIR"
	EnvOutputModel   = "FX_OUTPUT_MODEL"
	EnvOutputMetrics = "FX_OUTPUT_METRICS"
)

// Errors a task can fail with, wrapped in a *TaskError; test them with
// errors.Is. A cancelled context is reported by wrapping the context's error
// (context.Canceled), not one of these.
var (
	// ErrTimeout: the command ran longer than Config.Timeout and was killed.
	ErrTimeout = errors.New("task timed out")
	// ErrExit: the command exited with a non-zero status or was killed by
	// a signal it did not get from fx.
	ErrExit = errors.New("runner command failed")
	// ErrOutput: the command exited 0 but its outputs are missing or
	// malformed.
	ErrOutput = errors.New("bad runner output")
	// ErrStart: the command could not be started at all.
	ErrStart = errors.New("cannot start runner command")
)

// Config describes an exec runner for one experiment at one site.
type Config struct {
	// Dir is the unpacked experiment directory. The command runs there, and
	// a command path with a slash is resolved inside it.
	Dir string
	// Command is the plan's runner.command: the program and its arguments.
	// A program name without a slash is looked up in PATH (Env's PATH if it
	// sets one, else the envoy's); one with a slash is relative to Dir and
	// may not leave it; an absolute one names a program installed at the
	// site. The arguments are passed as they are.
	Command []string
	// Timeout bounds each task; zero means DefaultTimeout.
	Timeout time.Duration
	// KillGrace is how long the command has to exit after SIGTERM (at a
	// timeout or cancellation) before SIGKILL; zero means DefaultKillGrace.
	KillGrace time.Duration
	// Hyperparameters are the plan's runner.hyperparameters, handed to the
	// command in task.json as they are. They must encode as JSON.
	Hyperparameters map[string]any
	// Seed is the plan's runner.seed.
	Seed int64
	// Data is the site's data settings (the shard descriptor: kind, path,
	// shard, shapes, classes...), handed to the command in task.json: the
	// command loads the data itself. They must encode as JSON.
	Data map[string]any
	// Env holds extra KEY=VALUE variables the site allows the command to
	// see (a CUDA_VISIBLE_DEVICES, a PYTHONPATH, a PATH). Names starting
	// with FX_ are reserved for the protocol.
	Env []string
	// Logger receives the command's output line by line; nil discards it.
	Logger hclog.Logger
	// WorkDir is where task directories are made (created if missing);
	// empty means the system's temporary directory. Task directories hold
	// models trained on the site's data, so it should be private to the
	// envoy.
	WorkDir string
	// KeepFailed keeps the task directory of a failed task for inspection
	// (its path is in the error); by default every task directory is
	// removed when the task ends, so failed tasks do not fill the disk with
	// copies of the model.
	KeepFailed bool
}

// Runner runs tasks by starting the experiment's command once per task.
// Tasks are independent (each has its own directory), so a Runner is safe
// for concurrent use, though a collaborator runs one task at a time.
type Runner struct {
	dir        string
	path       string   // the resolved program
	argv       []string // argv, with argv[0] replaced by path
	timeout    time.Duration
	grace      time.Duration
	hyper      json.RawMessage
	data       json.RawMessage
	seed       int64
	env        []envVar // the site's variables, in the order given
	log        hclog.Logger
	workDir    string
	keepFailed bool
}

var _ runner.Runner = (*Runner)(nil)

// New checks the configuration and resolves the command, so that a plan
// that cannot run at this site fails before its first task rather than in
// the middle of a round.
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
	if c.Timeout < 0 {
		return nil, fmt.Errorf("exec runner: timeout %s is negative", c.Timeout)
	}
	if c.KillGrace < 0 {
		return nil, fmt.Errorf("exec runner: kill grace %s is negative", c.KillGrace)
	}
	env, err := parseEnv(c.Env)
	if err != nil {
		return nil, err
	}
	searchPath, ok := lookupEnv(env, "PATH")
	if !ok {
		searchPath = os.Getenv("PATH")
	}
	path, err := resolveCommand(dir, c.Command, searchPath)
	if err != nil {
		return nil, err
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
		timeout:    cmp0(c.Timeout, DefaultTimeout),
		grace:      cmp0(c.KillGrace, DefaultKillGrace),
		hyper:      hyper,
		data:       data,
		seed:       c.Seed,
		env:        env,
		log:        c.Logger,
		workDir:    workDir,
		keepFailed: c.KeepFailed,
	}
	if r.log == nil {
		r.log = hclog.NewNullLogger()
	}
	r.log = r.log.Named("exec")
	return r, nil
}

// cmp0 returns d, or def when d is zero.
func cmp0(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// encodeSettings turns a settings map into the JSON object task.json
// carries; nil becomes {} so a runner can always index it.
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

// Command returns the argv the runner starts for every task, with the
// program resolved to an absolute path: what a site operator reviews.
func (r *Runner) Command() []string { return slices.Clone(r.argv) }

// Train runs the command for the train task and returns the model it wrote.
func (r *Runner) Train(ctx context.Context, task runner.Task, model tensor.Model) (runner.Result, error) {
	if !runner.IsTrain(task.Name) {
		return runner.Result{}, fmt.Errorf("exec runner: Train called for task %q; only %q trains", task.Name, runner.TaskTrain)
	}
	return r.run(ctx, task, model)
}

// Validate runs the command for a validation task and returns its metrics.
func (r *Runner) Validate(ctx context.Context, task runner.Task, model tensor.Model) (runner.Result, error) {
	if err := runner.ValidateTaskName(task.Name); err != nil {
		return runner.Result{}, fmt.Errorf("exec runner: %w", err)
	}
	if runner.IsTrain(task.Name) {
		return runner.Result{}, fmt.Errorf("exec runner: Validate called for task %q; use Train", task.Name)
	}
	return r.run(ctx, task, model)
}

// TaskSpec is the content of task.json, the command's description of its
// task. Paths are absolute.
type TaskSpec struct {
	// Protocol is ProtocolVersion.
	Protocol int `json:"protocol"`
	// Task is the task name: train, aggregated_model_validation or
	// locally_tuned_model_validation.
	Task string `json:"task"`
	// Train is true for the train task, the only one that writes a model.
	Train bool `json:"train"`
	// Round is the federated round number, as the aggregator counts rounds.
	Round int `json:"round"`
	// Seed is the plan's runner.seed; runners derive per-round randomness
	// from seed and round so reruns repeat.
	Seed int64 `json:"seed"`
	// Hyperparameters are the plan's runner.hyperparameters ({} if none).
	Hyperparameters json.RawMessage `json:"hyperparameters"`
	// Data holds the site's data settings ({} if none).
	Data json.RawMessage `json:"data"`
	// ExperimentDir is the unpacked experiment, the working directory.
	ExperimentDir string `json:"experiment_dir"`
	// TaskDir is this task's private directory (also HOME).
	TaskDir string `json:"task_dir"`
	// InputModel is the model to start from (safetensors).
	InputModel string `json:"input_model"`
	// OutputDir is where the outputs go.
	OutputDir string `json:"output_dir"`
	// OutputModel is where the train task writes its model; empty for
	// validation tasks.
	OutputModel string `json:"output_model,omitempty"`
	// OutputMetrics is where every task writes its metrics.
	OutputMetrics string `json:"output_metrics"`
	// TimeoutSeconds is the task's time limit.
	TimeoutSeconds float64 `json:"timeout_seconds"`
	// Deadline is when the task is killed (RFC 3339, UTC).
	Deadline time.Time `json:"deadline"`
}

// TaskError is the error of a task that ran (or tried to) and failed: what
// went wrong, and the last lines the command wrote to stderr, which usually
// say why.
type TaskError struct {
	Task  string
	Round int
	// Err says what went wrong; it wraps ErrTimeout, ErrExit, ErrOutput,
	// ErrStart or the context's error.
	Err error
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

func (e *TaskError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "exec runner: %s round %d: %v", e.Task, e.Round, e.Err)
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

func (e *TaskError) Unwrap() error { return e.Err }

// taskDir holds the paths of one task's directory.
type taskDir struct {
	root, input, output, tmp          string
	taskJSON, inputModel, outputModel string
	outputMetrics                     string
}

// run carries one task through: prepare the directory, run the command,
// read and check what it wrote, clean up.
func (r *Runner) run(ctx context.Context, task runner.Task, model tensor.Model) (res runner.Result, err error) {
	if len(model) == 0 {
		return res, fmt.Errorf("exec runner: %s round %d: no input model", task.Name, task.Round)
	}
	if err := ctx.Err(); err != nil {
		return res, fmt.Errorf("exec runner: %s round %d not started: %w", task.Name, task.Round, err)
	}
	log := r.log.With("task", task.Name, "round", task.Round)
	start := time.Now()
	td, err := r.prepare(task, model, start.Add(r.timeout))
	if err != nil {
		return res, err
	}
	defer func() {
		if err != nil && r.keepFailed {
			var te *TaskError
			if errors.As(err, &te) {
				te.KeptDir = td.root
			}
			log.Warn("keeping the failed task's directory", "dir", td.root)
			return
		}
		if rerr := os.RemoveAll(td.root); rerr != nil {
			log.Warn("cannot remove the task directory", "dir", td.root, "error", rerr)
		}
	}()

	tctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	log.Debug("starting runner command", "argv", r.argv, "dir", r.dir, "task_dir", td.root)
	out := r.execute(tctx, task, td, log)
	fail := func(e error) error {
		return &TaskError{Task: task.Name, Round: task.Round, Err: e, Stderr: out.stderr}
	}
	switch {
	case out.startErr != nil:
		return res, fail(fmt.Errorf("%w %s: %w", ErrStart, r.path, out.startErr))
	case out.stopped && ctx.Err() != nil:
		return res, fail(fmt.Errorf("cancelled after %s, the command's process group was killed: %w",
			time.Since(start).Round(time.Millisecond), ctx.Err()))
	case out.stopped:
		return res, fail(fmt.Errorf("%w after %s (the plan's runner.timeout); the command's process group was killed",
			ErrTimeout, r.timeout))
	case out.waitErr != nil:
		return res, fail(fmt.Errorf("%w: %s", ErrExit, describeExit(out.waitErr)))
	}

	res.Samples, res.Metrics, err = readMetrics(td.outputMetrics)
	if err != nil {
		return res, fail(fmt.Errorf("%w: %w", ErrOutput, err))
	}
	if runner.IsTrain(task.Name) {
		if res.Model, err = readModel(td.outputModel, model); err != nil {
			return res, fail(fmt.Errorf("%w: %w", ErrOutput, err))
		}
	}
	log.Info("task done", "duration", time.Since(start).Round(time.Millisecond), "samples", res.Samples, "metrics", res.Metrics)
	return res, nil
}

// prepare makes the task directory and writes the inputs.
func (r *Runner) prepare(task runner.Task, model tensor.Model, deadline time.Time) (*taskDir, error) {
	root, err := os.MkdirTemp(r.workDir, fmt.Sprintf("fx-%s-r%d-", task.Name, task.Round))
	if err != nil {
		return nil, fmt.Errorf("exec runner: task directory: %w", err)
	}
	td := &taskDir{
		root:          root,
		input:         filepath.Join(root, InputDirName),
		output:        filepath.Join(root, OutputDirName),
		tmp:           filepath.Join(root, TmpDirName),
		outputMetrics: filepath.Join(root, OutputDirName, MetricsFileName),
	}
	td.taskJSON = filepath.Join(td.input, TaskFileName)
	td.inputModel = filepath.Join(td.input, ModelFileName)
	if runner.IsTrain(task.Name) {
		td.outputModel = filepath.Join(td.output, ModelFileName)
	}
	err = func() error {
		for _, d := range []string{td.input, td.output, td.tmp} {
			if err := os.Mkdir(d, 0o700); err != nil {
				return err
			}
		}
		if err := tensor.WriteFile(td.inputModel, model, nil); err != nil {
			return fmt.Errorf("input model: %w", err)
		}
		spec := TaskSpec{
			Protocol:        ProtocolVersion,
			Task:            task.Name,
			Train:           runner.IsTrain(task.Name),
			Round:           task.Round,
			Seed:            r.seed,
			Hyperparameters: r.hyper,
			Data:            r.data,
			ExperimentDir:   r.dir,
			TaskDir:         td.root,
			InputModel:      td.inputModel,
			OutputDir:       td.output,
			OutputModel:     td.outputModel,
			OutputMetrics:   td.outputMetrics,
			TimeoutSeconds:  r.timeout.Seconds(),
			Deadline:        deadline.UTC().Truncate(time.Second),
		}
		b, err := json.MarshalIndent(spec, "", "  ")
		if err != nil {
			return fmt.Errorf("task.json: %w", err)
		}
		return os.WriteFile(td.taskJSON, append(b, '\n'), 0o600)
	}()
	if err != nil {
		os.RemoveAll(root)
		return nil, fmt.Errorf("exec runner: %s round %d: preparing the task directory: %w", task.Name, task.Round, err)
	}
	return td, nil
}

// environment is the command's whole environment: the defaults, the site's
// variables over them, and the protocol's variables.
func (r *Runner) environment(task runner.Task, td *taskDir) []string {
	vars := map[string]string{
		"PATH":   DefaultPath,
		"HOME":   td.root,
		"LANG":   "C.UTF-8",
		"TMPDIR": td.tmp,
	}
	for _, v := range r.env {
		vars[v.key] = v.value
	}
	vars[EnvProtocol] = strconv.Itoa(ProtocolVersion)
	vars[EnvTask] = task.Name
	vars[EnvRound] = strconv.Itoa(task.Round)
	vars[EnvSeed] = strconv.FormatInt(r.seed, 10)
	vars[EnvExperimentDir] = r.dir
	vars[EnvTaskDir] = td.root
	vars[EnvTaskJSON] = td.taskJSON
	vars[EnvInputModel] = td.inputModel
	vars[EnvOutputDir] = td.output
	vars[EnvOutputMetrics] = td.outputMetrics
	if td.outputModel != "" {
		vars[EnvOutputModel] = td.outputModel
	}
	env := make([]string, 0, len(vars))
	for k, v := range vars {
		env = append(env, k+"="+v)
	}
	slices.Sort(env)
	return env
}

// Limits on metrics.json, so a runner cannot make the envoy hold or forward
// an unbounded document.
const (
	MaxMetricsBytes   = 1 << 20
	MaxMetrics        = 256
	maxMetricNameSize = 128
)

// metricsFile is the shape of metrics.json. Samples stays raw so that a
// missing value, a string or a fraction each get their own message.
type metricsFile struct {
	Samples json.RawMessage            `json:"samples"`
	Metrics map[string]json.RawMessage `json:"metrics"`
}

// readMetrics reads and checks output/metrics.json.
func readMetrics(path string) (int64, map[string]float64, error) {
	b, err := readRegular(path, MaxMetricsBytes, "metrics ("+MetricsFileName+")")
	if err != nil {
		return 0, nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(quoteNonFinite(b)))
	dec.DisallowUnknownFields()
	var mf metricsFile
	if err := dec.Decode(&mf); err != nil {
		return 0, nil, fmt.Errorf("%s is not the expected JSON object {\"samples\": N, \"metrics\": {...}}: %w", MetricsFileName, err)
	}
	if dec.More() {
		return 0, nil, fmt.Errorf("%s holds more than one JSON value", MetricsFileName)
	}
	if mf.Samples == nil || string(mf.Samples) == "null" {
		return 0, nil, fmt.Errorf("%s has no \"samples\" (the number of local samples the task used)", MetricsFileName)
	}
	samples, err := parseCount(mf.Samples)
	if err != nil {
		return 0, nil, fmt.Errorf("%s: \"samples\" %w", MetricsFileName, err)
	}
	if len(mf.Metrics) > MaxMetrics {
		return 0, nil, fmt.Errorf("%s has %d metrics, more than %d", MetricsFileName, len(mf.Metrics), MaxMetrics)
	}
	metrics := make(map[string]float64, len(mf.Metrics))
	for name, raw := range mf.Metrics {
		if err := validateMetricName(name); err != nil {
			return 0, nil, fmt.Errorf("%s: %w", MetricsFileName, err)
		}
		v, err := parseMetric(raw)
		if err != nil {
			return 0, nil, fmt.Errorf("%s: metric %q %w", MetricsFileName, name, err)
		}
		metrics[name] = v
	}
	return samples, metrics, nil
}

// parseCount reads a non-negative whole number (1e3 and 12.0 included).
func parseCount(raw json.RawMessage) (int64, error) {
	s := string(raw)
	if s == "" || !(s[0] == '-' || (s[0] >= '0' && s[0] <= '9')) {
		return 0, fmt.Errorf("is %s, want a whole number", s)
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		f, ferr := strconv.ParseFloat(s, 64)
		if ferr != nil || f != math.Trunc(f) || math.Abs(f) > 1<<53 {
			return 0, fmt.Errorf("is %s, want a whole number", s)
		}
		n = int64(f)
	}
	if n < 0 {
		return 0, fmt.Errorf("is %d, want a number of samples ≥ 0", n)
	}
	return n, nil
}

// parseMetric reads a finite number; the non-finite tokens Python's json
// module writes arrive here quoted by quoteNonFinite.
func parseMetric(raw json.RawMessage) (float64, error) {
	s := string(raw)
	switch s {
	case `"NaN"`, `"Infinity"`, `"-Infinity"`:
		return 0, fmt.Errorf("is %s: metrics must be finite numbers", strings.Trim(s, `"`))
	}
	if s == "" || !(s[0] == '-' || (s[0] >= '0' && s[0] <= '9')) {
		return 0, fmt.Errorf("is %s, want a number", s)
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsInf(v, 0) || math.IsNaN(v) {
		return 0, fmt.Errorf("is %s, which is not a finite float64", s)
	}
	return v, nil
}

// validateMetricName keeps names printable and short: they end up in logs,
// events and the researcher's tables.
func validateMetricName(name string) error {
	if name == "" {
		return errors.New("a metric has an empty name")
	}
	if len(name) > maxMetricNameSize {
		return fmt.Errorf("metric name %.40q... is longer than %d bytes", name, maxMetricNameSize)
	}
	if strings.ContainsFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f || r == 0xfffd }) {
		return fmt.Errorf("metric name %q holds control or invalid characters", name)
	}
	return nil
}

// nonFiniteTokens are the bare tokens quoteNonFinite quotes, longest first.
var nonFiniteTokens = [][]byte{[]byte("-Infinity"), []byte("Infinity"), []byte("NaN")}

// quoteNonFinite rewrites the bare tokens NaN, Infinity and -Infinity that
// Python's json module (and others) write for non-finite floats into JSON
// strings, so that the document parses and the metric holding one can be
// named in the error instead of a bare syntax error.
func quoteNonFinite(b []byte) []byte {
	if !bytes.Contains(b, []byte("NaN")) && !bytes.Contains(b, []byte("Infinity")) {
		return b
	}
	var out []byte
	inString, escaped := false, false
	last := 0
	for i := 0; i < len(b); i++ {
		c := b[i]
		if inString {
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
			continue
		}
		if c == '"' {
			inString = true
			continue
		}
		for _, tok := range nonFiniteTokens {
			if bytes.HasPrefix(b[i:], tok) {
				out = append(out, b[last:i]...)
				out = append(out, '"')
				out = append(out, tok...)
				out = append(out, '"')
				i += len(tok) - 1
				last = i + 1
				break
			}
		}
	}
	if out == nil {
		return b
	}
	return append(out, b[last:]...)
}

// statOutput finds a file the command had to write and refuses anything but
// a regular file: a FIFO would block the envoy, a link could point anywhere.
func statOutput(path, what string) (os.FileInfo, error) {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("the command exited 0 but wrote no %s at %s", what, path)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s at %s is not a regular file (%s)", what, path, fi.Mode().Type())
	}
	return fi, nil
}

// readRegular reads a file the command wrote, refusing anything but a
// regular file (a FIFO would block the envoy, a link could point anywhere)
// and anything larger than limit.
func readRegular(path string, limit int64, what string) ([]byte, error) {
	fi, err := statOutput(path, what)
	if err != nil {
		return nil, err
	}
	if fi.Size() > limit {
		return nil, fmt.Errorf("%s at %s is %d bytes, more than the %d allowed", what, path, fi.Size(), limit)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return b, nil
}

// readModel reads and checks output/model.safetensors against the input
// model: the same tensors, dtypes and shapes, every value finite. The header
// is checked before any data is read, so a wrong or oversized file costs no
// allocation. The tensors are returned in the input model's order.
func readModel(path string, input tensor.Model) (tensor.Model, error) {
	what := "output model (" + ModelFileName + ")"
	if _, err := statOutput(path, what); err != nil {
		return nil, err
	}
	hdr, err := tensor.ReadHeaderFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s is not a valid safetensors file: %w", what, err)
	}
	if err := input.Matches(hdr.Layout()); err != nil {
		return nil, fmt.Errorf("%s does not match the input model: %w", what, err)
	}
	m, _, err := tensor.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s is not a valid safetensors file: %w", what, err)
	}
	if err := input.Matches(m); err != nil {
		return nil, fmt.Errorf("%s does not match the input model: %w", what, err)
	}
	idx := m.Index()
	out := make(tensor.Model, len(input))
	for i, t := range input {
		out[i] = idx[t.Name]
		if err := out[i].CheckFinite(); err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
	}
	return out, nil
}
