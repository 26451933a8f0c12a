// Package telemetry is fx's one place for operational metrics: every series
// a director or an envoy exports is defined here, with its name, help, labels
// and buckets, and recorded through the methods below. The parties call
// those methods on an optional *Metrics: a nil one records nothing, so code
// under test and processes without a metrics listener pay nothing.
//
// Label values are bounded sets (phases, tasks, outcomes, experiment
// states): no experiment id, envoy name or round number is a label, so a
// federation's series count does not grow with its history.
package telemetry

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Round phases, the values of the phase label of
// fx_round_phase_duration_seconds: a collaborator times its download, its
// tasks and its uploads; an aggregator its fold and its checkpoint.
const (
	PhaseDownload   = "download"
	PhaseTasks      = "tasks"
	PhaseUpload     = "upload"
	PhaseFold       = "fold"
	PhaseCheckpoint = "checkpoint"
)

// Directions of model bytes, the values of the direction label.
const (
	Sent     = "sent"
	Received = "received"
)

// durationBuckets span 10 ms (a small model's fold) to about 45 minutes (a
// large model's round on a slow site).
var durationBuckets = prometheus.ExponentialBuckets(0.01, 4, 10)

// Metrics are one process's series.
type Metrics struct {
	registry *prometheus.Registry

	roundPhase      *prometheus.HistogramVec
	roundsCompleted prometheus.Counter
	roundDuration   prometheus.Histogram
	modelBytes      *prometheus.CounterVec
	transferSeconds *prometheus.HistogramVec
	results         *prometheus.CounterVec
	storeCommit     prometheus.Histogram
	runnerTasks     *prometheus.CounterVec
	runnerSeconds   *prometheus.HistogramVec
}

// Roles say which series a process exports: a director's aggregators and
// store, or an envoy's runners; both move models through rounds.
const (
	RoleDirector = "director"
	RoleEnvoy    = "envoy"
)

// New returns the series of an fx process of role at version (the
// fx_build_info series carries both), with Go runtime and process series
// beside them.
func New(version, role string) *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{
		registry: reg,
		roundPhase: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "fx_round_phase_duration_seconds",
			Help:    "Time a round spends in each phase: a collaborator's download, tasks and upload; an aggregator's fold and checkpoint.",
			Buckets: durationBuckets,
		}, []string{"phase"}),
		roundsCompleted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fx_aggregator_rounds_completed_total",
			Help: "Rounds whose model and checkpoint are durable, over all experiments.",
		}),
		roundDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "fx_aggregator_round_duration_seconds",
			Help:    "Time from a round's opening to its durable checkpoint.",
			Buckets: durationBuckets,
		}),
		modelBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fx_model_bytes_total",
			Help: "Tensor bytes of models moved: sent (aggregators' downloads, collaborators' uploads) and received.",
		}, []string{"direction"}),
		transferSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "fx_model_transfer_duration_seconds",
			Help:    "Time of one model transfer that completed, by direction as seen by this process; with fx_model_bytes_total it gives the throughput.",
			Buckets: durationBuckets,
		}, []string{"direction"}),
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fx_aggregator_results_total",
			Help: "Task results offered to aggregators, by outcome: counted, late (the round had closed) or refused.",
		}, []string{"outcome"}),
		storeCommit: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "fx_director_store_commit_duration_seconds",
			Help:    "Time of a write transaction of the director's store, commit and fsync included.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}),
		runnerTasks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fx_runner_tasks_total",
			Help: "Tasks a site's runner ran, by task and outcome (ok or failed).",
		}, []string{"task", "outcome"}),
		runnerSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "fx_runner_task_duration_seconds",
			Help:    "Time of a task in a site's runner, by task.",
			Buckets: durationBuckets,
		}, []string{"task"}),
	}
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "fx_build_info",
			Help:        "Always 1; the labels say the fx build's version and the process's role.",
			ConstLabels: prometheus.Labels{"version": version, "role": role},
		}, func() float64 { return 1 }),
		m.roundPhase, m.modelBytes, m.transferSeconds,
	)
	switch role {
	case RoleDirector:
		reg.MustRegister(m.roundsCompleted, m.roundDuration, m.results, m.storeCommit)
	case RoleEnvoy:
		reg.MustRegister(m.runnerTasks, m.runnerSeconds)
	}
	return m
}

// Registry is where the series are gathered from (the /metrics handler),
// and where a party registers series computed at scrape time (see Gauges).
func (m *Metrics) Registry() *prometheus.Registry { return m.registry }

// Phase records that a round spent d in phase.
func (m *Metrics) Phase(phase string, d time.Duration) {
	if m != nil {
		m.roundPhase.WithLabelValues(phase).Observe(d.Seconds())
	}
}

// RoundCompleted records a round made durable, d after it opened.
func (m *Metrics) RoundCompleted(d time.Duration) {
	if m != nil {
		m.roundsCompleted.Inc()
		m.roundDuration.Observe(d.Seconds())
	}
}

// Moved records bytes of tensors sent or received, counted as they move,
// so that a transfer that breaks still counts what it moved.
func (m *Metrics) Moved(direction string, bytes int64) {
	if m != nil && bytes > 0 {
		m.modelBytes.WithLabelValues(direction).Add(float64(bytes))
	}
}

// Transferred records a model transfer that completed in d.
func (m *Metrics) Transferred(direction string, d time.Duration) {
	if m != nil {
		m.transferSeconds.WithLabelValues(direction).Observe(d.Seconds())
	}
}

// Result records the outcome of a result offered to an aggregator:
// "counted", "late" or "refused".
func (m *Metrics) Result(outcome string) {
	if m != nil {
		m.results.WithLabelValues(outcome).Inc()
	}
}

// StoreCommit records a write transaction of d.
func (m *Metrics) StoreCommit(d time.Duration) {
	if m != nil {
		m.storeCommit.Observe(d.Seconds())
	}
}

// RunnerTask records a task the runner ran for d; err is its outcome.
func (m *Metrics) RunnerTask(task string, d time.Duration, err error) {
	if m == nil {
		return
	}
	outcome := "ok"
	if err != nil {
		outcome = "failed"
	}
	m.runnerTasks.WithLabelValues(task, outcome).Inc()
	m.runnerSeconds.WithLabelValues(task).Observe(d.Seconds())
}

// Gauges registers series whose values a party computes when scraped
// (envoys online, experiments by state): describe lists them once with
// their labels, and collect reports each value. Nothing on a nil Metrics.
func (m *Metrics) Gauges(descs []GaugeDesc, collect func(report func(name string, value float64, labelValues ...string))) {
	if m == nil {
		return
	}
	m.registry.MustRegister(&gaugeCollector{descs: descs, collect: collect})
}

// GaugeDesc describes one series of Gauges: a gauge, or a counter whose
// total the party keeps itself.
type GaugeDesc struct {
	Name, Help string
	Labels     []string
	Counter    bool
}

type gaugeCollector struct {
	descs   []GaugeDesc
	collect func(report func(name string, value float64, labelValues ...string))
}

func (g *gaugeCollector) desc(name string) (*prometheus.Desc, prometheus.ValueType) {
	for _, d := range g.descs {
		if d.Name == name {
			kind := prometheus.GaugeValue
			if d.Counter {
				kind = prometheus.CounterValue
			}
			return prometheus.NewDesc(d.Name, d.Help, d.Labels, nil), kind
		}
	}
	return prometheus.NewInvalidDesc(fmt.Errorf("telemetry: no series %q was described", name)), prometheus.GaugeValue
}

func (g *gaugeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range g.descs {
		desc, _ := g.desc(d.Name)
		ch <- desc
	}
}

func (g *gaugeCollector) Collect(ch chan<- prometheus.Metric) {
	g.collect(func(name string, value float64, labelValues ...string) {
		desc, kind := g.desc(name)
		ch <- prometheus.MustNewConstMetric(desc, kind, value, labelValues...)
	})
}
