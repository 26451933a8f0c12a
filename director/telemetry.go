package director

import (
	"context"

	"errors"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/fx-fl/fx/internal/tracing"

	"github.com/fx-fl/fx/director/store"
	"github.com/fx-fl/fx/internal/telemetry"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// timedStore times the director's write transactions
// (fx_director_store_commit_duration_seconds).
type timedStore struct {
	store.Store
	m *telemetry.Metrics
}

func (s timedStore) Update(fn func(store.Tx) error) error {
	start := time.Now()
	err := s.Store.Update(fn)
	s.m.StoreCommit(time.Since(start))
	return err
}

func (s timedStore) Batch(fn func(store.Tx) error) error {
	start := time.Now()
	err := s.Store.Batch(fn)
	s.m.StoreCommit(time.Since(start))
	return err
}

// backing is the store under any timing wrapper: what snapshots copy.
func backing(s store.Store) store.Store {
	if t, ok := s.(timedStore); ok {
		return t.Store
	}
	return s
}

// registerGauges exports the director's state as it is at each scrape:
// envoys online and offline, experiments by state, and the TLS handshakes
// its servers queue and refuse.
func (d *Director) registerGauges() {
	d.metrics.Gauges([]telemetry.GaugeDesc{
		{Name: "fx_director_envoys", Help: "Registered envoys, by status (online: heard from within offline_after).", Labels: []string{"status"}},
		{Name: "fx_director_experiments", Help: "Experiments the director keeps, by state.", Labels: []string{"state"}},
		{Name: "fx_tls_handshakes_waiting", Help: "Server TLS handshakes waiting for a slot now (all of this process's servers)."},
		{Name: "fx_tls_handshakes_refused_total", Help: "Server TLS handshakes refused: the queue was full or waited too long; the client retries.", Counter: true},
	}, func(report func(string, float64, ...string)) {
		d.mu.Lock()
		now := d.clock.Now()
		online, offline := 0, 0
		for _, env := range d.envoys {
			if d.onlineLocked(env, now) {
				online++
			} else {
				offline++
			}
		}
		byState := map[fxv1.ExperimentState]int{}
		for _, e := range d.exps {
			byState[e.rec.State]++
		}
		d.mu.Unlock()
		report("fx_director_envoys", float64(online), "online")
		report("fx_director_envoys", float64(offline), "offline")
		for _, state := range fxv1.ExperimentState_value {
			s := fxv1.ExperimentState(state)
			if s != fxv1.ExperimentState_EXPERIMENT_STATE_UNSPECIFIED {
				report("fx_director_experiments", float64(byState[s]), s.String())
			}
		}
		hs := pki.Handshakes()
		report("fx_tls_handshakes_waiting", float64(hs.Waiting))
		report("fx_tls_handshakes_refused_total", float64(hs.Refused))
	})
}

// readiness is /readyz's answer: nil once Run serves, until it starts
// stopping; a standby is not ready, and says who leads. The store is open
// for as long as that holds.
func (d *Director) readiness() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case d.stopped:
		return errors.New("the director is stopping")
	case !d.serving && d.standby != "":
		return errors.New(d.standby)
	case !d.serving:
		return errors.New("the director is starting")
	}
	return nil
}

// traceSubmission starts the experiment's span, from the submission's
// start, with the submission as its first child.
func (d *Director) traceSubmission(e *expState, started time.Time) {
	if !tracing.Enabled() {
		return
	}
	attrs := []attribute.KeyValue{attribute.String("experiment.id", e.rec.ID), attribute.String("experiment.name", e.rec.Name), attribute.String("owner", e.rec.Owner)}
	ctx, span := tracing.Tracer().Start(context.Background(), "experiment "+e.rec.Name, trace.WithTimestamp(started), trace.WithAttributes(attrs...), trace.WithNewRoot())
	e.span = span
	_, submit := tracing.Tracer().Start(ctx, "submit", trace.WithTimestamp(started), trace.WithAttributes(attribute.Int64("archive.bytes", e.rec.ArchiveSize)))
	submit.End()
}
