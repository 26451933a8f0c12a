package store

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/fx-fl/fx/internal/testpg"
)

func openPostgres(t *testing.T, dsn string) *Postgres {
	t.Helper()
	s, err := OpenPostgres(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// leading opens a store and makes it the leader, which it must be to write.
func leading(t *testing.T, dsn string) *Postgres {
	t.Helper()
	s := openPostgres(t, dsn)
	if _, err := s.Campaign(context.Background(), Candidate{Holder: t.Name(), Address: "leader.example:7000"}); err != nil {
		t.Fatal(err)
	}
	return s
}

// TestPostgres runs the store suite against a real PostgreSQL server, a
// new database for each case, and then what is PostgreSQL's own: schema
// versions, migrations racing, leader election and fencing, and
// connection strings kept out of errors.
func TestPostgres(t *testing.T) {
	srv := testpg.Start(t)
	testStore(t, backend{durable: true, fresh: func(t *testing.T) func(t *testing.T) Store {
		dsn := srv.NewDatabase(t)
		return func(t *testing.T) Store { return leading(t, dsn) }
	}})
	t.Run("Schema", func(t *testing.T) { testPostgresSchema(t, srv.NewDatabase(t)) })
	t.Run("NewerSchemaRefused", func(t *testing.T) { testPostgresNewerSchema(t, srv.NewDatabase(t)) })
	t.Run("MigrationsAtOnce", func(t *testing.T) { testPostgresMigrationsAtOnce(t, srv.NewDatabase(t)) })
	t.Run("Election", func(t *testing.T) { testPostgresElection(t, srv.NewDatabase(t)) })
	t.Run("Fencing", func(t *testing.T) { testPostgresFencing(t, srv.NewDatabase(t)) })
	t.Run("DeposedByWatch", func(t *testing.T) { testPostgresDeposedByWatch(t, srv.NewDatabase(t)) })
}

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

func schemaVersions(t *testing.T, conn *pgx.Conn) []int {
	t.Helper()
	rows, err := conn.Query(context.Background(), "SELECT version FROM fx_schema_migrations ORDER BY version")
	if err != nil {
		t.Fatal(err)
	}
	vs, err := pgx.CollectRows(rows, pgx.RowTo[int])
	if err != nil {
		t.Fatal(err)
	}
	return vs
}

// testPostgresSchema: opening a new database applies every migration and
// records each version once; opening it again applies nothing.
func testPostgresSchema(t *testing.T, dsn string) {
	ms, err := migrations()
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) == 0 {
		t.Fatal("no migrations embedded")
	}
	s := openPostgres(t, dsn)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	openPostgres(t, dsn)
	conn := connect(t, dsn)
	vs := schemaVersions(t, conn)
	if len(vs) != len(ms) || vs[len(vs)-1] != len(ms) {
		t.Errorf("schema versions %v, want 1..%d once each", vs, len(ms))
	}
	for _, b := range allBuckets {
		if _, err := conn.Exec(context.Background(), "SELECT key, value FROM "+table(b)+" LIMIT 1"); err != nil {
			t.Errorf("table of bucket %s: %v", b, err)
		}
	}
}

// testPostgresNewerSchema: a database a newer fx has migrated is refused,
// telling the user to upgrade, and left as it was.
func testPostgresNewerSchema(t *testing.T, dsn string) {
	s := openPostgres(t, dsn)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	conn := connect(t, dsn)
	if _, err := conn.Exec(context.Background(), "INSERT INTO fx_schema_migrations (version, name) VALUES (999, '0999_future')"); err != nil {
		t.Fatal(err)
	}
	_, err := OpenPostgres(context.Background(), dsn)
	if err == nil || !strings.Contains(err.Error(), "version 999") || !strings.Contains(err.Error(), "upgrade fx") {
		t.Fatalf("OpenPostgres on a newer schema = %v, want a refusal naming version 999 and saying to upgrade fx", err)
	}
	ms, _ := migrations()
	if vs := schemaVersions(t, conn); vs[len(vs)-1] != 999 || len(vs) != len(ms)+1 {
		t.Errorf("schema versions after the refusal: %v", vs)
	}
}

// testPostgresMigrationsAtOnce: processes migrating one new database at
// the same time take turns; each succeeds and every migration is applied
// once (without the lock, CREATE TABLE races and one fails).
func testPostgresMigrationsAtOnce(t *testing.T, dsn string) {
	const n = 4
	conns := make([]*pgx.Conn, n)
	for i := range conns {
		conns[i] = connect(t, dsn)
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i, c := range conns {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = migrate(context.Background(), c) }()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	ms, _ := migrations()
	if vs := schemaVersions(t, conns[0]); len(vs) != len(ms) {
		t.Errorf("schema versions %v, want %d", vs, len(ms))
	}
}

// put writes one envoy record.
func put(s Store, name string) error {
	return s.Update(func(tx Tx) error { return tx.PutEnvoy(&Envoy{Name: name}) })
}

// campaign runs Campaign in the background.
func campaign(s *Postgres, holder string) <-chan *Leadership {
	won := make(chan *Leadership, 1)
	go func() {
		l, err := s.Campaign(context.Background(), Candidate{Holder: holder, Address: holder + ":7000"})
		if err != nil {
			l = nil
		}
		won <- l
	}()
	return won
}

// testPostgresElection: the first store to campaign leads and writes; a
// second waits in its campaign, names the leader, and cannot write; when
// the leader steps down (Close) the second leads in the next term, told
// that its predecessor stepped down cleanly, and writes.
func testPostgresElection(t *testing.T, dsn string) {
	first := openPostgres(t, dsn)
	if err := put(first, "early"); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("a write before leading = %v, want ErrNotLeader", err)
	}
	l1, err := first.Campaign(context.Background(), Candidate{Holder: "first", Address: "first:7000"})
	if err != nil {
		t.Fatal(err)
	}
	if l1.Term != 1 || l1.Previous != nil {
		t.Errorf("first leadership: term %d, previous %v; want term 1 and none", l1.Term, l1.Previous)
	}
	if err := put(first, "a"); err != nil {
		t.Fatal(err)
	}
	second := openPostgres(t, dsn)
	won := campaign(second, "second")
	if err := put(second, "b"); !errors.Is(err, ErrNotLeader) || !strings.Contains(err.Error(), "standby") {
		t.Errorf("a standby's write = %v, want ErrNotLeader saying it is a standby", err)
	}
	if l, err := second.Leader(context.Background()); err != nil || l.Address != "first:7000" || l.Term != 1 {
		t.Errorf("Leader() from the standby = %+v, %v; want first:7000 in term 1", l, err)
	}
	select {
	case l := <-won:
		t.Fatalf("the second store won a campaign while the first leads: %+v", l)
	default:
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	l2 := <-won
	if l2 == nil {
		t.Fatal("the second campaign failed")
	}
	if l2.Term != 2 || l2.Previous == nil || l2.Previous.Holder != "first" || !l2.Previous.Released {
		t.Errorf("second leadership: term %d, previous %+v; want term 2 after first, released", l2.Term, l2.Previous)
	}
	if err := put(second, "b"); err != nil {
		t.Fatal(err)
	}
	if err := put(first, "c"); !errors.Is(err, ErrNotLeader) {
		t.Errorf("a write after stepping down = %v, want ErrNotLeader", err)
	}
}

// testPostgresFencing: the leader's lock session is terminated (as when
// its connection dies) while its process goes on. The standby leads at
// once; the deposed leader's next write fails with ErrNotLeader and
// changes nothing, and it learns it lost the lead (Lost) by itself.
func testPostgresFencing(t *testing.T, dsn string) {
	first := leading(t, dsn)
	second := openPostgres(t, dsn)
	won := campaign(second, "second")

	admin := connect(t, dsn)
	var pid int32
	if err := admin.QueryRow(context.Background(), "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid::bigint = $1", lockDirector).Scan(&pid); err != nil {
		t.Fatalf("the leader's lock session: %v", err)
	}
	if _, err := admin.Exec(context.Background(), "SELECT pg_terminate_backend($1)", pid); err != nil {
		t.Fatal(err)
	}
	l2 := <-won
	if l2 == nil {
		t.Fatal("the standby's campaign failed")
	}
	if l2.Term != 2 || l2.Previous == nil || l2.Previous.Released {
		t.Errorf("takeover: term %d, previous %+v; want term 2 after a leader that did not step down", l2.Term, l2.Previous)
	}
	err := put(first, "deposed")
	if !errors.Is(err, ErrNotLeader) {
		t.Fatalf("the deposed leader's write = %v, want ErrNotLeader", err)
	}
	if err := second.View(func(tx Tx) error {
		_, err := tx.Envoy("deposed")
		return err
	}); !errors.Is(err, ErrNotFound) {
		t.Errorf("the deposed leader's write is in the database: %v", err)
	}
	<-first.lost // the write, or the watch, deposed it
	if !errors.Is(first.lostErr, ErrNotLeader) {
		t.Errorf("Lost's reason = %v", first.lostErr)
	}
	if err := put(second, "new"); err != nil {
		t.Fatal(err)
	}
}

// testPostgresDeposedByWatch: a leader whose lock session ends learns it
// from its own check, without writing.
func testPostgresDeposedByWatch(t *testing.T, dsn string) {
	first := openPostgres(t, dsn)
	l, err := first.Campaign(context.Background(), Candidate{Holder: "first"})
	if err != nil {
		t.Fatal(err)
	}
	admin := connect(t, dsn)
	if _, err := admin.Exec(context.Background(), "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid::bigint = $1", lockDirector); err != nil {
		t.Fatal(err)
	}
	<-l.Lost()
	if err := l.Err(); !errors.Is(err, ErrNotLeader) || !strings.Contains(err.Error(), "failed") {
		t.Errorf("Err() = %v, want ErrNotLeader naming the failed connection", err)
	}
}

// TestPostgresTarget: connection strings are described by host and
// database, and neither a description nor an error quotes the password.
func TestPostgresTarget(t *testing.T) {
	for _, tc := range []struct {
		dsn, want string
	}{
		{"postgres://fx:s3cret@db.example:5433/fxstate", `PostgreSQL database "fxstate" on db.example:5433`},
		{"host=db.example user=fx password=s3cret dbname=fxstate", `PostgreSQL database "fxstate" on db.example:5432`},
		{"host=/run/postgresql dbname=fx password=s3cret", `PostgreSQL database "fx" at the socket in /run/postgresql`},
	} {
		got, err := PostgresTarget(tc.dsn)
		if err != nil || got != tc.want {
			t.Errorf("PostgresTarget(%q) = %q, %v; want %q", tc.dsn, got, err, tc.want)
		}
	}
	for _, dsn := range []string{
		"postgres://fx:s3cret@db.example:notaport/fx",
		"postgres://fx:s3cret@db.example/fx?sslmode=bogus",
		"host=db.example password=s3cret port=x",
		"host=db.example password='s3cret",
	} {
		_, err := PostgresTarget(dsn)
		if err == nil {
			t.Errorf("PostgresTarget(%q) accepted it", dsn)
			continue
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("PostgresTarget(%q) error quotes the password: %v", dsn, err)
		}
		if !strings.Contains(err.Error(), "not a PostgreSQL connection string") {
			t.Errorf("PostgresTarget(%q) error = %v", dsn, err)
		}
	}
	// Connecting fails without quoting the password either.
	_, err := OpenPostgres(context.Background(), "postgres://fx:s3cret@127.0.0.1:1/fx?connect_timeout=2")
	if err == nil || strings.Contains(err.Error(), "s3cret") || !strings.Contains(err.Error(), `cannot connect to the PostgreSQL database "fx" on 127.0.0.1:1`) {
		t.Errorf("OpenPostgres of an unreachable database = %v", err)
	}
}
