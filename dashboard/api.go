package dashboard

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// The API's JSON: plain field names, the protocol's where there is one,
// enums by name, times RFC 3339 (absent when unknown), and metric values
// as numbers ("NaN", "+Inf" and "-Inf" as strings, which JSON has no
// numbers for).

// Identity is GET /api/identity: who the dashboard acts as, and where.
type Identity struct {
	Name     string `json:"name"`
	Role     string `json:"role"`
	Director string `json:"director"`
}

// Envoy is an item of GET /api/envoys.
type Envoy struct {
	Name           string     `json:"name"`
	Online         bool       `json:"online"`
	LastSeen       *time.Time `json:"last_seen,omitempty"`
	RegisteredAt   *time.Time `json:"registered_at,omitempty"`
	Version        string     `json:"version"`
	Description    string     `json:"description,omitempty"`
	Tags           []string   `json:"tags"`
	SampleShape    []int64    `json:"sample_shape"`
	TargetShape    []int64    `json:"target_shape"`
	TrainSamples   int64      `json:"train_samples"`
	ValidSamples   int64      `json:"valid_samples"`
	Classes        int32      `json:"classes"`
	MaxExperiments int32      `json:"max_experiments"`
	// Experiments are the ids of those it takes part in now.
	Experiments []string `json:"experiments"`
}

// Experiment is an item of GET /api/experiments and the answer of GET
// /api/experiments/OWNER/NAME (which adds the plan).
type Experiment struct {
	ID            string        `json:"id"`
	Name          string        `json:"name"`
	Owner         string        `json:"owner"`
	State         string        `json:"state"`
	Ended         bool          `json:"ended"`
	Reason        string        `json:"reason,omitempty"`
	Round         int32         `json:"round"`
	Rounds        int32         `json:"rounds"`
	CreatedAt     *time.Time    `json:"created_at,omitempty"`
	UpdatedAt     *time.Time    `json:"updated_at,omitempty"`
	Best          *Best         `json:"best,omitempty"`
	LatestMetrics Metrics       `json:"latest_metrics"`
	Participants  []Participant `json:"participants"`
	PlanYAML      string        `json:"plan_yaml,omitempty"`
}

// Best is the best model so far.
type Best struct {
	Round  int32   `json:"round"`
	Metric string  `json:"metric"`
	Value  float64 `json:"value"`
}

// Participant is one envoy's part in an experiment.
type Participant struct {
	Envoy  string `json:"envoy"`
	State  string `json:"state"`
	Reason string `json:"reason,omitempty"`
	// LastRound is the last round it reported in; -1 if none.
	LastRound int32      `json:"last_round"`
	Task      string     `json:"task,omitempty"`
	UpdatedAt *time.Time `json:"updated_at,omitempty"`
}

// MetricEvent is the data of an event stream's "metric" events.
type MetricEvent struct {
	Sequence int64  `json:"sequence"`
	Round    int32  `json:"round"`
	Task     string `json:"task"`
	// Collaborator is the site; empty for the round's aggregate.
	Collaborator string     `json:"collaborator"`
	Samples      int64      `json:"samples"`
	Metrics      Metrics    `json:"metrics"`
	Time         *time.Time `json:"time,omitempty"`
}

// Metrics are named values; non-finite ones are written as strings.
type Metrics map[string]float64

// MarshalJSON writes NaN and the infinities as "NaN", "+Inf" and "-Inf".
func (m Metrics) MarshalJSON() ([]byte, error) {
	out := make(map[string]any, len(m))
	for k, v := range m {
		switch {
		case math.IsNaN(v):
			out[k] = "NaN"
		case math.IsInf(v, 1):
			out[k] = "+Inf"
		case math.IsInf(v, -1):
			out[k] = "-Inf"
		default:
			out[k] = v
		}
	}
	return json.Marshal(out)
}

func timeOf(t *timestamppb.Timestamp) *time.Time {
	if t == nil || (t.GetSeconds() == 0 && t.GetNanos() == 0) {
		return nil
	}
	v := t.AsTime().UTC()
	return &v
}

func orEmpty[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

func envoyView(e *fxv1.EnvoyInfo) Envoy {
	s := e.GetShard()
	return Envoy{
		Name: e.GetName(), Online: e.GetOnline(),
		LastSeen: timeOf(e.GetLastSeen()), RegisteredAt: timeOf(e.GetRegisteredAt()),
		Version: e.GetVersion(), Description: s.GetDescription(),
		Tags: orEmpty(s.GetTags()), SampleShape: orEmpty(s.GetSampleShape()), TargetShape: orEmpty(s.GetTargetShape()),
		TrainSamples: s.GetTrainSamples(), ValidSamples: s.GetValidSamples(), Classes: s.GetClasses(),
		MaxExperiments: e.GetMaxExperiments(), Experiments: orEmpty(e.GetExperiments()),
	}
}

func experimentView(e *fxv1.Experiment, withPlan bool) Experiment {
	v := Experiment{
		ID: e.GetId(), Name: e.GetName(), Owner: e.GetOwner(),
		State: e.GetState().String(), Ended: experiment.Ended(e.GetState()), Reason: e.GetReason(),
		Round: e.GetRound(), Rounds: e.GetRounds(),
		CreatedAt: timeOf(e.GetCreatedAt()), UpdatedAt: timeOf(e.GetUpdatedAt()),
		LatestMetrics: Metrics(e.GetLatestMetrics()), Participants: []Participant{},
	}
	if v.LatestMetrics == nil {
		v.LatestMetrics = Metrics{}
	}
	if b := e.GetBest(); b != nil {
		v.Best = &Best{Round: b.GetRound(), Metric: b.GetMetric(), Value: b.GetValue()}
	}
	for _, p := range e.GetParticipants() {
		v.Participants = append(v.Participants, Participant{
			Envoy: p.GetEnvoy(), State: p.GetState().String(), Reason: p.GetReason(),
			LastRound: p.GetLastRound(), Task: p.GetTask(), UpdatedAt: timeOf(p.GetUpdatedAt()),
		})
	}
	if withPlan {
		v.PlanYAML = e.GetPlanYaml()
	}
	return v
}

func metricView(ev *fxv1.MetricEvent) MetricEvent {
	m := Metrics(ev.GetMetrics())
	if m == nil {
		m = Metrics{}
	}
	return MetricEvent{
		Sequence: ev.GetSequence(), Round: ev.GetRound(), Task: ev.GetTask(),
		Collaborator: ev.GetCollaborator(), Samples: ev.GetSamples(), Metrics: m, Time: timeOf(ev.GetTime()),
	}
}

func (s *Server) identity(w http.ResponseWriter, r *http.Request) {
	id := s.c.Identity()
	writeJSON(w, Identity{Name: id.Name, Role: string(id.Role), Director: s.c.Address()})
}

func (s *Server) envoys(w http.ResponseWriter, r *http.Request) {
	list, err := s.c.Envoys(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := make([]Envoy, len(list))
	for i, e := range list {
		out[i] = envoyView(e)
	}
	writeJSON(w, out)
}

func (s *Server) experiments(w http.ResponseWriter, r *http.Request) {
	list, err := s.c.List(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := make([]Experiment, len(list))
	for i, e := range list {
		out[i] = experimentView(e, false)
	}
	writeJSON(w, out)
}

func (s *Server) experiment(w http.ResponseWriter, r *http.Request) {
	e, err := s.c.Get(r.Context(), ref(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, experimentView(e, true))
}

// ref is the experiment a request's path names, as OWNER/NAME: the
// director takes that form from any caller for their own experiments, and
// from an admin for anyone's.
func ref(r *http.Request) string {
	return r.PathValue("owner") + "/" + r.PathValue("name")
}

func writeJSON(w http.ResponseWriter, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeJSONError(w, http.StatusInternalServerError, "Internal", err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)+1))
	w.Write(append(b, '\n'))
}

// APIError is the body of a failed API request.
type APIError struct {
	Error string `json:"error"`
	// Code is the gRPC code's name when the director refused.
	Code string `json:"code"`
}

func writeJSONError(w http.ResponseWriter, httpStatus int, code, msg string) {
	b, _ := json.Marshal(APIError{Error: msg, Code: code})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(httpStatus)
	w.Write(append(b, '\n'))
}

// fail answers with the director's refusal (its reason and code) or the
// client's error, under the HTTP status closest to it.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		return // the browser went away, or the dashboard is stopping
	}
	code := status.Code(err)
	httpStatus := http.StatusBadGateway
	switch code {
	case codes.NotFound:
		httpStatus = http.StatusNotFound
	case codes.InvalidArgument, codes.OutOfRange:
		httpStatus = http.StatusBadRequest
	case codes.PermissionDenied, codes.Unauthenticated:
		httpStatus = http.StatusForbidden
	case codes.FailedPrecondition:
		httpStatus = http.StatusConflict
	case codes.DeadlineExceeded:
		httpStatus = http.StatusGatewayTimeout
	}
	s.log.Warn("request failed", "path", r.URL.Path, "error", err)
	writeJSONError(w, httpStatus, code.String(), fmt.Sprint(err))
}
