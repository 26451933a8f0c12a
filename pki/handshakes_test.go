package pki

import (
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/credentials"
)

// gatedCreds' handshakes each wait for a release, recording their order
// and how many ran at once.
type gatedCreds struct {
	credentials.TransportCredentials
	mu       sync.Mutex
	running  int
	most     int
	order    []string
	started  chan struct{}
	released chan struct{}
}

func (g *gatedCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	g.mu.Lock()
	g.running++
	g.most = max(g.most, g.running)
	g.order = append(g.order, raw.RemoteAddr().String())
	g.mu.Unlock()
	g.started <- struct{}{}
	<-g.released
	g.mu.Lock()
	g.running--
	g.mu.Unlock()
	return raw, nil, nil
}

type namedConn struct {
	net.Conn
	name string
}

type namedAddr string

func (a namedAddr) Network() string { return "test" }
func (a namedAddr) String() string  { return string(a) }

func (c namedConn) RemoteAddr() net.Addr { return namedAddr(c.name) }

// waitStart and release fail the test rather than hang it.
func (g *gatedCreds) waitStart(t *testing.T) {
	t.Helper()
	select {
	case <-g.started:
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting for a handshake to start")
	}
}

func (g *gatedCreds) release(t *testing.T) {
	t.Helper()
	select {
	case g.released <- struct{}{}:
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting for a handshake to release")
	}
}

// TestHandshakeLimiter: at most n handshakes run at once, waiting ones run
// in arrival order, and one that waits too long is refused without a
// handshake.
func TestHandshakeLimiter(t *testing.T) {
	g := &gatedCreds{started: make(chan struct{}), released: make(chan struct{})}
	limiter := limitHandshakes(g, 2, time.Minute)
	conns := []string{"a", "b", "c", "d"}
	results := make(chan error, len(conns))
	for i, name := range conns {
		go func() {
			_, _, err := limiter.ServerHandshake(namedConn{name: name})
			results <- err
		}()
		if i < 2 {
			g.waitStart(t) // a and b take the two slots
		} else {
			time.Sleep(100 * time.Millisecond) // c queues before d
		}
	}
	// c and d wait; each release lets the next in line start.
	g.release(t)
	g.waitStart(t)
	g.release(t)
	g.waitStart(t)
	g.release(t)
	g.release(t)
	for range conns {
		if err := <-results; err != nil {
			t.Fatalf("handshake: %v", err)
		}
	}
	if g.most != 2 {
		t.Errorf("%d handshakes ran at once, want at most 2", g.most)
	}
	if got := g.order; len(got) != 4 || got[2] != "c" || got[3] != "d" {
		t.Errorf("handshakes ran in the order %v, want a and b, then c, then d", got)
	}

	// Both slots taken for longer than the queue wait: a third is refused.
	short := limitHandshakes(g, 2, 200*time.Millisecond)
	for _, name := range []string{"e", "f"} {
		go func() {
			_, _, err := short.ServerHandshake(namedConn{name: name})
			results <- err
		}()
		g.waitStart(t)
	}
	start := time.Now()
	if _, _, err := short.ServerHandshake(namedConn{name: "late"}); !errors.Is(err, errHandshakeQueueFull) {
		t.Errorf("a handshake that waited past the limit: %v, want refused", err)
	}
	if waited := time.Since(start); waited < 200*time.Millisecond {
		t.Errorf("refused after %v, before the 200ms limit", waited)
	}
	g.release(t)
	g.release(t)
	for range 2 {
		if err := <-results; err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range g.order {
		if name == "late" {
			t.Error("the refused connection was handshaken")
		}
	}
}
