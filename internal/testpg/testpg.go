// Package testpg starts a real PostgreSQL server for a test: Debian's
// binaries (apt-get install postgresql), a cluster made by initdb in a
// temporary directory, and a server that listens only on a unix socket in
// that directory, so nothing outside this machine's owner of the directory
// (and root) can reach it, and no TCP port has to be found free. The server
// is stopped and its directory removed when the test ends.
//
// Without the binaries a test skips, unless FX_REQUIRE_POSTGRES=1 (CI sets
// it): then it fails, so that the PostgreSQL tests cannot silently stop
// running.
//
// initdb and postgres refuse to run as root. As root (CI, containers) the
// server runs as the postgres system user the Debian package creates: the
// directory is made in the system's temporary directory (not under the
// test's, which is private to root) and given to that user, and the
// processes are started with its credentials. Root reaches the socket in
// that directory whatever its owner.
package testpg

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// RequireEnv is the environment variable that turns a missing PostgreSQL
// into a failure.
const RequireEnv = "FX_REQUIRE_POSTGRES"

// port names the socket file (.s.PGSQL.<port>); the server listens on no
// TCP port, so any number does.
const port = 5432

// startTimeout bounds initdb and the server's start; generous for a
// shared machine under the race detector.
const startTimeout = time.Minute

// Server is a running PostgreSQL server owned by one test.
type Server struct {
	dir  string // the cluster's directory and the socket's
	user string // the superuser, trusted on the socket

	mu  sync.Mutex
	dbs int
}

// Start starts a server for t, or skips t when the binaries are missing
// and FX_REQUIRE_POSTGRES is not 1. The server stops when t ends.
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := binDir()
	if err != nil {
		if os.Getenv(RequireEnv) == "1" {
			t.Fatalf("%v, and %s=1 requires PostgreSQL", err, RequireEnv)
		}
		t.Skipf("%v; skipping the PostgreSQL test (set %s=1 to make this a failure)", err, RequireEnv)
	}
	cred, owner, err := credential()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "fx-testpg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			t.Fatal(err)
		}
	}
	s := &Server{dir: dir, user: owner}
	data := filepath.Join(dir, "data")
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	initdb := command(ctx, cred, filepath.Join(bin, "initdb"),
		"--pgdata", data, "--username", owner, "--auth", "trust",
		"--encoding", "UTF8", "--locale", "C", "--no-sync", "--no-instructions")
	if out, err := initdb.CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	// Durability is not what these tests check: fsync off makes them fast.
	srv := command(context.Background(), cred, filepath.Join(bin, "postgres"),
		"-D", data, "-k", dir, "-p", strconv.Itoa(port), "-c", "listen_addresses=",
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
	log := &logBuffer{}
	srv.Stdout, srv.Stderr = log, log
	if err := srv.Start(); err != nil {
		t.Fatalf("start postgres: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- srv.Wait() }()
	t.Cleanup(func() { stop(t, srv, exited, log) })
	if err := s.waitReady(ctx, exited); err != nil {
		t.Fatalf("postgres did not start: %v\n%s", err, log)
	}
	return s
}

// binDir finds the directory of Debian's PostgreSQL binaries, the newest
// version's when there are several.
func binDir() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int { return version(b) - version(a) })
	for _, d := range dirs {
		if isFile(filepath.Join(d, "initdb")) && isFile(filepath.Join(d, "postgres")) {
			return d, nil
		}
	}
	return "", fmt.Errorf("no PostgreSQL binaries (initdb, postgres) under /usr/lib/postgresql/*/bin: apt-get install postgresql")
}

func version(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

func isFile(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular()
}

// credential is who runs the server: this process's user, or, as root,
// the postgres system user. owner is the database superuser's name.
func credential() (cred *syscall.Credential, owner string, err error) {
	if os.Geteuid() != 0 {
		u, err := user.Current()
		if err != nil {
			return nil, "", err
		}
		return nil, u.Username, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, "", fmt.Errorf("running as root, the PostgreSQL server must run as the postgres system user (initdb refuses root), but: %v", err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, "postgres", nil
}

func command(ctx context.Context, cred *syscall.Credential, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = procAttr(cred)
	// Locale and the like from the test's environment do not matter;
	// HOME must be one the user can read.
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C", "HOME=" + os.TempDir()}
	return cmd
}

// waitReady waits until the server accepts a connection, or has exited.
func (s *Server) waitReady(ctx context.Context, exited <-chan error) error {
	for {
		conn, err := pgx.Connect(ctx, s.DSN("postgres"))
		if err == nil {
			return conn.Close(ctx)
		}
		select {
		case err := <-exited:
			return fmt.Errorf("the server exited: %v", err)
		case <-ctx.Done():
			return fmt.Errorf("not accepting connections after %s: %v", startTimeout, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stop asks for a fast shutdown (SIGINT: connections are ended, the
// cluster is left consistent), and kills the server if that takes too long.
func stop(t testing.TB, srv *exec.Cmd, exited <-chan error, log *logBuffer) {
	_ = srv.Process.Signal(syscall.SIGINT)
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		_ = srv.Process.Kill()
		<-exited
		t.Errorf("postgres did not stop within 30s of SIGINT; killed it")
	}
	if t.Failed() {
		t.Logf("postgres log:\n%s", log)
	}
}

// DSN is the connection string of database db as the superuser.
func (s *Server) DSN(db string) string {
	return fmt.Sprintf("host=%s port=%d user=%s dbname=%s sslmode=disable", s.dir, port, s.user, db)
}

// NewDatabase creates an empty database (UTF8, owned by the superuser)
// and returns its DSN. Each call makes another, so that the tests sharing a
// server do not see each other's data.
func (s *Server) NewDatabase(t testing.TB) string {
	t.Helper()
	s.mu.Lock()
	s.dbs++
	name := fmt.Sprintf("fx_test_%d", s.dbs)
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("create database %s: %v", name, err)
	}
	return s.DSN(name)
}

// logBuffer collects the server's stdout and stderr, for a test that
// fails.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
