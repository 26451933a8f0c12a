package pki

import (
	"errors"
	"io"
	"net"
	"os"
	"strings"
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

func newGatedCreds() *gatedCreds {
	return &gatedCreds{started: make(chan struct{}), released: make(chan struct{})}
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

func (g *gatedCreds) handshaken() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]string(nil), g.order...)
}

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

// noStart fails the test if a handshake starts now.
func (g *gatedCreds) noStart(t *testing.T) {
	t.Helper()
	select {
	case <-g.started:
		t.Fatal("a handshake started that should wait")
	default:
	}
}

type namedConn struct {
	net.Conn
	name string
}

type namedAddr string

func (a namedAddr) Network() string { return "test" }
func (a namedAddr) String() string  { return string(a) }

func (c namedConn) RemoteAddr() net.Addr { return namedAddr(c.name) }

// fakeHello is a TLS handshake record as small as the limiter accepts.
var fakeHello = []byte{recordTypeHandshake, 3, 1, 0, 4, 1, 0, 0, 0}

// peerConn is a connection from addr (a peer name, or host:port) whose
// client sends first, then waits.
func peerConn(t *testing.T, addr string, first []byte) net.Conn {
	t.Helper()
	server, client := net.Pipe()
	t.Cleanup(func() { server.Close(); client.Close() })
	if first != nil {
		go func() { _, _ = client.Write(first) }()
	}
	return namedConn{Conn: server, name: addr}
}

// waiting is how many connections wait for a slot.
func (q *handshakeQueue) waiting() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	for _, p := range q.peers {
		n += p.waiting.Len()
	}
	return n
}

// waitQueued waits until n connections wait for a slot.
func waitQueued(t *testing.T, q *handshakeQueue, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for q.waiting() != n {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %d queued handshakes (%d queued)", n, q.waiting())
		}
		time.Sleep(time.Millisecond)
	}
}

func testLimits(slots, perPeer int, queueWait time.Duration) handshakeLimits {
	return handshakeLimits{slots: slots, perPeer: perPeer, hello: 10 * time.Second, queueWait: queueWait, handshake: 10 * time.Second}
}

// startHandshake runs a server handshake of limiter on conn, sending its outcome to
// results.
func startHandshake(limiter handshakeLimiter, conn net.Conn, results chan<- error) {
	go func() {
		_, _, err := limiter.ServerHandshake(conn)
		results <- err
	}()
}

// handshake runs a server handshake of limiter on conn and returns its
// error, failing the test if it does not end within 10 s.
func handshake(t *testing.T, limiter handshakeLimiter, conn net.Conn) error {
	t.Helper()
	results := make(chan error, 1)
	startHandshake(limiter, conn, results)
	select {
	case err := <-results:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("a handshake did not end within 10 s")
		return nil
	}
}

func collect(t *testing.T, results <-chan error, n int) {
	t.Helper()
	for range n {
		select {
		case err := <-results:
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("timed out waiting for handshakes to end")
		}
	}
}

// TestHandshakeLimiter: at most n handshakes run at once, waiting ones run
// in arrival order, and one that waits too long is refused without a
// handshake.
func TestHandshakeLimiter(t *testing.T) {
	g := newGatedCreds()
	limiter := limitHandshakes(g, testLimits(2, 2, time.Minute))
	conns := []string{"a", "b", "c", "d"}
	results := make(chan error, len(conns))
	for i, name := range conns {
		startHandshake(limiter, peerConn(t, name, fakeHello), results)
		if i < 2 {
			g.waitStart(t) // a and b take the two slots
		} else {
			waitQueued(t, limiter.queue, i-1) // c queues before d
		}
	}
	// c and d wait; each release lets the next in line start.
	g.release(t)
	g.waitStart(t)
	g.release(t)
	g.waitStart(t)
	g.release(t)
	g.release(t)
	collect(t, results, len(conns))
	if g.most != 2 {
		t.Errorf("%d handshakes ran at once, want at most 2", g.most)
	}
	if got := g.handshaken(); len(got) != 4 || got[2] != "c" || got[3] != "d" {
		t.Errorf("handshakes ran in the order %v, want a and b, then c, then d", got)
	}

	// Both slots taken for longer than the queue wait: a third is refused.
	short := limitHandshakes(g, testLimits(2, 2, 200*time.Millisecond))
	for _, name := range []string{"e", "f"} {
		startHandshake(short, peerConn(t, name, fakeHello), results)
		g.waitStart(t)
	}
	begin := time.Now()
	if err := handshake(t, short, peerConn(t, "late", fakeHello)); !errors.Is(err, errHandshakeQueueFull) {
		t.Errorf("a handshake that waited past the limit: %v, want refused", err)
	}
	if waited := time.Since(begin); waited < 200*time.Millisecond {
		t.Errorf("refused after %v, before the 200ms limit", waited)
	}
	g.release(t)
	g.release(t)
	collect(t, results, 2)
	for _, name := range g.handshaken() {
		if name == "late" {
			t.Error("the refused connection was handshaken")
		}
	}
	if n := len(short.queue.peers); n != 0 {
		t.Errorf("the queue still tracks %d peers after every handshake ended", n)
	}
}

// TestHandshakeFairness: one peer address cannot hold every slot, and its
// queued connections do not make another peer's wait behind them.
func TestHandshakeFairness(t *testing.T) {
	t.Run("one peer leaves a slot for others", func(t *testing.T) {
		g := newGatedCreds()
		limiter := limitHandshakes(g, testLimits(3, 2, time.Minute))
		results := make(chan error, 4)
		for i, addr := range []string{"10.0.0.66:1", "10.0.0.66:2", "10.0.0.66:3"} {
			startHandshake(limiter, peerConn(t, addr, fakeHello), results)
			if i < 2 {
				g.waitStart(t)
			}
		}
		waitQueued(t, limiter.queue, 1) // its third waits, though a slot is free
		g.noStart(t)
		startHandshake(limiter, peerConn(t, "10.0.0.7:1", fakeHello), results)
		g.waitStart(t) // another peer takes the free slot at once
		if got := g.handshaken(); got[2] != "10.0.0.7:1" {
			t.Fatalf("handshakes ran in the order %v, want the other peer's third", got)
		}
		g.release(t)
		g.waitStart(t) // the first peer's third, below its share again
		for range 3 {
			g.release(t)
		}
		collect(t, results, 4)
	})

	t.Run("peers take turns", func(t *testing.T) {
		g := newGatedCreds()
		limiter := limitHandshakes(g, testLimits(1, 1, time.Minute))
		results := make(chan error, 5)
		startHandshake(limiter, peerConn(t, "10.0.0.66:1", fakeHello), results)
		g.waitStart(t)
		for i, addr := range []string{"10.0.0.66:2", "10.0.0.66:3", "10.0.0.66:4", "10.0.0.7:1"} {
			startHandshake(limiter, peerConn(t, addr, fakeHello), results)
			waitQueued(t, limiter.queue, i+1)
		}
		for range 4 {
			g.release(t)
			g.waitStart(t)
		}
		g.release(t)
		collect(t, results, 5)
		want := []string{"10.0.0.66:1", "10.0.0.66:2", "10.0.0.7:1", "10.0.0.66:3", "10.0.0.66:4"}
		if got := g.handshaken(); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Fatalf("handshakes ran in the order %v, want %v: the later peer's turn comes after one more of the first's", got, want)
		}
	})

	t.Run("an IPv6 /64 is one peer", func(t *testing.T) {
		for _, tc := range []struct{ a, b string }{
			{"[2001:db8:1:2::1]:443", "[2001:db8:1:2:ffff::9]:80"},
			{"[::ffff:10.0.0.1]:1", "10.0.0.1:2"},
		} {
			if peerKey(namedAddr(tc.a)) != peerKey(namedAddr(tc.b)) {
				t.Errorf("%s and %s count as different peers (%s, %s)", tc.a, tc.b, peerKey(namedAddr(tc.a)), peerKey(namedAddr(tc.b)))
			}
		}
		if peerKey(&net.TCPAddr{IP: net.ParseIP("2001:db8:1:2::1")}) == peerKey(&net.TCPAddr{IP: net.ParseIP("2001:db8:1:3::1")}) {
			t.Error("two IPv6 /64s count as one peer")
		}
	})
}

// TestHandshakeNeedsClientHello: a connection holds no slot until it has
// sent a whole TLS handshake record, gives up after the hello timeout, and
// is refused at once when it does not speak TLS; a handshake with a slot is
// cut off at the handshake timeout.
func TestHandshakeNeedsClientHello(t *testing.T) {
	g := newGatedCreds()
	limiter := limitHandshakes(g, testLimits(1, 1, time.Minute))
	results := make(chan error, 3)
	partial := append([]byte(nil), fakeHello[:len(fakeHello)-1]...)
	startHandshake(limiter, peerConn(t, "idle", nil), results)
	startHandshake(limiter, peerConn(t, "partial", partial), results)
	startHandshake(limiter, peerConn(t, "client", fakeHello), results)
	g.waitStart(t) // the one slot goes to the complete ClientHello
	if got := g.handshaken(); len(got) != 1 || got[0] != "client" {
		t.Fatalf("handshakes started: %v, want only the client's", got)
	}
	if n := limiter.queue.waiting(); n != 0 {
		t.Fatalf("%d connections without a ClientHello wait for a slot", n)
	}
	g.release(t)
	select {
	case err := <-results:
		if err != nil {
			t.Fatalf("the client's handshake: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting for the client's handshake")
	}

	// Past the hello timeout, the server gives up on them.
	quick := limitHandshakes(g, handshakeLimits{slots: 1, perPeer: 1, hello: 100 * time.Millisecond, queueWait: time.Minute, handshake: time.Minute})
	for _, first := range [][]byte{nil, partial} {
		err := handshake(t, quick, peerConn(t, "slow", first))
		if !errors.Is(err, os.ErrDeadlineExceeded) || !strings.Contains(err.Error(), "ClientHello") {
			t.Errorf("a connection that sent %d bytes: %v, want a timeout waiting for the ClientHello", len(first), err)
		}
	}

	// Not TLS: refused without waiting.
	for _, first := range [][]byte{[]byte("GET / HTTP/1.1\r\n"), []byte("PRI * HTTP/2.0\r\n"), {recordTypeHandshake, 3, 1, 0x40, 1}} {
		if err := handshake(t, limiter, peerConn(t, "plain", first)); !errors.Is(err, errNotTLS) {
			t.Errorf("a connection that began %q: %v, want refused as not TLS", first, err)
		}
	}

	// A handshake that stalls once it has its slot gives it back at the
	// handshake timeout.
	stalled := limitHandshakes(readingCreds{}, handshakeLimits{slots: 1, perPeer: 1, hello: time.Minute, queueWait: time.Minute, handshake: 100 * time.Millisecond})
	if err := handshake(t, stalled, peerConn(t, "staller", fakeHello)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a stalled handshake: %v, want cut off by the handshake timeout", err)
	}
	release, err := stalled.queue.acquire("next", time.Millisecond)
	if err != nil {
		t.Fatalf("the stalled handshake kept its slot: %v", err)
	}
	release()
}

// readingCreds' handshakes read until the connection fails, like a TLS
// server waiting for a client that stopped.
type readingCreds struct {
	credentials.TransportCredentials
}

func (readingCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	_, err := io.ReadAll(raw)
	return nil, nil, err
}
