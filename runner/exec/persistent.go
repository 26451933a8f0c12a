package exec

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	osexec "os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"weak"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// The persistent protocol (version 2, docs/runner-protocol.md): fx starts
// the command once, with a control pipe in each direction (fds 3 and 4,
// named by FX_CONTROL_IN and FX_CONTROL_OUT). Each message is one line of
// JSON. fx sends "setup" first, then one "task" at a time, and "stop" at
// the end (or closes its pipe); the command answers "ready" once, after it
// has loaded what it needs, then "done" or "failed" for every task. Models
// travel as safetensors files in the runner's scratch directory, written
// once per model rather than once per task.

// maxMessageBytes bounds one control message from the command, as
// metrics.json is bounded.
const maxMessageBytes = MaxMetricsBytes

// Message types.
const (
	msgSetup  = "setup"
	msgTask   = "task"
	msgStop   = "stop"
	msgReady  = "ready"
	msgDone   = "done"
	msgFailed = "failed"
)

// maxReportedBytes bounds the message of a "failed" answer that a task
// error carries.
const maxReportedBytes = 4 << 10

// SetupMessage is fx's first message: what stays the same for every task.
type SetupMessage struct {
	Type     string `json:"type"`
	Protocol int    `json:"protocol"`
	// Seed is the plan's runner.seed.
	Seed int64 `json:"seed"`
	// Hyperparameters are the plan's runner.hyperparameters ({} if none).
	Hyperparameters json.RawMessage `json:"hyperparameters"`
	// Data holds the site's data settings ({} if none).
	Data json.RawMessage `json:"data"`
	// DataFile is the site's data set as fx loaded and cut it, or empty.
	DataFile string `json:"data_file,omitempty"`
	// ExperimentDir is the unpacked experiment, the working directory.
	ExperimentDir string `json:"experiment_dir"`
	// WorkDir is the command's private scratch directory (HOME is inside).
	WorkDir string `json:"work_dir"`
	// TimeoutSeconds is each task's time limit.
	TimeoutSeconds float64 `json:"timeout_seconds"`
}

// TaskMessage hands the command one task.
type TaskMessage struct {
	Type string `json:"type"`
	// ID is echoed in the answer.
	ID int64 `json:"id"`
	// Task is train, aggregated_model_validation or
	// locally_tuned_model_validation; Train is true for train.
	Task  string `json:"task"`
	Train bool   `json:"train"`
	Round int    `json:"round"`
	// ProximalMu is the plan's training.proximal_mu, FedProx's μ: train
	// adds (μ/2)·‖w − w_global‖² to its loss, w_global being InputModel.
	// 0 is plain training.
	ProximalMu float64 `json:"proximal_mu"`
	// Scaffold is set on a SCAFFOLD experiment's train task (scaffold.go).
	Scaffold *ScaffoldSpec `json:"scaffold,omitempty"`
	// InputModel is the model to start from (safetensors). The file stays
	// unchanged while the task runs and may be handed to later tasks.
	InputModel string `json:"input_model"`
	// OutputModel is where train writes its model; empty otherwise.
	OutputModel string `json:"output_model,omitempty"`
	// OutputReuse, when set with OutputModel, is a model file fx no longer
	// needs: the runner may rename it to OutputModel and overwrite it in
	// place, which is several times faster than writing a new file of a
	// large model (its pages are in memory already). Its header is zeroed,
	// so a runner that renames it and writes nothing fails the check of
	// its output instead of sending an old model as trained.
	OutputReuse string `json:"output_reuse,omitempty"`
	// TimeoutSeconds and Deadline bound the task.
	TimeoutSeconds float64   `json:"timeout_seconds"`
	Deadline       time.Time `json:"deadline"`
}

// ReplyMessage is any message from the command.
type ReplyMessage struct {
	Type string `json:"type"`
	// Protocol is the version a "ready" command speaks.
	Protocol int `json:"protocol,omitempty"`
	// ID is the task answered by "done" or "failed".
	ID int64 `json:"id,omitempty"`
	// Samples and Metrics are the result of "done", as in metrics.json.
	Samples json.RawMessage            `json:"samples,omitempty"`
	Metrics map[string]json.RawMessage `json:"metrics,omitempty"`
	// Error says why the task "failed".
	Error string `json:"error,omitempty"`
	// Steps and StepSize are a SCAFFOLD train task's K and η (scaffold.go).
	Steps    int64   `json:"steps,omitempty"`
	StepSize float64 `json:"step_size,omitempty"`
}

// persistent is the state of a ModePersistent Runner.
type persistent struct {
	mu      sync.Mutex // one task at a time
	sess    *session
	scratch string // the command's scratch directory; made with the first session
	nextID  int64
	seq     int
	// files are the models the command has as files, most recently used
	// last: the round's global model serves two tasks and the trained
	// model the local validation, each written (or read back) once.
	files []modelFile
	// spare are model files no longer needed, kept to be overwritten by
	// the next model or trained weights instead of writing new files.
	spare spareFiles
	// closes counts Close calls, so that a Start still waiting for the
	// lock when Close came does not start a process nobody will stop;
	// starting tracks Starts in flight, which Close waits for.
	closes   atomic.Int64
	starting sync.WaitGroup
}

// modelFile is a model held in a file the command can read. It knows the
// model by its tensors' identity and holds them weakly: keeping the file
// must not keep the model in the envoy's memory after the collaborator let
// it go (last round's trained weights, a model size each).
type modelFile struct {
	model []weak.Pointer[tensor.Tensor]
	path  string
}

// is reports whether m is the very model the file was written from: the
// collaborator hands the runner the very model it got before (runners must
// not modify the models they are given), so identity is enough.
func (f modelFile) is(m tensor.Model) bool {
	if len(f.model) != len(m) {
		return false
	}
	for i, w := range f.model {
		if w.Value() != m[i] {
			return false
		}
	}
	return true
}

// maxModelFiles is how many model files are kept: the round's global model
// and its trained weights.
const maxModelFiles = 2

// session is one running persistent process.
type session struct {
	p    *proc
	ctrl *os.File // fx's end of the pipe to the command
	from *os.File // fx's end of the pipe from the command
	msgs chan reply
	done chan struct{} // closed by close: the reader stops
	once sync.Once
}

// reply is a message read from the command, or why none could be.
type reply struct {
	msg ReplyMessage
	err error
}

// runPersistent runs one task on the experiment's process, starting one
// if none runs (the first task, or after a process died or was killed).
func (r *Runner) runPersistent(ctx context.Context, task runner.Task, model tensor.Model) (runner.Result, error) {
	ps := r.persistent
	ps.mu.Lock()
	defer ps.mu.Unlock()
	log := r.log.With("task", task.Name, "round", task.Round)
	start := time.Now()
	deadline := start.Add(r.timeout)
	tctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	var stderr []string
	fail := func(e error) (runner.Result, error) {
		return runner.Result{}, &TaskError{Task: task.Name, Round: task.Round, Err: e, Stderr: stderr}
	}

	s, err := r.session(ctx, tctx, start, log)
	if err != nil {
		var te *TaskError
		if errors.As(err, &te) {
			te.Task, te.Round = task.Name, task.Round
			return runner.Result{}, te
		}
		return fail(err)
	}
	input, err := r.modelPath(model)
	if err != nil {
		return fail(err)
	}
	ps.nextID++
	msg := TaskMessage{
		Type: msgTask, ID: ps.nextID, Task: task.Name, Train: runner.IsTrain(task.Name), Round: task.Round,
		ProximalMu: r.proxMu, InputModel: input, TimeoutSeconds: r.timeout.Seconds(), Deadline: deadline.UTC().Truncate(time.Second),
	}
	if msg.Train {
		ps.seq++
		msg.OutputModel = filepath.Join(ps.scratch, "models", fmt.Sprintf("trained-%d.safetensors", ps.seq))
		ps.makeRoom()
		msg.OutputReuse = ps.spare.lend()
		defer func() {
			if !ps.holds(msg.OutputModel) {
				os.Remove(msg.OutputModel)
			}
			if msg.OutputReuse != "" {
				ps.spare.returned(msg.OutputReuse)
			}
		}()
	}
	if task.Scaffold != nil {
		msg.Scaffold = &ScaffoldSpec{Correction: ps.correctionFile()}
		if err := writeCorrection(msg.Scaffold.Correction, task.Scaffold, model); err != nil {
			return fail(err)
		}
	}
	// What the runner printed for the previous task may still be in its
	// pipes: it keeps that task's label.
	s.p.settle()
	s.p.setTask(task.Name, task.Round)
	if err := s.send(msg, deadline); err != nil {
		stderr = r.endSession(s, "it stopped reading its control pipe")
		return fail(fmt.Errorf("%w: cannot hand it the task: %w", ErrExit, err))
	}
	rep, err := r.await(ctx, tctx, s, start)
	if err != nil {
		stderr = r.endSession(s, err.Error())
		return fail(err)
	}
	switch {
	case rep.ID != msg.ID || (rep.Type != msgDone && rep.Type != msgFailed):
		stderr = r.endSession(s, "protocol violation")
		return fail(fmt.Errorf("%w: the runner answered the task (id %d) with a %q message for id %d", ErrOutput, msg.ID, rep.Type, rep.ID))
	case rep.Type == msgFailed:
		// The process is alive and said what went wrong: it keeps serving.
		stderr = s.p.tail.lines()
		te := &TaskError{Task: task.Name, Round: task.Round, Err: ErrReported, Reported: truncate(rep.Error, maxReportedBytes), Stderr: stderr}
		if te.Reported == "" {
			te.Reported = "(no reason given)"
		}
		return runner.Result{}, te
	}
	var res runner.Result
	res.Samples, res.Metrics, err = checkResult("the runner's answer", rep.Samples, rep.Metrics)
	if err != nil {
		stderr = s.p.tail.lines()
		return fail(fmt.Errorf("%w: %w", ErrOutput, err))
	}
	if msg.Scaffold != nil {
		if res.Steps, res.StepSize, err = scaffoldSteps(&rep); err != nil {
			stderr = s.p.tail.lines()
			return fail(fmt.Errorf("%w: %w", ErrOutput, err))
		}
	}
	if msg.Train {
		if res.Model, err = readModel(msg.OutputModel, model, r.takeRecycled()); err != nil {
			stderr = s.p.tail.lines()
			return fail(fmt.Errorf("%w: %w", ErrOutput, err))
		}
		ps.remember(res.Model, msg.OutputModel)
	}
	log.Info("task done", "duration", time.Since(start).Round(time.Millisecond), "samples", res.Samples, "metrics", res.Metrics)
	return res, nil
}

// session returns the running process, starting one and waiting until it
// is ready if there is none. Its start-up counts against the task (tctx).
func (r *Runner) session(ctx, tctx context.Context, start time.Time, log hclog.Logger) (*session, error) {
	ps := r.persistent
	if s := ps.sess; s != nil {
		if !s.p.hasExited() {
			return s, nil
		}
		tail := r.endSession(s, "")
		log.Warn("the runner process exited between tasks; starting a new one", "exit", describeExit(s.p.waitErr), "stderr", tail)
	}
	if ps.scratch == "" {
		dir, err := os.MkdirTemp(r.workDir, "runner-")
		if err != nil {
			return nil, fmt.Errorf("exec runner: scratch directory: %w", err)
		}
		for _, sub := range []string{"models", "home", "tmp"} {
			if err := os.Mkdir(filepath.Join(dir, sub), 0o700); err != nil {
				os.RemoveAll(dir)
				return nil, fmt.Errorf("exec runner: scratch directory: %w", err)
			}
		}
		ps.scratch = dir
	}
	sh, err := r.prepareShared()
	if err != nil {
		return nil, err
	}
	s, err := r.startSession(sh, log)
	if err != nil {
		return nil, &TaskError{Err: fmt.Errorf("%w %s: %w", ErrStart, r.path, err)}
	}
	setup := SetupMessage{
		Type: msgSetup, Protocol: PersistentProtocolVersion, Seed: r.seed,
		Hyperparameters: r.hyper, Data: r.data, DataFile: sh.dataFile,
		ExperimentDir: r.dir, WorkDir: ps.scratch, TimeoutSeconds: r.timeout.Seconds(),
	}
	deadline, _ := tctx.Deadline()
	if err := s.send(setup, deadline); err != nil {
		return nil, &TaskError{Err: fmt.Errorf("%w: cannot hand it its setup: %w", ErrExit, err), Stderr: r.endSession(s, "it stopped reading its control pipe")}
	}
	rep, err := r.await(ctx, tctx, s, start)
	if err == nil && (rep.Type != msgReady || rep.Protocol != PersistentProtocolVersion) {
		err = fmt.Errorf("%w: the runner's first message must be {\"type\": \"ready\", \"protocol\": %d}, got type %q protocol %d (does it speak the persistent protocol? for a protocol-1 runner set runner.mode: per_task)",
			ErrOutput, PersistentProtocolVersion, rep.Type, rep.Protocol)
	}
	if err != nil {
		return nil, &TaskError{Err: fmt.Errorf("before it was ready: %w", err), Stderr: r.endSession(s, err.Error())}
	}
	log.Info("runner process ready", "pid", s.p.pgid, "took", time.Since(start).Round(time.Millisecond))
	ps.sess = s
	return s, nil
}

// startSession starts the command with its control pipes.
func (r *Runner) startSession(sh shared, log hclog.Logger) (*session, error) {
	ps := r.persistent
	toR, toW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	fromR, fromW, err := os.Pipe()
	if err != nil {
		toR.Close()
		toW.Close()
		return nil, err
	}
	vars := r.baseEnvironment(filepath.Join(ps.scratch, "home"), filepath.Join(ps.scratch, "tmp"), sh)
	vars[EnvProtocol] = strconv.Itoa(PersistentProtocolVersion)
	vars[EnvControlIn] = "3"
	vars[EnvControlOut] = "4"
	cmd := &osexec.Cmd{Path: r.path, Args: r.argv, Dir: r.dir, Env: envList(vars)}
	log.Debug("starting the runner process", "argv", r.argv, "dir", r.dir)
	p, err := r.startProc(cmd, []*os.File{toR, fromW}, log)
	if err != nil {
		toW.Close()
		fromR.Close()
		return nil, err
	}
	s := &session{p: p, ctrl: toW, from: fromR, msgs: make(chan reply), done: make(chan struct{})}
	go s.read()
	return s, nil
}

// send writes one message, giving up at deadline (a command that does not
// read its pipe must not block the envoy).
func (s *session) send(msg any, deadline time.Time) error {
	b, err := json.Marshal(msg)
	if err != nil {
		return err
	}
	if !deadline.IsZero() {
		s.ctrl.SetWriteDeadline(deadline)
	}
	_, err = s.ctrl.Write(append(b, '\n'))
	return err
}

// read decodes the command's messages until its pipe closes, a message is
// malformed, or the session is closed.
func (s *session) read() {
	defer close(s.msgs)
	br := bufio.NewReaderSize(s.from, 64<<10)
	for {
		line, err := readLine(br, maxMessageBytes)
		var rep reply
		switch {
		case errors.Is(err, io.EOF) && len(line) == 0:
			return
		case err != nil:
			rep.err = err
		default:
			if derr := decodeStrict(line, &rep.msg); derr != nil {
				rep.err = fmt.Errorf("a message on its control pipe is not the expected JSON: %w", derr)
			}
		}
		select {
		case s.msgs <- rep:
		case <-s.done:
			return
		}
		if rep.err != nil {
			return
		}
	}
}

// readLine reads one line, without its newline, of at most limit bytes.
func readLine(br *bufio.Reader, limit int) ([]byte, error) {
	var line []byte
	for {
		chunk, err := br.ReadSlice('\n')
		if len(line)+len(chunk) > limit+1 {
			return nil, fmt.Errorf("a message on its control pipe is longer than %d bytes", limit)
		}
		line = append(line, chunk...)
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case err != nil:
			if len(line) > 0 && errors.Is(err, io.EOF) {
				return nil, errors.New("its control pipe closed in the middle of a message")
			}
			return line, err
		}
		return line[:len(line)-1], nil
	}
}

// await waits for the command's next message. It fails when the task's
// context ends, the command floods its output, exits, or breaks the
// protocol.
func (r *Runner) await(ctx, tctx context.Context, s *session, start time.Time) (ReplyMessage, error) {
	select {
	case rep, ok := <-s.msgs:
		switch {
		case ok && rep.err != nil:
			return ReplyMessage{}, fmt.Errorf("%w: %w", ErrOutput, rep.err)
		case ok:
			return rep.msg, nil
		}
		// The pipe closed: the process is exiting.
		t := time.NewTimer(r.grace)
		defer t.Stop()
		select {
		case <-s.p.exited:
			return ReplyMessage{}, r.exitError(s.p)
		case <-t.C:
			return ReplyMessage{}, fmt.Errorf("%w: it closed its control pipe (fd 4) without exiting", ErrOutput)
		case <-tctx.Done():
			return ReplyMessage{}, r.interrupted(ctx, start)
		}
	case <-s.p.exited:
		return ReplyMessage{}, r.exitError(s.p)
	case <-s.p.flooded:
		return ReplyMessage{}, r.floodError()
	case <-tctx.Done():
		return ReplyMessage{}, r.interrupted(ctx, start)
	}
}

// exitError describes a persistent process that exited when fx waited for
// it to answer.
func (r *Runner) exitError(p *proc) error {
	if p.waitErr == nil {
		return fmt.Errorf("%w: the runner process exited with status 0 without answering", ErrExit)
	}
	return fmt.Errorf("%w: the runner process ended without answering: %s", ErrExit, describeExit(p.waitErr))
}

// endSession stops a session's process for good and returns its stderr
// tail; the next task starts a new process.
func (r *Runner) endSession(s *session, reason string) []string {
	if r.persistent.sess == s {
		r.persistent.sess = nil
	}
	s.once.Do(func() {
		close(s.done)
		s.ctrl.Close()
	})
	tail := s.p.stop(r.grace, reason)
	s.from.Close()
	return tail
}

// closePersistent asks the process to stop, gives it the grace period to
// exit on its own, and removes the scratch files.
func (r *Runner) closePersistent() error {
	ps := r.persistent
	ps.closes.Add(1)
	ps.starting.Wait() // a Start that sees the Close starts nothing; one already starting finishes
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if s := ps.sess; s != nil {
		_ = s.send(map[string]string{"type": msgStop}, time.Now().Add(time.Second))
		s.once.Do(func() {
			close(s.done)
			s.ctrl.Close()
		})
		t := time.NewTimer(r.grace)
		select {
		case <-s.p.exited:
		case <-t.C:
		}
		t.Stop()
		r.endSession(s, "the experiment's runner is closing")
	}
	ps.files, ps.spare = nil, spareFiles{}
	if ps.scratch == "" {
		return nil
	}
	err := os.RemoveAll(ps.scratch)
	ps.scratch = ""
	return err
}

// modelPath returns a file holding model, writing one unless the command
// has it already (the round's global model for its second task, the
// trained weights for the local validation).
func (r *Runner) modelPath(model tensor.Model) (string, error) {
	ps := r.persistent
	for _, f := range ps.files {
		if f.is(model) {
			ps.remember(model, f.path)
			return f.path, nil
		}
	}
	ps.seq++
	path := filepath.Join(ps.scratch, "models", fmt.Sprintf("model-%d.safetensors", ps.seq))
	ps.makeRoom()
	if err := ps.spare.write(path, model); err != nil {
		return "", fmt.Errorf("exec runner: handing the model to the runner: %w", err)
	}
	ps.remember(model, path)
	return path, nil
}

// remember records that path holds model, as the most recently used file,
// and removes the file that falls out of the maxModelFiles kept.
func (ps *persistent) remember(model tensor.Model, path string) {
	for i, f := range ps.files {
		if f.path == path {
			ps.files = append(ps.files[:i], ps.files[i+1:]...)
			break
		}
	}
	ref := make([]weak.Pointer[tensor.Tensor], len(model))
	for i, t := range model {
		ref[i] = weak.Make(t)
	}
	ps.files = append(ps.files, modelFile{model: ref, path: path})
	for len(ps.files) > maxModelFiles {
		ps.spare.keep(ps.files[0].path)
		ps.files = ps.files[1:]
	}
}

// makeRoom, before a new model file is written, lets the least recently
// used kept file go to the spares when the kept files are full, so that
// the new one is written over it: two model files serve every round (the
// global model, then the trained weights over the last round's), and the
// page cache holds no third copy of a model.
func (ps *persistent) makeRoom() {
	if len(ps.files) >= maxModelFiles {
		ps.spare.keep(ps.files[0].path)
		ps.files = ps.files[1:]
	}
}

// holds reports whether path is one of the kept model files.
func (ps *persistent) holds(path string) bool {
	for _, f := range ps.files {
		if f.path == path {
			return true
		}
	}
	return false
}

// Start starts a persistent runner's process now, in the background, so
// that its start-up (an interpreter, its imports, loading data) overlaps
// the collaborator's wait for its first task, which then waits for it to
// be ready. A start that fails is logged, and tried again by the first
// task, which reports it. A per-task runner has nothing to start.
func (r *Runner) Start(ctx context.Context) {
	if r.persistent == nil {
		return
	}
	ps := r.persistent
	closes := ps.closes.Load()
	ps.starting.Add(1)
	go func() {
		defer ps.starting.Done()
		ps.mu.Lock()
		defer ps.mu.Unlock()
		if ps.sess != nil || ctx.Err() != nil || ps.closes.Load() != closes {
			return
		}
		tctx, cancel := context.WithTimeout(ctx, r.timeout)
		defer cancel()
		if _, err := r.session(ctx, tctx, time.Now(), r.log); err != nil && ctx.Err() == nil {
			r.log.Warn("the runner did not start ahead of its first task; the task will try again", "error", err)
		}
	}()
}

// Check starts the command as its first task would and waits until it says
// it is ready, then stops it, so that a plan whose program cannot start at
// this site — or cannot import what it needs with the site's interpreter —
// is declined at the offer rather than failing in its first round. A
// per-task runner is started by each task and has nothing more to check
// than New did. The start-up is bounded by the task timeout.
func (r *Runner) Check(ctx context.Context) error {
	if r.persistent == nil {
		return nil
	}
	ps := r.persistent
	ps.mu.Lock()
	start := time.Now()
	tctx, cancel := context.WithTimeout(ctx, r.timeout)
	_, err := r.session(ctx, tctx, start, r.log.With("check", true))
	cancel()
	ps.mu.Unlock()
	if cerr := r.Close(); err == nil && cerr != nil {
		return fmt.Errorf("exec runner: removing the check's scratch files: %w", cerr)
	}
	if err == nil {
		return nil
	}
	var te *TaskError
	if errors.As(err, &te) {
		if mod := missingModule(te.Stderr); mod != "" {
			te.Err = fmt.Errorf("%w: the runner cannot import the Python module %q with %s; the site installs it there, or names an interpreter that has it (exec.python)",
				ErrExit, mod, r.path)
		}
	}
	return err
}

// pythonMissing finds the module of a Python ModuleNotFoundError.
var pythonMissing = regexp.MustCompile(`ModuleNotFoundError: No module named '([^']{1,200})'`)

// missingModule returns the module a Python traceback says is missing.
func missingModule(stderr []string) string {
	for i := len(stderr) - 1; i >= 0; i-- {
		if m := pythonMissing.FindStringSubmatch(stderr[i]); m != nil {
			return m[1]
		}
	}
	return ""
}

// truncate cuts s to at most n bytes of valid UTF-8.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "…"
}
