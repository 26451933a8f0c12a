package pki

import (
	"errors"
	"net"
	"runtime"
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

// handshakeSlots is how many server handshakes run at once: enough to keep
// every core busy while a handshake waits on the network.
var handshakeSlots = max(4, 2*runtime.GOMAXPROCS(0))

// maxHandshakeQueueWait is how long a new connection may wait for a slot.
// Envoys give a call 15 s; past 10 s in the queue, the handshake and the
// call after it would rarely finish in time.
const maxHandshakeQueueWait = 10 * time.Second

var errHandshakeQueueFull = errors.New("pki: too many TLS handshakes waiting; the client should retry")

// handshakeLimiter wraps server credentials with a limit on concurrent
// handshakes; see above.
type handshakeLimiter struct {
	credentials.TransportCredentials
	slots   chan struct{}
	maxWait time.Duration
}

// limitHandshakes runs at most n of c's server handshakes at once; a
// connection that waits more than maxWait for its turn is refused.
func limitHandshakes(c credentials.TransportCredentials, n int, maxWait time.Duration) handshakeLimiter {
	return handshakeLimiter{TransportCredentials: c, slots: make(chan struct{}, n), maxWait: maxWait}
}

func (h handshakeLimiter) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	wait := time.NewTimer(h.maxWait)
	defer wait.Stop()
	select {
	case h.slots <- struct{}{}:
	case <-wait.C:
		return nil, nil, errHandshakeQueueFull
	}
	defer func() { <-h.slots }()
	return h.TransportCredentials.ServerHandshake(raw)
}

func (h handshakeLimiter) Clone() credentials.TransportCredentials {
	return handshakeLimiter{TransportCredentials: h.TransportCredentials.Clone(), slots: h.slots, maxWait: h.maxWait}
}
