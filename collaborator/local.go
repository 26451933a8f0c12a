package collaborator

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"

	"github.com/fx-fl/fx/tensor"
)

// Personalised layers (the plan's aggregation.local, Config.Local): the
// tensors it names are this site's own. The site trains them with the rest,
// keeps them in its work directory from round to round, puts them into
// every round's global model before running its tasks (so the validation of
// the aggregated model scores the site's personalised model), and never
// uploads them: they do not leave the site. The aggregator refuses an
// upload that carries them.
//
// Two files keep them, each with the round that trained it: the newest,
// and the one before, so that a round run again after a restart (the
// train task handed out again) starts from what the site had before that
// round, not from what its first attempt trained.
const (
	localFile     = "local.safetensors"
	localPrevFile = "local.prev.safetensors"
	localRound    = "fx.round" // metadata: the round that trained them
)

// isLocal reports whether the tensor name stays at the site.
func (c *Collaborator) isLocal(name string) bool {
	for _, p := range c.cfg.Local {
		if ok, _ := path.Match(p, name); ok {
			return true
		}
	}
	return false
}

// shared returns m's tensors that leave the site: all of them unless the
// plan keeps some local. The tensors are m's own, not copies.
func (c *Collaborator) shared(m tensor.Model) tensor.Model {
	if len(c.cfg.Local) == 0 {
		return m
	}
	out := make(tensor.Model, 0, len(m))
	for _, t := range m {
		if !c.isLocal(t.Name) {
			out = append(out, t)
		}
	}
	return out
}

// personalise puts the site's own local tensors, as the last round before
// this one trained them, into the round's global model. Before the site
// has trained any, the global model's (initial) values stand.
func (c *Collaborator) personalise(round int) error {
	if len(c.cfg.Local) == 0 {
		return nil
	}
	kept, from, err := c.keptLocal(round)
	if err != nil || kept == nil {
		return err
	}
	index := kept.Index()
	n := 0
	for _, t := range c.model {
		if !c.isLocal(t.Name) {
			continue
		}
		k := index[t.Name]
		if k == nil || !tensor.SameLayout(k, t) {
			return fmt.Errorf("the site's own %s (kept in %s) does not fit the round's model: its tensors are not the model's local ones; remove the file to start them again from the global model's values",
				t.Name, filepath.Join(c.cfg.WorkDir, localFile))
		}
		copy(t.Data, k.Data)
		n++
	}
	c.log.Debug("the site's own local tensors put into the round's model", "round", round, "tensors", n, "trained_in_round", from)
	return nil
}

// keptLocal returns the newest local tensors kept from a round before
// round, and that round; nil if there are none.
func (c *Collaborator) keptLocal(round int) (tensor.Model, int, error) {
	for _, name := range []string{localFile, localPrevFile} {
		m, meta, err := tensor.ReadFile(filepath.Join(c.cfg.WorkDir, name))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, 0, fmt.Errorf("the site's own local tensors: %w", err)
		}
		trained, err := strconv.Atoi(meta[localRound])
		if err != nil {
			return nil, 0, fmt.Errorf("the site's own local tensors (%s): no round recorded", name)
		}
		if trained < round {
			return m, trained, nil
		}
	}
	return nil, 0, nil
}

// keepLocal keeps the local tensors of the model trained in round, durably,
// before anything of the round is uploaded: an envoy restarted later starts
// the next round from them. The newest file kept so far moves aside if an
// earlier round trained it (see localPrevFile).
func (c *Collaborator) keepLocal(round int, trained tensor.Model) error {
	if len(c.cfg.Local) == 0 {
		return nil
	}
	var local tensor.Model
	for _, t := range trained {
		if c.isLocal(t.Name) {
			local = append(local, t)
		}
	}
	cur := filepath.Join(c.cfg.WorkDir, localFile)
	if h, err := tensor.ReadHeaderFile(cur); err == nil { // the round it holds, not its tensors
		if r, err := strconv.Atoi(h.Metadata[localRound]); err == nil && r < round {
			if err := os.Rename(cur, filepath.Join(c.cfg.WorkDir, localPrevFile)); err != nil {
				return fmt.Errorf("keep the site's own local tensors: %w", err)
			}
		}
	}
	if err := tensor.WriteFile(cur, local, map[string]string{localRound: strconv.Itoa(round)}); err != nil {
		return fmt.Errorf("keep the site's own local tensors: %w", err)
	}
	return nil
}
