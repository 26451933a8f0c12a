package fxv1

import (
	"strings"
	"testing"
	"unicode/utf8"

	"buf.build/gen/go/bufbuild/protovalidate/protocolbuffers/go/buf/validate"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Every string, bytes, repeated and map field that a request can carry, at
// any depth, declares a maximum: the servers' one validation interceptor
// enforces these rules, so a field without one would be unbounded input.
func TestEveryRequestFieldHasALimit(t *testing.T) {
	services := []protoreflect.ServiceDescriptor{
		File_fx_v1_director_proto.Services().ByName("Director"),
		File_fx_v1_aggregator_proto.Services().ByName("Aggregator"),
	}
	seen := map[protoreflect.FullName]bool{}
	var walk func(md protoreflect.MessageDescriptor)
	walk = func(md protoreflect.MessageDescriptor) {
		if seen[md.FullName()] || strings.HasPrefix(string(md.FullName()), "google.protobuf.") {
			return
		}
		seen[md.FullName()] = true
		fields := md.Fields()
		for i := range fields.Len() {
			fd := fields.Get(i)
			if why := missingLimit(fd); why != "" {
				t.Errorf("%s: %s", fd.FullName(), why)
			}
			switch {
			case fd.IsMap():
				if v := fd.MapValue(); v.Kind() == protoreflect.MessageKind {
					walk(v.Message())
				}
			case fd.Kind() == protoreflect.MessageKind:
				walk(fd.Message())
			}
		}
	}
	for _, sd := range services {
		for i := range sd.Methods().Len() {
			walk(sd.Methods().Get(i).Input())
		}
	}
	if len(seen) < 20 {
		t.Fatalf("walked only %d request messages; the walk is broken", len(seen))
	}
}

// missingLimit says which maximum a field lacks, or "".
func missingLimit(fd protoreflect.FieldDescriptor) string {
	rules, _ := proto.GetExtension(fd.Options(), validate.E_Field).(*validate.FieldRules)
	switch {
	case fd.IsMap():
		m := rules.GetMap()
		if !m.HasMaxPairs() {
			return "map without map.max_pairs"
		}
		if why := scalarLimit(fd.MapKey().Kind(), m.GetKeys()); why != "" {
			return "keys: " + why
		}
		return scalarLimit(fd.MapValue().Kind(), m.GetValues())
	case fd.IsList():
		r := rules.GetRepeated()
		if !r.HasMaxItems() {
			return "repeated field without repeated.max_items"
		}
		if why := scalarLimit(fd.Kind(), r.GetItems()); why != "" {
			return "items: " + why
		}
		return ""
	}
	return scalarLimit(fd.Kind(), rules)
}

func scalarLimit(k protoreflect.Kind, rules *validate.FieldRules) string {
	switch k {
	case protoreflect.StringKind:
		if !rules.GetString().HasMaxBytes() {
			return "string without string.max_bytes"
		}
	case protoreflect.BytesKind:
		if !rules.GetBytes().HasMaxLen() {
			return "bytes without bytes.max_len"
		}
	}
	return ""
}

func TestLimitsReadFromTheRules(t *testing.T) {
	if MaxReasonBytes() != 4096 || MaxDescriptionBytes() != 1024 {
		t.Fatalf("MaxReasonBytes %d, MaxDescriptionBytes %d: want 4096 and 1024 as the .proto declares", MaxReasonBytes(), MaxDescriptionBytes())
	}
}

func TestClip(t *testing.T) {
	for _, tc := range []struct {
		in    string
		limit int
		want  string
	}{
		{"short", 10, "short"},
		{"exactly10!", 10, "exactly10!"},
		{"abcdefghijk", 10, "abcdefg…"},
		{"ééééé", 7, "éé…"}, // never half a rune
		{"abc", 2, ""},
	} {
		got := Clip(tc.in, tc.limit)
		if got != tc.want || len(got) > tc.limit || !utf8.ValidString(got) {
			t.Errorf("Clip(%q, %d) = %q, want %q", tc.in, tc.limit, got, tc.want)
		}
	}
}
