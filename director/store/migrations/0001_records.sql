-- Version 1: one table per kind of record, each a key-value table like a
-- bbolt bucket. Keys sort by their bytes (COLLATE "C"), as bbolt's do, so
-- listings come in the same order from either store. Values are the JSON
-- records themselves: readable with psql (cast to jsonb to query them), and
-- a field added to a record needs no migration.
CREATE TABLE fx_experiments (
	key   text COLLATE "C" PRIMARY KEY,
	value json NOT NULL
);
-- key: experiment id + '/' + envoy name.
CREATE TABLE fx_participants (
	key   text COLLATE "C" PRIMARY KEY,
	value json NOT NULL
);
CREATE TABLE fx_envoys (
	key   text COLLATE "C" PRIMARY KEY,
	value json NOT NULL
);
CREATE TABLE fx_metric_positions (
	key   text COLLATE "C" PRIMARY KEY,
	value json NOT NULL
);
