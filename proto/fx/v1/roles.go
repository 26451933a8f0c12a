package fxv1

import (
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
)

// Name is the role's name as it appears in a certificate's OU ("envoy").
func (r Role) Name() string {
	return strings.ToLower(strings.TrimPrefix(r.String(), "ROLE_"))
}

// ServiceRoles returns, for every method of the given services, the roles its
// allowed_roles annotations admit, keyed by full method name as gRPC
// interceptors see it ("/fx.v1.Director/RegisterEnvoy"). A method without an
// annotation is absent, and so open to no one.
func ServiceRoles(services ...protoreflect.ServiceDescriptor) map[string][]Role {
	table := make(map[string][]Role)
	for _, sd := range services {
		methods := sd.Methods()
		for i := range methods.Len() {
			md := methods.Get(i)
			opts, ok := md.Options().(*descriptorpb.MethodOptions)
			if !ok || opts == nil {
				continue
			}
			roles, _ := proto.GetExtension(opts, E_AllowedRoles).([]Role)
			if len(roles) == 0 {
				continue
			}
			table["/"+string(sd.FullName())+"/"+string(md.Name())] = roles
		}
	}
	return table
}

// DirectorRoles is the authorisation table of the Director service.
func DirectorRoles() map[string][]Role {
	return ServiceRoles(File_fx_v1_director_proto.Services().ByName("Director"))
}

// AggregatorRoles is the authorisation table of the Aggregator service.
func AggregatorRoles() map[string][]Role {
	return ServiceRoles(File_fx_v1_aggregator_proto.Services().ByName("Aggregator"))
}
