// Package directors dials the federation's director when there may be
// several of them, active and standby (docs/scaling.md): clients (envoys,
// the CLI, the Go client) take a comma-separated list of addresses, or one
// DNS name with a record per director, and their calls go to whichever
// director leads, following it when another takes over.
//
// The mechanism is gRPC's own: a resolver that yields every address (a
// static list through a manual resolver, or dns:///), the round_robin
// balancer over them, and client-side health checking, which keeps a
// subchannel out of the picker unless the director's health service says
// SERVING for fx.v1.Director. Only the leader says so; a standby says
// NOT_SERVING until it takes the lead, and the picker moves at once. With
// no leader (the moment of a failover) calls fail UNAVAILABLE at once, and
// callers retry with their backoff as after any outage. One plain
// host:port behaves as before: the same balancer over one address.
package directors

import (
	"fmt"
	"net"
	"strings"

	"google.golang.org/grpc"
	// Registers client-side health checking with gRPC.
	_ "google.golang.org/grpc/health"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// scheme names the static list's resolver in targets.
const scheme = "fx-directors"

// serviceConfig balances over every address and uses only the one whose
// health service says the Director service is SERVING: the leader.
var serviceConfig = fmt.Sprintf(`{"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": %q}}`, fxv1.Director_ServiceDesc.ServiceName)

// Split parses an address setting: one or more host:port separated by
// commas (spaces around them are ignored), or one gRPC target with a
// scheme (dns:///name:port). Its error names the bad part.
func Split(addresses string) ([]string, error) {
	var out []string
	for _, a := range strings.Split(addresses, ",") {
		a = strings.TrimSpace(a)
		if a == "" {
			return nil, fmt.Errorf("director address %q: an empty entry: give host:port, or several separated by commas", addresses)
		}
		out = append(out, a)
	}
	for _, a := range out {
		if strings.Contains(a, "://") || strings.HasPrefix(a, "dns:") {
			if len(out) > 1 {
				return nil, fmt.Errorf("director address %q: a target with a scheme (%s) stands alone: list host:port entries instead", addresses, a)
			}
			continue
		}
		if _, _, err := net.SplitHostPort(a); err != nil {
			return nil, fmt.Errorf("director address %q: %q is not host:port: %w", addresses, a, err)
		}
	}
	return out, nil
}

// Several reports whether addresses names more than one director.
func Several(addresses string) bool { return strings.Contains(addresses, ",") }

// Dial returns the gRPC target and the dial options that reach whichever
// of the directors addresses names leads (see the package doc). The TLS
// server name of each address is its host, unless the caller's
// credentials fix one.
func Dial(addresses string) (string, []grpc.DialOption, error) {
	addrs, err := Split(addresses)
	if err != nil {
		return "", nil, err
	}
	opts := []grpc.DialOption{grpc.WithDefaultServiceConfig(serviceConfig)}
	if len(addrs) == 1 {
		return addrs[0], opts, nil
	}
	r := manual.NewBuilderWithScheme(scheme)
	state := resolver.State{}
	for _, a := range addrs {
		host, _, _ := net.SplitHostPort(a)
		state.Addresses = append(state.Addresses, resolver.Address{Addr: a, ServerName: host})
	}
	r.InitialState(state)
	return scheme + ":///directors", append(opts, grpc.WithResolvers(r)), nil
}
