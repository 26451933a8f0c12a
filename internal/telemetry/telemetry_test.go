package telemetry

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestServerServesMetricsAndProbes: on a real loopback listener, /metrics
// has the series recorded, by role; /healthz answers while the process
// runs; /readyz follows Ready and says why it is not ready; anything else
// is not found; and the server stops with its context.
func TestServerServesMetricsAndProbes(t *testing.T) {
	m := New("v1.2.3", RoleDirector)
	m.RoundCompleted(3 * time.Second)
	m.Phase(PhaseFold, time.Second)
	m.Moved(Sent, 1000)
	m.Moved(Sent, 0) // nothing moved: no series change
	m.StoreCommit(time.Millisecond)
	m.RunnerTask("train", time.Second, nil) // an envoy's series: not exported here
	waiting := 4.0
	m.Gauges([]GaugeDesc{
		{Name: "fx_test_queue", Help: "A queue.", Labels: []string{"kind"}},
		{Name: "fx_test_refused_total", Help: "Refusals.", Counter: true},
	}, func(report func(string, float64, ...string)) {
		report("fx_test_queue", waiting, "handshake")
		report("fx_test_refused_total", 7)
	})
	var notReady atomic.Value
	notReady.Store("the director is starting")
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Server{Metrics: m, Ready: func() error {
			if why := notReady.Load().(string); why != "" {
				return errors.New(why)
			}
			return nil
		}}.Serve(ctx, lis)
	}()
	base := "http://" + lis.Addr().String()

	code, body := get(t, base+"/metrics")
	for _, want := range []string{
		`fx_build_info{role="director",version="v1.2.3"} 1`,
		"fx_aggregator_rounds_completed_total 1",
		`fx_round_phase_duration_seconds_count{phase="fold"} 1`,
		`fx_model_bytes_total{direction="sent"} 1000`,
		"fx_director_store_commit_duration_seconds_count 1",
		`fx_test_queue{kind="handshake"} 4`,
		"# TYPE fx_test_refused_total counter",
		"fx_test_refused_total 7",
		"go_goroutines",
	} {
		if code != http.StatusOK || !strings.Contains(body, want) {
			t.Errorf("/metrics (%d) lacks %q", code, want)
		}
	}
	if strings.Contains(body, "fx_runner_tasks_total") {
		t.Error("a director exports an envoy's runner series")
	}
	if code, body := get(t, base+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d %s", code, body)
	}
	if code, body := get(t, base+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "the director is starting") {
		t.Errorf("/readyz before ready: %d %q", code, body)
	}
	notReady.Store("")
	if code, body := get(t, base+"/readyz"); code != http.StatusOK {
		t.Errorf("/readyz once ready: %d %q", code, body)
	}
	if code, _ := get(t, base+"/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("an unknown path answered %d", code)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve after cancel: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Serve did not return after its context ended")
	}
}

// TestNilMetricsRecordNothing: parties call their metrics whether or not
// they have a listener; a nil *Metrics must take every call.
func TestNilMetricsRecordNothing(t *testing.T) {
	var m *Metrics
	m.Phase(PhaseDownload, time.Second)
	m.RoundCompleted(time.Second)
	m.Moved(Received, 10)
	m.Transferred(Received, time.Second)
	m.Result("counted")
	m.StoreCommit(time.Second)
	m.RunnerTask("train", time.Second, errors.New("x"))
	m.Gauges(nil, nil)
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}
