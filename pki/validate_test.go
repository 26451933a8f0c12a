package pki

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// Every request type's rules compile, and an empty request breaks none of
// them: a bad rule in a .proto (a pattern that does not parse) would
// otherwise refuse every call of its RPC as INTERNAL.
func TestEveryRequestTypeValidates(t *testing.T) {
	for _, sd := range []protoreflect.ServiceDescriptor{
		fxv1.File_fx_v1_director_proto.Services().ByName("Director"),
		fxv1.File_fx_v1_aggregator_proto.Services().ByName("Aggregator"),
	} {
		for i := range sd.Methods().Len() {
			in := sd.Methods().Get(i).Input()
			mt, err := protoregistry.GlobalTypes.FindMessageByName(in.FullName())
			if err != nil {
				t.Fatal(err)
			}
			if err := CheckRequest(mt.New().Interface()); err != nil {
				t.Errorf("empty %s: %v", in.Name(), err)
			}
		}
	}
}

func TestCheckRequest(t *testing.T) {
	metrics := func(n int) map[string]float64 {
		m := map[string]float64{}
		for i := range n {
			m[strings.Repeat("m", 1+i%100)+string(rune('a'+i/100))] = 1
		}
		return m
	}
	for _, tc := range []struct {
		name string
		req  any
		want []string // in the message; nil: accepted
	}{
		{"reason of 4096 bytes", &fxv1.ReportFailureRequest{Reason: strings.Repeat("x", 4096)}, nil},
		{"reason of 4 MiB", &fxv1.ReportFailureRequest{Reason: strings.Repeat("x", 4<<20)}, []string{"invalid ReportFailureRequest", "reason", "at most 4096 bytes"}},
		{"envoy description of 4 MiB", &fxv1.RegisterEnvoyRequest{Shard: &fxv1.DatasetShard{Description: strings.Repeat("d", 4<<20)}}, []string{"shard.description", "at most 1024 bytes"}},
		{"one tag too long", &fxv1.ListEnvoysRequest{Tags: []string{"ok", strings.Repeat("t", 65)}}, []string{"tags[1]", "at most 64 bytes"}},
		{"page size over 1000", &fxv1.ListExperimentsRequest{PageSize: 1001}, []string{"page_size", "1000"}},
		{"256 metrics", &fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Header{Header: &fxv1.ResultHeader{Metrics: metrics(256)}}}, nil},
		{"257 metrics", &fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Header{Header: &fxv1.ResultHeader{Metrics: metrics(257)}}}, []string{"header.metrics", "at most 256"}},
		{"metric name of 1,000,000 bytes", &fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Header{Header: &fxv1.ResultHeader{
			Metrics: map[string]float64{strings.Repeat("n", 1_000_000): 1}}}}, []string{"header.metrics", "(the key)", "at most 128 bytes"}},
		{"metric name with a newline", &fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Header{Header: &fxv1.ResultHeader{
			Metrics: map[string]float64{"loss\nfake": 1}}}}, []string{"header.metrics[\"loss\\nfake\"] (the key): a metric name must not hold control characters"}},
		{"metric names in any script", &fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Header{Header: &fxv1.ResultHeader{
			Metrics: map[string]float64{"précision/top-1 (%)": 1, "損失": 2}}}}, nil},
		{"metric name with U+FFFD", &fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Header{Header: &fxv1.ResultHeader{
			Metrics: map[string]float64{"loss\ufffd": 1}}}}, []string{"must not hold control characters or U+FFFD"}},
		{"metric name with DEL", &fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Header{Header: &fxv1.ResultHeader{
			Metrics: map[string]float64{"loss\x7f": 1}}}}, []string{"must not hold control characters"}},
		{"empty metric name", &fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Header{Header: &fxv1.ResultHeader{
			Metrics: map[string]float64{"": 1}}}}, []string{"header.metrics", "at least 1 bytes"}},
		{"chunk over 1 MiB", &fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: make([]byte, 1<<20+1)}}, []string{"chunk", "1048576"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckRequest(tc.req)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			wantStatus(t, err, codes.InvalidArgument, tc.want...)
			if len(err.Error()) > 300 {
				t.Fatalf("the refusal is %d bytes long; it must not quote the input: %.300s", len(err.Error()), err)
			}
		})
	}
}

// aggregatorStub counts the calls that reach its handlers.
type aggregatorStub struct {
	fxv1.UnimplementedAggregatorServer
	calls  atomic.Int64
	frames atomic.Int64
}

func (a *aggregatorStub) GetTasks(context.Context, *fxv1.GetTasksRequest) (*fxv1.GetTasksResponse, error) {
	a.calls.Add(1)
	return &fxv1.GetTasksResponse{Action: fxv1.GetTasksResponse_WAIT}, nil
}

func (a *aggregatorStub) UploadResult(stream fxv1.Aggregator_UploadResultServer) error {
	a.calls.Add(1)
	for {
		_, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(&fxv1.UploadResultResponse{})
		}
		if err != nil {
			return err
		}
		a.frames.Add(1)
	}
}

// The interceptor is part of every fx server's options: an oversized unary
// request never reaches its handler, and a stream is cut at its first
// oversized message, after the good ones before it were delivered.
func TestServerOptionsCheckRequests(t *testing.T) {
	ca := newTestCA(t)
	srvFiles, _ := issueFiles(t, ca, IssueRequest{Role: RoleDirector, Name: "director.test", Hosts: []string{"localhost", "127.0.0.1"}})
	k, err := NewKeyring(KeyringConfig{Files: srvFiles, CheckInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(ServerOptions(k, RulesFromProto(fxv1.AggregatorRoles()))...)
	stub := &aggregatorStub{}
	fxv1.RegisterAggregatorServer(srv, stub)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	envoy, _ := issueFiles(t, ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	c := fxv1.NewAggregatorClient(dial(t, lis.Addr().String(), envoy))
	ctx := testContext(t)

	if _, err := c.GetTasks(ctx, &fxv1.GetTasksRequest{Collaborator: "site-1", ExperimentId: "x"}); err != nil {
		t.Fatalf("a valid GetTasks: %v", err)
	}
	_, err = c.GetTasks(ctx, &fxv1.GetTasksRequest{Collaborator: strings.Repeat("s", 65)})
	wantStatus(t, err, codes.InvalidArgument, "invalid GetTasksRequest: collaborator: must be at most 64 bytes")
	if n := stub.calls.Load(); n != 1 {
		t.Fatalf("%d calls reached the handler, want only the valid one", n)
	}

	stream, err := c.UploadResult(ctx)
	if err != nil {
		t.Fatal(err)
	}
	good := &fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Frame{Frame: &fxv1.TensorFrame{Frame: &fxv1.TensorFrame_Data{Data: make([]byte, 1<<20)}}}}
	bad := &fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Header{Header: &fxv1.ResultHeader{Metrics: map[string]float64{strings.Repeat("n", 1_000_000): 1}}}}
	for _, m := range []*fxv1.UploadResultRequest{good, good, bad, good} {
		if err := stream.Send(m); err != nil {
			break // the server ended the stream
		}
	}
	_, err = stream.CloseAndRecv()
	wantStatus(t, err, codes.InvalidArgument, "invalid UploadResultRequest: header.metrics", "at most 128 bytes")
	if n := stub.frames.Load(); n != 2 {
		t.Fatalf("the handler received %d messages, want the 2 before the oversized one", n)
	}
}
