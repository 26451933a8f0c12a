package directors

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

func TestSplit(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
		err  string
	}{
		{in: "a:1", want: []string{"a:1"}},
		{in: "a:1, b:2 ,c:3", want: []string{"a:1", "b:2", "c:3"}},
		{in: "dns:///director.example:7000", want: []string{"dns:///director.example:7000"}},
		{in: "a:1,,b:2", err: "an empty entry"},
		{in: "a:1,b", err: `"b" is not host:port`},
		{in: "a:1,dns:///b:2", err: "stands alone"},
	} {
		got, err := Split(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("Split(%q) = %v, %v; want an error with %q", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || strings.Join(got, " ") != strings.Join(tc.want, " ") {
			t.Errorf("Split(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
}

// director is a server with a health service only, which also says
// SERVING for its own name, so a call can tell which server answered.
type director struct {
	name string
	hs   *health.Server
	addr string
}

func startDirector(t *testing.T, name string, leading bool) *director {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	d := &director{name: name, hs: health.NewServer(), addr: lis.Addr().String()}
	healthpb.RegisterHealthServer(srv, d.hs)
	d.hs.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	d.lead(leading)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return d
}

func (d *director) lead(leading bool) {
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if leading {
		st = healthpb.HealthCheckResponse_SERVING
	}
	d.hs.SetServingStatus(fxv1.Director_ServiceDesc.ServiceName, st)
}

// TestCallsFollowTheLeader: with two directors' addresses, every call goes
// to the one that leads, and after a takeover to the new leader.
func TestCallsFollowTheLeader(t *testing.T) {
	a := startDirector(t, "a", true)
	b := startDirector(t, "b", false)
	target, opts, err := Dial(a.addr + "," + b.addr)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(target, append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// answeredBy calls until one call succeeds (none may while no leader
	// is picked yet), then makes n more, each of which must reach leader.
	answeredBy := func(leader *director, n int) {
		t.Helper()
		for {
			_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: leader.name}, grpc.WaitForReady(true))
			if err == nil {
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("no call reached %s: %v", leader.name, err)
			}
		}
		for range n {
			if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: leader.name}, grpc.WaitForReady(true)); err != nil {
				t.Fatalf("a call reached a standby, not %s: %v", leader.name, err)
			}
		}
	}
	answeredBy(a, 20)
	// The leader steps down: calls fail fast while none leads...
	a.lead(false)
	for {
		_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: a.name})
		if status.Code(err) == codes.Unavailable {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("calls still reach a director that stepped down: %v", err)
		}
	}
	// ... and go to the new one once it leads.
	b.lead(true)
	answeredBy(b, 20)
}
