package pki

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// newTestCA makes a CA in a fresh temporary directory.
func newTestCA(t *testing.T) *CA {
	t.Helper()
	ca, err := InitCA(filepath.Join(t.TempDir(), "ca"), InitOptions{Organization: "test federation"})
	if err != nil {
		t.Fatalf("InitCA: %v", err)
	}
	return ca
}

// issueFiles issues a certificate and writes it to a fresh directory.
func issueFiles(t *testing.T, ca *CA, req IssueRequest) (Files, *Issued) {
	t.Helper()
	iss, err := ca.Issue(req)
	if err != nil {
		t.Fatalf("Issue(%+v): %v", req, err)
	}
	files, err := iss.WriteFiles(t.TempDir())
	if err != nil {
		t.Fatalf("WriteFiles: %v", err)
	}
	return files, iss
}

const (
	methodCheck = "/grpc.health.v1.Health/Check"
	methodWatch = "/grpc.health.v1.Health/Watch"
	methodList  = "/grpc.health.v1.Health/List"
)

// testRules opens Check to envoys and admins and Watch to everyone; List is
// left out to show that unlisted methods are closed.
func testRules() Rules {
	return Rules{
		methodCheck: {RoleEnvoy, RoleAdmin},
		methodWatch: {AnyRole},
	}
}

// healthService is the tiny service under test: Check treats its service
// field as the name of the caller (as fx's RPCs name an envoy) and refuses a
// request that names someone else; every call that reaches a handler is
// counted, so a test can see that a refused call changed nothing.
type healthService struct {
	healthpb.UnimplementedHealthServer
	calls atomic.Int64
	mu    sync.Mutex
	last  Identity
}

func (h *healthService) Check(ctx context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	if err := RequireCaller(ctx, req.GetService()); err != nil {
		return nil, err
	}
	h.record(ctx)
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

func (h *healthService) Watch(req *healthpb.HealthCheckRequest, stream healthpb.Health_WatchServer) error {
	h.record(stream.Context())
	return stream.Send(&healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING})
}

func (h *healthService) record(ctx context.Context) {
	id, _ := IdentityFromContext(ctx)
	h.mu.Lock()
	h.last = id
	h.mu.Unlock()
	h.calls.Add(1)
}

func (h *healthService) lastIdentity() Identity {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.last
}

type testServer struct {
	addr    string
	keyring *Keyring
	authz   *Authorizer
	health  *healthService
}

// startServer serves the health service with files on 127.0.0.1, reloading
// the files on every handshake and call.
func startServer(t *testing.T, files Files, rules Rules) *testServer {
	t.Helper()
	k, err := NewKeyring(KeyringConfig{Files: files, CheckInterval: -1})
	if err != nil {
		t.Fatalf("NewKeyring(server): %v", err)
	}
	a := NewAuthorizer(rules, k)
	srv := grpc.NewServer(serverOptions(k, a)...) // the production server, with a handle on its Authorizer
	h := &healthService{}
	healthpb.RegisterHealthServer(srv, h)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return &testServer{addr: lis.Addr().String(), keyring: k, authz: a, health: h}
}

// dial connects with a Keyring for files through DialOptions.
func dial(t *testing.T, addr string, files Files) *grpc.ClientConn {
	t.Helper()
	k, err := NewKeyring(KeyringConfig{Files: files, CheckInterval: -1})
	if err != nil {
		t.Fatalf("NewKeyring(client): %v", err)
	}
	conn, err := NewClient(addr, k, "")
	if err != nil {
		t.Fatalf("NewClient: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// dialRaw connects with a hand-made TLS configuration, for clients a Keyring
// would refuse to load (no certificate, an expired one), through
// ClientDialOptions.
func dialRaw(t *testing.T, addr string, roots *x509.CertPool, cert *tls.Certificate) *grpc.ClientConn {
	t.Helper()
	config := func(name string) *tls.Config {
		cfg := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: roots, ServerName: name}
		if cert != nil {
			cfg.Certificates = []tls.Certificate{*cert}
		}
		return cfg
	}
	conn, err := grpc.NewClient(addr, ClientDialOptions(config, "")...)
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func check(ctx context.Context, conn *grpc.ClientConn, name string, opts ...grpc.CallOption) error {
	_, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: name}, opts...)
	return err
}

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}
