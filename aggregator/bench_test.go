package aggregator_test

// Benchmarks of the aggregator, each reported against a baseline measured in
// the same run (go test -run '^$' -bench . -benchtime 15x ./aggregator):
//
//   - BenchmarkFold, BenchmarkFoldScaling (fold_bench_test.go): folding a
//     round's updates on the aggregator's path, against the single-pass
//     kernel out += w·x in the same run (goal ≥ 0.8), and the log-log
//     slope of its cost from 1M to 100M parameters (goal ≤ 1.1).
//   - BenchmarkTransfer: model download and upload over mTLS as a ratio of a
//     raw gRPC byte stream of the same size over the same mTLS (goal ≥ 0.85),
//     the median of per-iteration ratios.
//   - BenchmarkUploadMemory: peak aggregator memory while 8 collaborators, in
//     a child process, upload a 256 MiB model at once (goal ≤ 2 × model +
//     64 MiB), next to the raw size of the bytes received.
//   - BenchmarkRoundOverhead: rounds with a runner that does nothing, 10
//     collaborators, 1M parameters: p50 and p99 per round (goal p50 < 50 ms),
//     and p50 as a ratio of, and in ms beyond, moving the same bytes (10
//     downloads and 10 uploads of the model at once) over raw gRPC.

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/testpki"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

const mib = 1 << 20

// benchModel is a model of n float32 parameters in tensors of at most 16M
// elements.
func benchModel(n int64) tensor.Model {
	var m tensor.Model
	for i := 0; n > 0; i++ {
		size := min(n, 16<<20)
		t := tensor.New(fmt.Sprintf("layer%03d.weight", i), tensor.F32, []int64{size})
		v := t.Float32s()
		for j := range v {
			v[j] = float32(j%1000) * 1e-3
		}
		m = append(m, t)
		n -= size
	}
	return m
}

// benchPlan's best model is scored by the first validation task it lists.
func benchPlan(tb testing.TB, rounds int, tasks string) *experiment.Plan {
	tb.Helper()
	best := runner.TaskLocalValidation
	if strings.Contains(tasks, runner.TaskAggregatedValidation) {
		best = runner.TaskAggregatedValidation
	}
	p, err := experiment.ParsePlan(fmt.Appendf(nil, `
name: bench
rounds: %d
participants: {min: 1}
runner: {kind: builtin, model: mlp}
stragglers: {deadline: 10m, min_reporting: 1}
tasks: %s
best_model: {task: %s}
`, rounds, tasks, best))
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

func names(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("envoy%02d", i)
	}
	return out
}

// rawServer is the baseline: a Director service that only moves bytes.
type rawServer struct {
	fxv1.UnimplementedDirectorServer
	data []byte
}

func (s *rawServer) DownloadArchive(_ *fxv1.DownloadArchiveRequest, stream fxv1.Director_DownloadArchiveServer) error {
	for off := 0; off < len(s.data); off += tensor.MaxChunk {
		end := min(off+tensor.MaxChunk, len(s.data))
		if err := stream.Send(&fxv1.ArchiveChunk{Offset: int64(off), Data: s.data[off:end]}); err != nil {
			return err
		}
	}
	return nil
}

func (s *rawServer) SubmitExperiment(stream fxv1.Director_SubmitExperimentServer) error {
	for {
		if _, err := stream.Recv(); err == io.EOF {
			return stream.SendAndClose(&fxv1.SubmitExperimentResponse{})
		} else if err != nil {
			return err
		}
	}
}

// rawPeer serves rawServer over the same mTLS as the aggregator.
func rawPeer(tb testing.TB, ca *testpki.CA, size int64, client *pki.Keyring) *grpc.ClientConn {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	// The same TLS and interceptors as fx, with both methods open to envoys.
	rules := map[string][]fxv1.Role{
		"/fx.v1.Director/DownloadArchive":  {fxv1.Role_ROLE_ENVOY},
		"/fx.v1.Director/SubmitExperiment": {fxv1.Role_ROLE_ENVOY},
	}
	srv := grpc.NewServer(testpki.ServerOptions(ca.Keyring(pki.RoleDirector, "director"), rules)...)
	fxv1.RegisterDirectorServer(srv, &rawServer{data: make([]byte, size)})
	go srv.Serve(lis)
	tb.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), testpki.DialOptions(client, "localhost")...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close() })
	return conn
}

// ready connects conn and waits until it can carry calls.
func ready(tb testing.TB, conn *grpc.ClientConn) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn.Connect()
	for s := conn.GetState(); s != connectivity.Ready; s = conn.GetState() {
		if !conn.WaitForStateChange(ctx, s) {
			tb.Fatalf("connection to %s never became ready (last state %v)", conn.Target(), s)
		}
	}
}

func rawDownload(ctx context.Context, conn *grpc.ClientConn) error {
	s, err := fxv1.NewDirectorClient(conn).DownloadArchive(ctx, &fxv1.DownloadArchiveRequest{})
	if err != nil {
		return err
	}
	for {
		if _, err := s.Recv(); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
	}
}

func rawUpload(ctx context.Context, conn *grpc.ClientConn, size int64) error {
	s, err := fxv1.NewDirectorClient(conn).SubmitExperiment(ctx)
	if err != nil {
		return err
	}
	chunk := make([]byte, tensor.MaxChunk)
	for sent := int64(0); sent < size; sent += tensor.MaxChunk {
		if err := s.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: chunk[:min(tensor.MaxChunk, size-sent)]}}); err != nil {
			_, err = s.CloseAndRecv()
			return err
		}
	}
	_, err = s.CloseAndRecv()
	return err
}

// fetch downloads a round's model, discarding the bytes as they arrive.
func fetch(ctx context.Context, conn *grpc.ClientConn, name string, round int32) error {
	s, err := fxv1.NewAggregatorClient(conn).FetchModel(ctx, &fxv1.FetchModelRequest{ExperimentId: experimentID, Collaborator: name, Round: round})
	if err != nil {
		return err
	}
	if _, err := s.Recv(); err != nil {
		return err
	}
	_, err = tensor.Receive(tensor.DecoderConfig{OnChunk: func(*tensor.Tensor, int64, []byte) error { return nil }}, func() (*fxv1.TensorFrame, error) {
		msg, err := s.Recv()
		return msg.GetFrame(), err
	})
	return err
}

// uploadTrain sends a train result carrying m.
func uploadTrain(ctx context.Context, conn *grpc.ClientConn, name string, round int32, m tensor.Model) error {
	s, err := fxv1.NewAggregatorClient(conn).UploadResult(ctx)
	if err != nil {
		return err
	}
	h := &fxv1.ResultHeader{ExperimentId: experimentID, Collaborator: name, Round: round, Task: runner.TaskTrain, SampleCount: 1}
	if err := s.Send(&fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Header{Header: h}}); err != nil {
		_, err = s.CloseAndRecv() // the server's reason
		return err
	}
	err = tensor.SendModel(m, func(fr *fxv1.TensorFrame) error {
		return s.Send(&fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Frame{Frame: fr}})
	})
	if err != nil && err != io.EOF {
		return err
	}
	_, err = s.CloseAndRecv()
	return err
}

// validated reports a round's local validation, the task that closes it.
func validated(ctx context.Context, conn *grpc.ClientConn, name string, round int32) error {
	s, err := fxv1.NewAggregatorClient(conn).UploadResult(ctx)
	if err != nil {
		return err
	}
	h := &fxv1.ResultHeader{ExperimentId: experimentID, Collaborator: name, Round: round, Task: runner.TaskLocalValidation, SampleCount: 1, Metrics: map[string]float64{"accuracy": 0.5}}
	if err := s.Send(&fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Header{Header: h}}); err != nil {
		_, err = s.CloseAndRecv()
		return err
	}
	_, err = s.CloseAndRecv()
	return err
}

func median(v []float64) float64 {
	v = slices.Clone(v)
	slices.Sort(v)
	return v[len(v)/2]
}

// BenchmarkTransfer measures transfers of a 32 MiB and a 256 MiB model;
// uploads come one at a time, so the aggregator stages each in memory (see
// StageBudget) and folds it at its commit.
func BenchmarkTransfer(b *testing.B) {
	for _, c := range []struct {
		name   string
		params int64
	}{{"32MiB", 8 << 20}, {"256MiB", 64 << 20}} {
		b.Run(c.name, func(b *testing.B) { benchTransfer(b, c.params) })
	}
}

func benchTransfer(b *testing.B, params int64) {
	model := benchModel(params)
	size := model.Bytes()
	participants := make([]string, 0, b.N+1)
	for i := range b.N + 1 {
		participants = append(participants, fmt.Sprintf("envoy%02d", i))
	}
	f := newFederation(b, benchPlan(b, 1, "[train, locally_tuned_model_validation]"), participants...)
	f.initial = model
	f.start()
	ctx := context.Background()
	conns := map[string]*grpc.ClientConn{}
	for _, name := range participants {
		conn, err := grpc.NewClient(f.addr, testpki.DialOptions(f.ca.Keyring(pki.RoleEnvoy, name), "localhost")...)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		conns[name] = conn
		ready(b, conn) // time transfers, not handshakes
	}
	raw := rawPeer(b, f.ca, size, f.ca.Keyring(pki.RoleEnvoy, participants[0]))
	rate := func(what string, do func() error) float64 {
		start := time.Now()
		if err := do(); err != nil {
			b.Fatalf("%s: %v", what, err)
		}
		return float64(size) / time.Since(start).Seconds() / 1e9
	}
	// Warm up both paths.
	rate("raw download", func() error { return rawDownload(ctx, raw) })
	rate("fx download", func() error { return fetch(ctx, conns[participants[0]], participants[0], 1) })
	// Each iteration times one raw and one fx transfer each way, in
	// alternating order, and the ratio is taken per pair: on a shared
	// machine the speed drifts between iterations far more than within one.
	var rd, fd, ru, fu, down, up []float64
	b.ResetTimer()
	for i := range b.N {
		// Each iteration's upload comes from another participant, so every
		// one is accepted: received, checked, staged and folded.
		name := participants[i+1]
		pair := func(rawWhat, fxWhat string, raw, fx func() error) (float64, float64) {
			if i%2 == 1 {
				f := rate(fxWhat, fx)
				return rate(rawWhat, raw), f
			}
			r := rate(rawWhat, raw)
			return r, rate(fxWhat, fx)
		}
		r, f := pair("raw download", "fx download",
			func() error { return rawDownload(ctx, raw) },
			func() error { return fetch(ctx, conns[name], name, 1) })
		rd, fd, down = append(rd, r), append(fd, f), append(down, f/r)
		r, f = pair("raw upload", "fx upload",
			func() error { return rawUpload(ctx, raw, size) },
			func() error { return uploadTrain(ctx, conns[name], name, 1, model) })
		ru, fu, up = append(ru, r), append(fu, f), append(up, f/r)
	}
	b.StopTimer()
	b.ReportMetric(median(rd), "raw_down_GB/s")
	b.ReportMetric(median(fd), "fx_down_GB/s")
	b.ReportMetric(median(down), "down/raw")
	b.ReportMetric(median(ru), "raw_up_GB/s")
	b.ReportMetric(median(fu), "fx_up_GB/s")
	b.ReportMetric(median(up), "up/raw")
}

// TestMain lets the benchmark binary act as the uploader child process.
func TestMain(m *testing.M) {
	if spec := os.Getenv("FX_BENCH_UPLOADER"); spec != "" {
		os.Exit(uploaderMain(spec))
	}
	os.Exit(m.Run())
}

// uploaderMain reads "addr;certdir;count;params" and uploads one model from
// count collaborators at once, all sharing one copy of it.
func uploaderMain(spec string) int {
	parts := strings.Split(spec, ";")
	addr, dir := parts[0], parts[1]
	count, _ := strconv.Atoi(parts[2])
	params, _ := strconv.ParseInt(parts[3], 10, 64)
	model := benchModel(params)
	var wg sync.WaitGroup
	errs := make(chan error, count)
	for _, name := range names(count) {
		k, err := pki.NewKeyring(pki.KeyringConfig{Files: pki.PartyFiles(filepath.Join(dir, "envoy", name), name)})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		wg.Go(func() {
			conn, err := grpc.NewClient(addr, pki.DialOptions(k, "localhost")...)
			if err != nil {
				errs <- err
				return
			}
			defer conn.Close()
			if err := uploadTrain(context.Background(), conn, name, 1, model); err != nil {
				errs <- err
				return
			}
			errs <- validated(context.Background(), conn, name, 1)
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	return 0
}

// heapSampler records the peak of the Go heap (live and not yet collected
// objects) and of the process's memory from the runtime.
type heapSampler struct {
	stop     chan struct{}
	done     chan struct{}
	peakHeap uint64 // heap objects, live or awaiting collection
	peakLive uint64 // heap live after the last GC: what the aggregator retains
	peakAll  uint64
}

func sampleHeap() *heapSampler {
	s := &heapSampler{stop: make(chan struct{}), done: make(chan struct{})}
	samples := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/memory/classes/total:bytes"}, {Name: "/memory/classes/heap/released:bytes"}, {Name: "/gc/heap/live:bytes"}}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			metrics.Read(samples)
			s.peakHeap = max(s.peakHeap, samples[0].Value.Uint64())
			s.peakAll = max(s.peakAll, samples[1].Value.Uint64()-samples[2].Value.Uint64())
			s.peakLive = max(s.peakLive, samples[3].Value.Uint64())
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

func (s *heapSampler) finish() { close(s.stop); <-s.done }

// settledHeap waits for the heap to come back to near baseline: the
// previous iteration's server goroutines finish shortly after its aggregator
// returns, and until they do its models are still reachable. An aggregator
// that kept its memory for good would fail the benchmark here.
func settledHeap(b *testing.B, baseline uint64) uint64 {
	deadline := time.Now().Add(10 * time.Second)
	for {
		h := currentHeap()
		if h < baseline+32*mib {
			return h
		}
		if time.Now().After(deadline) {
			b.Fatalf("the previous run still holds %d MiB of heap 10 s after its aggregator returned", (h-baseline)/mib)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func currentHeap() uint64 {
	runtime.GC()
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// BenchmarkUploadMemory reports the aggregator's peak memory two ways. The
// live heap is what it retains: the global model, the round's running sum,
// and buffers. The heap in use adds garbage awaiting collection — every
// 1 MiB frame off the wire is one — which Go would let grow to the live
// heap's size; the aggregator sets the process's memory limit from its
// model's size (internal/membudget), so it collects sooner and stays
// within it, at little cost since the large arrays hold no pointers to
// scan. Nothing here sets a limit: what is measured is what fx does.
func BenchmarkUploadMemory(b *testing.B) {
	const (
		uploaders = 8
		params    = 64 << 20 // 256 MiB of float32
	)
	modelBytes := float64(params * 4)
	goal := 2*modelBytes + 64*mib
	var live, heap, all []float64
	baseline := currentHeap()
	for range b.N {
		before := settledHeap(b, baseline)
		f := newFederation(b, benchPlan(b, 1, "[train, locally_tuned_model_validation]"), names(uploaders)...)
		for _, name := range names(uploaders) {
			f.ca.Files(pki.RoleEnvoy, name)
		}
		f.initial = benchModel(params)
		f.start()
		sampler := sampleHeap()
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), fmt.Sprintf("FX_BENCH_UPLOADER=%s;%s;%d;%d", f.addr, f.ca.Dir, uploaders, params))
		out, err := cmd.CombinedOutput()
		if err != nil {
			b.Fatalf("uploaders: %v\n%s", err, out)
		}
		if err := f.wait(5 * time.Minute); err != nil {
			b.Fatal(err)
		}
		sampler.finish()
		live = append(live, float64(sampler.peakLive-min(sampler.peakLive, before)))
		heap = append(heap, float64(sampler.peakHeap-min(sampler.peakHeap, before)))
		all = append(all, float64(sampler.peakAll))
		f.initial, f.agg = nil, nil
	}
	b.ReportMetric(modelBytes/mib, "model_MiB")
	b.ReportMetric(uploaders*modelBytes/mib, "received_MiB")
	b.ReportMetric(goal/mib, "goal_MiB")
	b.ReportMetric(median(live)/mib, "peak_live_MiB")
	b.ReportMetric(median(live)/goal, "peak_live/goal")
	b.ReportMetric(median(heap)/mib, "peak_heap_MiB")
	b.ReportMetric(median(heap)/goal, "peak_heap/goal")
	b.ReportMetric(median(all)/mib, "peak_process_MiB")
}

// nopRunner trains nothing: it returns the model it was given.
type nopRunner struct{}

func (nopRunner) Train(_ context.Context, _ runner.Task, m tensor.Model) (runner.Result, error) {
	return runner.Result{Model: m, Samples: 1}, nil
}

func (nopRunner) Validate(context.Context, runner.Task, tensor.Model) (runner.Result, error) {
	return runner.Result{Samples: 1, Metrics: map[string]float64{"accuracy": 0.5}}, nil
}

func BenchmarkRoundOverhead(b *testing.B) {
	const (
		collaborators = 10
		params        = 1 << 20
		rounds        = 40
	)
	var p50s, p99s, ratios, beyond []float64
	for range b.N {
		f := newFederation(b, benchPlan(b, rounds, "[aggregated_model_validation, train]"), names(collaborators)...)
		f.initial = benchModel(params)
		stamps := make(chan time.Time, rounds+2)
		f.sink.onRound = func() { stamps <- time.Now() }
		f.start()
		ctx, cancel := context.WithCancel(context.Background())
		for _, name := range names(collaborators) {
			f.collab(ctx, name, nopRunner{}, b.TempDir())
		}
		if err := f.wait(5 * time.Minute); err != nil {
			b.Fatal(err)
		}
		cancel()
		close(stamps)
		var times []time.Time
		for t := range stamps {
			times = append(times, t)
		}
		// The first round includes connecting; leave it out.
		var per []float64
		for i := 2; i < len(times); i++ {
			per = append(per, float64(times[i].Sub(times[i-1]))/float64(time.Millisecond))
		}
		slices.Sort(per)
		p50, p99 := per[len(per)/2], per[min(len(per)-1, len(per)*99/100)]

		// Baseline: the same bytes over raw gRPC, 10 downloads and 10 uploads at once.
		k := f.ca.Keyring(pki.RoleEnvoy, "envoy00")
		raw := rawPeer(b, f.ca, params*4, k)
		var wg sync.WaitGroup
		start := time.Now()
		for range collaborators {
			wg.Go(func() { rawDownload(context.Background(), raw) })
			wg.Go(func() { rawUpload(context.Background(), raw, params*4) })
		}
		wg.Wait()
		rawMS := float64(time.Since(start)) / float64(time.Millisecond)
		p50s, p99s, ratios = append(p50s, p50), append(p99s, p99), append(ratios, p50/rawMS)
		beyond = append(beyond, p50-rawMS)
	}
	b.ReportMetric(median(p50s), "p50_ms/round")
	b.ReportMetric(median(p99s), "p99_ms/round")
	b.ReportMetric(median(ratios), "p50/raw_transfer")
	// What a round costs beyond moving its bytes: negative when fx's rounds,
	// whose uploads start as each download ends, beat the baseline's 20
	// streams at once.
	b.ReportMetric(median(beyond), "p50-raw_transfer_ms")
}
