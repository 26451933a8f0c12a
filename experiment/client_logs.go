package experiment

import (
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// RunnerLogs yields what the experiment's runners printed at the sites that
// share their output (their exec.share_logs), oldest first: every site's,
// or envoy's alone. Without follow it yields the lines the director keeps
// and ends; with follow it then waits for new lines until the experiment
// ends, reconnecting as Metrics does, and yields each line once. It yields
// a non-nil error, and stops, when the director refuses (NotFound), when
// reconnecting has failed for Retry.GiveUpAfter, or when ctx ends.
func (c *Client) RunnerLogs(ctx context.Context, name, envoy string, follow bool) iter.Seq2[*fxv1.RunnerLogLine, error] {
	return func(yield func(*fxv1.RunnerLogLine, error) bool) {
		var last int64
		bo := newBackoff(c.cfg.Retry)
		lastProgress := time.Now()
		op := fmt.Sprintf("reading the runner output of experiment %s", name)
		for {
			err := func() error {
				sctx, cancel := context.WithCancel(ctx)
				defer cancel()
				stream, err := c.rpc.WatchRunnerLogs(sctx, &fxv1.WatchRunnerLogsRequest{Experiment: Ref(name), Envoy: envoy, AfterSequence: last, Follow: follow})
				if err != nil {
					return c.wrap(op, err)
				}
				for {
					line, err := stream.Recv()
					if errors.Is(err, io.EOF) {
						return nil
					}
					if err != nil {
						return c.wrap(op, err)
					}
					if line.GetSequence() <= last {
						continue
					}
					last = line.GetSequence()
					bo.reset()
					lastProgress = time.Now()
					if !yield(line, nil) {
						return errStopped
					}
				}
			}()
			switch {
			case errors.Is(err, errStopped):
				return
			case err == nil:
				return // the director ended the stream: all kept lines, or the experiment ended
			case ctx.Err() != nil:
				yield(nil, fmt.Errorf("%s: %w", op, ctx.Err()))
				return
			case !follow || !retryable(err):
				yield(nil, err)
				return
			case time.Since(lastProgress) > c.cfg.Retry.GiveUpAfter:
				yield(nil, fmt.Errorf("gave up reconnecting after %s: %w", c.cfg.Retry.GiveUpAfter, err))
				return
			}
			if bo.wait(ctx) != nil {
				yield(nil, fmt.Errorf("%s: %w", op, ctx.Err()))
				return
			}
		}
	}
}

// errStopped ends a stream whose reader broke out of its loop.
var errStopped = errors.New("the caller stopped reading")
