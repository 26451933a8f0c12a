package pki

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/fx-fl/fx/internal/tracing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// clientCreds are TLS client credentials from a client configuration (see
// Keyring.ClientConfig): each connection uses the material current at that
// moment and checks the server's certificate for serverName, or for the host
// of the dial target when serverName is empty. They coalesce TLS records
// (see coalescingConn) and wait for the server's verdict on the client
// certificate. In TLS 1.3 the client's handshake is over
// before the server has looked at the client certificate; a refusal then
// arrives as an alert that races with the client's first write, and the user
// often sees only "broken pipe". gRPC servers speak first (the HTTP/2
// SETTINGS frame), so the handshake here reads until the server's first
// bytes arrive: either the alert, reported as the handshake error, or the
// SETTINGS, handed on to gRPC unchanged.
type clientCreds struct {
	config     func(serverName string) *tls.Config
	serverName string
}

// serverVerdictTimeout bounds the wait for the server's first bytes when the
// dial context has no deadline.
const serverVerdictTimeout = 20 * time.Second

func (c *clientCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	name := c.serverName
	if name == "" {
		host, _, err := net.SplitHostPort(authority)
		if err != nil {
			host = authority
		}
		name = host
	}
	under := newCoalescingConn(raw)
	tlsConn, info, err := credentials.NewTLS(c.config(name)).ClientHandshake(ctx, authority, under)
	if err != nil {
		return nil, nil, err
	}
	conn := &coalescedTLS{Conn: tlsConn, raw: under}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(serverVerdictTimeout)
	}
	if err := conn.SetReadDeadline(deadline); err != nil {
		conn.Close()
		return nil, nil, err
	}
	buf := make([]byte, 512)
	n, err := conn.Read(buf)
	if err != nil {
		conn.Close()
		var netErr net.Error
		if errors.As(err, &netErr) && netErr.Timeout() {
			return nil, nil, fmt.Errorf("the server at %s accepted the TLS handshake but sent nothing: is it an fx gRPC server? %w", authority, err)
		}
		return nil, nil, err
	}
	if err := conn.SetReadDeadline(time.Time{}); err != nil {
		conn.Close()
		return nil, nil, err
	}
	return &prereadConn{Conn: conn, buf: buf[:n]}, info, nil
}

func (c *clientCreds) ServerHandshake(net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("pki: client credentials cannot accept connections; use Keyring.ServerConfig")
}

func (c *clientCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls", SecurityVersion: "1.3", ServerName: c.serverName}
}

func (c *clientCreds) Clone() credentials.TransportCredentials {
	clone := *c
	return &clone
}

// OverrideServerName is deprecated in gRPC but still part of the interface.
func (c *clientCreds) OverrideServerName(name string) error {
	c.serverName = name
	return nil
}

// prereadConn hands back bytes read ahead (the server's first bytes while a
// client waits for its verdict, a ClientHello read before a server
// handshake) before reading on.
type prereadConn struct {
	net.Conn
	buf []byte
}

func (c *prereadConn) Read(p []byte) (int, error) {
	if len(c.buf) > 0 {
		n := copy(p, c.buf)
		c.buf = c.buf[n:]
		if len(c.buf) == 0 {
			c.buf = nil // a director keeps thousands of connections: let the bytes go
		}
		return n, nil
	}
	return c.Conn.Read(p)
}

// DialOptions are the options an fx client needs to call the director or an
// aggregator as the keyring's party; see ClientDialOptions.
func DialOptions(k *Keyring, serverName string) []grpc.DialOption {
	return ClientDialOptions(k.ClientConfig, serverName)
}

// ClientDialOptions are the options an fx client needs, with its TLS client
// configuration from config: mutual TLS (the server's certificate checked
// for serverName, or for the dial target's host when serverName is empty),
// interceptors that turn a handshake refusal into an Unauthenticated status
// that says why, and flow control for bulk streams.
func ClientDialOptions(config func(serverName string) *tls.Config, serverName string) []grpc.DialOption {
	opts := append([]grpc.DialOption{
		grpc.WithTransportCredentials(&clientCreds{config: config, serverName: serverName}),
		grpc.WithChainUnaryInterceptor(UnaryClientInterceptor()),
		grpc.WithChainStreamInterceptor(StreamClientInterceptor()),
	}, bulkDialOptions()...)
	return append(opts, tracing.DialOptions()...)
}

// NewClient creates a gRPC client connection to target with DialOptions and
// then opts.
func NewClient(target string, k *Keyring, serverName string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	return grpc.NewClient(target, append(DialOptions(k, serverName), opts...)...)
}

// UnaryClientInterceptor explains handshake refusals of unary calls; see
// ExplainHandshakeError.
func UnaryClientInterceptor() grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		return ExplainHandshakeError(invoker(ctx, method, req, reply, cc, opts...))
	}
}

// StreamClientInterceptor explains handshake refusals when a stream is
// opened; see ExplainHandshakeError.
func StreamClientInterceptor() grpc.StreamClientInterceptor {
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		s, err := streamer(ctx, desc, cc, method, opts...)
		return s, ExplainHandshakeError(err)
	}
}

// handshakeRefusals maps the TLS alerts a server sends when it refuses a
// client certificate to what the user should know.
var handshakeRefusals = []struct{ alert, explain string }{
	{"tls: certificate required", "the server requires a client certificate and none was sent"},
	{"tls: unknown certificate authority", "the server does not trust the CA that issued this certificate: is it from another federation?"},
	{"tls: expired certificate", "the server says this certificate has expired: ask the federation's CA for a new one"},
	{"tls: revoked certificate", "the server says this certificate was revoked"},
	{"tls: bad certificate", "the server refused this certificate: it was revoked, carries no fx role, or was not issued by the federation's signing CA"},
	{"tls: unsupported certificate", "the server refused this certificate: it is not for client use"},
	{"tls: certificate unknown", "the server refused this certificate"},
}

// ExplainHandshakeError turns an Unavailable status caused by the server
// refusing this party's certificate in the TLS handshake into an
// Unauthenticated status naming the reason. With TLS 1.3 the client learns
// of the refusal only when it reads, so gRPC reports a transport failure
// that callers would otherwise retry forever. Other errors pass unchanged.
func ExplainHandshakeError(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.Unavailable {
		return err
	}
	msg := st.Message()
	for _, r := range handshakeRefusals {
		if strings.Contains(msg, "remote error: "+r.alert) {
			return status.Errorf(codes.Unauthenticated, "%s (the server answered %q during the TLS handshake; check the certificate with `fx pki show`)", r.explain, r.alert)
		}
	}
	return err
}
