package director

import (
	"google.golang.org/grpc"

	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// Methods every authenticated party may call on the director: health checks
// and server reflection carry no federation data, and operators' tools
// (grpc_health_probe, grpcurl) need them with any valid certificate.
var openMethods = []string{
	"/grpc.health.v1.Health/Check",
	"/grpc.health.v1.Health/Watch",
	"/grpc.health.v1.Health/List",
	"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
	"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
}

// Rules is the director server's authorisation table: the protocol's
// allowed_roles annotations, plus health and reflection for anyone
// authenticated.
func Rules() pki.Rules {
	rules := pki.RulesFromProto(fxv1.DirectorRoles())
	for _, m := range openMethods {
		rules[m] = []pki.Role{pki.AnyRole}
	}
	return rules
}

// AggregatorRules is the authorisation table of the aggregators the
// director starts.
func AggregatorRules() pki.Rules { return pki.RulesFromProto(fxv1.AggregatorRoles()) }

// ServerOptions returns the gRPC server options of the director and of its
// aggregators from the director's keyring: mutual TLS with reloading and
// CRL checks, and the interceptors enforcing Rules and AggregatorRules.
func ServerOptions(k *pki.Keyring) (director, aggregators []grpc.ServerOption) {
	return pki.ServerOptions(k, Rules()), pki.ServerOptions(k, AggregatorRules())
}
