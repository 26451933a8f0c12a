package envoy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync"

	"github.com/fx-fl/fx/collaborator"
	"github.com/fx-fl/fx/experiment"
)

// DefaultCollaborator runs the collaborator package's loop. The aggregator
// saying QUIT is the normal end for this site, whatever the reason it gives
// (finished, cancelled, failed, dropped): the director already knows, so it
// is logged and not reported as a failure.
func DefaultCollaborator(ctx context.Context, spec CollaboratorSpec) error {
	c, err := collaborator.New(collaborator.Config{
		ExperimentID: spec.ExperimentID,
		Name:         spec.Name,
		Address:      spec.Address,
		DialOptions:  spec.DialOptions,
		Runner:       spec.Runner,
		WorkDir:      spec.WorkDir,
		InitialModel: filepath.Join(spec.Dir, experiment.InitialModelFile),
		Logger:       spec.Logger,
		Retry:        spec.Retry.schedule(),
		Metrics:      spec.Metrics,
		Privacy:      spec.Privacy,
		Local:        localTensors(spec.Plan),
		Secure:       secureAggregation(spec.Plan),
		Scaffold:     spec.Plan != nil && spec.Plan.Scaffold(),
		Async:        spec.Plan != nil && spec.Plan.Async(),
	})
	if err != nil {
		return err
	}
	err = c.Run(ctx)
	var quit *collaborator.Quit
	if errors.As(err, &quit) {
		if spec.Logger != nil {
			spec.Logger.Info("the aggregator ended the experiment for this site", "reason", quit.Reason)
		}
		return nil
	}
	return err
}

// aggregatorLink dials an experiment's aggregator wherever the director
// last said it listens. A restarted director starts the aggregator again,
// usually on another port, and says so in a new Start: the envoy moves the
// link instead of restarting the collaborator, so the task in progress
// goes on and the results already computed are uploaded to the new
// aggregator rather than computed again.
type aggregatorLink struct {
	mu    sync.Mutex
	addr  string
	conns map[*linkConn]struct{}
}

func newAggregatorLink(addr string) *aggregatorLink {
	return &aggregatorLink{addr: addr, conns: map[*linkConn]struct{}{}}
}

// dial is the collaborator's gRPC dialer. It dials the current address,
// whatever address gRPC resolved from the first Start.
func (l *aggregatorLink) dial(ctx context.Context, _ string) (net.Conn, error) {
	l.mu.Lock()
	addr := l.addr
	l.mu.Unlock()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.addr != addr {
		c.Close()
		return nil, fmt.Errorf("the aggregator moved from %s to %s while connecting", addr, l.addr)
	}
	lc := &linkConn{Conn: c, link: l}
	l.conns[lc] = struct{}{}
	return lc, nil
}

// move points the link at addr and closes the connections to the old
// address: they lead to an aggregator that is gone or, once its port is
// reused, to another experiment's. The collaborator's next call connects
// to addr.
func (l *aggregatorLink) move(addr string) {
	l.mu.Lock()
	l.addr = addr
	old := l.conns
	l.conns = map[*linkConn]struct{}{}
	l.mu.Unlock()
	for c := range old {
		c.Conn.Close()
	}
}

// linkConn is a connection the link dialled; closing it forgets it.
type linkConn struct {
	net.Conn
	link *aggregatorLink
}

func (c *linkConn) Close() error {
	c.link.mu.Lock()
	delete(c.link.conns, c)
	c.link.mu.Unlock()
	return c.Conn.Close()
}

// localTensors are the plan's personalised layers (aggregation.local),
// which the collaborator keeps at the site.
func localTensors(p *experiment.Plan) []string {
	if p == nil {
		return nil
	}
	return p.Aggregation.Local
}

// secureAggregation is the plan's secure aggregation, if it asks for it.
func secureAggregation(p *experiment.Plan) *collaborator.Secure {
	if p == nil || !p.Aggregation.Secure {
		return nil
	}
	return &collaborator.Secure{
		Threshold:    p.SecureThresholdOrDefault(),
		Range:        p.SecureRangeOrDefault(),
		EqualWeights: p.Aggregation.Weights == experiment.WeightsEqual,
	}
}
