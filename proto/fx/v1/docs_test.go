package fxv1

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// docs/protocol.md lists who may call each RPC; the list must say what the
// allowed_roles annotations say, no more and no less.
func TestProtocolDocRolesTable(t *testing.T) {
	data, err := os.ReadFile("../../../docs/protocol.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(data)
	start := strings.Index(doc, "<!-- roles-table")
	end := strings.Index(doc, "<!-- end roles-table -->")
	if start < 0 || end < start {
		t.Fatal("docs/protocol.md has no roles table between its markers")
	}
	row := regexp.MustCompile("(?m)^\\| `(\\w+)/(\\w+)` \\| ([a-z, ]+) \\|$")
	documented := map[string][]string{}
	for _, m := range row.FindAllStringSubmatch(doc[start:end], -1) {
		documented["/fx.v1."+m[1]+"/"+m[2]] = strings.Split(m[3], ", ")
	}
	actual := map[string][]Role{}
	for k, v := range DirectorRoles() {
		actual[k] = v
	}
	for k, v := range AggregatorRoles() {
		actual[k] = v
	}
	for method, roles := range actual {
		var names []string
		for _, r := range roles {
			names = append(names, r.Name())
		}
		if got, ok := documented[method]; !ok {
			t.Errorf("%s is missing from docs/protocol.md", method)
		} else if !slices.Equal(got, names) {
			t.Errorf("docs/protocol.md says %s is for %v; the proto says %v", method, got, names)
		}
	}
	for method := range documented {
		if _, ok := actual[method]; !ok {
			t.Errorf("docs/protocol.md lists %s, which the protocol does not have", method)
		}
	}
}
