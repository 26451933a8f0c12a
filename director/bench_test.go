package director

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

const benchPlan = "name: big\nrounds: 1\nrunner: {kind: builtin, model: softmax}\n"

// benchArchiveBytes is the payload of the benchmark's archive: 1 GiB, or
// FX_BENCH_ARCHIVE_MIB MiB for a quick run.
func benchArchiveBytes() int64 {
	if s := os.Getenv("FX_BENCH_ARCHIVE_MIB"); s != "" {
		if n, err := strconv.ParseInt(s, 10, 64); err == nil && n > 0 {
			return n << 20
		}
	}
	return 1 << 30
}

// genArchive writes a tar.gz experiment archive holding plan.yaml and
// payload bytes of incompressible, seeded noise, stored without
// compression. The same size gives the same bytes, so the archive can be
// generated once for its digest and again for the upload without ever
// being held in memory or on the client's disk.
func genArchive(w io.Writer, payload int64) error {
	zw, err := gzip.NewWriterLevel(w, gzip.NoCompression)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(zw)
	if err := tw.WriteHeader(&tar.Header{Name: "plan.yaml", Mode: 0o600, Size: int64(len(benchPlan)), Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	if _, err := io.WriteString(tw, benchPlan); err != nil {
		return err
	}
	if err := tw.WriteHeader(&tar.Header{Name: "data.bin", Mode: 0o600, Size: payload, Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	if _, err := io.CopyN(tw, rand.NewChaCha8([32]byte{42}), payload); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return zw.Close()
}

// archiveDigest generates the archive once to learn its size and sha256.
func archiveDigest(payload int64) (int64, string, error) {
	h := sha256.New()
	cw := &countWriter{w: h}
	if err := genArchive(cw, payload); err != nil {
		return 0, "", err
	}
	return cw.n, hex.EncodeToString(h.Sum(nil)), nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}

// streamChunks generates the archive and calls send with chunks of at most
// MaxChunk bytes. Each chunk is a fresh slice: gRPC may hold a sent message
// after Send returns.
func streamChunks(payload int64, send func([]byte) error) error {
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(genArchive(pw, payload)) }()
	defer pr.Close()
	for {
		buf := make([]byte, MaxChunk)
		n, err := io.ReadFull(pr, buf)
		if n > 0 {
			if err := send(buf[:n]); err != nil {
				return err
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// heapPeak samples the heap until stopped and reports the highest
// HeapAlloc seen above the level at start.
type heapPeak struct {
	base, peak uint64
	stop       chan struct{}
	done       sync.WaitGroup
}

func startHeapPeak() *heapPeak {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	h := &heapPeak{base: ms.HeapAlloc, peak: ms.HeapAlloc, stop: make(chan struct{})}
	h.done.Add(1)
	go func() {
		defer h.done.Done()
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-h.stop:
				return
			case <-t.C:
				var ms runtime.MemStats
				runtime.ReadMemStats(&ms)
				h.peak = max(h.peak, ms.HeapAlloc)
			}
		}
	}()
	return h
}

func (h *heapPeak) growth() uint64 {
	close(h.stop)
	h.done.Wait()
	return h.peak - h.base
}

// rawUploadDesc is a bare client-streaming service that discards what it
// receives: the cost of moving the bytes through gRPC and TLS alone.
var rawUploadDesc = grpc.ServiceDesc{
	ServiceName: "fx.bench.Raw",
	HandlerType: (*any)(nil),
	Streams: []grpc.StreamDesc{{
		StreamName:    "Upload",
		ClientStreams: true,
		Handler: func(_ any, stream grpc.ServerStream) error {
			for {
				var m fxv1.SubmitExperimentRequest
				if err := stream.RecvMsg(&m); errors.Is(err, io.EOF) {
					return stream.SendMsg(&fxv1.SubmitExperimentResponse{})
				} else if err != nil {
					return err
				}
			}
		},
	}},
}

// BenchmarkSubmitLargeArchive uploads a 1 GiB archive to a director over
// mutual TLS on loopback and reports the heap growth during the upload
// (goal: under 64 MiB, whatever the archive's size) and the upload
// throughput as a ratio of a raw gRPC byte stream of the same bytes over the
// same TLS, measured in the same run.
//
//	go test -run '^$' -bench SubmitLargeArchive -benchtime 1x ./director/
func BenchmarkSubmitLargeArchive(b *testing.B) {
	payload := benchArchiveBytes()
	size, digest, err := archiveDigest(payload)
	if err != nil {
		b.Fatal(err)
	}
	f := newFed(b, func(c *Config) { c.ReviewPolicy = ReviewManual; c.MaxArchiveBytes = 4 << 30 })

	// The raw baseline: same keyring, same TLS settings, same client.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	rules := pki.Rules{"/fx.bench.Raw/Upload": {pki.AnyRole}}
	raw := grpc.NewServer(pki.ServerOptions(f.keyring, rules)...)
	raw.RegisterService(&rawUploadDesc, struct{}{})
	go func() { _ = raw.Serve(lis) }()
	defer raw.Stop()
	client := f.researcher("bench") // issues the certificate the raw client uses too
	rk, err := pki.NewKeyring(pki.KeyringConfig{Files: pki.PartyFiles(filepath.Join(f.certDir, "researcher-bench"), "bench")})
	if err != nil {
		b.Fatal(err)
	}
	rawConn, err := pki.NewClient(lis.Addr().String(), rk, "")
	if err != nil {
		b.Fatal(err)
	}
	defer rawConn.Close()

	var dirSecs, rawSecs float64
	var heap uint64
	b.SetBytes(size)
	b.ResetTimer()
	for i := range b.N {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
		// Baseline first, then the director, alternating per iteration.
		start := time.Now()
		rs, err := rawConn.NewStream(ctx, &rawUploadDesc.Streams[0], "/fx.bench.Raw/Upload")
		if err != nil {
			b.Fatal(err)
		}
		err = streamChunks(payload, func(c []byte) error {
			return rs.SendMsg(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: c}})
		})
		if err == nil {
			err = rs.CloseSend()
		}
		if err == nil {
			err = rs.RecvMsg(&fxv1.SubmitExperimentResponse{})
		}
		if err != nil {
			b.Fatalf("raw upload: %v", err)
		}
		rawSecs += time.Since(start).Seconds()

		hp := startHeapPeak()
		start = time.Now()
		stream, err := client.SubmitExperiment(ctx)
		if err != nil {
			b.Fatal(err)
		}
		err = stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Header{Header: &fxv1.SubmitHeader{
			Name: fmt.Sprintf("big-%d", i), Size: size, Sha256: digest, PlanYaml: benchPlan}}})
		if err == nil {
			err = streamChunks(payload, func(c []byte) error {
				return stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: c}})
			})
		}
		var resp *fxv1.SubmitExperimentResponse
		if err == nil {
			resp, err = stream.CloseAndRecv()
		}
		if err != nil {
			b.Fatalf("submit: %v", err)
		}
		dirSecs += time.Since(start).Seconds()
		heap = max(heap, hp.growth())
		cancel()
		if resp.GetExperiment().GetArchiveSize() != size {
			b.Fatalf("stored %d bytes, sent %d", resp.GetExperiment().GetArchiveSize(), size)
		}
		// Free the disk for the next iteration.
		_, err = f.admin().RejectExperiment(context.Background(), &fxv1.ReviewExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: resp.GetExperiment().GetId()}, Reason: "benchmark"})
		if err == nil {
			_, err = f.admin().RemoveExperiment(context.Background(), &fxv1.RemoveExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: resp.GetExperiment().GetId()}})
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	mb := float64(size) * float64(b.N) / (1 << 20)
	b.ReportMetric(float64(heap)/(1<<20), "peak-heap-growth-MiB")
	b.ReportMetric(mb/dirSecs, "director-MiB/s")
	b.ReportMetric(mb/rawSecs, "raw-grpc-MiB/s")
	b.ReportMetric(rawSecs/dirSecs, "throughput-ratio")
	if heap > 64<<20 {
		b.Errorf("heap grew by %d MiB during the upload; the goal is under 64 MiB", heap>>20)
	}
}
