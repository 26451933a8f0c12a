package director

import (
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// An aggregator that runs out of disk, or meets a failing one, pauses
// instead of failing (see aggregator.Aggregator's persist): the experiment
// shows PAUSED with the reason, its participants stay, and it is RUNNING
// again as soon as the aggregator gets past the problem. A director
// restarted meanwhile relaunches it (see start).

// Paused records that the experiment's aggregator waits for a resource.
func (s *sink) Paused(reason string) {
	s.d.mu.Lock()
	defer s.d.mu.Unlock()
	if e := s.d.exps[s.id]; e != nil {
		s.d.setPausedLocked(e, reason)
	}
}

// Resumed records that it runs again.
func (s *sink) Resumed() { s.Paused("") }

// setPausedLocked moves a RUNNING experiment to PAUSED with reason, or a
// PAUSED one back to RUNNING when reason is empty.
func (d *Director) setPausedLocked(e *expState, reason string) {
	from, to := fxv1.ExperimentState_RUNNING, fxv1.ExperimentState_PAUSED
	if reason == "" {
		from, to = to, from
	}
	if e.rec.State != from {
		return
	}
	rec := e.rec
	rec.State, rec.Reason = to, reason
	if err := d.saveLocked(e, rec); err != nil {
		d.log.Error("cannot record the experiment's state", "experiment", e.rec.ID, "state", to, "error", err)
		return
	}
	if reason != "" {
		d.log.Warn("experiment paused", "experiment", e.rec.ID, "reason", reason)
	} else {
		d.log.Info("experiment running again", "experiment", e.rec.ID)
	}
}
