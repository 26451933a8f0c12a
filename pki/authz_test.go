package pki

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestRulesValidate(t *testing.T) {
	if err := testRules().Validate(); err != nil {
		t.Fatalf("valid rules: %v", err)
	}
	for _, bad := range []Rules{
		{"Check": {RoleEnvoy}},
		{"/grpc.health.v1.Health/": {RoleEnvoy}},
		{"/grpc.health.v1.Health/Check": {"owner"}},
	} {
		if err := bad.Validate(); err == nil {
			t.Errorf("Validate(%v) accepted", bad)
		}
	}
}

func TestAuthorizeWithoutPeer(t *testing.T) {
	_, err := NewAuthorizer(testRules(), nil).Authorize(context.Background(), methodCheck)
	if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "no client certificate") {
		t.Fatalf("Authorize without a peer: %v", err)
	}
}

func TestRequireCaller(t *testing.T) {
	ctx := ContextWithIdentity(context.Background(), Identity{Name: "site-1", Role: RoleEnvoy})
	if err := RequireCaller(ctx, "site-1"); err != nil {
		t.Fatalf("RequireCaller(own name): %v", err)
	}
	err := RequireCaller(ctx, "site-2")
	if status.Code(err) != codes.PermissionDenied || status.Convert(err).Message() != "request names envoy site-2 but the certificate is for site-1" {
		t.Fatalf("RequireCaller(other name): %v", err)
	}
	if err := RequireCaller(context.Background(), "site-1"); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("RequireCaller without identity: %v", err)
	}
}

func TestExplainHandshakeErrorLeavesOtherErrors(t *testing.T) {
	for _, err := range []error{
		nil,
		status.Error(codes.Unavailable, "connection refused"),
		status.Error(codes.PermissionDenied, "remote error: tls: bad certificate"),
	} {
		if got := ExplainHandshakeError(err); got != err {
			t.Errorf("ExplainHandshakeError(%v) = %v, want it unchanged", err, got)
		}
	}
}
