// Package tracing follows one experiment across the parties that run it:
// OpenTelemetry spans for its submission, its offer, each round, and in each
// round every collaborator's download, tasks and uploads, the aggregator's
// fold and checkpoint, linked into one trace. Off by default: with no OTLP
// endpoint configured the process's tracer records nothing and its gRPC
// servers and clients carry no tracing at all.
//
// The context of a span crosses process boundaries in W3C traceparent form:
// in gRPC metadata for the calls themselves (otelgrpc), and where a round's
// context must reach collaborators that did not start it, as the
// "fx-round-traceparent" header of the GetTasks answer.
package tracing

import (
	"context"
	"fmt"
	"sync/atomic"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// Config says where spans go.
type Config struct {
	// Endpoint is an OTLP/gRPC collector's host:port; empty: tracing off.
	Endpoint string `mapstructure:"endpoint"`
	// Insecure sends spans without TLS, to a collector on the same host
	// or network segment.
	Insecure bool `mapstructure:"insecure"`
}

var enabled atomic.Bool

// Enabled reports whether this process records spans.
func Enabled() bool { return enabled.Load() }

// Setup turns tracing on when cfg names an endpoint: spans of this process
// (service fx-<role>, at version) are batched to it. The returned function
// flushes and stops; call it before exiting.
func Setup(ctx context.Context, cfg Config, role, version string) (shutdown func(context.Context) error, err error) {
	if cfg.Endpoint == "" {
		return func(context.Context) error { return nil }, nil
	}
	opts := []otlptracegrpc.Option{otlptracegrpc.WithEndpoint(cfg.Endpoint)}
	if cfg.Insecure {
		opts = append(opts, otlptracegrpc.WithInsecure())
	}
	exp, err := otlptracegrpc.New(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("tracing.endpoint %q: %w", cfg.Endpoint, err)
	}
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp),
		sdktrace.WithResource(resource.NewSchemaless(
			attribute.String("service.name", "fx-"+role),
			attribute.String("service.version", version),
		)),
	)
	Install(tp)
	return tp.Shutdown, nil
}

// Install makes tp this process's tracer provider and turns tracing on
// (Setup's doing; tests install one with an in-memory exporter).
func Install(tp trace.TracerProvider) {
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.TraceContext{})
	enabled.Store(true)
}

// Tracer is fx's tracer.
func Tracer() trace.Tracer { return otel.Tracer("github.com/fx-fl/fx") }

// Start starts a span named name under ctx's span. When tracing is off it
// returns ctx and a span that records nothing, at no cost.
func Start(ctx context.Context, name string, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	if !Enabled() {
		return ctx, trace.SpanFromContext(context.Background())
	}
	return Tracer().Start(ctx, name, trace.WithAttributes(attrs...))
}

// ServerOptions trace every call a gRPC server serves, as a child of the
// caller's span; none when tracing is off.
func ServerOptions() []grpc.ServerOption {
	if !Enabled() {
		return nil
	}
	return []grpc.ServerOption{grpc.StatsHandler(otelgrpc.NewServerHandler())}
}

// DialOptions trace every call a gRPC client makes and send its span's
// context along; none when tracing is off.
func DialOptions() []grpc.DialOption {
	if !Enabled() {
		return nil
	}
	return []grpc.DialOption{grpc.WithStatsHandler(otelgrpc.NewClientHandler())}
}

// RoundHeader is the metadata key of a round span's context in the answer
// to GetTasks.
const RoundHeader = "fx-round-traceparent"

// Inject returns ctx's span context as a traceparent, "" if none.
func Inject(ctx context.Context) string {
	c := propagation.MapCarrier{}
	propagation.TraceContext{}.Inject(ctx, c)
	return c.Get("traceparent")
}

// Extract returns ctx with the remote span context of traceparent as its
// parent; ctx unchanged if traceparent is empty or malformed.
func Extract(ctx context.Context, traceparent string) context.Context {
	if traceparent == "" {
		return ctx
	}
	return propagation.TraceContext{}.Extract(ctx, propagation.MapCarrier{"traceparent": traceparent})
}

// FromHeader is Extract of the RoundHeader in md.
func FromHeader(ctx context.Context, md metadata.MD) context.Context {
	if v := md.Get(RoundHeader); len(v) > 0 {
		return Extract(ctx, v[0])
	}
	return ctx
}
