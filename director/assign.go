package director

import (
	"slices"
	"sync"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fx-fl/fx/director/store"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// assignQueue is how many assignments may wait for a slow envoy stream
// before the director gives up on the stream. The envoy reconnects and the
// replay brings it up to date, so nothing is lost by dropping the stream.
const assignQueue = 256

// assignStream is one open WatchAssignments stream.
type assignStream struct {
	ch     chan *fxv1.Assignment
	once   sync.Once
	kicked chan struct{} // closed when the stream must end
	reason string
}

func newAssignStream(replay int) *assignStream {
	return &assignStream{ch: make(chan *fxv1.Assignment, assignQueue+replay), kicked: make(chan struct{})}
}

func (s *assignStream) kick(reason string) {
	s.once.Do(func() {
		s.reason = reason
		close(s.kicked)
	})
}

// sendLocked queues an assignment on every open stream of an envoy.
func (d *Director) sendLocked(envoy string, a *fxv1.Assignment) {
	env := d.envoys[envoy]
	if env == nil {
		return
	}
	for s := range env.streams {
		select {
		case s.ch <- a:
		default:
			s.kick("the envoy is not reading its assignments fast enough; reconnect to get them replayed")
		}
	}
}

func (d *Director) closeStreamsLocked() {
	for _, env := range d.envoys {
		for s := range env.streams {
			s.kick("the director is shutting down")
		}
	}
}

func (d *Director) offerAssignment(e *expState) *fxv1.Assignment {
	return &fxv1.Assignment{ExperimentId: e.rec.ID, Kind: &fxv1.Assignment_Offer{Offer: &fxv1.Offer{
		Name: e.rec.Name, Owner: e.rec.Owner,
		ArchiveSize: e.rec.ArchiveSize, ArchiveSha256: e.rec.ArchiveSHA256,
		PlanYaml: e.rec.PlanYAML, AnswerBy: timestamppb.New(e.rec.AnswerBy),
	}}}
}

func (d *Director) startAssignment(e *expState) *fxv1.Assignment {
	return &fxv1.Assignment{ExperimentId: e.rec.ID, Kind: &fxv1.Assignment_Start{Start: &fxv1.Start{
		AggregatorAddress: e.run.address, AggregatorServerName: d.cfg.ServerName, Round: displayRound(e),
	}}}
}

func stopAssignment(id string, state fxv1.ExperimentState, reason string) *fxv1.Assignment {
	return &fxv1.Assignment{ExperimentId: id, Kind: &fxv1.Assignment_Stop{Stop: &fxv1.Stop{State: state, Reason: reason}}}
}

// replayLocked is what a new stream of the envoy starts with: open offers
// (answered or not, until the experiment starts or ends), starts of running
// experiments it trains in, and stops for experiments it last said it runs
// that have ended, that it should let go, or that it takes no part in.
func (d *Director) replayLocked(env *envoyState) []*fxv1.Assignment {
	name := env.rec.Name
	var out []*fxv1.Assignment
	for _, e := range d.sortedExps() {
		p, ok := e.parts[name]
		switch {
		case !ok:
		case e.rec.State == fxv1.ExperimentState_OFFERED &&
			(p.State == fxv1.ParticipantState_INVITED || p.State == fxv1.ParticipantState_ACCEPTED):
			out = append(out, d.offerAssignment(e))
		case store.Running(e.rec.State) && p.State == fxv1.ParticipantState_TRAINING && e.run != nil && e.run.serving:
			out = append(out, d.startAssignment(e))
		}
	}
	out = append(out, d.stopsLocked(name, env.running)...)
	return out
}

// stopsLocked returns a Stop for each experiment in running (as an envoy
// reported it) that the envoy should not be running. Only an experiment
// the envoy was offered is answered with its state and why; any other id,
// known or not, gets the one Stop an unknown id gets, so that an envoy
// cannot learn another experiment's state, reason or existence by naming
// its id.
func (d *Director) stopsLocked(name string, running []string) []*fxv1.Assignment {
	var out []*fxv1.Assignment
	for _, id := range running {
		e := d.exps[id]
		switch {
		case e == nil || e.parts[name] == nil:
			out = append(out, stopAssignment(id, fxv1.ExperimentState_EXPERIMENT_STATE_UNSPECIFIED, "this envoy takes part in no experiment with this id (it was removed, or never offered to this envoy)"))
		case e.rec.Ended():
			out = append(out, stopAssignment(id, e.rec.State, e.rec.Reason))
		default:
			if why := d.notTakingPartLocked(e, name); why != "" {
				out = append(out, stopAssignment(id, e.rec.State, why))
			}
		}
	}
	return out
}

// heartbeatStopsLocked returns the stops to push when a heartbeat lists
// experiments the envoy should not be running, sent only for ids not listed
// in the previous heartbeat, so an envoy slow to stop is not flooded.
func (d *Director) heartbeatStopsLocked(env *envoyState, running []string) []*fxv1.Assignment {
	var fresh []string
	for _, id := range running {
		if !slices.Contains(env.running, id) {
			fresh = append(fresh, id)
		}
	}
	return d.stopsLocked(env.rec.Name, fresh)
}

// notTakingPartLocked says why an envoy that was offered a live experiment
// should let it go, or "" when it may keep it: it declined it, was dropped,
// or the experiment started without it.
func (d *Director) notTakingPartLocked(e *expState, envoy string) string {
	p := e.parts[envoy]
	switch {
	case p.State == fxv1.ParticipantState_DECLINED:
		return "this envoy declined the experiment"
	case p.State == fxv1.ParticipantState_DROPPED:
		return "this envoy was dropped from the experiment: " + p.Reason
	case p.State == fxv1.ParticipantState_INVITED && e.rec.State != fxv1.ExperimentState_OFFERED:
		return "offer closed: the experiment started without this envoy"
	}
	return ""
}
