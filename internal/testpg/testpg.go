// Package testpg starts a real PostgreSQL server for a test: Debian's
// binaries (apt-get install postgresql), a cluster made by initdb in a
// temporary directory, and a server that listens only on a unix socket in
// that directory, so nothing outside this machine's owner of the directory
// (and root) can reach it, and no TCP port has to be found free. The server
// is stopped and its directory removed when the test ends. Programs that
// are not tests (fxbench failover) use Launch and Stop instead.
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
	"errors"
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

// ErrNotInstalled is matched by Launch's error when PostgreSQL's binaries
// are missing: a test skips on it rather than fails (unless RequireEnv).
var ErrNotInstalled = errors.New("PostgreSQL is not installed")

// Server is a running PostgreSQL server, owned by one test or program.
type Server struct {
	dir  string // the cluster's directory and the socket's
	user string // the superuser, trusted on the socket

	srv    *exec.Cmd
	exited chan error // the server's exit, once
	log    *logBuffer

	mu  sync.Mutex
	dbs int
}

// Start starts a server for t, or skips t when the binaries are missing
// and FX_REQUIRE_POSTGRES is not 1. The server stops when t ends.
func Start(t testing.TB) *Server {
	t.Helper()
	s, err := Launch()
	switch {
	case errors.Is(err, ErrNotInstalled) && os.Getenv(RequireEnv) != "1":
		t.Skipf("%v; skipping the PostgreSQL test (set %s=1 to make this a failure)", err, RequireEnv)
	case errors.Is(err, ErrNotInstalled):
		t.Fatalf("%v, and %s=1 requires PostgreSQL", err, RequireEnv)
	case err != nil:
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			t.Logf("postgres log:\n%s", s.Log())
		}
	})
	return s
}

// Launch starts a server in a new temporary directory, for a program that
// is not a test (fxbench failover); Stop it when done. Tests use Start.
func Launch() (_ *Server, err error) {
	bin, err := binDir()
	if err != nil {
		return nil, err
	}
	cred, owner, err := credential()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "fx-testpg-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(dir)
		}
	}()
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			return nil, err
		}
	}
	s := &Server{dir: dir, user: owner, exited: make(chan error, 1), log: &logBuffer{}}
	data := filepath.Join(dir, "data")
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	initdb := command(ctx, cred, filepath.Join(bin, "initdb"),
		"--pgdata", data, "--username", owner, "--auth", "trust",
		"--encoding", "UTF8", "--locale", "C", "--no-sync", "--no-instructions")
	if out, err := initdb.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("initdb: %v\n%s", err, out)
	}
	// Durability is not what these servers are for: fsync off makes them
	// fast.
	s.srv = command(context.Background(), cred, filepath.Join(bin, "postgres"),
		"-D", data, "-k", dir, "-p", strconv.Itoa(port), "-c", "listen_addresses=",
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
	s.srv.Stdout, s.srv.Stderr = s.log, s.log
	if err := s.srv.Start(); err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	go func() { s.exited <- s.srv.Wait() }()
	if err := s.waitReady(ctx); err != nil {
		_ = s.Stop()
		return nil, fmt.Errorf("postgres did not start: %v\n%s", err, s.log)
	}
	return s, nil
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
	return "", fmt.Errorf("%w: no binaries (initdb, postgres) under /usr/lib/postgresql/*/bin: apt-get install postgresql", ErrNotInstalled)
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
func (s *Server) waitReady(ctx context.Context) error {
	for {
		conn, err := pgx.Connect(ctx, s.DSN("postgres"))
		if err == nil {
			return conn.Close(ctx)
		}
		select {
		case err := <-s.exited:
			s.exited <- err // for Stop
			return fmt.Errorf("the server exited: %v", err)
		case <-ctx.Done():
			return fmt.Errorf("not accepting connections after %s: %v", startTimeout, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Stop asks for a fast shutdown (SIGINT: connections are ended, the
// cluster is left consistent), kills the server if that takes too long,
// and removes its directory. Call it once.
func (s *Server) Stop() error {
	var err error
	_ = s.srv.Process.Signal(syscall.SIGINT)
	select {
	case <-s.exited:
	case <-time.After(30 * time.Second):
		_ = s.srv.Process.Kill()
		<-s.exited
		err = errors.New("postgres did not stop within 30s of SIGINT; killed it")
	}
	return errors.Join(err, os.RemoveAll(s.dir))
}

// Log is what the server has written to its stdout and stderr.
func (s *Server) Log() string { return s.log.String() }

// DSN is the connection string of database db as the superuser.
func (s *Server) DSN(db string) string {
	return fmt.Sprintf("host=%s port=%d user=%s dbname=%s sslmode=disable", s.dir, port, s.user, db)
}

// NewDatabase creates an empty database (UTF8, owned by the superuser)
// and returns its DSN. Each call makes another, so that the tests sharing a
// server do not see each other's data.
func (s *Server) NewDatabase(t testing.TB) string {
	t.Helper()
	dsn, err := s.CreateDatabase()
	if err != nil {
		t.Fatal(err)
	}
	return dsn
}

// CreateDatabase is NewDatabase for a program that is not a test.
func (s *Server) CreateDatabase() (string, error) {
	s.mu.Lock()
	s.dbs++
	name := fmt.Sprintf("fx_test_%d", s.dbs)
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.DSN("postgres"))
	if err != nil {
		return "", err
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		return "", fmt.Errorf("create database %s: %w", name, err)
	}
	return s.DSN(name), nil
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
