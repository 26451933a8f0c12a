package pki

import (
	"bytes"
	"container/list"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/credentials"
)

// When thousands of envoys connect at once (a director restart, a fleet
// coming up), every TLS handshake competes for the same cores. Run them all
// at once and each takes as long as all of them: none finishes within its
// client's call timeout, the clients retry, and the server spends its CPU on
// handshakes nobody waits for any more. handshakeLimiter runs a few at a
// time, in arrival order, so each finishes as fast as the machine allows;
// a connection that waited longer than its client plausibly does is closed
// without the costly handshake, and the client retries with backoff.
//
// Slots are scarce, and anyone who can reach the port can ask for one, before
// authenticating. So nothing holds a slot before it has shown it is a TLS
// client: a connection first sends its whole ClientHello record, within
// helloTimeout, while holding nothing but its socket (an idle connection or
// a slow-loris costs the server a goroutine and no more than the bytes it
// sent). A handshake that has a slot must finish within handshakeTimeout.
// And one peer address cannot hold every slot, nor make others wait behind
// its queue: see handshakeQueue.

// handshakeSlots is how many server handshakes run at once: enough to keep
// every core busy while a handshake waits on the network.
var handshakeSlots = max(4, 2*runtime.GOMAXPROCS(0))

const (
	// helloTimeout is how long a new connection has to send its first TLS
	// record. A client sends it as soon as TCP is up; 10 s covers a few
	// lost packets.
	helloTimeout = 10 * time.Second
	// maxHandshakeQueueWait is how long a connection may wait for a slot.
	// Envoys give a call 15 s; past 10 s in the queue, the handshake and
	// the call after it would rarely finish in time.
	maxHandshakeQueueWait = 10 * time.Second
	// handshakeTimeout bounds a handshake (and gRPC's connection preface
	// after it) once it has a slot: a few round trips and milliseconds of
	// CPU, so 5 s is slow and a stalled peer gives its slot back soon.
	handshakeTimeout = 5 * time.Second
)

// handshakeLimits configure a handshakeLimiter; defaultHandshakeLimits are
// those of fx's servers.
type handshakeLimits struct {
	slots     int           // handshakes at once
	perPeer   int           // of which one peer address may hold at most
	hello     time.Duration // to send the ClientHello
	queueWait time.Duration // to wait for a slot
	handshake time.Duration // to finish the handshake once it has a slot
}

func defaultHandshakeLimits() handshakeLimits {
	return handshakeLimits{
		slots:     handshakeSlots,
		perPeer:   max(1, handshakeSlots-1),
		hello:     helloTimeout,
		queueWait: maxHandshakeQueueWait,
		handshake: handshakeTimeout,
	}
}

var (
	errHandshakeQueueFull = errors.New("pki: too many TLS handshakes waiting; the client should retry")
	errNotTLS             = errors.New("pki: the connection did not start with a TLS handshake record: fx servers speak only gRPC over TLS")
)

// handshakeLimiter wraps server credentials with the limits above.
type handshakeLimiter struct {
	credentials.TransportCredentials
	queue  *handshakeQueue
	limits handshakeLimits
}

func limitHandshakes(c credentials.TransportCredentials, limits handshakeLimits) handshakeLimiter {
	return handshakeLimiter{TransportCredentials: c, queue: newHandshakeQueue(limits.slots, limits.perPeer), limits: limits}
}

// ServerHandshake reads the ClientHello, waits for a slot and hands the
// connection, ClientHello first, to the wrapped credentials. gRPC closes
// the connection when it fails and clears the deadlines set here once the
// connection is up.
func (h handshakeLimiter) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	hello, err := readClientHello(raw, h.limits.hello)
	if err != nil {
		return nil, nil, err
	}
	release, err := h.queue.acquire(peerKey(raw.RemoteAddr()), h.limits.queueWait)
	if err != nil {
		return nil, nil, err
	}
	defer release()
	if err := raw.SetDeadline(time.Now().Add(h.limits.handshake)); err != nil {
		return nil, nil, err
	}
	return h.TransportCredentials.ServerHandshake(&prereadConn{Conn: raw, buf: hello})
}

func (h handshakeLimiter) Clone() credentials.TransportCredentials {
	return handshakeLimiter{TransportCredentials: h.TransportCredentials.Clone(), queue: h.queue, limits: h.limits}
}

// TLS record framing (RFC 8446 §5.1): a type byte, a two-byte legacy
// version whose first byte is 3 in every TLS version, a two-byte length.
const (
	recordHeaderLen     = 5
	recordTypeHandshake = 0x16
	maxPlaintextRecord  = 1 << 14
)

// readClientHello reads the first TLS record of a new connection, which a
// TLS client fills with its ClientHello, within timeout. Anything else is
// refused before it costs more: a first byte that is not a handshake
// record's, a length no record has. The record is read into a buffer that
// grows with the bytes that arrive, so a slow-loris that announces 16 KiB
// and trickles holds only what it sent.
func readClientHello(conn net.Conn, timeout time.Duration) ([]byte, error) {
	if err := conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	var record bytes.Buffer
	if _, err := io.CopyN(&record, conn, recordHeaderLen); err != nil {
		return nil, fmt.Errorf("pki: no TLS ClientHello from %s within %s: %w", conn.RemoteAddr(), timeout, err)
	}
	header := record.Bytes()
	length := int(header[3])<<8 | int(header[4])
	if header[0] != recordTypeHandshake || header[1] != 3 || length == 0 || length > maxPlaintextRecord {
		return nil, fmt.Errorf("%w (it began %q)", errNotTLS, header)
	}
	if _, err := io.CopyN(&record, conn, int64(length)); err != nil {
		return nil, fmt.Errorf("pki: no complete TLS ClientHello from %s within %s: %w", conn.RemoteAddr(), timeout, err)
	}
	return record.Bytes(), nil
}

// peerKey names the peer that a connection's slots are counted against: its
// IPv4 address, or its IPv6 /64, the block one host or site is usually
// given (counting single IPv6 addresses, one host could be thousands of
// peers). Addresses that are not IP (tests, Unix sockets) count as
// themselves.
func peerKey(addr net.Addr) string {
	if addr == nil {
		return ""
	}
	var ip netip.Addr
	if tcp, ok := addr.(*net.TCPAddr); ok {
		ip = tcp.AddrPort().Addr()
	} else if ap, err := netip.ParseAddrPort(addr.String()); err == nil {
		ip = ap.Addr()
	} else {
		return addr.String()
	}
	ip = ip.Unmap()
	if ip.Is6() {
		return netip.PrefixFrom(ip, 64).Masked().String()
	}
	return ip.String()
}

// handshakeQueue hands out slots fairly among peers. Each peer waits in a
// line of its own, in arrival order, and the lines take turns: when a slot
// frees, it goes to the first waiter of the line whose turn it is, and that
// line goes to the back. A peer with a thousand connections waiting thus
// delays another peer's one by a single turn, not a thousand. And a peer
// may hold at most perPeer slots, one fewer than there are, so a peer that
// stalls its handshakes (or a NAT full of envoys) leaves a slot for
// everyone else; with only one peer waiting, that slot stays free.
type handshakeQueue struct {
	mu      sync.Mutex
	free    int
	perPeer int
	peers   map[string]*peerLine
	turns   list.List // of *peerLine with waiters, next turn first
}

type peerLine struct {
	key     string
	running int
	waiting list.List     // of chan struct{}, closed when granted a slot
	turn    *list.Element // in handshakeQueue.turns; nil when nobody waits
}

func newHandshakeQueue(slots, perPeer int) *handshakeQueue {
	return &handshakeQueue{free: slots, perPeer: perPeer, peers: make(map[string]*peerLine)}
}

// acquire waits up to maxWait for a slot for peer and returns the function
// that gives it back.
func (q *handshakeQueue) acquire(peer string, maxWait time.Duration) (release func(), err error) {
	granted := make(chan struct{})
	q.mu.Lock()
	p := q.peers[peer]
	if p == nil {
		p = &peerLine{key: peer}
		q.peers[peer] = p
	}
	w := p.waiting.PushBack(granted)
	if p.turn == nil {
		p.turn = q.turns.PushBack(p)
	}
	q.dispatchLocked()
	q.mu.Unlock()

	release = func() { q.release(p) }
	select {
	case <-granted:
		return release, nil
	default:
	}
	handshakesWaiting.Add(1)
	defer handshakesWaiting.Add(-1)
	timer := time.NewTimer(maxWait)
	defer timer.Stop()
	select {
	case <-granted:
		return release, nil
	case <-timer.C:
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	select {
	case <-granted: // granted as the wait ran out
		return release, nil
	default:
	}
	p.waiting.Remove(w)
	if p.waiting.Len() == 0 {
		q.turns.Remove(p.turn)
		p.turn = nil
	}
	q.forgetLocked(p)
	handshakesRefused.Add(1)
	return nil, errHandshakeQueueFull
}

// The process's handshake counts, over all its servers: see Handshakes.
var handshakesWaiting, handshakesRefused atomic.Int64

// HandshakeCounts are what Handshakes reports.
type HandshakeCounts struct {
	// Waiting is how many server handshakes wait for a slot now.
	Waiting int64
	// Refused is how many were refused since the process started, for
	// waiting longer than a client plausibly does.
	Refused int64
}

// Handshakes reports the queue of this process's fx servers, for
// operators' metrics: a queue that stays long, or refusals that grow,
// mean more sites connect at once than the host handshakes with.
func Handshakes() HandshakeCounts {
	return HandshakeCounts{Waiting: handshakesWaiting.Load(), Refused: handshakesRefused.Load()}
}

func (q *handshakeQueue) release(p *peerLine) {
	q.mu.Lock()
	defer q.mu.Unlock()
	p.running--
	q.free++
	q.forgetLocked(p)
	q.dispatchLocked()
}

// dispatchLocked gives free slots to waiters, line by line in turn,
// skipping lines whose peer holds its share.
func (q *handshakeQueue) dispatchLocked() {
	for q.free > 0 {
		e := q.turns.Front()
		for e != nil && e.Value.(*peerLine).running >= q.perPeer {
			e = e.Next()
		}
		if e == nil {
			return
		}
		p := e.Value.(*peerLine)
		close(p.waiting.Remove(p.waiting.Front()).(chan struct{}))
		p.running++
		q.free--
		q.turns.Remove(e)
		p.turn = nil
		if p.waiting.Len() > 0 {
			p.turn = q.turns.PushBack(p)
		}
	}
}

// forgetLocked drops a peer that holds and waits for nothing.
func (q *handshakeQueue) forgetLocked(p *peerLine) {
	if p.running == 0 && p.waiting.Len() == 0 {
		delete(q.peers, p.key)
	}
}
