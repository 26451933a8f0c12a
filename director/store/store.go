// Package store keeps the director's durable state: experiments, the
// per-experiment participant states, registered envoys and each experiment's
// metric-log position. Everything else the director knows (who is online, an
// aggregator's live progress, the metric events themselves) is rebuilt from
// this state and from the files under the director's data directory after a
// restart, so this is the one thing that must survive a crash intact.
//
// Records are JSON, which keeps a store readable with bbolt's own tools (or
// psql) and lets fields be added without a migration. Every change goes
// through Update, one transaction: a state transition and the participant
// changes that go with it are written together or not at all.
//
// There are two durable implementations, Bolt (one file in the director's
// data directory, the default) and Postgres (a PostgreSQL database), and
// Mem for tests. All three are written on one small key-value surface (kv),
// so the typed records, their keys and their order are the same in each.
package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// ErrNotFound is returned (wrapped) when a record does not exist.
var ErrNotFound = errors.New("not found")

// Experiment is the durable record of one experiment.
type Experiment struct {
	ID            string               `json:"id"`
	Name          string               `json:"name"`
	Owner         string               `json:"owner"`
	State         fxv1.ExperimentState `json:"state"`
	Reason        string               `json:"reason,omitempty"`
	PlanYAML      string               `json:"plan_yaml"`
	ArchiveSize   int64                `json:"archive_size"`
	ArchiveSHA256 string               `json:"archive_sha256"`
	CreatedAt     time.Time            `json:"created_at"`
	UpdatedAt     time.Time            `json:"updated_at"`
	// ApprovedAt orders the queue: the earliest approved goes first.
	ApprovedAt time.Time `json:"approved_at,omitzero"`
	// AnswerBy is when the offer closes if too few envoys accepted.
	AnswerBy time.Time `json:"answer_by,omitzero"`
	// Rounds is how many rounds the plan asks for.
	Rounds int `json:"rounds"`
}

// Ended reports whether the experiment is in a final state.
func (e *Experiment) Ended() bool { return Ended(e.State) }

// Ended reports whether s is a final state.
func Ended(s fxv1.ExperimentState) bool {
	switch s {
	case fxv1.ExperimentState_FINISHED, fxv1.ExperimentState_FAILED,
		fxv1.ExperimentState_CANCELLED, fxv1.ExperimentState_REJECTED:
		return true
	}
	return false
}

// Running reports whether an experiment in state s has an aggregator:
// RUNNING, or PAUSED while its aggregator waits for a resource.
func Running(s fxv1.ExperimentState) bool {
	return s == fxv1.ExperimentState_RUNNING || s == fxv1.ExperimentState_PAUSED
}

// Participant is one envoy's part in one experiment.
type Participant struct {
	Envoy     string                `json:"envoy"`
	State     fxv1.ParticipantState `json:"state"`
	Reason    string                `json:"reason,omitempty"`
	UpdatedAt time.Time             `json:"updated_at"`
	// Registered are the samples the envoy had registered when the
	// experiment started: the most its results may claim, for every launch
	// of the experiment's aggregator, whatever the envoy registers later.
	// Nil before the start (and in records older than the field).
	Registered *Samples `json:"registered,omitempty"`
}

// Samples are an envoy's registered sample counts.
type Samples struct {
	Train int64 `json:"train"`
	Valid int64 `json:"valid"`
}

// Envoy is a registered envoy. Liveness (the last heartbeat) is not kept
// here: it changes every few seconds, and after a restart every envoy is
// offline until it heartbeats again anyway.
type Envoy struct {
	Name string `json:"name"`
	// Shard is the envoy's fxv1.DatasetShard in protobuf wire format.
	Shard          []byte    `json:"shard"`
	MaxExperiments int32     `json:"max_experiments"`
	Version        string    `json:"version,omitempty"`
	RegisteredAt   time.Time `json:"registered_at"`
}

// MetricPosition is how far an experiment's metric log has been built: the
// last round folded into it and the sequence number of its last event.
type MetricPosition struct {
	Round    int   `json:"round"`
	Sequence int64 `json:"sequence"`
}

// Tx reads and writes records inside one transaction. A Tx must not be used
// after the function it was passed to returns.
type Tx interface {
	Experiment(id string) (*Experiment, error)
	Experiments() ([]*Experiment, error)
	PutExperiment(e *Experiment) error
	// DeleteExperiment removes the experiment with its participants and
	// metric position.
	DeleteExperiment(id string) error

	Participants(experimentID string) ([]*Participant, error)
	PutParticipant(experimentID string, p *Participant) error

	Envoy(name string) (*Envoy, error)
	Envoys() ([]*Envoy, error)
	PutEnvoy(e *Envoy) error

	MetricPosition(experimentID string) (MetricPosition, error)
	PutMetricPosition(experimentID string, pos MetricPosition) error
}

// Store is the director's durable state.
type Store interface {
	// View runs fn in a read-only transaction.
	View(fn func(Tx) error) error
	// Update runs fn in a read-write transaction, committed if fn returns
	// nil and rolled back otherwise. fn may run more than once when the
	// transaction has to be retried (Postgres, after a serialization
	// failure), so it must act only through its Tx: only the last run's
	// writes are committed.
	Update(fn func(Tx) error) error
	// Batch is Update for many independent writers at once: fn may share
	// its transaction, and so one commit, with other Batch calls made
	// meanwhile, and may run more than once, so it must be idempotent. A
	// nil return means fn's writes are committed.
	Batch(fn func(Tx) error) error
	Close() error
}

// Buckets.
const (
	bucketExperiments  = "experiments"
	bucketParticipants = "participants"
	bucketEnvoys       = "envoys"
	bucketMetrics      = "metric_positions"
)

var allBuckets = []string{bucketExperiments, bucketParticipants, bucketEnvoys, bucketMetrics}

// kv is the small key-value surface both implementations provide; the typed
// Tx is written once on top of it.
type kv interface {
	// get returns nil, nil when the key does not exist.
	get(bucket, key string) ([]byte, error)
	put(bucket, key string, val []byte) error
	del(bucket, key string) error
	// scan calls fn for every key with the prefix, in the order of the
	// keys' bytes. fn must not use the kv.
	scan(bucket, prefix string, fn func(key string, val []byte) error) error
}

type tx struct{ kv kv }

func participantKey(expID, envoy string) string { return expID + "/" + envoy }

func getJSON[T any](t tx, bucket, key, what string) (*T, error) {
	b, err := t.kv.get(bucket, key)
	if err != nil {
		return nil, fmt.Errorf("%s %q: %w", what, key, err)
	}
	if b == nil {
		return nil, fmt.Errorf("%s %q: %w", what, key, ErrNotFound)
	}
	v := new(T)
	if err := json.Unmarshal(b, v); err != nil {
		return nil, fmt.Errorf("%s %q: corrupt record: %w", what, key, err)
	}
	return v, nil
}

func listJSON[T any](t tx, bucket, prefix, what string) ([]*T, error) {
	var out []*T
	err := t.kv.scan(bucket, prefix, func(key string, val []byte) error {
		v := new(T)
		if err := json.Unmarshal(val, v); err != nil {
			return fmt.Errorf("%s %q: corrupt record: %w", what, key, err)
		}
		out = append(out, v)
		return nil
	})
	return out, err
}

func putJSON(t tx, bucket, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return t.kv.put(bucket, key, b)
}

func (t tx) Experiment(id string) (*Experiment, error) {
	return getJSON[Experiment](t, bucketExperiments, id, "experiment")
}

func (t tx) Experiments() ([]*Experiment, error) {
	return listJSON[Experiment](t, bucketExperiments, "", "experiment")
}

func (t tx) PutExperiment(e *Experiment) error {
	if e.ID == "" || strings.Contains(e.ID, "/") {
		return fmt.Errorf("experiment id %q: must be non-empty and without '/'", e.ID)
	}
	return putJSON(t, bucketExperiments, e.ID, e)
}

func (t tx) DeleteExperiment(id string) error {
	var keys []string
	if err := t.kv.scan(bucketParticipants, id+"/", func(key string, _ []byte) error {
		keys = append(keys, key)
		return nil
	}); err != nil {
		return err
	}
	for _, k := range keys {
		if err := t.kv.del(bucketParticipants, k); err != nil {
			return err
		}
	}
	if err := t.kv.del(bucketMetrics, id); err != nil {
		return err
	}
	return t.kv.del(bucketExperiments, id)
}

func (t tx) Participants(expID string) ([]*Participant, error) {
	return listJSON[Participant](t, bucketParticipants, expID+"/", "participant")
}

func (t tx) PutParticipant(expID string, p *Participant) error {
	if p.Envoy == "" {
		return errors.New("participant without an envoy name")
	}
	return putJSON(t, bucketParticipants, participantKey(expID, p.Envoy), p)
}

func (t tx) Envoy(name string) (*Envoy, error) {
	return getJSON[Envoy](t, bucketEnvoys, name, "envoy")
}

func (t tx) Envoys() ([]*Envoy, error) { return listJSON[Envoy](t, bucketEnvoys, "", "envoy") }

func (t tx) PutEnvoy(e *Envoy) error {
	if e.Name == "" {
		return errors.New("envoy without a name")
	}
	return putJSON(t, bucketEnvoys, e.Name, e)
}

func (t tx) MetricPosition(expID string) (MetricPosition, error) {
	p, err := getJSON[MetricPosition](t, bucketMetrics, expID, "metric position")
	if errors.Is(err, ErrNotFound) {
		return MetricPosition{}, nil
	}
	if err != nil {
		return MetricPosition{}, err
	}
	return *p, nil
}

func (t tx) PutMetricPosition(expID string, pos MetricPosition) error {
	return putJSON(t, bucketMetrics, expID, pos)
}
