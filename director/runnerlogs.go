package director

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// maxRunnerLogLines is how many lines of an experiment the director keeps;
// older ones are forgotten first. With the protocol's bounds on a line (4
// KiB, declared in director.proto like the 1000 lines of one push) no
// site can make the director hold more than a few tens of MiB per
// experiment.
const maxRunnerLogLines = 10000

// runnerLog is an experiment's shared runner output: the last
// maxRunnerLogLines lines, numbered from 1 without gaps. A watcher waits
// on changed, closed and replaced on every append.
type runnerLog struct {
	lines   []*fxv1.RunnerLogLine // the kept lines, oldest first
	last    int64                 // the sequence of the newest line
	changed chan struct{}
}

// runnerLogLocked returns the experiment's log, making it if needed.
func (e *expState) runnerLogLocked() *runnerLog {
	if e.logs == nil {
		e.logs = &runnerLog{changed: make(chan struct{})}
	}
	return e.logs
}

func (l *runnerLog) append(envoy string, lines []*fxv1.RunnerLogLine, now time.Time) {
	for _, in := range lines {
		l.last++
		line := proto.Clone(in).(*fxv1.RunnerLogLine)
		line.Sequence, line.Envoy = l.last, envoy
		if line.Time == nil {
			line.Time = timestamppb.New(now)
		}
		l.lines = append(l.lines, line)
	}
	if over := len(l.lines) - maxRunnerLogLines; over > 0 {
		l.lines = append(l.lines[:0:0], l.lines[over:]...)
	}
	close(l.changed)
	l.changed = make(chan struct{})
}

// after returns the kept lines with sequence > seq from envoy ("" for all).
func (l *runnerLog) after(seq int64, envoy string) []*fxv1.RunnerLogLine {
	var out []*fxv1.RunnerLogLine
	for _, line := range l.lines {
		if line.GetSequence() > seq && (envoy == "" || line.GetEnvoy() == envoy) {
			out = append(out, line)
		}
	}
	return out
}

// checkLogLines refuses a push the director would not keep as it is. The
// sizes (lines per push, bytes per line) are the protocol's rules, checked
// before the handler runs.
func checkLogLines(lines []*fxv1.RunnerLogLine) error {
	for i, l := range lines {
		switch {
		case l.GetStream() != "stdout" && l.GetStream() != "stderr" && l.GetStream() != "fx":
			return fmt.Errorf("line %d has stream %.20q: want stdout, stderr or fx: %w", i, l.GetStream(), ErrInvalidArgument)
		case l.GetTask() != "" && runner.ValidateTaskName(l.GetTask()) != nil:
			return fmt.Errorf("line %d: %w: %w", i, runner.ValidateTaskName(l.GetTask()), ErrInvalidArgument)
		case l.GetRound() < 0:
			return fmt.Errorf("line %d has round %d: %w", i, l.GetRound(), ErrInvalidArgument)
		}
	}
	return nil
}

func (s *service) PushRunnerLogs(ctx context.Context, req *fxv1.PushRunnerLogsRequest) (*fxv1.PushRunnerLogsResponse, error) {
	if err := pki.RequireCaller(ctx, req.GetEnvoyName()); err != nil {
		return nil, err
	}
	if err := checkLogLines(req.GetLines()); err != nil {
		return nil, toStatus(err)
	}
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.exps[req.GetExperimentId()]
	if e == nil || e.parts[req.GetEnvoyName()] == nil {
		return nil, toStatus(fmt.Errorf("envoy %s does not take part in experiment %q: %w", req.GetEnvoyName(), req.GetExperimentId(), ErrNotFound))
	}
	if len(req.GetLines()) > 0 {
		e.runnerLogLocked().append(req.GetEnvoyName(), req.GetLines(), d.clock.Now())
	}
	return &fxv1.PushRunnerLogsResponse{}, nil
}

func (s *service) WatchRunnerLogs(req *fxv1.WatchRunnerLogsRequest, stream grpc.ServerStreamingServer[fxv1.RunnerLogLine]) error {
	if req.GetAfterSequence() < 0 {
		return toStatus(fmt.Errorf("after_sequence %d is negative: use 0 for every line kept: %w", req.GetAfterSequence(), ErrInvalidArgument))
	}
	return follow(s, stream.Context(), req.GetExperiment(), req.GetAfterSequence(), req.GetFollow(),
		func(e *expState, after int64) ([]*fxv1.RunnerLogLine, int64, <-chan struct{}) {
			l := e.runnerLogLocked()
			// Caught up to the newest line, though other sites' lines
			// are not sent to a watcher of one site.
			return l.after(after, req.GetEnvoy()), max(after, l.last), l.changed
		}, stream.Send)
}
