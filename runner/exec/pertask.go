package exec

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	osexec "os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// Names inside a per-task directory. The full paths are also handed to the
// command in FX_* variables and in task.json; runners should use those.
const (
	InputDirName    = "input"
	OutputDirName   = "output"
	TmpDirName      = "tmp"
	TaskFileName    = "task.json"
	ModelFileName   = "model.safetensors"
	MetricsFileName = "metrics.json"
)

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
	// ProximalMu is the plan's training.proximal_mu, FedProx's μ: train
	// adds (μ/2)·‖w − w_global‖² to its loss, w_global being InputModel.
	// 0 is plain training.
	ProximalMu float64 `json:"proximal_mu"`
	// Hyperparameters are the plan's runner.hyperparameters ({} if none).
	Hyperparameters json.RawMessage `json:"hyperparameters"`
	// Data holds the site's data settings ({} if none).
	Data json.RawMessage `json:"data"`
	// DataFile is the site's data set as fx loaded and cut it
	// (DataFileName), or empty when fx did not load the site's data.
	DataFile string `json:"data_file,omitempty"`
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

// taskDir holds the paths of one task's directory.
type taskDir struct {
	root, input, output, tmp          string
	taskJSON, inputModel, outputModel string
	outputMetrics                     string
}

// runPerTask carries one task through in its own process: prepare the
// task directory, run the command, read and check what it wrote, clean up.
func (r *Runner) runPerTask(ctx context.Context, task runner.Task, model tensor.Model) (res runner.Result, err error) {
	log := r.log.With("task", task.Name, "round", task.Round)
	start := time.Now()
	sh, err := r.prepareShared()
	if err != nil {
		return res, err
	}
	td, err := r.prepare(task, model, start.Add(r.timeout), sh.dataFile)
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
	cmd := &osexec.Cmd{Path: r.path, Args: r.argv, Dir: r.dir, Env: r.taskEnvironment(task, td, sh)}
	p, err := r.startProc(cmd, nil, log)
	if err != nil {
		return res, &TaskError{Task: task.Name, Round: task.Round, Err: fmt.Errorf("%w %s: %w", ErrStart, r.path, err)}
	}
	p.setTask(task.Name, task.Round)
	var cause error
	select {
	case <-p.exited:
	case <-tctx.Done():
		cause = r.interrupted(ctx, start)
	case <-p.flooded:
		cause = r.floodError()
	}
	stderr := p.stop(r.grace, fmt.Sprint(cause))
	fail := func(e error) error {
		return &TaskError{Task: task.Name, Round: task.Round, Err: e, Stderr: stderr}
	}
	switch {
	case cause != nil:
		return res, fail(cause)
	case p.waitErr != nil:
		return res, fail(fmt.Errorf("%w: %s", ErrExit, describeExit(p.waitErr)))
	}

	res.Samples, res.Metrics, err = readMetrics(td.outputMetrics)
	if err != nil {
		return res, fail(fmt.Errorf("%w: %w", ErrOutput, err))
	}
	if runner.IsTrain(task.Name) {
		if res.Model, err = readModel(td.outputModel, model, r.takeRecycled()); err != nil {
			return res, fail(fmt.Errorf("%w: %w", ErrOutput, err))
		}
	}
	log.Info("task done", "duration", time.Since(start).Round(time.Millisecond), "samples", res.Samples, "metrics", res.Metrics)
	return res, nil
}

// interrupted says why a task's context ended before the command finished:
// the caller cancelled it, or the task's timeout passed.
func (r *Runner) interrupted(ctx context.Context, start time.Time) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("cancelled after %s, the command's process group was killed: %w",
			time.Since(start).Round(time.Millisecond), err)
	}
	return fmt.Errorf("%w after %s (the plan's runner.timeout); the command's process group was killed", ErrTimeout, r.timeout)
}

// floodError is the failure of a command that printed more than it may.
func (r *Runner) floodError() error {
	return fmt.Errorf("%w: it wrote more than %d bytes to stdout and stderr during one task (the site's limit); its process group was killed",
		ErrFlood, r.maxOutput)
}

// prepare makes the task directory and writes the inputs.
func (r *Runner) prepare(task runner.Task, model tensor.Model, deadline time.Time, dataFile string) (*taskDir, error) {
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
			ProximalMu:      r.proxMu,
			Hyperparameters: r.hyper,
			Data:            r.data,
			DataFile:        dataFile,
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

// taskEnvironment is a per-task command's whole environment: the base,
// and the protocol's variables.
func (r *Runner) taskEnvironment(task runner.Task, td *taskDir, sh shared) []string {
	vars := r.baseEnvironment(td.root, td.tmp, sh)
	vars[EnvProtocol] = strconv.Itoa(ProtocolVersion)
	vars[EnvTask] = task.Name
	vars[EnvRound] = strconv.Itoa(task.Round)
	vars[EnvSeed] = strconv.FormatInt(r.seed, 10)
	vars[EnvTaskDir] = td.root
	vars[EnvTaskJSON] = td.taskJSON
	vars[EnvInputModel] = td.inputModel
	vars[EnvOutputDir] = td.output
	vars[EnvOutputMetrics] = td.outputMetrics
	if td.outputModel != "" {
		vars[EnvOutputModel] = td.outputModel
	}
	return envList(vars)
}

// baseEnvironment is what every command sees: the defaults, the site's
// variables over them, the experiment directory, and the site library
// first on PYTHONPATH.
func (r *Runner) baseEnvironment(home, tmp string, sh shared) map[string]string {
	vars := map[string]string{
		"PATH":   DefaultPath,
		"HOME":   home,
		"LANG":   "C.UTF-8",
		"TMPDIR": tmp,
	}
	for _, v := range r.env {
		vars[v.key] = v.value
	}
	vars[EnvExperimentDir] = r.dir
	if sh.libDir != "" {
		if pp := vars["PYTHONPATH"]; pp != "" {
			vars["PYTHONPATH"] = sh.libDir + string(filepath.ListSeparator) + pp
		} else {
			vars["PYTHONPATH"] = sh.libDir
		}
	}
	return vars
}

// envList turns variables into a sorted KEY=VALUE list.
func envList(vars map[string]string) []string {
	env := make([]string, 0, len(vars))
	for k, v := range vars {
		env = append(env, k+"="+v)
	}
	slices.Sort(env)
	return env
}
