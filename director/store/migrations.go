package store

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"path"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
)

// The PostgreSQL schema is versioned: migrations/NNNN_name.sql is version
// NNNN, numbered from 1 without gaps, and the table fx_schema_migrations
// records the versions a database has. A migration, once released, never
// changes; a new schema is a new file.
//
//go:embed migrations/*.sql
var migrationFiles embed.FS

type migration struct {
	version int
	name    string
	sql     string
}

// migrations are the embedded migrations in version order.
func migrations() ([]migration, error) {
	names, err := fs.Glob(migrationFiles, "migrations/*.sql")
	if err != nil {
		return nil, err
	}
	// fs.Glob returns names sorted: zero-padded versions sort as numbers.
	out := make([]migration, 0, len(names))
	for i, name := range names {
		base := path.Base(name)
		num, _, ok := strings.Cut(base, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v != i+1 {
			return nil, fmt.Errorf("migration %s: want a name %04d_<what>.sql: versions count from 1 without gaps", name, i+1)
		}
		sql, err := migrationFiles.ReadFile(name)
		if err != nil {
			return nil, err
		}
		out = append(out, migration{version: v, name: strings.TrimSuffix(base, ".sql"), sql: string(sql)})
	}
	return out, nil
}

// migrate brings the database's schema up to this build's version, in one
// transaction: all the missing migrations and their records, or nothing.
// A transaction-level advisory lock makes processes that migrate at once
// (two directors started together) take turns: the second waits for the
// first to commit and then finds nothing left to do. A database with a
// newer version than this build knows is refused without a change.
func migrate(ctx context.Context, db interface {
	Begin(context.Context) (pgx.Tx, error)
}) error {
	ms, err := migrations()
	if err != nil {
		return err
	}
	tx, err := db.Begin(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(ctx) }()
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", lockMigrate); err != nil {
		return fmt.Errorf("wait for other migrations: %w", err)
	}
	if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS fx_schema_migrations (
		version integer PRIMARY KEY,
		name text NOT NULL,
		applied_at timestamptz NOT NULL DEFAULT now()
	)`); err != nil {
		return fmt.Errorf("schema migrations table: %w", err)
	}
	var have int
	if err := tx.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM fx_schema_migrations").Scan(&have); err != nil {
		return fmt.Errorf("schema version: %w", err)
	}
	if have > len(ms) {
		return fmt.Errorf("its schema is version %d, newer than this fx knows (version %d): a newer fx has used this database; upgrade fx to that version (or run the director on another database)", have, len(ms))
	}
	for _, m := range ms[have:] {
		if _, err := tx.Exec(ctx, m.sql); err != nil {
			return fmt.Errorf("schema migration %s: %w", m.name, err)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO fx_schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name); err != nil {
			return fmt.Errorf("schema migration %s: %w", m.name, err)
		}
	}
	return tx.Commit(ctx)
}
