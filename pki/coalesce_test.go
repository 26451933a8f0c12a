package pki

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// countingConn counts the writes that reach a socket.
type countingConn struct {
	net.Conn
	writes *atomic.Int64
}

func (c countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

type countingListener struct {
	net.Listener
	writes *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return countingConn{c, l.writes}, nil
}

// bulkServer streams data down and hashes what comes up.
type bulkServer struct {
	fxv1.UnimplementedDirectorServer
	data []byte

	mu       sync.Mutex
	received [sha256.Size]byte
}

func (s *bulkServer) DownloadArchive(_ *fxv1.DownloadArchiveRequest, stream fxv1.Director_DownloadArchiveServer) error {
	for off := 0; off < len(s.data); off += 1 << 20 {
		if err := stream.Send(&fxv1.ArchiveChunk{Offset: int64(off), Data: s.data[off:min(off+1<<20, len(s.data))]}); err != nil {
			return err
		}
	}
	return nil
}

func (s *bulkServer) SubmitExperiment(stream fxv1.Director_SubmitExperimentServer) error {
	h := sha256.New()
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		h.Write(req.GetChunk())
	}
	s.mu.Lock()
	copy(s.received[:], h.Sum(nil))
	s.mu.Unlock()
	return stream.SendAndClose(&fxv1.SubmitExperimentResponse{})
}

// TestBulkTransfersCoalesceRecords moves 8 MiB each way at once over one
// connection secured by ServerOptions and DialOptions, checks every byte,
// and checks that both sides wrote to their sockets in large writes, not
// one per 16 KiB TLS record.
func TestBulkTransfersCoalesceRecords(t *testing.T) {
	ca := newTestCA(t)
	directorFiles, _ := issueFiles(t, ca, IssueRequest{Role: RoleDirector, Name: "director.test", Hosts: []string{"localhost"}})
	envoyFiles, _ := issueFiles(t, ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	serverKeys, err := NewKeyring(KeyringConfig{Files: directorFiles, CheckInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	clientKeys, err := NewKeyring(KeyringConfig{Files: envoyFiles, CheckInterval: -1})
	if err != nil {
		t.Fatal(err)
	}

	const size = 8 << 20
	data := make([]byte, size)
	rand.Read(data)
	bulk := &bulkServer{data: data}
	rules := Rules{
		"/fx.v1.Director/DownloadArchive":  {RoleEnvoy},
		"/fx.v1.Director/SubmitExperiment": {RoleEnvoy},
	}
	srv := grpc.NewServer(ServerOptions(serverKeys, rules)...)
	fxv1.RegisterDirectorServer(srv, bulk)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var serverWrites, clientWrites atomic.Int64
	go func() { _ = srv.Serve(countingListener{lis, &serverWrites}) }()
	t.Cleanup(srv.Stop)

	conn, err := NewClient(lis.Addr().String(), clientKeys, "localhost",
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
			if err != nil {
				return nil, err
			}
			return countingConn{c, &clientWrites}, nil
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := fxv1.NewDirectorClient(conn)
	ctx := testContext(t)

	var wg sync.WaitGroup
	var downloaded bytes.Buffer
	var downErr, upErr error
	wg.Go(func() {
		s, err := client.DownloadArchive(ctx, &fxv1.DownloadArchiveRequest{})
		if err != nil {
			downErr = err
			return
		}
		for {
			chunk, err := s.Recv()
			if err == io.EOF {
				return
			}
			if err != nil {
				downErr = err
				return
			}
			downloaded.Write(chunk.GetData())
		}
	})
	wg.Go(func() {
		s, err := client.SubmitExperiment(ctx)
		if err != nil {
			upErr = err
			return
		}
		for off := 0; off < size; off += 1 << 20 {
			if err := s.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: data[off : off+1<<20]}}); err != nil {
				break // CloseAndRecv has the reason
			}
		}
		_, upErr = s.CloseAndRecv()
	})
	wg.Wait()
	if downErr != nil || upErr != nil {
		t.Fatalf("download: %v; upload: %v", downErr, upErr)
	}
	if !bytes.Equal(downloaded.Bytes(), data) {
		t.Fatalf("downloaded %d bytes that differ from the %d sent", downloaded.Len(), size)
	}
	bulk.mu.Lock()
	received := bulk.received
	bulk.mu.Unlock()
	if received != sha256.Sum256(data) {
		t.Fatal("the server hashed other bytes than the client uploaded")
	}

	// One write per TLS record would be at least size/16 KiB = 512 each way.
	const most = size / (64 << 10)
	for side, n := range map[string]int64{"server": serverWrites.Load(), "client": clientWrites.Load()} {
		t.Logf("%s: %d socket writes for %d MiB", side, n, size>>20)
		if n > most {
			t.Errorf("the %s made %d socket writes for %d MiB; coalesced records need at most %d", side, n, size>>20, most)
		}
	}
}

// TestCoalescingConnLendsBuffersOnlyWhileDataWaits checks that a connection
// holds a read buffer only while bytes it read are waiting to be handed
// out, and a write buffer only during a coalesced write: idle connections
// on a busy director hold none.
func TestCoalescingConnLendsBuffersOnlyWhileDataWaits(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	rawClient, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer rawClient.Close()
	rawServer, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	defer rawServer.Close()
	sender, receiver := newCoalescingConn(rawClient), newCoalescingConn(rawServer)

	data := make([]byte, 60<<10) // within the socket buffers: nobody reads until the write is done
	rand.Read(data)
	sender.begin()
	for off := 0; off < len(data); off += 1000 {
		if _, err := sender.Write(data[off:min(off+1000, len(data))]); err != nil {
			t.Fatal(err)
		}
	}
	if sender.writeBlock == nil || len(sender.pending) != len(data) {
		t.Fatalf("during a coalesced write: %d bytes pending, want all %d held back", len(sender.pending), len(data))
	}
	if err := sender.end(); err != nil {
		t.Fatal(err)
	}
	if sender.writeBlock != nil {
		t.Error("the write buffer was kept after the coalesced write")
	}

	var got bytes.Buffer
	small := make([]byte, 10)
	for got.Len() < len(data) {
		n, err := receiver.Read(small)
		if err != nil {
			t.Fatal(err)
		}
		got.Write(small[:n])
		if got.Len() == 10 && receiver.readBlock == nil {
			t.Fatal("a socket read larger than the caller's buffer kept nothing back")
		}
	}
	if !bytes.Equal(got.Bytes(), data) {
		t.Fatal("bytes read differ from bytes written")
	}
	if receiver.readBlock != nil {
		t.Error("the read buffer was kept after every byte was handed out")
	}

	// A small message read into a large enough buffer keeps nothing.
	if _, err := sender.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	big := make([]byte, 512)
	n, err := receiver.Read(big)
	if err != nil || string(big[:n]) != "ping" {
		t.Fatalf("Read = %q, %v", big[:n], err)
	}
	if receiver.readBlock != nil {
		t.Error("a read that fit the caller's buffer kept a block")
	}
}
