package pki

import (
	"context"
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/fx-fl/fx/internal/tracing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Rules says which roles may call each RPC, keyed by full method name
// ("/fx.v1.Director/RegisterEnvoy"). A method that is not in the table is
// refused to everyone, so a new RPC is closed until someone decides who may
// call it. A rule that lists AnyRole admits every authenticated party.
//
// The table for fx's own services is generated from the .proto files; pki
// only enforces it.
type Rules map[string][]Role

// Validate checks that every key is a full method name and every role a
// certificate role or AnyRole, so that a typo in a table is found when the
// server starts rather than when someone is refused.
func (r Rules) Validate() error {
	for method, roles := range r {
		if !strings.HasPrefix(method, "/") || strings.Count(method, "/") != 2 || strings.HasSuffix(method, "/") {
			return fmt.Errorf("rule key %q is not a full method name like /fx.v1.Director/RegisterEnvoy", method)
		}
		for _, role := range roles {
			if role != AnyRole && !role.Valid() {
				return fmt.Errorf("rule for %s names role %q: use one of %s or pki.AnyRole", method, role, roleList(Roles()))
			}
		}
	}
	return nil
}

// allows returns the rule for method and whether role may call it.
func (r Rules) allows(method string, role Role) (roles []Role, listed, allowed bool) {
	roles, listed = r[method]
	if !listed {
		return nil, false, false
	}
	return roles, true, slices.Contains(roles, AnyRole) || slices.Contains(roles, role)
}

// RevocationChecker tells whether a certificate of a verified chain (leaf
// first) has been revoked. *Keyring implements it with its current CRL.
type RevocationChecker interface {
	Revocation(chain []*x509.Certificate) (revokedAt time.Time, revoked bool)
}

// Authorizer authenticates and authorises every call from the peer's
// verified certificate. Besides what the handshake checked, it refuses
// certificates that expired or were revoked since the connection opened:
// gRPC connections live for days, and a revocation must take effect on the
// next call, not the next connection.
type Authorizer struct {
	rules      Rules
	revocation RevocationChecker
	now        func() time.Time
}

// NewAuthorizer enforces rules; revocation may be nil when there is no CRL.
func NewAuthorizer(rules Rules, revocation RevocationChecker) *Authorizer {
	return &Authorizer{rules: rules, revocation: revocation, now: time.Now}
}

// ServerOptions are the options an fx gRPC server needs: TLS credentials from
// the keyring, the interceptors enforcing rules with the keyring's CRL, and
// then the one checking every request against the limits its .proto
// declares (CheckRequest).
func ServerOptions(k *Keyring, rules Rules) []grpc.ServerOption {
	return serverOptions(k, NewAuthorizer(rules, k))
}

// serverOptions are ServerOptions with a given Authorizer.
func serverOptions(k *Keyring, a *Authorizer) []grpc.ServerOption {
	opts := append([]grpc.ServerOption{
		grpc.Creds(limitHandshakes(coalescingCreds{credentials.NewTLS(k.ServerConfig())}, defaultHandshakeLimits())),
		grpc.ChainUnaryInterceptor(a.UnaryServerInterceptor(), validateUnary),
		grpc.ChainStreamInterceptor(a.StreamServerInterceptor(), validateStream),
	}, bulkServerOptions()...)
	return append(opts, tracing.ServerOptions()...)
}

// Flow control for bulk streams. fx moves models and archives as streams of
// 1 MiB frames; with gRPC's default 64 KiB starting window, grown only by
// probing, a receiver that checks each frame before reading the next stalls
// its sender. Fixed windows of a few frames keep the pipe full while bounding
// what one stream can buffer (streamWindow per stream, connWindow per
// connection).
const (
	streamWindow = 2 << 20
	connWindow   = 16 << 20
	ioBuffer     = 256 << 10
)

func bulkServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.InitialWindowSize(streamWindow),
		grpc.InitialConnWindowSize(connWindow),
		grpc.ReadBufferSize(ioBuffer),
		grpc.WriteBufferSize(ioBuffer),
	}
}

func bulkDialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithInitialWindowSize(streamWindow),
		grpc.WithInitialConnWindowSize(connWindow),
		grpc.WithReadBufferSize(ioBuffer),
		grpc.WithWriteBufferSize(ioBuffer),
	}
}

// UnaryServerInterceptor authorises each unary call and passes the caller's
// Identity to the handler in its context.
func (a *Authorizer) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		ctx, err := a.Authorize(ctx, info.FullMethod)
		if err != nil {
			return nil, err
		}
		return handler(ctx, req)
	}
}

// StreamServerInterceptor authorises each stream and passes the caller's
// Identity to the handler in the stream's context.
func (a *Authorizer) StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		ctx, err := a.Authorize(ss.Context(), info.FullMethod)
		if err != nil {
			return err
		}
		return handler(srv, &identityStream{ServerStream: ss, ctx: ctx})
	}
}

type identityStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *identityStream) Context() context.Context { return s.ctx }

// Authorize checks the caller of fullMethod and returns ctx with its
// Identity. The error is a gRPC status: Unauthenticated when the caller has
// no valid, current, unrevoked fx certificate (the message says which),
// PermissionDenied when its role may not call the method.
func (a *Authorizer) Authorize(ctx context.Context, fullMethod string) (context.Context, error) {
	chain, err := verifiedChain(ctx)
	if err != nil {
		return nil, err
	}
	leaf := chain[0]
	id, err := IdentityFromCertificate(leaf)
	if err != nil {
		return nil, status.Errorf(codes.Unauthenticated, "invalid client certificate: %v", err)
	}
	now := a.now()
	for _, c := range chain {
		if now.After(c.NotAfter) {
			if c == leaf {
				return nil, status.Errorf(codes.Unauthenticated, "certificate for %s expired at %s: ask the federation's CA for a new one", id, c.NotAfter.Format(time.RFC3339))
			}
			return nil, status.Errorf(codes.Unauthenticated, "certificate for %s was issued by %q, which expired at %s", id, c.Subject.CommonName, c.NotAfter.Format(time.RFC3339))
		}
		if now.Before(c.NotBefore) {
			return nil, status.Errorf(codes.Unauthenticated, "certificate for %s is not valid before %s (check the clocks)", id, c.NotBefore.Format(time.RFC3339))
		}
	}
	if a.revocation != nil {
		if at, revoked := a.revocation.Revocation(chain); revoked {
			return nil, status.Errorf(codes.Unauthenticated, "certificate for %s was revoked at %s", id, at.Format(time.RFC3339))
		}
	}
	roles, listed, allowed := a.rules.allows(fullMethod, id.Role)
	if !listed {
		return nil, status.Errorf(codes.PermissionDenied, "method %s is not open to any role", fullMethod)
	}
	if !allowed {
		return nil, status.Errorf(codes.PermissionDenied, "certificate role %s may not call %s (allowed: %s)", id.Role, shortMethod(fullMethod), allowedList(roles))
	}
	return ContextWithIdentity(ctx, id), nil
}

// verifiedChain returns the peer's verified certificate chain, leaf first,
// or an Unauthenticated status saying what is missing.
func verifiedChain(ctx context.Context) ([]*x509.Certificate, error) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.AuthInfo == nil {
		return nil, status.Error(codes.Unauthenticated, "no client certificate: the connection is not mutual TLS, and fx knows callers only by their certificate")
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return nil, status.Errorf(codes.Unauthenticated, "no client certificate: the connection uses %s, not mutual TLS", p.AuthInfo.AuthType())
	}
	if len(info.State.PeerCertificates) == 0 {
		return nil, status.Error(codes.Unauthenticated, "no client certificate: connect with the certificate the federation's CA issued you")
	}
	if len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
		return nil, status.Error(codes.Unauthenticated, "invalid client certificate: it was not verified against the federation root")
	}
	return info.State.VerifiedChains[0], nil
}

func shortMethod(full string) string {
	if i := strings.LastIndex(full, "/"); i >= 0 {
		return full[i+1:]
	}
	return full
}

func allowedList(roles []Role) string {
	if len(roles) == 0 {
		return "no role"
	}
	return roleList(roles)
}

// RequireCaller checks that a request field naming a party (an envoy or
// collaborator name) names the caller itself. Identity comes only from the
// certificate: a caller that names someone else is refused with
// PermissionDenied, one without an identity in ctx with Unauthenticated.
func RequireCaller(ctx context.Context, name string) error {
	id, ok := IdentityFromContext(ctx)
	if !ok {
		return status.Error(codes.Unauthenticated, "no caller identity: the call did not pass through the pki interceptors")
	}
	if name != id.Name {
		named := name
		if named == "" {
			named = `""`
		}
		return status.Errorf(codes.PermissionDenied, "request names %s %s but the certificate is for %s", id.Role, named, id.Name)
	}
	return nil
}
