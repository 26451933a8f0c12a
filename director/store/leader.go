package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// Leader election among the directors that share one PostgreSQL database
// (active and standby).
//
// The leader is whoever holds a session-level advisory lock
// (pg_advisory_lock) on a connection of its own. We chose the lock over a
// lease row renewed on a timer because PostgreSQL releases it the moment
// the holder's session ends: a leader killed with SIGKILL, or whose host
// died, loses its TCP connection and the lock with it, and the standby
// blocked in pg_advisory_lock gets it at once, with no expiry to wait out
// and no clocks to trust. (A leader cut off by a silent network partition
// keeps the lock until the server's TCP keepalive notices; set the
// server's tcp_keepalives_* for a bound.)
//
// A lock alone does not fence: a leader that lost its connection without
// noticing could still write through its pool. So taking the lead also
// bumps a term in fx_leader, and every write transaction reads that row
// FOR SHARE and fails with ErrNotLeader unless the term is still its own.
// The row lock orders the two: a bump waits for a write already under way
// to commit, and a write that starts after a bump sees the new term (or,
// SERIALIZABLE, fails to serialize and sees it on the retry). Reads need no
// fence. The leader also checks its lock connection and term every
// leaderCheckEvery, and reports the loss (Leadership.Lost) within
// DeposeWithin, so that it stops its aggregators and stops serving.

// ErrNotLeader is returned (wrapped) by writes of a director that does not
// lead: a standby's, or a deposed leader's.
var ErrNotLeader = errors.New("this director is not the leader")

// Candidate is a director campaigning for the lead.
type Candidate struct {
	// Holder names the director in fx_leader and in logs: host, process.
	Holder string
	// Address is where the director serves clients (host:port), for
	// standbys to point clients at.
	Address string
}

// Leader is the row of fx_leader: the current (or last) leader.
type Leader struct {
	Term    int64
	Holder  string
	Address string
	Since   time.Time
	// Released says the leader stepped down cleanly (its aggregators had
	// stopped); false while it leads, and after it died.
	Released bool
}

// Leadership is a won campaign.
type Leadership struct {
	// Term is this leadership's term: one more than the previous one's.
	Term int64
	// Previous is the leader before, nil for a database's first.
	Previous *Leader
	s        *Postgres
}

// Lost is closed once the leadership is lost: the lock's connection
// failed or did not answer within leaderCheckTimeout, or another director
// took a newer term. From then on every write fails with ErrNotLeader.
func (l *Leadership) Lost() <-chan struct{} { return l.s.lost }

// Err says why the leadership was lost, nil before.
func (l *Leadership) Err() error {
	l.s.mu.Lock()
	defer l.s.mu.Unlock()
	return l.s.lostErr
}

// Elector is a Store that several directors share, one of them leading.
type Elector interface {
	// Campaign blocks until this store's director leads, ctx ends or the
	// database fails. Only then does Update write.
	Campaign(ctx context.Context, c Candidate) (*Leadership, error)
	// Leader reads the current leader; ErrNotFound when none ever led.
	Leader(ctx context.Context) (Leader, error)
	// Target names the database, for messages.
	Target() string
}

// How a leader watches its own leadership. A leader that cannot confirm
// it within DeposeWithin of losing it considers itself deposed.
const (
	leaderCheckEvery   = time.Second
	leaderCheckTimeout = 2 * time.Second
	// DeposeWithin bounds how long a leader that lost the database takes
	// to notice (Leadership.Lost): a new leader whose predecessor did not
	// step down cleanly waits this long, and a little more, before it
	// launches aggregators on the shared files.
	DeposeWithin = leaderCheckEvery + leaderCheckTimeout
)

var _ Elector = (*Postgres)(nil)

// Campaign implements Elector: it connects a session of its own, waits in
// pg_advisory_lock until it holds the director lock, and takes the next
// term, recording c in fx_leader. The lock's session then lives until
// Close, or until it fails, which loses the leadership.
func (s *Postgres) Campaign(ctx context.Context, c Candidate) (*Leadership, error) {
	s.mu.Lock()
	if s.lock != nil {
		s.mu.Unlock()
		return nil, errors.New("already leading")
	}
	s.mu.Unlock()
	cctx, cancel := context.WithTimeout(ctx, pgConnectTimeout)
	conn, err := pgx.ConnectConfig(cctx, s.connConfig.Copy())
	cancel()
	if err != nil {
		return nil, fmt.Errorf("cannot connect to the %s: %w", s.target, err)
	}
	l, err := s.takeLead(ctx, conn, c)
	if err != nil {
		closeCtx, cancel := context.WithTimeout(context.Background(), pgConnectTimeout)
		defer cancel()
		_ = conn.Close(closeCtx)
		return nil, err
	}
	watchCtx, stop := context.WithCancel(context.Background())
	s.mu.Lock()
	s.lock, s.stopWatch, s.watchDone = conn, stop, make(chan struct{})
	s.mu.Unlock()
	s.term.Store(l.Term)
	go s.watch(watchCtx, conn, l.Term)
	return l, nil
}

func (s *Postgres) takeLead(ctx context.Context, conn *pgx.Conn, c Candidate) (*Leadership, error) {
	// Blocks while another session holds the lock; cancelling ctx cancels
	// the wait.
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", lockDirector); err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("the %s: waiting for the leader's lock: %w", s.target, err)
	}
	tctx, cancel := context.WithTimeout(ctx, pgTxTimeout)
	defer cancel()
	l := &Leadership{s: s}
	err := pgx.BeginFunc(tctx, conn, func(tx pgx.Tx) error {
		prev, err := readLeader(tctx, tx)
		switch {
		case errors.Is(err, ErrNotFound):
		case err != nil:
			return err
		default:
			l.Previous = &prev
		}
		return tx.QueryRow(tctx, `INSERT INTO fx_leader (id, term, holder, address, since, released) VALUES (1, 1, $1, $2, now(), false)
			ON CONFLICT (id) DO UPDATE SET term = fx_leader.term + 1, holder = excluded.holder, address = excluded.address, since = excluded.since, released = false
			RETURNING term`, c.Holder, c.Address).Scan(&l.Term)
	})
	if err != nil {
		return nil, fmt.Errorf("the %s: taking the lead: %w", s.target, err)
	}
	return l, nil
}

type queryRower interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func readLeader(ctx context.Context, q queryRower) (Leader, error) {
	var l Leader
	err := q.QueryRow(ctx, "SELECT term, holder, address, since, released FROM fx_leader WHERE id = 1").Scan(&l.Term, &l.Holder, &l.Address, &l.Since, &l.Released)
	if errors.Is(err, pgx.ErrNoRows) {
		return Leader{}, fmt.Errorf("leader: %w", ErrNotFound)
	}
	return l, err
}

// Leader implements Elector.
func (s *Postgres) Leader(ctx context.Context) (Leader, error) {
	ctx, cancel := context.WithTimeout(ctx, pgTxTimeout)
	defer cancel()
	l, err := readLeader(ctx, s.pool)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return l, fmt.Errorf("the %s: %w", s.target, err)
	}
	return l, err
}

// watch checks, every leaderCheckEvery, that the lock's session answers
// and the term is still term; the first failure deposes.
func (s *Postgres) watch(ctx context.Context, conn *pgx.Conn, term int64) {
	defer close(s.watchDone)
	t := time.NewTicker(leaderCheckEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cctx, cancel := context.WithTimeout(ctx, leaderCheckTimeout)
		var now int64
		err := conn.QueryRow(cctx, "SELECT term FROM fx_leader WHERE id = 1").Scan(&now)
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			s.depose(fmt.Errorf("%w: the connection holding the leader's lock on the %s failed (%v): another director may lead now", ErrNotLeader, s.target, err))
			return
		case now != term:
			s.depose(fmt.Errorf("%w: another director took the lead (term %d after this one's %d)", ErrNotLeader, now, term))
			return
		}
	}
}

// depose records the loss of the leadership, once: writes fail from now on.
func (s *Postgres) depose(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lostErr != nil {
		return
	}
	s.term.Store(-1)
	s.lostErr = err
	close(s.lost)
}

// fence fails a write transaction unless this store leads in the term the
// database has, and holds that row (FOR SHARE) until the transaction ends,
// so that no new term can begin before it commits.
func (s *Postgres) fence(ctx context.Context, tx pgx.Tx) error {
	if err := s.standing(); err != nil {
		return err
	}
	term := s.term.Load()
	var now int64
	err := tx.QueryRow(ctx, "SELECT term FROM fx_leader WHERE id = 1 FOR SHARE").Scan(&now)
	if err != nil {
		return err // a serialization failure is retried, and then sees the new term
	}
	if now != term {
		err := fmt.Errorf("%w: another director took the lead (term %d after this one's %d)", ErrNotLeader, now, term)
		s.depose(err)
		return err
	}
	return nil
}

// standing fails unless this store believes it leads: a standby's or a
// deposed leader's write fails before it reaches the database.
func (s *Postgres) standing() error {
	switch term := s.term.Load(); {
	case term < 0:
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.lostErr
	case term == 0:
		return fmt.Errorf("%w: it is a standby, and writes nothing until it leads", ErrNotLeader)
	}
	return nil
}

// release steps down cleanly: the row says so, so that the next leader
// need not wait out DeposeWithin, and closing the session frees the lock.
func (s *Postgres) release() {
	s.mu.Lock()
	conn, stop, done := s.lock, s.stopWatch, s.watchDone
	s.lock = nil
	s.mu.Unlock()
	if conn == nil {
		return
	}
	stop()
	<-done
	ctx, cancel := context.WithTimeout(context.Background(), pgConnectTimeout)
	defer cancel()
	if term := s.term.Load(); term > 0 {
		_, _ = conn.Exec(ctx, "UPDATE fx_leader SET released = true WHERE id = 1 AND term = $1", term)
	}
	s.depose(fmt.Errorf("%w: it stepped down", ErrNotLeader))
	_ = conn.Close(ctx)
}

// leaderState is what Postgres keeps of its leadership.
type leaderState struct {
	connConfig *pgx.ConnConfig
	// term is 0 before Campaign wins, the term while leading, -1 after.
	term      atomic.Int64
	mu        sync.Mutex
	lock      *pgx.Conn
	stopWatch context.CancelFunc
	watchDone chan struct{}
	lost      chan struct{}
	lostErr   error
}
