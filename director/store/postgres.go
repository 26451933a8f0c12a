package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fx-fl/fx/internal/backoff"
)

// Postgres is a Store in a PostgreSQL database, for directors whose state
// should live in a managed database (replicated, backed up with pg_dump or
// point-in-time recovery) rather than in a file beside them. Each bucket is
// a table fx_<bucket> of (key, JSON value); migrations.go creates them.
//
// Update runs SERIALIZABLE: PostgreSQL then commits only transactions
// whose outcome equals some serial order of them, and aborts the others
// with a serialization failure (SQLSTATE 40001), which Update retries from
// the start, with backoff. That is what makes the director's
// read-modify-write transactions correct when they overlap (no lost
// update, no write based on a listing that changed meanwhile), without
// each read having to know which rows to lock. Retries are rare: a
// director writes under its own mutex, one transaction at a time. View runs
// REPEATABLE READ and READ ONLY: one consistent snapshot for all its reads,
// never a serialization failure, and no write gets through.
//
// Batch is Update: PostgreSQL commits are cheap next to bbolt's fsync per
// commit, which is what bbolt's Batch saves.
//
// Several directors may share one database, one leading and the others
// standing by: see leader.go. Update writes only while Campaign's
// leadership lasts.
type Postgres struct {
	pool *pgxpool.Pool
	leaderState
	// target names the database in messages: host, port and database,
	// never the password.
	target string
}

// Bounds of one transaction.
const (
	// pgTxTimeout bounds one attempt of a transaction, so that a database
	// that stopped answering fails the caller instead of hanging it.
	pgTxTimeout = 30 * time.Second
	// pgRetryFor bounds the retries of a transaction that keeps failing
	// with serialization failures or deadlocks.
	pgRetryFor = 30 * time.Second
	// pgConnectTimeout bounds connecting at open.
	pgConnectTimeout = 15 * time.Second
)

// Advisory lock keys, per database: fixed forever, "fx" in ASCII then a
// number.
const (
	lockMigrate  int64 = 0x6678_0001
	lockDirector int64 = 0x6678_0002
)

// pgRetry is the schedule between the attempts of a transaction.
var pgRetry = backoff.Config{Initial: 5 * time.Millisecond, Max: 250 * time.Millisecond}

// PostgresTarget checks that dsn is a PostgreSQL connection string (a
// postgres:// URL or keyword=value pairs) and describes the database it
// names, for logs and messages: host, port and database, never the user's
// password. Its error does not quote dsn.
func PostgresTarget(dsn string) (string, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return "", dsnError(err)
	}
	return target(cfg.ConnConfig), nil
}

func target(c *pgx.ConnConfig) string {
	if strings.HasPrefix(c.Host, "/") {
		return fmt.Sprintf("PostgreSQL database %q at the socket in %s", c.Database, c.Host)
	}
	return fmt.Sprintf("PostgreSQL database %q on %s:%d", c.Database, c.Host, c.Port)
}

// dsnError is pgx's parse error without the connection string it quotes:
// pgx masks the password it finds there, but only as best it can, and the
// error it wraps (a URL's) quotes the string as given.
func dsnError(err error) error {
	const what = "not a PostgreSQL connection string (a postgres://user@host/database URL or keyword=value pairs)"
	var pe *pgconn.ParseConfigError
	if !errors.As(err, &pe) {
		return errors.New(what)
	}
	// pe.Error() is "cannot parse `<masked dsn>`: <problem>" followed by
	// " (<wrapped error>)" when there is one.
	msg := pe.Error()
	if i := strings.Index(msg, "`: "); i >= 0 {
		msg = msg[i+3:]
	}
	if inner := pe.Unwrap(); inner != nil {
		msg = strings.TrimSuffix(msg, " ("+inner.Error()+")")
	}
	return fmt.Errorf("%s: %s", what, msg)
}

// OpenPostgres connects to the database dsn names and brings its schema up
// to this build's version (see migrate); it writes nothing else until
// Campaign makes it the leader. A
// database whose schema is newer than this build knows is refused: a newer
// fx has used it. Errors never quote dsn.
func OpenPostgres(ctx context.Context, dsn string) (*Postgres, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, dsnError(err)
	}
	where := target(cfg.ConnConfig)
	ctx, cancel := context.WithTimeout(ctx, pgConnectTimeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg.ConnConfig.Copy())
	if err != nil {
		return nil, fmt.Errorf("cannot connect to the %s: %w", where, err)
	}
	defer func() { _ = conn.Close(context.Background()) }()
	if err := prepare(ctx, conn, where); err != nil {
		return nil, err
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("cannot connect to the %s: %w", where, err)
	}
	s := &Postgres{pool: pool, target: where}
	s.connConfig = cfg.ConnConfig
	s.lost = make(chan struct{})
	return s, nil
}

// prepare checks the database's encoding and migrates its schema.
func prepare(ctx context.Context, conn *pgx.Conn, where string) error {
	var enc string
	if err := conn.QueryRow(ctx, "SHOW server_encoding").Scan(&enc); err != nil {
		return fmt.Errorf("the %s: %w", where, err)
	}
	if enc != "UTF8" {
		return fmt.Errorf("the %s has encoding %s: the director's records need UTF8 (CREATE DATABASE ... ENCODING 'UTF8', PostgreSQL's default)", where, enc)
	}
	if err := migrate(ctx, conn); err != nil {
		return fmt.Errorf("the %s: %w", where, err)
	}
	return nil
}

// Target describes the database, as PostgresTarget does.
func (s *Postgres) Target() string { return s.target }

// View implements Store.
func (s *Postgres) View(fn func(Tx) error) error {
	return s.run(pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, fn)
}

// Update implements Store; see Postgres for why SERIALIZABLE.
func (s *Postgres) Update(fn func(Tx) error) error {
	return s.run(pgx.TxOptions{IsoLevel: pgx.Serializable}, fn)
}

// Batch implements Store: it is Update (see Postgres).
func (s *Postgres) Batch(fn func(Tx) error) error { return s.Update(fn) }

// Close implements Store. A leader steps down: closing the lock's
// connection releases the lock.
func (s *Postgres) Close() error {
	s.release()
	s.pool.Close()
	return nil
}

// run runs fn in a transaction, again from the start after a
// serialization failure or a deadlock, for up to pgRetryFor.
func (s *Postgres) run(opts pgx.TxOptions, fn func(Tx) error) error {
	b := backoff.New(pgRetry)
	deadline := time.Now().Add(pgRetryFor)
	for attempt := 1; ; attempt++ {
		err := s.attempt(opts, fn)
		if !retryable(err) {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the %s: transaction still conflicting with others after %d attempts: %w", s.target, attempt, err)
		}
		backoff.Sleep(context.Background(), b.Next())
	}
}

func (s *Postgres) attempt(opts pgx.TxOptions, fn func(Tx) error) error {
	write := opts.AccessMode != pgx.ReadOnly
	if write {
		if err := s.standing(); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), pgTxTimeout)
	defer cancel()
	ptx, err := s.pool.BeginTx(ctx, opts)
	if err != nil {
		return fmt.Errorf("the %s: %w", s.target, err)
	}
	// Rolling back a committed transaction does nothing.
	defer func() { _ = ptx.Rollback(ctx) }()
	if write {
		if err := s.fence(ctx, ptx); err != nil {
			return err
		}
	}
	if err := fn(tx{kv: pgKV{ctx: ctx, tx: ptx}}); err != nil {
		return err
	}
	if err := ptx.Commit(ctx); err != nil {
		return fmt.Errorf("the %s: commit: %w", s.target, err)
	}
	return nil
}

// retryable reports whether err is PostgreSQL's answer to a conflict with
// another transaction, after which running the transaction again can
// succeed: a serialization failure or a deadlock.
func retryable(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "40001" || pe.Code == "40P01")
}

type pgKV struct {
	ctx context.Context
	tx  pgx.Tx
}

// table is a bucket's table. Bucket names are this package's constants,
// never input, so they may be put into SQL.
func table(bucket string) string { return "fx_" + bucket }

func (k pgKV) get(bucket, key string) ([]byte, error) {
	var v []byte
	err := k.tx.QueryRow(k.ctx, "SELECT value FROM "+table(bucket)+" WHERE key = $1", key).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	return v, err
}

func (k pgKV) put(bucket, key string, val []byte) error {
	_, err := k.tx.Exec(k.ctx, "INSERT INTO "+table(bucket)+" (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value", key, string(val))
	return err
}

func (k pgKV) del(bucket, key string) error {
	_, err := k.tx.Exec(k.ctx, "DELETE FROM "+table(bucket)+" WHERE key = $1", key)
	return err
}

// scan reads every matching row before it calls fn: a connection runs
// one query at a time. key >= prefix lets the primary key's index start
// the scan; the listings are small (the director's whole state).
func (k pgKV) scan(bucket, prefix string, fn func(string, []byte) error) error {
	rows, err := k.tx.Query(k.ctx, "SELECT key, value FROM "+table(bucket)+" WHERE key >= $1 AND starts_with(key, $1) ORDER BY key", prefix)
	if err != nil {
		return err
	}
	type row struct {
		key string
		val []byte
	}
	all, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var x row
		err := r.Scan(&x.key, &x.val)
		return x, err
	})
	if err != nil {
		return err
	}
	for _, r := range all {
		if err := fn(r.key, r.val); err != nil {
			return err
		}
	}
	return nil
}
