package aggregator_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"buf.build/gen/go/bufbuild/protovalidate/protocolbuffers/go/buf/validate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/fx-fl/fx/internal/testpki"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/runner/exec"
)

// rawTensor is a tensor as the test puts it on the wire, by hand.
type rawTensor struct {
	name   string
	dtype  fxv1.DType
	shape  []int64
	values []float32
}

func f32bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

type upload struct {
	experiment   string
	collaborator string
	round        int32
	task         string
	samples      int64
	metrics      map[string]float64
	tensors      []rawTensor
}

// send performs one UploadResult call as the given client.
func send(ctx context.Context, conn *grpc.ClientConn, u upload) error {
	stream, err := fxv1.NewAggregatorClient(conn).UploadResult(ctx)
	if err != nil {
		return err
	}
	h := &fxv1.ResultHeader{ExperimentId: u.experiment, Collaborator: u.collaborator, Round: u.round, Task: u.task, SampleCount: u.samples, Metrics: u.metrics}
	msgs := []*fxv1.UploadResultRequest{{Part: &fxv1.UploadResultRequest_Header{Header: h}}}
	for _, t := range u.tensors {
		frame := func(f *fxv1.TensorFrame) *fxv1.UploadResultRequest {
			return &fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Frame{Frame: f}}
		}
		msgs = append(msgs, frame(&fxv1.TensorFrame{Frame: &fxv1.TensorFrame_Header{Header: &fxv1.TensorHeader{Name: t.name, Dtype: t.dtype, Shape: t.shape}}}))
		data := f32bytes(t.values)
		if t.dtype == fxv1.DType_DTYPE_F64 {
			data = make([]byte, 8*len(t.values))
		}
		if len(data) > 0 {
			msgs = append(msgs, frame(&fxv1.TensorFrame{Frame: &fxv1.TensorFrame_Data{Data: data}}))
		}
	}
	for _, m := range msgs {
		if err := stream.Send(m); err != nil {
			break // the server refused early; CloseAndRecv has the status
		}
	}
	_, err = stream.CloseAndRecv()
	return err
}

func goodTensors(step float32) []rawTensor {
	w := []float32{1, 2, 3, 4, 5, 6}
	for i := range w {
		w[i] += step
	}
	return []rawTensor{
		{"fc.weight", fxv1.DType_DTYPE_F32, []int64{2, 3}, w},
		{"fc.bias", fxv1.DType_DTYPE_F32, []int64{2}, []float32{step, step}},
	}
}

func dial(t *testing.T, f *federation, role pki.Role, name string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(f.addr, testpki.DialOptions(f.ca.Keyring(role, name), "localhost")...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// Every bad upload is refused with a status that says why, and the round's
// model is exactly what the good uploads alone give.
func TestBadUploadsAreRefusedAndChangeNothing(t *testing.T) {
	f := newFederation(t, parsePlan(t, `
name: test
rounds: 1
participants: {min: 2}
runner: {kind: builtin, model: mlp}
tasks: [train, locally_tuned_model_validation]
best_model: {task: locally_tuned_model_validation}
`), "alpha", "beta")
	f.start()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	alpha := dial(t, f, pki.RoleEnvoy, "alpha")
	beta := dial(t, f, pki.RoleEnvoy, "beta")
	mallory := dial(t, f, pki.RoleEnvoy, "mallory")
	researcher := dial(t, f, pki.RoleResearcher, "alice")

	good := upload{experiment: experimentID, collaborator: "alpha", round: 1, task: runner.TaskTrain, samples: 1, tensors: goodTensors(1)}
	with := func(change func(*upload)) upload {
		u := good
		u.tensors = goodTensors(1)
		change(&u)
		return u
	}
	nan := goodTensors(1)
	nan[1].values = []float32{0, float32(math.NaN())}
	inf := goodTensors(1)
	inf[0].values[5] = float32(math.Inf(1))

	tests := []struct {
		name string
		conn *grpc.ClientConn
		u    upload
		code codes.Code
		says string
	}{
		{"collaborator field names someone else", alpha, with(func(u *upload) { u.collaborator = "beta" }), codes.PermissionDenied, "beta"},
		{"envoy that is not a participant", mallory, with(func(u *upload) { u.collaborator = "mallory" }), codes.NotFound, "envoy mallory takes part in no experiment"},
		{"researcher certificate", researcher, with(func(u *upload) { u.collaborator = "alice" }), codes.PermissionDenied, "researcher"},
		{"another experiment", alpha, with(func(u *upload) { u.experiment = "exp-other" }), codes.NotFound, "exp-other"},
		{"a future round", alpha, with(func(u *upload) { u.round = 2 }), codes.FailedPrecondition, "round 2"},
		{"unknown task", alpha, with(func(u *upload) { u.task = "evaluate" }), codes.InvalidArgument, "unknown task"},
		{"task not in the plan", alpha, with(func(u *upload) { u.task = runner.TaskAggregatedValidation; u.tensors = nil }), codes.InvalidArgument, "not part of round"},
		{"tensors for a validation task", alpha, with(func(u *upload) { u.task = runner.TaskLocalValidation }), codes.InvalidArgument, "metrics only"},
		{"no samples", alpha, with(func(u *upload) { u.samples = 0 }), codes.InvalidArgument, "sample_count"},
		{"non-finite metric", alpha, with(func(u *upload) { u.metrics = map[string]float64{"loss": math.Inf(1)} }), codes.InvalidArgument, "loss"},
		{"metric name of 1,000,000 bytes", alpha, with(func(u *upload) { u.metrics = map[string]float64{strings.Repeat("m", 1_000_000): 1} }), codes.InvalidArgument, "header.metrics"},
		{"metric name with a control character", alpha, with(func(u *upload) { u.metrics = map[string]float64{"loss\x1b[2J": 1} }), codes.InvalidArgument, "control characters"},
		{"257 metrics", alpha, with(func(u *upload) { u.metrics = manyMetrics(257) }), codes.InvalidArgument, "at most 256"},
		{"unknown tensor", alpha, with(func(u *upload) { u.tensors[1].name = "fc.extra" }), codes.InvalidArgument, "fc.extra"},
		{"wrong shape", alpha, with(func(u *upload) { u.tensors[0].shape = []int64{3, 2} }), codes.InvalidArgument, "fc.weight"},
		{"wrong dtype", alpha, with(func(u *upload) { u.tensors[1].dtype = fxv1.DType_DTYPE_F64 }), codes.InvalidArgument, "fc.bias"},
		{"NaN in the last chunk", alpha, with(func(u *upload) { u.tensors = nan }), codes.InvalidArgument, "NaN"},
		{"Inf", alpha, with(func(u *upload) { u.tensors = inf }), codes.InvalidArgument, "Inf"},
		{"missing tensor", alpha, with(func(u *upload) { u.tensors = u.tensors[:1] }), codes.InvalidArgument, "fc.bias"},
		{"repeated tensor", alpha, with(func(u *upload) { u.tensors = append(u.tensors, u.tensors[0]) }), codes.InvalidArgument, "fc.weight"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := send(ctx, tc.conn, tc.u)
			if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.says) {
				t.Fatalf("got %v, want %v mentioning %q", err, tc.code, tc.says)
			}
		})
	}

	if err := send(ctx, alpha, good); err != nil {
		t.Fatalf("good upload: %v", err)
	}
	if err := send(ctx, alpha, good); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("second upload: %v, want AlreadyExists", err)
	}
	if err := send(ctx, beta, upload{experiment: experimentID, collaborator: "beta", round: 1, task: runner.TaskTrain, samples: 3, tensors: goodTensors(5)}); err != nil {
		t.Fatalf("beta's upload: %v", err)
	}
	for _, v := range []struct {
		conn *grpc.ClientConn
		name string
	}{{alpha, "alpha"}, {beta, "beta"}} {
		err := send(ctx, v.conn, upload{experiment: experimentID, collaborator: v.name, round: 1, task: runner.TaskLocalValidation, samples: 2, metrics: map[string]float64{"accuracy": 0.5}})
		if err != nil {
			t.Fatalf("%s's validation: %v", v.name, err)
		}
	}
	if err := f.wait(20 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	// (1·1 + 3·5) / 4 = 4: only the two good uploads count.
	if got := values(readModel(t, f.dir, 1), "fc.bias"); !equalFloats(got, []float32{4, 4}) {
		t.Fatalf("bias %v, want [4 4]", got)
	}
	// After the end, results are late.
	if err := send(ctx, beta, upload{experiment: experimentID, collaborator: "beta", round: 1, task: runner.TaskTrain, samples: 3, tensors: goodTensors(5)}); err == nil {
		t.Fatal("an upload after the end was accepted")
	}
}

func manyMetrics(n int) map[string]float64 {
	m := make(map[string]float64, n)
	for i := range n {
		m[fmt.Sprintf("metric-%d", i)] = 1
	}
	return m
}

// The aggregator enforces the runner protocol's limits on a result's
// metrics (declared on ResultHeader.metrics), so an envoy that skips its
// runner's checks cannot send more; the two must agree.
func TestMetricLimitsAreTheRunnerProtocols(t *testing.T) {
	fd := (&fxv1.ResultHeader{}).ProtoReflect().Descriptor().Fields().ByName("metrics")
	rules := proto.GetExtension(fd.Options(), validate.E_Field).(*validate.FieldRules).GetMap()
	if got := rules.GetMaxPairs(); got != exec.MaxMetrics {
		t.Errorf("ResultHeader.metrics allows %d metrics; the runner protocol %d", got, exec.MaxMetrics)
	}
	if got := rules.GetKeys().GetString().GetMaxBytes(); got != 128 {
		t.Errorf("ResultHeader.metrics allows names of %d bytes; the runner protocol 128", got)
	}
}
