package envoy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"
)

// downParty stands in for a director or an aggregator that is down: it
// takes every TCP connection and closes it at once, so each attempt to
// reach it fails, and it records when each attempt came.
type downParty struct {
	lis net.Listener

	mu       sync.Mutex
	attempts []time.Time
}

func newDownParty(t *testing.T) *downParty {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &downParty{lis: lis}
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			p.attempts = append(p.attempts, time.Now())
			p.mu.Unlock()
			c.Close()
		}
	}()
	t.Cleanup(func() { lis.Close() })
	return p
}

func (p *downParty) addr() string { return p.lis.Addr().String() }

// longestPause is the longest time between two attempts from the first
// one to now (the time since the last attempt counts too), and the number
// of attempts.
func (p *downParty) longestPause() (time.Duration, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.attempts) == 0 {
		return 0, 0
	}
	var longest time.Duration
	for i := 1; i < len(p.attempts); i++ {
		longest = max(longest, p.attempts[i].Sub(p.attempts[i-1]))
	}
	return max(longest, time.Since(p.attempts[len(p.attempts)-1])), len(p.attempts)
}

// watchOutage lets p be down for outage after the first attempt reached it
// and fails the test if the attempts paused for longer than bound: over
// an outage of several seconds gRPC's own reconnection backoff (1s, 1.6s,
// 2.6s, ... up to 2 minutes) pauses longer than that whatever retry.max
// says.
func watchOutage(t *testing.T, p *downParty, outage, bound time.Duration) {
	t.Helper()
	eventually(t, "a first attempt to reach "+p.addr(), func() bool {
		_, n := p.longestPause()
		return n > 0
	})
	<-time.After(outage) // the outage itself, not a wait for a condition
	longest, n := p.longestPause()
	t.Logf("%d attempts in %s, the longest pause %s", n, outage, longest.Round(time.Millisecond))
	if longest > bound {
		t.Errorf("attempts to reconnect paused for %s, more than %s with retry.max %s", longest.Round(time.Millisecond), bound, 200*time.Millisecond)
	}
}

// reconnectBound is how long a test lets attempts pause with retry.max at
// 200ms (testConfig's): five times retry.max, for a loaded machine. gRPC's
// own backoff pauses for 1.28s or more by its third attempt.
const reconnectBound = time.Second

// TestReconnectToDirectorHonoursRetryMax: while the director is down the
// envoy tries to reach it again at least every retry.max (here 200ms), not
// on gRPC's default schedule, so a director back from an outage of minutes
// is found within retry.max.
func TestReconnectToDirectorHonoursRetryMax(t *testing.T) {
	down := newDownParty(t)
	d := newFakeDirector(t)
	cfg := testConfig(t, d, "site-r1")
	cfg.Director.Address = down.addr()
	startSite(t, cfg, nil)
	watchOutage(t, down, 4*time.Second, reconnectBound)
}

// TestReconnectToAggregatorHonoursRetryMax: a collaborator whose
// aggregator is down tries to reach it at least every retry.max too.
func TestReconnectToAggregatorHonoursRetryMax(t *testing.T) {
	down := newDownParty(t)
	d := newFakeDirector(t)
	name := "site-r2"
	cfg := testConfig(t, d, name)
	e, err := New(cfg) // the default runner and collaborator
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("Run: %v", err)
		}
	}()
	plan := fmt.Sprintf(softmaxPlan, "reconnect")
	d.push(name, d.offer("exp-r", makeArchive(t, plan, 0), plan), true)
	d.answer(name, "exp-r")
	start := startAssignment("exp-r")
	start.GetStart().AggregatorAddress = down.addr()
	start.GetStart().AggregatorServerName = "localhost"
	d.push(name, start, false)
	watchOutage(t, down, 4*time.Second, reconnectBound)
}
