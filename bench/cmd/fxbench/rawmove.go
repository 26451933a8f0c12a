package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"

	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/tensor"
)

// The raw baseline of fxbench large: the bytes of a round moved between
// the same number of processes as fx's, over the same gRPC and mTLS, and
// nothing else. A server process (the director's place) holds a model's
// worth of bytes; each client process (an envoy's place) downloads it and
// uploads as many back, in 1 MiB messages, as a collaborator does in a
// round; all clients at once.

// rawMover is the server: a Director service whose DownloadArchive sends
// the bytes and whose SubmitExperiment swallows them.
type rawMover struct {
	fxv1.UnimplementedDirectorServer
	data []byte
}

func (s *rawMover) DownloadArchive(_ *fxv1.DownloadArchiveRequest, stream fxv1.Director_DownloadArchiveServer) error {
	for off := 0; off < len(s.data); off += tensor.MaxChunk {
		end := min(off+tensor.MaxChunk, len(s.data))
		if err := stream.Send(&fxv1.ArchiveChunk{Offset: int64(off), Data: s.data[off:end]}); err != nil {
			return err
		}
	}
	return nil
}

func (s *rawMover) SubmitExperiment(stream fxv1.Director_SubmitExperimentServer) error {
	for {
		if _, err := stream.Recv(); errors.Is(err, io.EOF) {
			return stream.SendAndClose(&fxv1.SubmitExperimentResponse{})
		} else if err != nil {
			return err
		}
	}
}

// rawmoveMain is the child process: -role server prints "LISTEN addr" and
// serves until its stdin closes; -role client connects, prints "READY",
// and for each "go" line on stdin moves a round's bytes and prints "DONE".
func rawmoveMain(args []string) error {
	fs := flag.NewFlagSet("rawmove", flag.ExitOnError)
	role := fs.String("role", "", "server or client")
	pkiDir := fs.String("pki", "", "the benchmark's PKI directory")
	size := fs.Int64("bytes", 0, "bytes each way")
	addr := fs.String("addr", "", "client: the server's address")
	envoy := fs.Int("envoy", 1, "client: whose certificate (envoy number)")
	_ = fs.Parse(args)
	p, err := openBenchPKI(*pkiDir)
	if err != nil {
		return err
	}
	switch *role {
	case "server":
		k, err := pki.NewKeyring(pki.KeyringConfig{Files: p.Director})
		if err != nil {
			return err
		}
		rules := pki.RulesFromProto(map[string][]fxv1.Role{
			"/fx.v1.Director/DownloadArchive":  {fxv1.Role_ROLE_ENVOY},
			"/fx.v1.Director/SubmitExperiment": {fxv1.Role_ROLE_ENVOY},
		})
		srv := grpc.NewServer(pki.ServerOptions(k, rules)...)
		fxv1.RegisterDirectorServer(srv, &rawMover{data: make([]byte, *size)})
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		go func() { _, _ = io.Copy(io.Discard, os.Stdin); srv.Stop() }()
		fmt.Printf("LISTEN %s\n", lis.Addr())
		return srv.Serve(lis)
	case "client":
		k, err := pki.NewKeyring(pki.KeyringConfig{Files: p.envoyFiles(*envoy)})
		if err != nil {
			return err
		}
		conn, err := grpc.NewClient(*addr, pki.DialOptions(k, "localhost")...)
		if err != nil {
			return err
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		conn.Connect()
		for s := conn.GetState(); s != connectivity.Ready; s = conn.GetState() {
			if !conn.WaitForStateChange(ctx, s) {
				cancel()
				return fmt.Errorf("connection to %s never became ready (%v)", *addr, s)
			}
		}
		cancel()
		fmt.Println("READY")
		c := fxv1.NewDirectorClient(conn)
		chunk := make([]byte, tensor.MaxChunk)
		in := bufio.NewScanner(os.Stdin)
		for in.Scan() {
			start := time.Now()
			if err := rawRound(c, chunk, *size); err != nil {
				return err
			}
			fmt.Printf("DONE %.6f\n", time.Since(start).Seconds())
		}
		return nil
	}
	return fmt.Errorf("-role %q: server or client", *role)
}

// rawRound downloads size bytes and uploads as many.
func rawRound(c fxv1.DirectorClient, chunk []byte, size int64) error {
	ctx := context.Background()
	down, err := c.DownloadArchive(ctx, &fxv1.DownloadArchiveRequest{})
	if err != nil {
		return err
	}
	for {
		if _, err := down.Recv(); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return err
		}
	}
	up, err := c.SubmitExperiment(ctx)
	if err != nil {
		return err
	}
	for sent := int64(0); sent < size; sent += tensor.MaxChunk {
		if err := up.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: chunk[:min(tensor.MaxChunk, size-sent)]}}); err != nil {
			_, err = up.CloseAndRecv()
			return err
		}
	}
	_, err = up.CloseAndRecv()
	return err
}

// moverProc is a rawmove process and its standard streams.
type moverProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
}

func startMover(self string, args ...string) (*moverProc, error) {
	cmd := exec.Command(self, append([]string{"rawmove"}, args...)...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return &moverProc{cmd: cmd, stdin: stdin, out: bufio.NewScanner(out)}, nil
}

// expect reads the child's next line, which must start with prefix.
func (c *moverProc) expect(prefix string) (string, error) {
	if !c.out.Scan() {
		return "", fmt.Errorf("rawmove child ended before %q: %v", prefix, c.out.Err())
	}
	line := c.out.Text()
	rest, ok := strings.CutPrefix(line, prefix)
	if !ok {
		return "", fmt.Errorf("rawmove child said %q, want %q", line, prefix)
	}
	return strings.TrimSpace(rest), nil
}

func (c *moverProc) stop() {
	_ = c.stdin.Close()
	_ = c.cmd.Wait()
}

// measureRawProcesses times a round's bytes moved raw between a server
// process and n client processes (each downloading and uploading size
// bytes, all at once), trials times, on warm connections.
func measureRawProcesses(p *benchPKI, n int, size int64, trials int) ([]float64, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	srv, err := startMover(self, "-role", "server", "-pki", p.dir, "-bytes", fmt.Sprint(size))
	if err != nil {
		return nil, err
	}
	defer srv.stop()
	addr, err := srv.expect("LISTEN ")
	if err != nil {
		return nil, err
	}
	var clients []*moverProc
	defer func() {
		for _, c := range clients {
			c.stop()
		}
	}()
	for i := 1; i <= n; i++ {
		c, err := startMover(self, "-role", "client", "-pki", p.dir, "-addr", addr, "-envoy", fmt.Sprint(i), "-bytes", fmt.Sprint(size))
		if err != nil {
			return nil, err
		}
		clients = append(clients, c)
		if _, err := c.expect("READY"); err != nil {
			return nil, err
		}
	}
	var times []float64
	for range trials {
		start := time.Now()
		var wg sync.WaitGroup
		errs := make([]error, n)
		for i, c := range clients {
			wg.Go(func() {
				if _, err := fmt.Fprintln(c.stdin, "go"); err != nil {
					errs[i] = err
					return
				}
				_, errs[i] = c.expect("DONE ")
			})
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return nil, err
		}
		times = append(times, time.Since(start).Seconds())
	}
	return times, nil
}
