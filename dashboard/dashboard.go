// Package dashboard is the web UI behind `fx dashboard`: a small, read-only
// HTTP server on the researcher's own machine that shows the federation's
// envoys, the researcher's experiments, and one experiment's accuracy and
// loss round by round as they arrive, and hands out its best and latest
// models.
//
// It adds no network surface to the director. The server is a client of
// the director like every `fx experiment` command: it talks gRPC over mutual
// TLS with the user's own certificate through an *experiment.Client, so it
// sees exactly what that user may see, and nothing it serves could not be
// fetched with the CLI. Because the server carries those credentials,
// whoever can talk to it acts as the user; hence the guards:
//
//   - It listens on loopback unless told otherwise (see CheckListen).
//   - It only reads: every method but GET and HEAD is refused, and no
//     handler calls anything on the director that changes state.
//   - It answers only requests whose Host header names its own address
//     (localhost, a loopback or the listen address, at its port), so a web
//     page whose DNS name is rebound to 127.0.0.1 cannot read it through
//     the user's browser (DNS rebinding).
//   - Every response carries a Content-Security-Policy that allows only the
//     server's own script and style files (none inline, nothing from
//     elsewhere) and forbids framing; the API refuses requests a browser
//     marks as coming from another site (Sec-Fetch-Site: cross-site).
//
// The page is self-contained: its HTML, CSS and JavaScript are embedded in
// the binary (web/), and it draws its charts as SVG itself, so it works on
// machines with no route to the internet. Lists are polled; an experiment's
// metrics come as Server-Sent Events: the server follows the director's
// WatchMetrics stream for the experiment and passes each event on, with its
// sequence as the event id, so a browser that reconnects resumes where it
// stopped.
package dashboard

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/experiment"
)

//go:embed web
var webFiles embed.FS

// ContentSecurityPolicy is sent with every response: scripts, styles and
// images only from the dashboard itself (no inline ones), connections only
// back to it, no plugins, forms, base URL changes or framing.
const ContentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// DefaultPollInterval is how often an experiment's event stream asks the
// director for the experiment's state between metric events, so that state
// and participant changes (offered, accepted, dropped) reach the page
// before the next round's metrics do. The CLI's `submit --wait` refreshes
// as often.
const DefaultPollInterval = 2 * time.Second

// Config says what a Server serves and where.
type Config struct {
	// Client is the connection to the director, with the user's
	// certificate. Required; the Server does not close it.
	Client *experiment.Client
	// Addr is the address the server listens on (host:port, with the port
	// actually bound): Host headers must name it.
	Addr string
	// Logger receives the errors of requests; nil discards them.
	Logger hclog.Logger
	// PollInterval: see DefaultPollInterval.
	PollInterval time.Duration
}

// Server is the dashboard's HTTP handler. Use Handler or Serve.
type Server struct {
	c       *experiment.Client
	hosts   hostCheck
	log     hclog.Logger
	poll    time.Duration
	handler http.Handler
}

// New builds a dashboard for cfg.
func New(cfg Config) (*Server, error) {
	if cfg.Client == nil {
		return nil, errors.New("dashboard: no director client")
	}
	hosts, err := newHostCheck(cfg.Addr)
	if err != nil {
		return nil, err
	}
	s := &Server{c: cfg.Client, hosts: hosts, log: cfg.Logger, poll: cfg.PollInterval}
	if s.log == nil {
		s.log = hclog.NewNullLogger()
	}
	if s.poll <= 0 {
		s.poll = DefaultPollInterval
	}
	static, err := fs.Sub(webFiles, "web")
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	// Pages: the same document, whose script reads the path.
	mux.HandleFunc("GET /{$}", s.page)
	mux.HandleFunc("GET /experiments/{owner}/{name}", s.page)
	mux.Handle("GET /static/", http.StripPrefix("/static/", noCache(http.FileServerFS(static))))
	// The API: JSON, except the event stream and the models.
	mux.HandleFunc("GET /api/identity", s.identity)
	mux.HandleFunc("GET /api/envoys", s.envoys)
	mux.HandleFunc("GET /api/experiments", s.experiments)
	mux.HandleFunc("GET /api/experiments/{owner}/{name}", s.experiment)
	mux.HandleFunc("GET /api/experiments/{owner}/{name}/events", s.events)
	mux.HandleFunc("GET /api/experiments/{owner}/{name}/model/{which}", s.model)
	mux.HandleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		writeJSONError(w, http.StatusNotFound, "NotFound", fmt.Sprintf("no such endpoint: %s", r.URL.Path))
	})
	s.handler = s.guard(mux)
	return s, nil
}

// Serve answers on l until ctx ends, then stops accepting and waits (a
// few seconds at most) for requests in flight. Event streams and downloads
// end with ctx.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	srv := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		// Requests live within ctx: a shutdown ends the event streams.
		BaseContext: func(net.Listener) context.Context { return ctx },
		ErrorLog:    s.log.StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true}),
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	if err := <-done; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// guard refuses what the dashboard never does, before any handler runs:
// methods other than GET and HEAD, Host headers that do not name it, and
// API requests made by another site's page. It sets the security headers
// on every response.
func (s *Server) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", ContentSecurityPolicy)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cross-Origin-Opener-Policy", "same-origin")
		h.Set("Cross-Origin-Resource-Policy", "same-origin")
		if !s.hosts.allowed(r.Host) {
			http.Error(w, fmt.Sprintf("fx dashboard: refusing a request for host %q: this dashboard answers only to %s (a check against DNS rebinding, since it acts with your certificate)", r.Host, s.hosts.want()), http.StatusMisdirectedRequest)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			h.Set("Allow", "GET, HEAD")
			http.Error(w, "fx dashboard is read-only: only GET and HEAD", http.StatusMethodNotAllowed)
			return
		}
		if strings.HasPrefix(r.URL.Path, "/api/") && r.Header.Get("Sec-Fetch-Site") == "cross-site" {
			writeJSONError(w, http.StatusForbidden, "PermissionDenied", "fx dashboard: refusing an API request made by another site's page")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// page serves the single HTML document; its script reads the path.
func (s *Server) page(w http.ResponseWriter, r *http.Request) {
	b, err := webFiles.ReadFile("web/index.html")
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	w.Write(b)
}

// noCache makes browsers revalidate the embedded files, which change with
// the binary.
func noCache(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-cache")
		h.ServeHTTP(w, r)
	})
}
