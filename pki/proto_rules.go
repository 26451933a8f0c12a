package pki

import fxv1 "github.com/fx-fl/fx/proto/fx/v1"

// RulesFromProto turns a service's role table, generated from the
// allowed_roles annotations in the .proto files (fxv1.DirectorRoles,
// fxv1.AggregatorRoles), into Rules. The protocol is the one place that says
// who may call what; servers never write the table by hand.
func RulesFromProto(table map[string][]fxv1.Role) Rules {
	rules := make(Rules, len(table))
	for method, roles := range table {
		for _, r := range roles {
			rules[method] = append(rules[method], Role(r.Name()))
		}
	}
	return rules
}
