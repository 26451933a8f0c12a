package fxv1

import (
	"slices"
	"testing"

	"google.golang.org/protobuf/reflect/protoreflect"
)

// Every RPC must name who may call it; a missing annotation would lock
// everyone out of it, which is safe but surely a mistake.
func TestEveryMethodHasRoles(t *testing.T) {
	for _, sd := range []protoreflect.ServiceDescriptor{
		File_fx_v1_director_proto.Services().ByName("Director"),
		File_fx_v1_aggregator_proto.Services().ByName("Aggregator"),
	} {
		table := ServiceRoles(sd)
		methods := sd.Methods()
		for i := range methods.Len() {
			name := "/" + string(sd.FullName()) + "/" + string(methods.Get(i).Name())
			if len(table[name]) == 0 {
				t.Errorf("%s has no allowed_roles annotation", name)
			}
		}
	}
}

func TestRoleTable(t *testing.T) {
	director := DirectorRoles()
	tests := []struct {
		method string
		want   []Role
	}{
		{"/fx.v1.Director/RegisterEnvoy", []Role{Role_ROLE_ENVOY}},
		{"/fx.v1.Director/SubmitExperiment", []Role{Role_ROLE_RESEARCHER}},
		{"/fx.v1.Director/GetExperiment", []Role{Role_ROLE_RESEARCHER, Role_ROLE_ADMIN}},
		{"/fx.v1.Director/ApproveExperiment", []Role{Role_ROLE_ADMIN}},
	}
	for _, tc := range tests {
		if got := director[tc.method]; !slices.Equal(got, tc.want) {
			t.Errorf("%s: roles %v, want %v", tc.method, got, tc.want)
		}
	}
	if got := AggregatorRoles()["/fx.v1.Aggregator/UploadResult"]; !slices.Equal(got, []Role{Role_ROLE_ENVOY}) {
		t.Errorf("UploadResult roles %v", got)
	}
	if Role_ROLE_RESEARCHER.Name() != "researcher" {
		t.Errorf("Name() = %q", Role_ROLE_RESEARCHER.Name())
	}
}
