-- Version 2: the leader of the directors sharing this database (active and
-- standby). One row, id 1. term counts the leaderships: each director that
-- takes the lead adds one, and every write it makes checks, in its own
-- transaction, that the term is still its own (fencing: a deposed leader's
-- writes fail). address is where the leader serves, for standbys to name;
-- released says the holder stepped down cleanly, its aggregators stopped.
CREATE TABLE fx_leader (
	id       integer PRIMARY KEY CHECK (id = 1),
	term     bigint NOT NULL,
	holder   text NOT NULL,
	address  text NOT NULL,
	since    timestamptz NOT NULL,
	released boolean NOT NULL DEFAULT false
);
