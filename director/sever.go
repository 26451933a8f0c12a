package director

import (
	"net"
	"sync"
)

// severableListener lets the director cut every connection of an
// aggregator at once. When the director shuts down, its aggregators must
// vanish the way they would if the process were killed: collaborators see
// the connection drop, retry, and rejoin the relaunched aggregator that the
// next director announces. Merely cancelling an aggregator's context would
// first answer their pending polls with "quit", and a collaborator that
// heard "quit" leaves the experiment for good.
type severableListener struct {
	net.Listener
	mu      sync.Mutex
	conns   map[*severableConn]struct{}
	severed bool
}

func newSeverableListener(l net.Listener) *severableListener {
	return &severableListener{Listener: l, conns: map[*severableConn]struct{}{}}
}

func (l *severableListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.severed {
		c.Close()
		return nil, net.ErrClosed
	}
	sc := &severableConn{Conn: c, l: l}
	l.conns[sc] = struct{}{}
	return sc, nil
}

// sever closes the listener and every connection it accepted.
func (l *severableListener) sever() {
	l.mu.Lock()
	l.severed = true
	conns := l.conns
	l.conns = map[*severableConn]struct{}{}
	l.mu.Unlock()
	_ = l.Listener.Close()
	for c := range conns {
		_ = c.Conn.Close()
	}
}

type severableConn struct {
	net.Conn
	l    *severableListener
	once sync.Once
}

func (c *severableConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}
