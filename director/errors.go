package director

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/experiment"
)

// Error classes. The director's logic wraps them (%w) with a message that
// names the problem; the service boundary maps the class to a gRPC code, so
// the logic never deals in status codes and the codes stay in one place.
var (
	ErrNotFound           = errors.New("not found")
	ErrAlreadyExists      = errors.New("already exists")
	ErrInvalidArgument    = errors.New("invalid argument")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrOutOfRange         = errors.New("out of range")
	ErrTooLarge           = errors.New("too large")
	// ErrBusy: the caller holds its share of a limited resource already;
	// it may try again once one is released.
	ErrBusy             = errors.New("busy")
	ErrPermissionDenied = errors.New("permission denied")
	ErrUnauthenticated  = errors.New("unauthenticated")
	// errUnavailable: the director is going away or dropped a stream; the
	// client should reconnect.
	errUnavailable = errors.New("unavailable")
)

// toStatus turns an error from the director's logic into a gRPC status
// error whose message is the error's own text.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	switch {
	case errors.Is(err, ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, ErrAlreadyExists):
		code = codes.AlreadyExists
	case errors.Is(err, ErrTooLarge), errors.Is(err, experiment.ErrTooLarge), errors.Is(err, ErrBusy):
		code = codes.ResourceExhausted
	case errors.Is(err, ErrInvalidArgument), errors.Is(err, experiment.ErrInvalidPlan),
		errors.Is(err, experiment.ErrInvalidName), errors.Is(err, experiment.ErrInvalidArchive):
		code = codes.InvalidArgument
	case errors.Is(err, ErrFailedPrecondition):
		code = codes.FailedPrecondition
	case errors.Is(err, ErrOutOfRange):
		code = codes.OutOfRange
	case errors.Is(err, ErrPermissionDenied):
		code = codes.PermissionDenied
	case errors.Is(err, errUnavailable):
		code = codes.Unavailable
	case errors.Is(err, ErrUnauthenticated):
		code = codes.Unauthenticated
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	}
	return status.Error(code, err.Error())
}
