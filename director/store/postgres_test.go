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

// TestPostgres runs the store suite against a real PostgreSQL server, a
// new database for each case, and then what is PostgreSQL's own: schema
// versions, migrations racing, the one-director lock, and connection
// strings kept out of errors.
func TestPostgres(t *testing.T) {
	srv := testpg.Start(t)
	testStore(t, backend{durable: true, fresh: func(t *testing.T) func(t *testing.T) Store {
		dsn := srv.NewDatabase(t)
		return func(t *testing.T) Store { return openPostgres(t, dsn) }
	}})
	t.Run("Schema", func(t *testing.T) { testPostgresSchema(t, srv.NewDatabase(t)) })
	t.Run("NewerSchemaRefused", func(t *testing.T) { testPostgresNewerSchema(t, srv.NewDatabase(t)) })
	t.Run("MigrationsAtOnce", func(t *testing.T) { testPostgresMigrationsAtOnce(t, srv.NewDatabase(t)) })
	t.Run("OneDirectorPerDatabase", func(t *testing.T) { testPostgresOneDirector(t, srv.NewDatabase(t)) })
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
	if vs := schemaVersions(t, conn); vs[len(vs)-1] != 999 || len(vs) != 2 {
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

// testPostgresOneDirector: while one store is open on a database a second
// is refused with a message saying why; after Close the database is free.
func testPostgresOneDirector(t *testing.T, dsn string) {
	first := openPostgres(t, dsn)
	_, err := OpenPostgres(context.Background(), dsn)
	if err == nil || !strings.Contains(err.Error(), "in use by another director") {
		t.Fatalf("second OpenPostgres = %v, want a refusal", err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	openPostgres(t, dsn)
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
