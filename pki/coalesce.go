package pki

import (
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
// the most it reads from the socket at once: the size of gRPC's own I/O
// buffers above TLS.
const coalesceSize = ioBuffer

// blocks lends coalescingConns their buffers only while data passes: a
// director holds thousands of mostly idle connections, and a buffer each
// would be megabytes of heap that does nothing.
var blocks = sync.Pool{New: func() any {
	b := make([]byte, coalesceSize+32<<10) // room for the record that crosses coalesceSize
	return &b
}}

// coalescingConn is the raw connection under TLS; see above. Writes outside
// a coalesced TLS write (handshake messages, alerts, key updates) pass
// straight through, in order. Reads are not concurrent: crypto/tls
// serialises them. Close does not flush: closing is how gRPC unblocks a
// write to a peer that stopped reading, so it must never wait on one; what
// a close racing a write would drop is a connection's last bytes as it goes
// away.
type coalescingConn struct {
	net.Conn

	// Read side: unread bytes of the last socket read, in a lent block.
	readBlock *[]byte
	unread    []byte
	readErr   error // returned once unread is drained

	mu         sync.Mutex // guards the write side and orders writes
	coalescing bool
	writeBlock *[]byte
	pending    []byte
}

func newCoalescingConn(raw net.Conn) *coalescingConn { return &coalescingConn{Conn: raw} }

// Read reads up to coalesceSize bytes from the socket into a lent block and
// hands them out over the following calls; a read that fits in p gives the
// block back at once.
func (c *coalescingConn) Read(p []byte) (int, error) {
	if c.readBlock == nil {
		if len(p) >= coalesceSize {
			return c.Conn.Read(p)
		}
		b := blocks.Get().(*[]byte)
		n, err := c.Conn.Read((*b)[:coalesceSize])
		if n <= len(p) {
			copy(p, (*b)[:n])
			blocks.Put(b)
			return n, err
		}
		c.readBlock, c.unread, c.readErr = b, (*b)[:n], err
	}
	n := copy(p, c.unread)
	c.unread = c.unread[n:]
	if len(c.unread) > 0 {
		return n, nil
	}
	blocks.Put(c.readBlock)
	err := c.readErr
	c.readBlock, c.unread, c.readErr = nil, nil, nil
	return n, err
}

func (c *coalescingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.coalescing {
		return c.Conn.Write(p)
	}
	if c.writeBlock == nil {
		c.writeBlock = blocks.Get().(*[]byte)
		c.pending = (*c.writeBlock)[:0]
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

// begin starts collecting records; end writes what was collected, stops,
// and gives the block back.
func (c *coalescingConn) begin() {
	c.mu.Lock()
	c.coalescing = true
	c.mu.Unlock()
}

func (c *coalescingConn) end() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.coalescing = false
	err := c.flushLocked()
	if c.writeBlock != nil {
		blocks.Put(c.writeBlock)
		c.writeBlock, c.pending = nil, nil
	}
	return err
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
