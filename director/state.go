package director

import (
	"cmp"
	"context"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/director/store"
	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// expState is the director's in-memory view of one experiment: the stored
// record and participants, plus what is rebuilt or live.
type expState struct {
	rec     store.Experiment
	plan    *experiment.Plan
	parts   map[string]*store.Participant
	metrics *metricLog
	// logs is what the sites shared of their runners' output; made with
	// the first line.
	logs     *runnerLog
	progress map[string]aggregator.Progress
	// run is the aggregator of a RUNNING experiment; nil otherwise.
	run *runState
	// lastRun is the run most recently stopped, so Remove can wait for it
	// to let go of the experiment's files.
	lastRun *runState
	// span follows the experiment from its submission to its end, and
	// offer its OFFERED time (see internal/tracing); they record nothing
	// when tracing is off, and a restarted director starts new ones.
	span, offer trace.Span
}

func newExpState(rec store.Experiment, plan *experiment.Plan) *expState {
	none := trace.SpanFromContext(context.Background())
	return &expState{
		rec:      rec,
		plan:     plan,
		parts:    map[string]*store.Participant{},
		metrics:  newMetricLog(),
		progress: map[string]aggregator.Progress{},
		span:     none,
		offer:    none,
	}
}

func (e *expState) countParts(states ...fxv1.ParticipantState) int {
	n := 0
	for _, p := range e.parts {
		if slices.Contains(states, p.State) {
			n++
		}
	}
	return n
}

func (e *expState) partNames(states ...fxv1.ParticipantState) []string {
	var out []string
	for name, p := range e.parts {
		if slices.Contains(states, p.State) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// runState is one launch of an experiment's aggregator.
type runState struct {
	cancel  context.CancelFunc
	address string
	done    chan struct{}
	// agg is set once the aggregator is built; drops reported before that
	// are queued in drops and applied when it is.
	agg   Aggregator
	drops [][2]string
	// serving is set once the aggregator serves: only then do the
	// participants learn its address (see aggregatorServing).
	serving bool
}

// envoyState is the in-memory view of one registered envoy.
type envoyState struct {
	rec       store.Envoy
	shard     *fxv1.DatasetShard
	lastSeen  time.Time
	wasOnline bool
	// running are the experiments the envoy said (last heartbeat) it runs.
	running []string
	streams map[*assignStream]struct{}
}

// metricLog is an experiment's metric events, derived from its aggregator's
// completed rounds. Events are only ever appended; a watcher waits on
// changed, which is closed and replaced on every append and when the
// experiment ends.
type metricLog struct {
	events []*fxv1.MetricEvent
	last   int                        // last round folded in
	rounds map[int]map[string]float64 // round → flattened aggregates
	// reported is the last round each collaborator's train result counted
	// in, so a participant's last_round survives a restart.
	reported map[string]int
	best     *aggregator.Best
	changed  chan struct{}
}

func newMetricLog() *metricLog {
	return &metricLog{rounds: map[int]map[string]float64{}, reported: map[string]int{}, changed: make(chan struct{})}
}

func (m *metricLog) round() int { return m.last }

func (m *metricLog) notify() {
	close(m.changed)
	m.changed = make(chan struct{})
}

// add folds in one completed round: an event per task result in the order
// the round file lists them, then per task (in plan order) the aggregate.
// Rounds arrive in order; a round already folded in is ignored, so a
// relaunched aggregator cannot duplicate events.
func (m *metricLog) add(s aggregator.RoundSummary, at time.Time, plan *experiment.Plan) {
	if s.Round <= m.last {
		return
	}
	seq := int64(len(m.events))
	ts := timestamppb.New(at)
	samples := map[string]int64{}
	for _, r := range s.Results {
		seq++
		samples[r.Task] += r.Samples
		m.events = append(m.events, &fxv1.MetricEvent{
			Sequence: seq, Round: int32(s.Round), Task: r.Task, Collaborator: r.Collaborator,
			Samples: r.Samples, Metrics: maps.Clone(r.Metrics), Time: ts,
		})
	}
	for _, task := range taskOrder(plan, s.Aggregates) {
		seq++
		m.events = append(m.events, &fxv1.MetricEvent{
			Sequence: seq, Round: int32(s.Round), Task: task,
			Samples: samples[task], Metrics: maps.Clone(s.Aggregates[task]), Time: ts,
		})
	}
	m.rounds[s.Round] = flatten(s.Aggregates)
	for _, name := range s.Reported {
		m.reported[name] = s.Round
	}
	m.last = s.Round
	m.notify()
}

// taskOrder lists the tasks of aggregates in the plan's order, then any
// others by name, so the order never depends on map iteration.
func taskOrder(plan *experiment.Plan, aggs map[string]map[string]float64) []string {
	var out []string
	for _, t := range plan.Tasks {
		if _, ok := aggs[t]; ok {
			out = append(out, t)
		}
	}
	var rest []string
	for t := range aggs {
		if !slices.Contains(out, t) {
			rest = append(rest, t)
		}
	}
	slices.Sort(rest)
	return append(out, rest...)
}

// modelMetrics are the metrics of the global model round produced: how it
// was made (round's train and locally_tuned_model_validation aggregates)
// and how it did (the next round's aggregated_model_validation, which
// validates exactly this model at every site). Round's own
// aggregated_model_validation is left out: it scored the model before.
func (m *metricLog) modelMetrics(round int) map[string]float64 {
	validation := runner.TaskAggregatedValidation + "/"
	out := map[string]float64{}
	for k, v := range m.rounds[round] {
		if !strings.HasPrefix(k, validation) {
			out[k] = v
		}
	}
	for k, v := range m.rounds[round+1] {
		if strings.HasPrefix(k, validation) {
			out[k] = v
		}
	}
	return out
}

// flatten turns per-task aggregates into "task/metric" keys.
func flatten(aggs map[string]map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for task, ms := range aggs {
		for k, v := range ms {
			out[task+"/"+k] = v
		}
	}
	return out
}

// after returns the events with sequence > seq.
func (m *metricLog) after(seq int64) []*fxv1.MetricEvent {
	if seq >= int64(len(m.events)) {
		return nil
	}
	return m.events[seq:]
}

// sortedExps returns the experiments oldest first (ties by id), so every
// sweep and replay has a stable order.
func (d *Director) sortedExps() []*expState {
	out := slices.Collect(maps.Values(d.exps))
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i].rec, out[j].rec
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c < 0
		}
		return a.ID < b.ID
	})
	return out
}

func (d *Director) sortedEnvoys() []*envoyState {
	out := slices.Collect(maps.Values(d.envoys))
	slices.SortFunc(out, func(a, b *envoyState) int { return cmp.Compare(a.rec.Name, b.rec.Name) })
	return out
}

func (d *Director) onlineLocked(env *envoyState, now time.Time) bool {
	return !env.lastSeen.IsZero() && now.Sub(env.lastSeen) <= d.cfg.OfflineAfter
}

// displayRound is the round in progress while running, the last one once
// ended, 0 before the first.
func displayRound(e *expState) int32 {
	done := e.metrics.round()
	if e.rec.Ended() {
		return int32(min(done, e.rec.Rounds))
	}
	if store.Running(e.rec.State) {
		return int32(min(done+1, e.rec.Rounds))
	}
	return 0
}

// An experiment's record is bounded field by field (the plan by 1 MiB, each
// reason by the protocol's bound), but not its number of participants: one
// offered to a thousand sites that all failed with long reasons would not
// fit in a message. Past maxExperimentBytes its participants' reasons are
// cut to shortReasonBytes, which keeps records of several thousand
// participants under gRPC's 4 MiB limit.
const (
	maxExperimentBytes = 3 << 20
	shortReasonBytes   = 256
)

// toProto renders an experiment for a client.
func (d *Director) toProtoLocked(e *expState) *fxv1.Experiment {
	now := d.clock.Now()
	out := &fxv1.Experiment{
		Id: e.rec.ID, Name: e.rec.Name, Owner: e.rec.Owner,
		State: e.rec.State, Reason: e.rec.Reason, PlanYaml: e.rec.PlanYAML,
		ArchiveSize: e.rec.ArchiveSize, ArchiveSha256: e.rec.ArchiveSHA256,
		CreatedAt: timestamppb.New(e.rec.CreatedAt), UpdatedAt: timestamppb.New(e.rec.UpdatedAt),
		Round: displayRound(e), Rounds: int32(e.rec.Rounds),
	}
	for _, name := range slices.Sorted(maps.Keys(e.parts)) {
		p := e.parts[name]
		state := p.State
		if state == fxv1.ParticipantState_TRAINING {
			if env := d.envoys[name]; env == nil || !d.onlineLocked(env, now) {
				state = fxv1.ParticipantState_DISCONNECTED
			}
		}
		pp := &fxv1.Participant{Envoy: name, State: state, Reason: p.Reason, LastRound: -1, UpdatedAt: timestamppb.New(p.UpdatedAt)}
		if r, ok := e.metrics.reported[name]; ok {
			// The final validation-only round (rounds+1) scores the last
			// training round's model; it is not a round of its own.
			pp.LastRound = int32(min(r, e.plan.Rounds))
		}
		if pr, ok := e.progress[name]; ok {
			pp.LastRound = max(pp.LastRound, int32(pr.LastRound))
			pp.Task = pr.Task
		}
		out.Participants = append(out.Participants, pp)
	}
	if b := e.metrics.best; b != nil {
		out.Best = &fxv1.ModelSummary{Round: int32(b.Round), Metric: b.Metric, Value: b.Value}
	}
	if last := e.metrics.round(); last > 0 {
		out.LatestMetrics = maps.Clone(e.metrics.rounds[last])
	}
	if proto.Size(out) > maxExperimentBytes {
		for _, p := range out.Participants {
			p.Reason = fxv1.Clip(p.Reason, shortReasonBytes)
		}
	}
	return out
}
