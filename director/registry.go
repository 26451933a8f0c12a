package director

import (
	"bytes"
	"context"
	"fmt"
	"hash/fnv"
	"slices"
	"time"

	"github.com/fx-fl/fx/internal/version"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fx-fl/fx/director/store"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// registerEnvoy records an envoy and its shard, marks it seen, and invites
// it to open offers it qualifies for. The record is committed outside the
// director's lock, in a store batch shared with other registrations: a
// thousand envoys starting at once then cost a few commits rather than a
// thousand fsyncs in a row, and heartbeats and researchers never wait on
// them. Registrations of one envoy are ordered by its registration lock, so
// the store and memory agree on its last one. A registration that repeats
// what the store holds (an envoy reconnecting, every envoy after a director
// restart) writes nothing, and a caller that gave up while waiting gets its
// context's error and changes nothing.
func (d *Director) registerEnvoy(ctx context.Context, req *fxv1.RegisterEnvoyRequest) error {
	name := req.GetEnvoyName()
	if err := experiment.ValidateName("envoy", name); err != nil {
		return err
	}
	shard := req.GetShard()
	if shard == nil {
		return fmt.Errorf("envoy %s: no dataset shard: describe the data the envoy holds: %w", name, ErrInvalidArgument)
	}
	if len(shard.GetSampleShape()) == 0 {
		return fmt.Errorf("envoy %s: the shard has no sample_shape: %w", name, ErrInvalidArgument)
	}
	if err := checkDims("shard.sample_shape", shard.GetSampleShape()); err != nil {
		return err
	}
	if err := checkDims("shard.target_shape", shard.GetTargetShape()); err != nil {
		return err
	}
	if shard.GetTrainSamples() <= 0 && shard.GetValidSamples() <= 0 {
		return fmt.Errorf("envoy %s: the shard has no samples (train_samples and valid_samples are 0): %w", name, ErrInvalidArgument)
	}
	if shard.GetTrainSamples() < 0 || shard.GetValidSamples() < 0 || shard.GetClasses() < 0 || req.GetMaxExperiments() < 0 {
		return fmt.Errorf("envoy %s: negative sample, class or max_experiments count: %w", name, ErrInvalidArgument)
	}
	raw, err := proto.MarshalOptions{Deterministic: true}.Marshal(shard)
	if err != nil {
		return fmt.Errorf("envoy %s: %w", name, err)
	}

	unlock := d.registrationLock(name)
	defer unlock()
	d.mu.Lock()
	if err := ctx.Err(); err != nil {
		d.mu.Unlock()
		return fmt.Errorf("envoy %s: registration abandoned by the caller: %w", name, err)
	}
	rec := store.Envoy{Name: name, Shard: raw, MaxExperiments: req.GetMaxExperiments(), Version: req.GetVersion(), RegisteredAt: d.clock.Now()}
	prev := d.envoys[name]
	if prev != nil {
		rec.RegisteredAt = prev.rec.RegisteredAt
	}
	changed := prev == nil || !sameEnvoyRecord(prev.rec, rec)
	d.mu.Unlock()
	if changed {
		if err := d.store.Batch(func(tx store.Tx) error { return tx.PutEnvoy(&rec) }); err != nil {
			return fmt.Errorf("store: %w", err)
		}
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.clock.Now()
	env := d.envoys[name]
	if env == nil {
		env = &envoyState{streams: map[*assignStream]struct{}{}}
		d.envoys[name] = env
		d.log.Info("envoy registered", "envoy", name, "tags", shard.GetTags(), "sample_shape", shard.GetSampleShape(), "version", req.GetVersion())
		if err := version.Compatible(d.cfg.Version, req.GetVersion()); err != nil {
			d.log.Warn("an envoy runs another release series of fx", "envoy", name, "director_version", d.cfg.Version, "envoy_version", req.GetVersion(), "why", err)
		}
	} else {
		d.log.Info("envoy re-registered", "envoy", name)
	}
	env.rec = rec
	env.shard = proto.Clone(shard).(*fxv1.DatasetShard)
	d.seenLocked(env, now)
	d.inviteAllLocked()
	return nil
}

// registrationLock serialises the registrations of one envoy; other
// envoys' proceed in parallel (but for the rare one hashed to the same
// stripe).
func (d *Director) registrationLock(name string) (unlock func()) {
	h := fnv.New32a()
	h.Write([]byte(name))
	mu := &d.registering[h.Sum32()%uint32(len(d.registering))]
	mu.Lock()
	return mu.Unlock
}

// sameEnvoyRecord reports whether storing b would change nothing of a.
func sameEnvoyRecord(a, b store.Envoy) bool {
	return a.Name == b.Name && bytes.Equal(a.Shard, b.Shard) && a.MaxExperiments == b.MaxExperiments &&
		a.Version == b.Version && a.RegisteredAt.Equal(b.RegisteredAt)
}

func checkDims(key string, dims []int64) error {
	for i, v := range dims {
		if v < 0 {
			return fmt.Errorf("%s[%d] is %d: dimensions must not be negative: %w", key, i, v, ErrInvalidArgument)
		}
	}
	return nil
}

// seenLocked marks a heartbeat; an envoy that comes back online is invited
// to offers it missed while away.
func (d *Director) seenLocked(env *envoyState, now time.Time) {
	env.lastSeen = now
	if !env.wasOnline {
		env.wasOnline = true
		d.log.Info("envoy online", "envoy", env.rec.Name)
		d.inviteAllLocked()
	}
}

func (d *Director) heartbeat(req *fxv1.HeartbeatRequest) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	env := d.envoys[req.GetEnvoyName()]
	if env == nil {
		return fmt.Errorf("envoy %s is not registered with this director: call RegisterEnvoy: %w", req.GetEnvoyName(), ErrFailedPrecondition)
	}
	running := slices.Clone(req.GetRunningExperiments())
	for _, a := range d.heartbeatStopsLocked(env, running) {
		d.sendLocked(env.rec.Name, a)
	}
	env.running = running
	d.seenLocked(env, d.clock.Now())
	return nil
}

// envoyInfoLocked describes an envoy as viewer may see it. An admin sees
// everything. A researcher sees the shard without its description, which
// says where the site keeps its data (dataset descriptions name their
// files), and of the experiments the envoy takes part in only its own:
// tags, shapes and counts are what a researcher selects sites by.
func (d *Director) envoyInfoLocked(env *envoyState, viewer pki.Identity) *fxv1.EnvoyInfo {
	info := &fxv1.EnvoyInfo{
		Name:           env.rec.Name,
		Online:         d.onlineLocked(env, d.clock.Now()),
		RegisteredAt:   timestamppb.New(env.rec.RegisteredAt),
		Shard:          shardFor(env.shard, viewer),
		MaxExperiments: env.rec.MaxExperiments,
		Version:        env.rec.Version,
	}
	if !env.lastSeen.IsZero() {
		info.LastSeen = timestamppb.New(env.lastSeen)
	}
	for _, e := range d.sortedExps() {
		if e.rec.Ended() || (viewer.Role != pki.RoleAdmin && e.rec.Owner != viewer.Name) {
			continue
		}
		if p, ok := e.parts[env.rec.Name]; ok && (p.State == fxv1.ParticipantState_ACCEPTED || p.State == fxv1.ParticipantState_TRAINING) {
			info.Experiments = append(info.Experiments, e.rec.ID)
		}
	}
	return info
}

// shardFor copies a shard for viewer: without its description unless
// viewer is an admin (see envoyInfoLocked).
func shardFor(s *fxv1.DatasetShard, viewer pki.Identity) *fxv1.DatasetShard {
	out := proto.Clone(s).(*fxv1.DatasetShard)
	if viewer.Role != pki.RoleAdmin {
		out.Description = ""
	}
	return out
}

// envoyKey is an envoy's key in listings: its name.
func envoyKey(env *envoyState) string { return env.rec.Name }

func (d *Director) listEnvoys(req *fxv1.ListEnvoysRequest, viewer pki.Identity) (*fxv1.ListEnvoysResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.clock.Now()
	var cands []*envoyState
	for _, env := range d.envoys {
		if req.GetOnlineOnly() && !d.onlineLocked(env, now) {
			continue
		}
		if !shardMatches(env.shard, req.GetTags(), nil, nil) {
			continue
		}
		cands = append(cands, env)
	}
	envoys, next, err := page("ListEnvoys", req.GetPageSize(), req.GetPageToken(), cands, envoyKey, func(env *envoyState) *fxv1.EnvoyInfo {
		return d.envoyInfoLocked(env, viewer)
	})
	if err != nil {
		return nil, err
	}
	return &fxv1.ListEnvoysResponse{Envoys: envoys, NextPageToken: next}, nil
}

func (d *Director) searchDatasets(req *fxv1.SearchDatasetsRequest, viewer pki.Identity) (*fxv1.SearchDatasetsResponse, error) {
	if err := checkDims("sample_shape", req.GetSampleShape()); err != nil {
		return nil, err
	}
	if err := checkDims("target_shape", req.GetTargetShape()); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.clock.Now()
	var cands []*envoyState
	for _, env := range d.envoys {
		if !d.onlineLocked(env, now) && !req.GetIncludeOffline() {
			continue
		}
		if !shardMatches(env.shard, req.GetTags(), req.GetSampleShape(), req.GetTargetShape()) {
			continue
		}
		cands = append(cands, env)
	}
	matches, next, err := page("SearchDatasets", req.GetPageSize(), req.GetPageToken(), cands, envoyKey, func(env *envoyState) *fxv1.DatasetMatch {
		return &fxv1.DatasetMatch{Envoy: env.rec.Name, Online: d.onlineLocked(env, now), Shard: shardFor(env.shard, viewer)}
	})
	if err != nil {
		return nil, err
	}
	return &fxv1.SearchDatasetsResponse{Matches: matches, NextPageToken: next}, nil
}
