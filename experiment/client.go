package experiment

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/internal/directors"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// Client defaults. They are applied by Dial to the zero fields of
// ClientConfig.
const (
	// DefaultConnectTimeout bounds how long Dial waits to reach the director
	// and hear back from it: a wrong address or a director that is down
	// fails with a message naming the address instead of hanging.
	DefaultConnectTimeout = 10 * time.Second
	// DefaultCallTimeout bounds a unary call (Get, List, Cancel, ...) whose
	// context has no deadline of its own.
	DefaultCallTimeout = 30 * time.Second
	// DefaultRetryInitial and DefaultRetryMax bound the pause between two
	// attempts to reconnect a metric stream: it starts short so a brief
	// network blip costs little, and doubles up to the maximum so a director
	// that is restarting is not hammered.
	DefaultRetryInitial = 100 * time.Millisecond
	DefaultRetryMax     = 5 * time.Second
	// DefaultGiveUpAfter is how long a metric stream keeps reconnecting
	// without receiving anything before it reports the director lost.
	DefaultGiveUpAfter = 2 * time.Minute
)

// ChunkSize is the largest piece of an archive Submit sends in one message;
// the protocol caps messages at 1 MiB.
const ChunkSize = 1 << 20

// ErrWrongRole is matched (errors.Is) by the error Dial returns when the
// certificate is not a researcher's or an admin's: the director would refuse
// every call, so Dial refuses before making one.
var ErrWrongRole = errors.New("wrong certificate role")

// ErrUnreachable is matched (errors.Is) by the error Dial returns when the
// director cannot be reached: nothing listens at the address, its
// certificate does not carry the name asked for, or it did not answer
// within ConnectTimeout.
var ErrUnreachable = errors.New("director unreachable")

// ClientConfig says how a researcher's program reaches the director.
type ClientConfig struct {
	// Director is the director's address, host:port. Required. With
	// active and standby directors: every director's host:port separated
	// by commas, or one dns:///name:port with a record per director; calls
	// go to whichever leads (internal/directors).
	Director string
	// ServerName is the name the director's certificate must carry; empty
	// means the host of Director.
	ServerName string
	// Cert, Key and CA are the researcher's certificate (PEM, with its
	// chain), private key and the federation root. Required.
	Cert, Key, CA string

	// ConnectTimeout bounds Dial's wait for the director (see
	// DefaultConnectTimeout).
	ConnectTimeout time.Duration
	// CallTimeout bounds unary calls whose context has no deadline (see
	// DefaultCallTimeout).
	CallTimeout time.Duration
	// Retry shapes how a metric stream reconnects after a dropped
	// connection.
	Retry Retry

	// DialOptions are added after fx's own (mutual TLS and error
	// interceptors); for tests and unusual networks.
	DialOptions []grpc.DialOption
}

// Retry is the bounded exponential backoff of a reconnecting stream.
type Retry struct {
	// Initial is the first pause (see DefaultRetryInitial).
	Initial time.Duration
	// Max caps the pause (see DefaultRetryMax).
	Max time.Duration
	// GiveUpAfter is how long the stream keeps trying without receiving an
	// event before it fails (see DefaultGiveUpAfter).
	GiveUpAfter time.Duration
}

func (c ClientConfig) withDefaults() ClientConfig {
	if c.ConnectTimeout <= 0 {
		c.ConnectTimeout = DefaultConnectTimeout
	}
	if c.CallTimeout <= 0 {
		c.CallTimeout = DefaultCallTimeout
	}
	if c.Retry.Initial <= 0 {
		c.Retry.Initial = DefaultRetryInitial
	}
	if c.Retry.Max <= 0 {
		c.Retry.Max = DefaultRetryMax
	}
	if c.Retry.Max < c.Retry.Initial {
		c.Retry.Max = c.Retry.Initial
	}
	if c.Retry.GiveUpAfter <= 0 {
		c.Retry.GiveUpAfter = DefaultGiveUpAfter
	}
	return c
}

// Client is a researcher's (or an admin's) connection to the director. It
// is safe for concurrent use; Close it when done.
type Client struct {
	cfg  ClientConfig
	id   pki.Identity
	conn *grpc.ClientConn
	rpc  fxv1.DirectorClient
}

// Dial loads the certificate, checks that it is a researcher's or an
// admin's, connects to the director and makes one cheap call to prove the
// director is there and accepts the certificate. It fails within
// ConnectTimeout (or ctx's deadline, if sooner) with an error naming the
// address when the director cannot be reached, and at once when waiting
// cannot help: nothing listens at the address (connection refused), or the
// director's certificate does not carry ServerName. Both match
// ErrUnreachable; a program that starts a director and dials it at once
// asks again while its connection is refused.
func Dial(ctx context.Context, cfg ClientConfig) (*Client, error) {
	cfg = cfg.withDefaults()
	if cfg.Director == "" {
		return nil, errors.New("no director address: give it as host:port (the CLI's --director or FX_DIRECTOR)")
	}
	target, directorOpts, err := directors.Dial(cfg.Director)
	if err != nil {
		return nil, err
	}
	k, err := pki.NewKeyring(pki.KeyringConfig{Files: pki.Files{Cert: cfg.Cert, Key: cfg.Key, CA: cfg.CA}})
	if err != nil {
		return nil, fmt.Errorf("loading the researcher's certificate: %w", err)
	}
	id := k.Identity()
	if id.Role != pki.RoleResearcher && id.Role != pki.RoleAdmin {
		return nil, fmt.Errorf("%w: %s is the certificate of %s %q, but experiments are driven with a researcher's (or an admin's) certificate: ask the federation's CA for one (`fx pki certify --role researcher --name NAME`)", ErrWrongRole, cfg.Cert, id.Role, id.Name)
	}
	opts := append([]grpc.DialOption{
		// Pings no more often than the director's default enforcement
		// (5 minutes) allows, so a watch over a connection that died
		// silently (a NAT dropping it) fails and reconnects.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 6 * time.Minute, Timeout: 20 * time.Second}),
		// Reconnect on the same schedule as Retry, so a restarted
		// director is found again within Retry.Max rather than gRPC's
		// default of up to two minutes.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: cfg.Retry.Initial, Multiplier: 1.6, Jitter: 0.2, MaxDelay: cfg.Retry.Max},
			MinConnectTimeout: 20 * time.Second,
		}),
	}, directorOpts...)
	opts = append(opts, cfg.DialOptions...)
	conn, err := pki.NewClient(target, k, cfg.ServerName, opts...)
	if err != nil {
		return nil, fmt.Errorf("director %s: %w", cfg.Director, err)
	}
	c := &Client{cfg: cfg, id: id, conn: conn, rpc: fxv1.NewDirectorClient(conn)}
	if err := c.probe(ctx); err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// probe calls GetExperiment without naming one: a director that is there
// and accepts the certificate answers InvalidArgument at once, and that
// answer needs no experiment to exist. Attempts fail fast, so a director
// that refuses the certificate in the handshake (revoked, another
// federation's) is reported at once rather than after ConnectTimeout;
// between attempts it waits for the connection's state to change, not for
// a fixed time.
func (c *Client) probe(ctx context.Context) error {
	pctx, cancel := context.WithTimeout(ctx, c.cfg.ConnectTimeout)
	defer cancel()
	var last error
	bo := newBackoff(c.cfg.Retry)
	for {
		_, err := c.rpc.GetExperiment(pctx, &fxv1.GetExperimentRequest{})
		switch status.Code(err) {
		case codes.OK, codes.InvalidArgument, codes.NotFound:
			return nil
		case codes.Unavailable:
			last = err
			// Waiting would not change these: say so at once.
			// With several directors one may be down while another
			// takes over: only waiting tells.
			if why := hopeless(err); why != "" && !directors.Several(c.cfg.Director) {
				return fmt.Errorf("%w: cannot reach the director at %s: %s", ErrUnreachable, c.cfg.Director, why)
			}
			// Every director of a federation refuses the same
			// certificate: waiting for another would not help.
			if refused := healthRefusal(err); refused != nil {
				return c.wrap(fmt.Sprintf("connecting to the director at %s", c.cfg.Director), refused)
			}
			switch st := c.conn.GetState(); st {
			case connectivity.Ready:
				// The director itself answered Unavailable (it is
				// shutting down): ask again after a pause.
				if bo.wait(pctx) == nil {
					continue
				}
			default:
				if st == connectivity.Idle {
					c.conn.Connect()
				}
				if c.conn.WaitForStateChange(pctx, st) {
					continue
				}
			}
		case codes.DeadlineExceeded, codes.Canceled:
			if last == nil {
				last = err
			}
		default:
			return c.wrap(fmt.Sprintf("connecting to the director at %s", c.cfg.Director), err)
		}
		if ctx.Err() != nil {
			return fmt.Errorf("connecting to the director at %s: %w", c.cfg.Director, ctx.Err())
		}
		return fmt.Errorf("%w: cannot reach the director at %s within %s: is it running, and is the address right? (%s)", ErrUnreachable, c.cfg.Director, c.cfg.ConnectTimeout, statusMessage(last))
	}
}

// hopeless says why a failed connection attempt will fail again however
// long one waits, or "" when it might not: nothing listens at the address,
// or the director's certificate does not carry the name the client checks.
func hopeless(err error) string {
	msg := statusMessage(err)
	switch {
	case strings.Contains(msg, "connection refused"):
		return "nothing listens there (connection refused): is the director running, and is the port right?"
	case strings.Contains(msg, "certificate is valid for"), strings.Contains(msg, "certificate is not valid for"):
		return "its certificate does not carry the name this client checks (" + msg + "): give the name it carries as the server name (--server-name, FX_SERVER_NAME), or ask the CA for a certificate with this one"
	}
	return ""
}

// healthRefusal digs out the director's refusal of this client's
// certificate (Unauthenticated or PermissionDenied) from the UNAVAILABLE
// that client-side health checking reports for it, with several
// directors, or nil.
func healthRefusal(err error) error {
	msg := statusMessage(err)
	if !strings.Contains(msg, "health check RPC error") {
		return nil
	}
	for _, code := range []codes.Code{codes.Unauthenticated, codes.PermissionDenied} {
		marker := "code = " + code.String() + " desc = "
		if i := strings.Index(msg, marker); i >= 0 {
			return status.Error(code, msg[i+len(marker):])
		}
	}
	return nil
}

// Close releases the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Identity is who the director knows this client as: the certificate's name
// and role.
func (c *Client) Identity() pki.Identity { return c.id }

// Address is the director's address the client dialled.
func (c *Client) Address() string { return c.cfg.Director }

// RPC is the connection's protocol client, for the calls Client does not
// wrap (an admin's review of experiments).
func (c *Client) RPC() fxv1.DirectorClient { return c.rpc }

// StatusError is a call the director refused or that failed on the way. Its
// message keeps the director's own reason; status.Code(err) and
// status.FromError(err) see the gRPC status through any wrapping.
type StatusError struct {
	// Op says what the client was doing ("cancelling experiment x").
	Op     string
	Status *status.Status
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("%s: %s (%s)", e.Op, e.Status.Message(), e.Status.Code())
}

// GRPCStatus lets status.FromError and status.Code read the status.
func (e *StatusError) GRPCStatus() *status.Status { return e.Status }

// wrap turns a gRPC error into a *StatusError for op; other errors are
// wrapped with op.
func (c *Client) wrap(op string, err error) error {
	if err == nil {
		return nil
	}
	if st, ok := status.FromError(err); ok {
		if st.Code() == codes.Unavailable {
			st = status.New(codes.Unavailable, fmt.Sprintf("the director at %s is unreachable: %s", c.cfg.Director, st.Message()))
		}
		return &StatusError{Op: op, Status: st}
	}
	return fmt.Errorf("%s: %w", op, err)
}

func statusMessage(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Message()
	}
	return err.Error()
}

// callCtx bounds a unary call whose context has no deadline.
func (c *Client) callCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, c.cfg.CallTimeout)
}

// Ref names an experiment for the director: "NAME" is one of the caller's
// own, "OWNER/NAME" another researcher's (admins only).
func Ref(name string) *fxv1.ExperimentRef {
	if owner, n, ok := strings.Cut(name, "/"); ok {
		return &fxv1.ExperimentRef{Owner: owner, Name: n}
	}
	return &fxv1.ExperimentRef{Name: name}
}

// Get returns an experiment with its state, progress and participants.
// name is "NAME", or "OWNER/NAME" for an admin.
func (c *Client) Get(ctx context.Context, name string) (*fxv1.Experiment, error) {
	ctx, cancel := c.callCtx(ctx)
	defer cancel()
	e, err := c.rpc.GetExperiment(ctx, &fxv1.GetExperimentRequest{Experiment: Ref(name)}, grpc.WaitForReady(true))
	return e, c.wrap(fmt.Sprintf("experiment %s", name), err)
}

// List returns the caller's experiments (an admin's: everyone's), newest
// first; with states, only those in one of them. Like every listing of the
// Client it reads all the director's pages.
func (c *Client) List(ctx context.Context, states ...fxv1.ExperimentState) ([]*fxv1.Experiment, error) {
	return c.ListOf(ctx, "", states...)
}

// ListOf is List for an admin: only owner's experiments (all when owner is
// empty). The director ignores owner for a researcher, who always sees
// their own.
func (c *Client) ListOf(ctx context.Context, owner string, states ...fxv1.ExperimentState) ([]*fxv1.Experiment, error) {
	return allPages(ctx, c, "listing experiments", func(ctx context.Context, token string) ([]*fxv1.Experiment, string, error) {
		resp, err := c.rpc.ListExperiments(ctx, &fxv1.ListExperimentsRequest{States: states, Owner: owner, PageToken: token}, grpc.WaitForReady(true))
		return resp.GetExperiments(), resp.GetNextPageToken(), err
	})
}

// allPages reads a listing page by page, each call bounded as any other,
// until the director says there is no next page.
func allPages[T any](ctx context.Context, c *Client, what string, fetch func(ctx context.Context, token string) ([]T, string, error)) ([]T, error) {
	var all []T
	token := ""
	for {
		cctx, cancel := c.callCtx(ctx)
		items, next, err := fetch(cctx, token)
		cancel()
		if err != nil {
			return nil, c.wrap(what, err)
		}
		all = append(all, items...)
		if next == "" {
			return all, nil
		}
		if next == token {
			return nil, fmt.Errorf("%s: the director handed out the same page token twice", what)
		}
		token = next
	}
}

// Cancel stops an experiment that has not ended; models of the rounds it
// completed stay downloadable. reason is shown with its CANCELLED state.
func (c *Client) Cancel(ctx context.Context, name, reason string) (*fxv1.Experiment, error) {
	ctx, cancel := c.callCtx(ctx)
	defer cancel()
	e, err := c.rpc.CancelExperiment(ctx, &fxv1.CancelExperimentRequest{Experiment: Ref(name), Reason: reason}, grpc.WaitForReady(true))
	return e, c.wrap(fmt.Sprintf("cancelling experiment %s", name), err)
}

// Remove deletes an ended experiment with its archive, models and metrics.
func (c *Client) Remove(ctx context.Context, name string) error {
	ctx, cancel := c.callCtx(ctx)
	defer cancel()
	_, err := c.rpc.RemoveExperiment(ctx, &fxv1.RemoveExperimentRequest{Experiment: Ref(name)}, grpc.WaitForReady(true))
	return c.wrap(fmt.Sprintf("removing experiment %s", name), err)
}

// Envoys lists the registered envoys, online or not; with tags, only those
// whose dataset carries every one of them.
func (c *Client) Envoys(ctx context.Context, tags ...string) ([]*fxv1.EnvoyInfo, error) {
	return allPages(ctx, c, "listing envoys", func(ctx context.Context, token string) ([]*fxv1.EnvoyInfo, string, error) {
		resp, err := c.rpc.ListEnvoys(ctx, &fxv1.ListEnvoysRequest{Tags: tags, PageToken: token}, grpc.WaitForReady(true))
		return resp.GetEnvoys(), resp.GetNextPageToken(), err
	})
}

// Search finds the online envoys whose datasets carry every tag and, when
// given, have exactly these sample and target shapes: where a plan's
// participants section would find data, before submitting it.
func (c *Client) Search(ctx context.Context, tags []string, sampleShape, targetShape []int64) ([]*fxv1.DatasetMatch, error) {
	return allPages(ctx, c, "searching datasets", func(ctx context.Context, token string) ([]*fxv1.DatasetMatch, string, error) {
		resp, err := c.rpc.SearchDatasets(ctx, &fxv1.SearchDatasetsRequest{Tags: tags, SampleShape: sampleShape, TargetShape: targetShape, PageToken: token}, grpc.WaitForReady(true))
		return resp.GetMatches(), resp.GetNextPageToken(), err
	})
}

// backoff is the pause schedule of one reconnecting stream.
type backoff struct {
	r    Retry
	next time.Duration
}

func newBackoff(r Retry) *backoff { return &backoff{r: r, next: r.Initial} }

// wait pauses before the next attempt, with jitter so that many watchers
// cut at once do not come back at once. It returns ctx's error if ctx ends
// first.
func (b *backoff) wait(ctx context.Context) error {
	d := b.next/2 + rand.N(b.next/2+1)
	b.next = min(2*b.next, b.r.Max)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func (b *backoff) reset() { b.next = b.r.Initial }

// retryable reports whether a stream error may go away by reconnecting: the
// connection or the director went away, not a refusal.
func retryable(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.Aborted, codes.Internal, codes.Unknown, codes.ResourceExhausted, codes.DeadlineExceeded:
		return true
	}
	return false
}
