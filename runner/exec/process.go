package exec

import (
	"bufio"
	"context"
	"errors"
	"io"
	"os"
	osexec "os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/runner"
)

// drainTimeout bounds the wait for the command's output pipes to close
// after its process group was killed. Only a process that left the group
// (setsid) can hold them open longer; the runner then stops reading.
const drainTimeout = 2 * time.Second

// maxLineBytes caps one logged line; the rest of a longer line is dropped,
// so a runner printing a megabyte without a newline cannot bloat the log.
const maxLineBytes = 8 << 10

// outcome is how a command run ended.
type outcome struct {
	startErr error    // the command did not start
	waitErr  error    // cmd.Wait's error: a non-zero exit or a signal
	stopped  bool     // fx signalled the group (timeout or cancellation)
	stderr   []string // the last StderrTail lines of stderr
}

// execute runs the command for one task in its own process group and waits
// for it. When ctx ends first, the group gets SIGTERM, then SIGKILL after
// the grace period. When the command's main process ends, whatever it left
// running in its group is killed: a task is over when its command exits.
func (r *Runner) execute(ctx context.Context, task runner.Task, td *taskDir, log hclog.Logger) outcome {
	tail := &tailBuffer{max: StderrTail}
	outR, outW, err := os.Pipe()
	if err != nil {
		return outcome{startErr: err}
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return outcome{startErr: err}
	}
	cmd := &osexec.Cmd{
		Path:        r.path,
		Args:        r.argv,
		Dir:         r.dir,
		Env:         r.environment(task, td),
		Stdout:      outW,
		Stderr:      errW,
		SysProcAttr: procAttr(),
	}
	err = cmd.Start()
	// The child holds its own copies of the write ends; closing ours lets
	// the readers see EOF when the last process holding them is gone.
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return outcome{startErr: err}
	}
	pgid := cmd.Process.Pid
	log.Info("runner command started", "pid", pgid)

	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		pumpLines(outR, func(line string) { log.Info(line, "stream", "stdout") })
	}()
	go func() {
		defer wg.Done()
		pumpLines(errR, func(line string) {
			log.Info(line, "stream", "stderr")
			tail.add(line)
		})
	}()

	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	var out outcome
	select {
	case out.waitErr = <-waited:
	case <-ctx.Done():
		out.stopped = true
		log.Warn("stopping the runner command", "reason", context.Cause(ctx), "grace", r.grace)
		killGroup(pgid, syscall.SIGTERM)
		grace := time.NewTimer(r.grace)
		select {
		case out.waitErr = <-waited:
		case <-grace.C:
			log.Warn("the runner command outlived its grace period; killing it", "grace", r.grace)
			killGroup(pgid, syscall.SIGKILL)
			out.waitErr = <-waited
		}
		grace.Stop()
	}
	killGroup(pgid, syscall.SIGKILL)

	drained := make(chan struct{})
	go func() {
		wg.Wait()
		close(drained)
	}()
	select {
	case <-drained:
	case <-time.After(drainTimeout):
		log.Warn("a process that left the runner's process group still holds its output open; no longer reading it")
		outR.Close()
		errR.Close()
		<-drained
	}
	outR.Close()
	errR.Close()
	out.stderr = tail.lines()
	return out
}

// killGroup signals every process of the group; a group that is already
// gone is not an error (ESRCH), nor is a group id that no longer belongs to
// us (EPERM): either way nothing of the command's is left to signal.
func killGroup(pgid int, sig syscall.Signal) {
	_ = syscall.Kill(-pgid, sig)
}

// pumpLines reads r line by line and hands each non-blank line to emit,
// without its line ending, as valid UTF-8, cut at maxLineBytes.
func pumpLines(r io.Reader, emit func(string)) {
	br := bufio.NewReaderSize(r, 4096)
	var line []byte
	cut := false
	for {
		chunk, err := br.ReadSlice('\n')
		if room := maxLineBytes - len(line); len(chunk) > room {
			line = append(line, chunk[:room]...)
			cut = true
		} else {
			line = append(line, chunk...)
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		s := strings.TrimRight(strings.ToValidUTF8(string(line), "\uFFFD"), "\r\n")
		if cut {
			s += " …[line cut]"
		}
		if strings.TrimSpace(s) != "" {
			emit(s)
		}
		line, cut = line[:0], false
		if err != nil {
			return
		}
	}
}

// tailBuffer keeps the last max lines written to it.
type tailBuffer struct {
	mu    sync.Mutex
	max   int
	buf   []string
	total int
}

func (t *tailBuffer) add(line string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.buf) < t.max {
		t.buf = append(t.buf, line)
	} else {
		t.buf[t.total%t.max] = line
	}
	t.total++
}

// lines returns the kept lines, oldest first.
func (t *tailBuffer) lines() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.total <= t.max {
		return append([]string(nil), t.buf...)
	}
	start := t.total % t.max
	return append(append([]string(nil), t.buf[start:]...), t.buf[:start]...)
}
