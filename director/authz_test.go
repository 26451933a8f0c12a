package director

import (
	"context"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// conn returns the raw connection of a party's client.
func (f *fed) conn(role pki.Role, name string) *grpc.ClientConn {
	f.client(role, name)
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.conns[len(f.conns)-1]
}

// TestAuthorization calls every Director RPC with every role, with an empty
// request, and checks that the roles the protocol does not allow are
// refused with PERMISSION_DENIED before the handler runs, and that the
// allowed ones get past the interceptor.
func TestAuthorization(t *testing.T) {
	f := newFed(t, nil)
	table := fxv1.DirectorRoles()
	sd := fxv1.File_fx_v1_director_proto.Services().ByName("Director")
	methods := sd.Methods()
	if methods.Len() != len(table) {
		t.Fatalf("%d methods but %d have roles: every RPC needs allowed_roles", methods.Len(), len(table))
	}
	roles := []fxv1.Role{fxv1.Role_ROLE_DIRECTOR, fxv1.Role_ROLE_ENVOY, fxv1.Role_ROLE_RESEARCHER, fxv1.Role_ROLE_ADMIN}
	conns := map[fxv1.Role]*grpc.ClientConn{}
	for _, r := range roles {
		// Fresh conns per role, so cached clients do not mix.
		conns[r] = f.conn(pki.Role(r.Name()), "who-"+r.Name())
	}
	for i := range methods.Len() {
		md := methods.Get(i)
		full := "/" + string(sd.FullName()) + "/" + string(md.Name())
		for _, r := range roles {
			allowed := slices.Contains(table[full], r)
			t.Run(string(md.Name())+"/"+r.Name(), func(t *testing.T) {
				ctx, cancel := context.WithTimeout(ctxT(t), waitTimeout)
				defer cancel()
				in := dynamicpb.NewMessage(md.Input())
				out := dynamicpb.NewMessage(md.Output())
				var err error
				if !md.IsStreamingClient() && !md.IsStreamingServer() {
					err = conns[r].Invoke(ctx, full, in, out)
				} else {
					var s grpc.ClientStream
					s, err = conns[r].NewStream(ctx, &grpc.StreamDesc{ServerStreams: md.IsStreamingServer(), ClientStreams: md.IsStreamingClient()}, full)
					if err == nil {
						if err = s.SendMsg(in); err == nil {
							if err = s.CloseSend(); err == nil {
								err = s.RecvMsg(out)
							}
						}
					}
				}
				got := code(err)
				switch {
				case !allowed && got != codes.PermissionDenied:
					t.Errorf("%s may not call %s, got %v", r.Name(), full, err)
				case allowed && (got == codes.PermissionDenied || got == codes.Unauthenticated):
					// An envoy naming "" is refused by RequireCaller,
					// after the interceptor let it through.
					if got == codes.PermissionDenied && r == fxv1.Role_ROLE_ENVOY && strings.Contains(err.Error(), "but the certificate is for") {
						return
					}
					t.Errorf("%s may call %s, got %v", r.Name(), full, err)
				}
			})
		}
	}
	// Health is open to any authenticated party.
	for _, r := range roles {
		resp, err := healthpb.NewHealthClient(conns[r]).Check(ctxT(t), &healthpb.HealthCheckRequest{})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health check as %s: %v %v", r.Name(), resp, err)
		}
	}
}
