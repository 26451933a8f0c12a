package exec

import (
	"bufio"
	"errors"
	"io"
	"os"
	osexec "os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
)

// drainTimeout bounds the wait for the command's output pipes to close
// after its process group was killed. Only a process that left the group
// (setsid) can hold them open longer; the runner then stops reading.
const drainTimeout = 2 * time.Second

// maxLineBytes caps one logged line; the rest of a longer line is dropped,
// so a runner printing a megabyte without a newline cannot bloat the log.
const maxLineBytes = 8 << 10

// proc is one started runner command: its process group, the goroutines
// reading its output, and what they have seen.
type proc struct {
	cmd  *osexec.Cmd
	pgid int
	log  hclog.Logger
	// exited is closed when the main process has exited; waitErr is then
	// cmd.Wait's error.
	exited  chan struct{}
	waitErr error
	// pumps read stdout and stderr until both are closed.
	pumps      sync.WaitGroup
	outR, errR *os.File
	tail       *tailBuffer
	// output counts the bytes written since the last setTask; flooded
	// is closed when they pass limit.
	output    atomic.Int64
	limit     int64
	flooded   chan struct{}
	floodOnce sync.Once
	stopped   atomic.Bool // fx signalled the group
	stopOnce  sync.Once
	label     atomic.Pointer[taskLabel]
	onLine    func(OutputLine)
	// received counts the bytes read from the output pipes, handled those
	// whose lines were emitted: settle compares them.
	received, handled atomic.Int64
}

// taskLabel names the task a persistent process is running, for its
// output lines.
type taskLabel struct {
	task  string
	round int
}

// startProc starts cmd in its own process group with its stdout and stderr
// pumped line by line into log (and onLine), and returns at once.
// extraFiles are the child's ends of pipes passed as fds 3, 4, ...; they
// are closed here once the child holds them.
func (r *Runner) startProc(cmd *osexec.Cmd, extraFiles []*os.File, log hclog.Logger) (*proc, error) {
	p := &proc{
		log:     log,
		tail:    &tailBuffer{max: StderrTail},
		limit:   r.maxOutput,
		flooded: make(chan struct{}),
		exited:  make(chan struct{}),
		onLine:  r.output,
	}
	closeAll := func(fs ...*os.File) {
		for _, f := range fs {
			if f != nil {
				f.Close()
			}
		}
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		closeAll(extraFiles...)
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		closeAll(append(extraFiles, outR, outW)...)
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	cmd.ExtraFiles = extraFiles
	cmd.SysProcAttr = procAttr()
	if r.contain != nil {
		if err := r.contain(cmd); err != nil {
			closeAll(append(extraFiles, outR, outW, errR, errW)...)
			return nil, err
		}
	}
	err = cmd.Start()
	// The child holds its own copies of the write ends (and of the extra
	// files); closing ours lets the readers see EOF when the last process
	// holding them is gone.
	closeAll(append(extraFiles, outW, errW)...)
	if err != nil {
		closeAll(outR, errR)
		return nil, err
	}
	p.cmd, p.pgid, p.outR, p.errR = cmd, cmd.Process.Pid, outR, errR
	log.Info("runner command started", "pid", p.pgid)
	p.pumps.Add(2)
	go p.pump(outR, "stdout")
	go p.pump(errR, "stderr")
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// pump reads one of the command's streams until it closes.
func (p *proc) pump(r io.Reader, stream string) {
	defer p.pumps.Done()
	pumpLines(countingReader{r, &p.received}, func(n int) {
		p.handled.Add(int64(n))
		if p.output.Add(int64(n)) > p.limit {
			p.floodOnce.Do(func() { close(p.flooded) })
		}
	}, func(line string) {
		l := p.label.Load()
		if l == nil {
			l = &taskLabel{}
		}
		if p.output.Load() > p.limit {
			return // flooding: neither logged nor shared
		}
		p.log.Info(line, "stream", stream)
		if stream == "stderr" {
			p.tail.add(line)
		}
		if p.onLine != nil {
			p.onLine(OutputLine{Stream: stream, Task: l.task, Round: l.round, Text: line})
		}
	})
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n.Add(int64(n))
	return n, err
}

// settleTimeout bounds settle: a line the command left without its
// newline is never emitted, and must not hold up the next task.
const settleTimeout = 200 * time.Millisecond

// settle waits until the output the command wrote so far has been read and
// emitted, so that lines it printed during a task carry that task's label
// though the command's answer may arrive first.
func (p *proc) settle() {
	deadline := time.Now().Add(settleTimeout)
	for time.Now().Before(deadline) && !p.hasExited() {
		if pending(p.outR)+pending(p.errR) == 0 && p.received.Load() == p.handled.Load() {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// setTask labels the output that follows with a task, and restarts the
// output count: the limit is per task.
func (p *proc) setTask(task string, round int) {
	p.label.Store(&taskLabel{task: task, round: round})
	p.output.Store(0)
}

// hasExited reports whether the main process has exited.
func (p *proc) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// stop ends the command for good: SIGTERM to its group (unless its main
// process already exited), SIGKILL after grace, then SIGKILL to whatever it
// left in its group, and waits for its output to drain. It returns the
// stderr tail. Safe to call more than once.
func (p *proc) stop(grace time.Duration, reason string) []string {
	p.stopOnce.Do(func() {
		if !p.hasExited() {
			p.stopped.Store(true)
			p.log.Warn("stopping the runner command", "reason", reason, "grace", grace)
			killGroup(p.pgid, syscall.SIGTERM)
			t := time.NewTimer(grace)
			select {
			case <-p.exited:
			case <-t.C:
				p.log.Warn("the runner command outlived its grace period; killing it", "grace", grace)
				killGroup(p.pgid, syscall.SIGKILL)
				<-p.exited
			}
			t.Stop()
		}
		// A task is over when its command exits: what it left running in
		// its group goes too.
		killGroup(p.pgid, syscall.SIGKILL)
		drained := make(chan struct{})
		go func() {
			p.pumps.Wait()
			close(drained)
		}()
		select {
		case <-drained:
		case <-time.After(drainTimeout):
			p.log.Warn("a process that left the runner's process group still holds its output open; no longer reading it")
			p.outR.Close()
			p.errR.Close()
			<-drained
		}
		p.outR.Close()
		p.errR.Close()
	})
	return p.tail.lines()
}

// killGroup signals every process of the group; a group that is already
// gone is not an error (ESRCH), nor is a group id that no longer belongs to
// us (EPERM): either way nothing of the command's is left to signal.
func killGroup(pgid int, sig syscall.Signal) {
	_ = syscall.Kill(-pgid, sig)
}

// pumpLines reads r line by line and hands each non-blank line to emit,
// without its line ending, as valid UTF-8, cut at maxLineBytes; count is
// told of every byte once the line it belongs to was emitted (or, for a
// line longer than the buffer, once its part was taken).
func pumpLines(r io.Reader, count func(int), emit func(string)) {
	br := bufio.NewReaderSize(r, 4096)
	var line []byte
	cut := false
	for {
		chunk, err := br.ReadSlice('\n')
		n := len(chunk)
		if room := maxLineBytes - len(line); len(chunk) > room {
			line = append(line, chunk[:room]...)
			cut = true
		} else {
			line = append(line, chunk...)
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			count(n)
			continue
		}
		s := strings.TrimRight(strings.ToValidUTF8(string(line), "\uFFFD"), "\r\n")
		if cut {
			s += " …[line cut]"
		}
		if strings.TrimSpace(s) != "" {
			emit(s)
		}
		count(n)
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
