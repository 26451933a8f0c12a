package pki

import (
	"bufio"
	"net"
	"sync"

	"google.golang.org/grpc/credentials"
)

// Go's crypto/tls hands each TLS record, at most 16 KiB, to the socket with
// a write system call of its own, and reads the socket a record at a time.
// A 1 MiB tensor frame therefore costs some 130 system calls on its way
// through one connection, and on loopback those calls were a third of the
// CPU an fx round spends moving models. A coalescingConn sits under TLS: the
// records of one write to the TLS connection are collected and given to the
// kernel in a few large writes, and the socket is read through a buffer of
// the same size. Nothing else changes: the TLS bytes on the wire are the
// same, and a write returns only once its records are with the kernel.

// coalesceSize is how much a coalescingConn collects before writing, and
// the size of its read buffer: the size of gRPC's own I/O buffers above TLS.
const coalesceSize = ioBuffer

// coalescingConn is the raw connection under TLS; see above. Writes outside
// a coalesced TLS write (handshake messages, alerts, key updates) pass
// straight through, in order.
type coalescingConn struct {
	net.Conn
	in *bufio.Reader

	mu         sync.Mutex // guards coalescing and pending, and orders writes
	coalescing bool
	pending    []byte
}

func newCoalescingConn(raw net.Conn) *coalescingConn {
	return &coalescingConn{Conn: raw, in: bufio.NewReaderSize(raw, coalesceSize)}
}

func (c *coalescingConn) Read(p []byte) (int, error) { return c.in.Read(p) }

func (c *coalescingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.coalescing {
		return c.Conn.Write(p)
	}
	c.pending = append(c.pending, p...)
	if len(c.pending) >= coalesceSize {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (c *coalescingConn) flushLocked() error {
	if len(c.pending) == 0 {
		return nil
	}
	_, err := c.Conn.Write(c.pending)
	c.pending = c.pending[:0]
	return err
}

// begin starts collecting records; end writes what was collected and stops.
func (c *coalescingConn) begin() {
	c.mu.Lock()
	c.coalescing = true
	c.mu.Unlock()
}

func (c *coalescingConn) end() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.coalescing = false
	return c.flushLocked()
}

// coalescedTLS is the TLS connection gRPC uses: each of its writes is
// coalesced by the raw connection underneath.
type coalescedTLS struct {
	net.Conn // the TLS connection, as the handshake returned it
	raw      *coalescingConn
	writeMu  sync.Mutex // one coalesced write at a time
}

func (c *coalescedTLS) Write(p []byte) (int, error) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	c.raw.begin()
	n, err := c.Conn.Write(p)
	if flushErr := c.raw.end(); err == nil && flushErr != nil {
		return 0, flushErr
	}
	return n, err
}

// coalescingCreds wraps TLS transport credentials so that every connection
// they secure coalesces its records.
type coalescingCreds struct {
	credentials.TransportCredentials
}

func (c coalescingCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	under := newCoalescingConn(raw)
	conn, info, err := c.TransportCredentials.ServerHandshake(under)
	if err != nil {
		return nil, nil, err
	}
	return &coalescedTLS{Conn: conn, raw: under}, info, nil
}

func (c coalescingCreds) Clone() credentials.TransportCredentials {
	return coalescingCreds{c.TransportCredentials.Clone()}
}
