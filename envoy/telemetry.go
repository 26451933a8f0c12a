package envoy

import (
	"errors"

	"github.com/fx-fl/fx/internal/telemetry"
)

// phases are the values of fx_envoy_experiments' phase label.
var phases = []phase{phaseReviewing, phasePending, phaseAccepted, phaseRejected, phaseRunning, phaseFinished, phaseFailed}

// registerGauges exports, at each scrape, the experiments the envoy holds
// by phase and whether it is connected to the director.
func (e *Envoy) registerGauges() {
	e.metrics.Gauges([]telemetry.GaugeDesc{
		{Name: "fx_envoy_experiments", Help: "Experiments this envoy holds, by phase.", Labels: []string{"phase"}},
		{Name: "fx_envoy_director_connected", Help: "1 while the envoy is registered with the director and its session stands, else 0."},
	}, func(report func(string, float64, ...string)) {
		e.mu.Lock()
		byPhase := map[phase]int{}
		for _, x := range e.exps {
			byPhase[x.phase]++
		}
		up := e.link == linkUp
		e.mu.Unlock()
		for _, p := range phases {
			report("fx_envoy_experiments", float64(byPhase[p]), string(p))
		}
		connected := 0.0
		if up {
			connected = 1
		}
		report("fx_envoy_director_connected", connected)
	})
}

// readiness is /readyz's answer: ready while the envoy's session with the
// director stands (registered, heartbeats answered).
func (e *Envoy) readiness() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.link != linkUp {
		return errors.New("not connected to the director")
	}
	return nil
}
