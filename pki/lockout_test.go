package pki

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"
)

// clientHelloRecord is the first TLS record of a real TLS 1.3 client: its
// ClientHello.
func clientHelloRecord(t *testing.T) []byte {
	t.Helper()
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	go func() {
		_ = tls.Client(client, &tls.Config{MinVersion: tls.VersionTLS13, ServerName: "localhost"}).Handshake()
	}()
	if err := server.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	header := make([]byte, 5)
	if _, err := io.ReadFull(server, header); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, int(header[3])<<8|int(header[4]))
	if _, err := io.ReadFull(server, body); err != nil {
		t.Fatal(err)
	}
	return append(header, body...)
}

// trickle writes data one byte at a time, a byte every interval, until it
// is done, the connection fails or stop is closed: a slow-loris. It counts
// the bytes it wrote in sent.
func trickle(conn net.Conn, data []byte, interval time.Duration, sent *atomic.Int64, stop <-chan struct{}) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for i := range data {
		if _, err := conn.Write(data[i : i+1]); err != nil {
			return
		}
		sent.Add(1)
		select {
		case <-stop:
			return
		case <-tick.C:
		}
	}
}

// TestIdleConnectionsDoNotLockOutClients: connections that never finish a
// ClientHello — 256 idle ones, and slow-lorises trickling a real ClientHello
// byte by byte, twice as many as there are handshake slots — hold nothing a real
// client needs. Its call, on the production server, succeeds promptly while
// they are all still open. (Before, idle connections held the handshake
// slots: a client waited the 10 s queue limit and was refused.)
func TestIdleConnectionsDoNotLockOutClients(t *testing.T) {
	f := newFederation(t, true)
	envoy, _ := issueFiles(t, f.ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	hello := clientHelloRecord(t)
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })

	dialer := net.Dialer{Timeout: 5 * time.Second}
	open := func() net.Conn {
		t.Helper()
		c, err := dialer.Dial("tcp", f.server.addr)
		if err != nil {
			t.Fatalf("opening a connection: %v", err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	idle := make([]net.Conn, 256)
	for i := range idle {
		idle[i] = open()
	}
	// The slow-lorises send all of a ClientHello but its last byte, and
	// the call waits until each is past the record header.
	lorises := 2 * handshakeSlots
	sent := make([]atomic.Int64, lorises)
	for i := range lorises {
		go trickle(open(), hello[:len(hello)-1], 10*time.Millisecond, &sent[i], stop)
	}
	deadline := time.Now().Add(10 * time.Second)
	for i := range sent {
		for sent[i].Load() < recordHeaderLen+16 {
			if time.Now().After(deadline) {
				t.Fatalf("slow-loris %d sent %d bytes in 10 s", i, sent[i].Load())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	// The real client: well within the bound on any machine, and far
	// beyond it when its handshake has to wait for a slot.
	const bound = 5 * time.Second
	conn := dial(t, f.server.addr, envoy)
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	start := time.Now()
	err := check(ctx, conn, "site-1")
	took := time.Since(start)
	if err != nil {
		t.Fatalf("a client's call with 256 idle connections and %d slow ClientHellos open failed after %v: %v", lorises, took, err)
	}
	t.Logf("the call took %v", took)

	// The idle connections were all open throughout the call: it did not
	// succeed because the server gave up on them.
	buf := make([]byte, 1)
	for i, c := range idle {
		if err := c.SetReadDeadline(time.Now().Add(time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("idle connection %d was closed by the server before the call was checked (%v); the test shows nothing unless they stay open for the whole call", i, err)
		}
	}
}

// TestStalledHandshakesOfOnePeerDoNotLockOutOthers: a peer that sends
// complete ClientHellos and then stalls its handshakes — on more
// connections than there are slots — holds at most all but one slot, and a
// client at another address is served at once. (Without the per-peer share
// it would wait until a stalled handshake timed out, 5 s.)
func TestStalledHandshakesOfOnePeerDoNotLockOutOthers(t *testing.T) {
	f := newFederation(t, true)
	envoy, _ := issueFiles(t, f.ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	hello := clientHelloRecord(t)

	// The stalling peer dials from 127.0.0.2, the client from 127.0.0.1.
	dialer := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	for i := range 2 * handshakeSlots {
		c, err := dialer.Dial("tcp", f.server.addr)
		if err != nil {
			if i == 0 {
				t.Skipf("cannot dial from 127.0.0.2 on this system: %v", err)
			}
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := c.Write(hello); err != nil {
			t.Fatal(err)
		}
	}

	const bound = 3 * time.Second // the stalled handshakes end only after 5 s
	conn := dial(t, f.server.addr, envoy)
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	start := time.Now()
	if err := check(ctx, conn, "site-1"); err != nil {
		t.Fatalf("a client's call while another address stalls %d handshakes failed after %v: %v", 2*handshakeSlots, time.Since(start), err)
	}
	t.Logf("the call took %v", time.Since(start))
}
