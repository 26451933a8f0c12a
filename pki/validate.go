package pki

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"buf.build/gen/go/bufbuild/protovalidate/protocolbuffers/go/buf/validate"
	"buf.build/go/protovalidate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// Every fx request is checked against the limits its .proto declares (the
// buf.validate field rules) before a handler sees it, by the interceptors
// below, which ServerOptions installs after authorisation: one rule set next
// to the protocol, one place that enforces it, and no size checks by hand in
// handlers. A stream is checked message by message as the handler receives
// them, so an upload is refused at its first oversized message.

// validator is shared by every server of the process: it compiles each
// message type's rules once.
var validator = sync.OnceValues(func() (protovalidate.Validator, error) {
	return protovalidate.New()
})

// maxKeyInError bounds how much of a refused map key a message quotes: the
// key may be the oversized input itself.
const maxKeyInError = 40

// CheckRequest checks msg against its declared rules. It returns nil, or
// an INVALID_ARGUMENT status naming the message, the first field at fault
// and the rule it breaks ("invalid ReportFailureRequest: reason: must be at
// most 4096 bytes"). Validation stops at the first violation, so a hostile
// request costs no more than a valid one.
func CheckRequest(msg any) error {
	m, ok := msg.(proto.Message)
	if !ok {
		return nil
	}
	v, err := validator()
	if err != nil {
		return status.Errorf(codes.Internal, "the server cannot check requests: %v", err)
	}
	err = v.Validate(m, protovalidate.WithFailFast())
	if err == nil {
		return nil
	}
	name := string(m.ProtoReflect().Descriptor().Name())
	var verr *protovalidate.ValidationError
	if !errors.As(err, &verr) || len(verr.Violations) == 0 {
		return status.Errorf(codes.Internal, "the server cannot check %s: %v", name, err)
	}
	return status.Errorf(codes.InvalidArgument, "invalid %s: %s", name, describeViolation(verr.Violations[0].Proto))
}

// describeViolation writes "field.path: what is wrong", quoting at most
// maxKeyInError bytes of a map key.
func describeViolation(v *validate.Violation) string {
	var b strings.Builder
	for i, el := range v.GetField().GetElements() {
		if i > 0 {
			b.WriteByte('.')
		}
		b.WriteString(el.GetFieldName())
		switch el.WhichSubscript() {
		case validate.FieldPathElement_Index_case:
			fmt.Fprintf(&b, "[%d]", el.GetIndex())
		case validate.FieldPathElement_StringKey_case:
			fmt.Fprintf(&b, "[%s]", strconv.Quote(fxv1.Clip(el.GetStringKey(), maxKeyInError)))
		case validate.FieldPathElement_IntKey_case:
			fmt.Fprintf(&b, "[%d]", el.GetIntKey())
		case validate.FieldPathElement_UintKey_case:
			fmt.Fprintf(&b, "[%d]", el.GetUintKey())
		case validate.FieldPathElement_BoolKey_case:
			fmt.Fprintf(&b, "[%t]", el.GetBoolKey())
		}
	}
	if v.GetForKey() {
		b.WriteString(" (the key)")
	}
	msg := v.GetMessage()
	if msg == "" {
		msg = "breaks rule " + v.GetRuleId()
	}
	if b.Len() == 0 {
		return msg
	}
	return b.String() + ": " + msg
}

// validateUnary checks each unary request.
func validateUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := CheckRequest(req); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

// validateStream checks every message a stream's handler receives.
func validateStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return handler(srv, checkedStream{ss})
}

type checkedStream struct{ grpc.ServerStream }

func (s checkedStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	return CheckRequest(m)
}
