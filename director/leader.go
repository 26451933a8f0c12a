package director

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/director/store"
	"github.com/fx-fl/fx/internal/backoff"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// Active and standby directors. With a store several directors share
// (store.Elector: PostgreSQL), each director serves from the start but
// leads only once it wins the store's election (see director/store's
// leader.go). Until then it is a standby: its state is not loaded, every
// Director call is refused UNAVAILABLE naming the leader's address, its
// gRPC health says NOT_SERVING (which Go clients' health-checked
// balancing uses to pick the leader among several addresses), and /readyz
// says not ready. On winning it loads the state and relaunches aggregators
// exactly as a restarted director does (load, checkStoreMatches, start):
// a takeover is a restart on another host. A leader that loses the
// election stops serving and stops its aggregators (Run returns), and its
// writes fail meanwhile: the store fences them.

// Election timings.
const (
	// campaignRetryMax spaces the attempts of a campaign the database fails.
	campaignRetryMax = 5 * time.Second
	// leaderHintEvery is how often a standby rereads the leader's address.
	leaderHintEvery = 2 * time.Second
	// takeoverMargin is added to store.DeposeWithin before a new leader,
	// whose predecessor did not step down cleanly, launches aggregators:
	// time for the predecessor's own aggregators to stop.
	takeoverMargin = time.Second
)

// gated reports whether a method is refused by a standby: the Director
// service's, not health or reflection.
func gated(method string) bool {
	return strings.HasPrefix(method, "/"+fxv1.Director_ServiceDesc.ServiceName+"/")
}

// gateOptions refuse the Director service's calls while this director does
// not lead.
func (d *Director) gateOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			if err := d.gate(info.FullMethod); err != nil {
				return nil, err
			}
			return handler(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
			if err := d.gate(info.FullMethod); err != nil {
				return err
			}
			return handler(srv, ss)
		}),
	}
}

func (d *Director) gate(method string) error {
	if d.leading.Load() || !gated(method) {
		return nil
	}
	d.mu.Lock()
	why := d.standby
	d.mu.Unlock()
	if why == "" {
		why = "this director is not serving yet"
	}
	return status.Error(codes.Unavailable, why)
}

// setStandby records why this director does not serve, for refused calls
// and /readyz.
func (d *Director) setStandby(why string) {
	d.mu.Lock()
	d.standby = why
	d.mu.Unlock()
}

// standbyMessage says who leads, for a client to go there.
func standbyMessage(l store.Leader, err error) string {
	switch {
	case errors.Is(err, store.ErrNotFound):
		return "this director is a standby and no director leads yet: try again in a few seconds"
	case err != nil:
		return fmt.Sprintf("this director is a standby and cannot read who leads (%v): try another director", err)
	case l.Released:
		return fmt.Sprintf("this director is a standby; the leader (%s) has stepped down and a standby is taking over: try again in a few seconds", l.Address)
	}
	return fmt.Sprintf("not the leader: this director is a standby; the leader is at %s (term %d): call it, or give the client every director's address (comma-separated) to follow the leader by itself", l.Address, l.Term)
}

// candidate names this director in the election.
func (d *Director) candidate(addr net.Addr) store.Candidate {
	host, _ := os.Hostname()
	address := addr.String()
	if tcp, ok := addr.(*net.TCPAddr); ok {
		address = net.JoinHostPort(d.advertiseHost(), fmt.Sprint(tcp.Port))
	}
	return store.Candidate{Holder: fmt.Sprintf("%s pid %d", host, os.Getpid()), Address: address}
}

// campaign stands by until this director leads, then loads the state as a
// start does. It returns the leadership, or an error when ctx ends (nil
// leadership, nil error) or the state cannot be loaded.
func (d *Director) campaign(ctx context.Context, el store.Elector, hs *health.Server, addr net.Addr) (*store.Leadership, error) {
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	hs.SetServingStatus(fxv1.Director_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_NOT_SERVING)
	me := d.candidate(addr)
	d.setStandby("this director is a standby; looking for the leader")
	hintCtx, stopHints := context.WithCancel(ctx)
	hintsDone := make(chan struct{})
	go func() {
		defer close(hintsDone)
		t := time.NewTicker(leaderHintEvery)
		defer t.Stop()
		for {
			select {
			case <-hintCtx.Done():
				return
			case <-t.C:
				d.setStandby(standbyMessage(el.Leader(hintCtx)))
			}
		}
	}()
	d.setStandby(standbyMessage(el.Leader(ctx)))
	d.log.Info("standing by: another director leads, or will", "database", el.Target(), "address", me.Address)
	var lead *store.Leadership
	b := backoff.New(backoff.Config{Initial: 200 * time.Millisecond, Max: campaignRetryMax})
	for lead == nil {
		var err error
		lead, err = el.Campaign(ctx, me)
		if ctx.Err() != nil {
			stopHints()
			<-hintsDone
			return nil, nil
		}
		if err != nil {
			wait := b.Next()
			d.log.Warn("cannot stand for the lead; trying again", "error", err, "in", wait)
			backoff.Sleep(ctx, wait)
		}
	}
	stopHints()
	<-hintsDone
	d.setStandby("this director is taking the lead: try again in a few seconds")
	d.log.Info("leading", "term", lead.Term, "address", me.Address)
	if p := lead.Previous; p != nil && !p.Released {
		// The predecessor may be alive and cut off from the database: it
		// stops its aggregators within DeposeWithin of losing the lock.
		wait := store.DeposeWithin + takeoverMargin
		d.log.Info("taking over from a leader that did not step down; waiting for its aggregators to have stopped", "previous", p.Holder, "previous_term", p.Term, "wait", wait)
		if !backoff.Sleep(ctx, wait) {
			return nil, nil
		}
	}
	if err := clearDir(filepath.Join(d.cfg.DataDir, "tmp")); err != nil {
		return nil, fmt.Errorf("director: data_dir: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.load(); err != nil {
		return nil, fmt.Errorf("director: load state: %w", err)
	}
	if err := d.checkStoreMatches(); err != nil {
		return nil, fmt.Errorf("director: %w", err)
	}
	return lead, nil
}
