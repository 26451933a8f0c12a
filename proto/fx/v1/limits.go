package fxv1

import (
	"strings"
	"sync"
	"unicode/utf8"

	"buf.build/gen/go/bufbuild/protovalidate/protocolbuffers/go/buf/validate"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Limits that the protocol's rules (the buf.validate annotations in the
// .proto files, which servers enforce on every request) declare, read from
// those rules so that code which makes such values itself cannot drift from
// them. They are functions because the descriptors they read are built when
// the package initialises.
var (
	// MaxReasonBytes bounds every reason a request carries (a failure, a
	// rejection, a cancellation); the director also keeps no reason longer,
	// whoever wrote it.
	MaxReasonBytes = sync.OnceValue(func() int { return maxBytes(&ReportFailureRequest{}, "reason") })
	// MaxDescriptionBytes bounds a dataset shard's description.
	MaxDescriptionBytes = sync.OnceValue(func() int { return maxBytes(&DatasetShard{}, "description") })
)

// maxBytes is the max_bytes rule of a string field of m. It panics when
// the field or its rule is missing: a limit the code relies on is part of
// the protocol, and a test runs this at start-up.
func maxBytes(m proto.Message, field string) int {
	fd := m.ProtoReflect().Descriptor().Fields().ByName(protoreflect.Name(field))
	if fd == nil {
		panic("fxv1: no field " + field + " in " + string(m.ProtoReflect().Descriptor().FullName()))
	}
	rules, _ := proto.GetExtension(fd.Options(), validate.E_Field).(*validate.FieldRules)
	if !rules.GetString().HasMaxBytes() {
		panic("fxv1: " + string(fd.FullName()) + " has no max_bytes rule")
	}
	return int(rules.GetString().GetMaxBytes())
}

// ellipsis marks where Clip cut a string.
const ellipsis = "…"

// Clip returns s if it has at most limit bytes; otherwise its longest
// prefix of valid UTF-8 that, followed by "…", fits in limit bytes.
func Clip(s string, limit int) string {
	if len(s) <= limit {
		return s
	}
	if limit < len(ellipsis) {
		return ""
	}
	cut := limit - len(ellipsis)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return strings.ToValidUTF8(s[:cut], "") + ellipsis
}
