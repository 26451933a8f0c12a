package telemetry

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Server is a process's plain-HTTP operations listener: /metrics for
// Prometheus, and /healthz and /readyz for probes that have no client
// certificate (Kubernetes, a load balancer). It serves nothing else and
// changes nothing: the federation's own services stay behind mutual TLS.
type Server struct {
	Metrics *Metrics
	// Ready says whether the process can do its work; its error, the
	// reason it cannot, is /readyz's 503 body.
	Ready  func() error
	Logger hclog.Logger
}

// Serve answers on lis until ctx ends. The parties listen themselves, so
// that a metrics.listen address that cannot be listened on stops them at
// start, before anything else runs.
func (s Server) Serve(ctx context.Context, lis net.Listener) error {
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
	if s.Logger != nil {
		s.Logger.Info("metrics and probes serving", "address", "http://"+lis.Addr().String(), "paths", "/metrics /healthz /readyz")
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(lis) }()
	select {
	case err := <-done:
		return fmt.Errorf("metrics listener: %w", err)
	case <-ctx.Done():
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdown); err != nil {
		srv.Close()
	}
	if err := <-done; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Handler serves the three paths.
func (s Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.Metrics.Registry(), promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if s.Ready != nil {
			if err := s.Ready(); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}
