package privacy

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/fx-fl/fx/internal/atomicfile"
)

// Charge is one release of noised data computed from a dataset: in
// client-level DP, one round's clipped and noised update.
type Charge struct {
	Experiment string `json:"experiment"`
	// Name is the experiment as people know it (owner/name), for whoever
	// reads the ledger or a refusal; Experiment alone identifies it.
	Name  string `json:"name,omitempty"`
	Round int    `json:"round"`
	// The mechanism: noise multiplier σ, sampling rate q (1 when the whole
	// dataset's update is noised once) and steps (1 per round then).
	SampledGaussian
	// Clip is the clip norm C; ε does not depend on it, the budget may.
	Clip float64 `json:"clip_norm"`
	// Delta is the δ the experiment states, kept for the record (0: none
	// stated). The site computes ε at its own budget's δ.
	Delta float64 `json:"delta,omitempty"`
}

func (c Charge) validate() error {
	switch {
	case c.Experiment == "":
		return errors.New("charge: no experiment named")
	case c.Round < 0:
		return fmt.Errorf("charge: round %d: want ≥ 0", c.Round)
	case c.Steps < 1:
		return fmt.Errorf("charge: %d steps: a release is at least one step", c.Steps)
	case !(c.Clip > 0) || math.IsInf(c.Clip, 1):
		return fmt.Errorf("charge: clip norm %v: want a finite number > 0", c.Clip)
	case c.Delta != 0 && !(c.Delta > 0 && c.Delta < 1):
		return fmt.Errorf("charge: δ %v: want a number in (0, 1), or 0 for none stated", c.Delta)
	}
	if err := c.SampledGaussian.Validate(); err != nil {
		return fmt.Errorf("charge: %w", err)
	}
	return nil
}

// Entry is a charge as the ledger recorded it.
type Entry struct {
	Charge
	At time.Time `json:"at"`
}

// Ledger is the durable record of the privacy each dataset of a site has
// spent: one JSON file, readable by the data owner, rewritten atomically
// and durably (internal/atomicfile: temporary file, fsync, rename, fsync of
// the directory) on every charge, so a crash at any moment leaves every
// charge recorded before it. Every operation reads the file afresh under a
// lock — a mutex within the process and flock on path+".lock" across
// processes — so charges from any number of experiments are serialised, and
// a check and the charge it admits are one step.
//
// Deleting the file resets what the site believes it has spent, not what
// it has spent: back it up with the rest of the envoy's work directory.
type Ledger struct {
	path string
	mu   sync.Mutex
	lock *os.File // nil once closed
}

const ledgerVersion = 1

// ledgerFile is the file's content.
type ledgerFile struct {
	Version  int                `json:"version"`
	Datasets map[string][]Entry `json:"datasets"`
}

// Open opens the ledger at path, creating its directory; the file itself
// is created by the first charge. A ledger that cannot be read is an error
// here, when the envoy starts, rather than at its first round.
func Open(path string) (*Ledger, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("privacy ledger: %w", err)
	}
	lock, err := os.OpenFile(path+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("privacy ledger: %w", err)
	}
	l := &Ledger{path: path, lock: lock}
	if err := l.with(func(*ledgerFile) (bool, error) { return false, nil }); err != nil {
		lock.Close()
		return nil, err
	}
	return l, nil
}

// Close releases the ledger. Charges made before it are on disk already.
func (l *Ledger) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lock == nil {
		return nil
	}
	err := l.lock.Close()
	l.lock = nil
	return err
}

// with runs fn on the ledger's content under both locks, and writes the
// content back if fn asks to.
func (l *Ledger) with(fn func(*ledgerFile) (write bool, err error)) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lock == nil {
		return fmt.Errorf("privacy ledger %s is closed", l.path)
	}
	if err := lockFile(l.lock); err != nil {
		return fmt.Errorf("privacy ledger %s: lock: %w", l.path, err)
	}
	defer unlockFile(l.lock)
	f, err := l.read()
	if err != nil {
		return err
	}
	write, err := fn(f)
	if err != nil || !write {
		return err
	}
	if err := atomicfile.WriteJSON(l.path, f); err != nil {
		return fmt.Errorf("privacy ledger: %w (nothing was charged: the update must not leave the site)", err)
	}
	return nil
}

func (l *Ledger) read() (*ledgerFile, error) {
	data, err := os.ReadFile(l.path)
	if errors.Is(err, fs.ErrNotExist) {
		return &ledgerFile{Version: ledgerVersion, Datasets: map[string][]Entry{}}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("privacy ledger: %w", err)
	}
	damaged := func(err error) error {
		return fmt.Errorf("privacy ledger %s is damaged (%w): it is the only record of the privacy this site has spent, so no update may leave the site until it is restored from a backup", l.path, err)
	}
	var f ledgerFile
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, damaged(err)
	}
	if f.Version != ledgerVersion {
		return nil, fmt.Errorf("privacy ledger %s has format version %d; this fx reads version %d: use the fx that wrote it", l.path, f.Version, ledgerVersion)
	}
	if f.Datasets == nil {
		f.Datasets = map[string][]Entry{}
	}
	for name, entries := range f.Datasets {
		if err := validateDataset(name); err != nil {
			return nil, damaged(err)
		}
		for i, e := range entries {
			if err := e.validate(); err != nil {
				return nil, damaged(fmt.Errorf("dataset %q entry %d: %w", name, i, err))
			}
		}
	}
	return &f, nil
}

func validateDataset(name string) error {
	switch {
	case name == "":
		return errors.New("no dataset named")
	case len(name) > 256 || !utf8.ValidString(name):
		return fmt.Errorf("dataset name %.40q: want at most 256 bytes of UTF-8", name)
	case strings.ContainsFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f }):
		return fmt.Errorf("dataset name %q holds control characters", name)
	}
	return nil
}

// curve is the RDP, over DefaultOrders, of every entry composed: RDP adds
// up order by order. Entries with the same σ and q differ only in steps,
// so each such group costs one evaluation of the accountant.
func curve(entries []Entry) ([]float64, error) {
	type mech struct{ noise, rate float64 }
	steps := map[mech]int{}
	for _, e := range entries {
		steps[mech{e.Noise, e.Rate}] += e.Steps
	}
	// Add the groups in a fixed order, so that the same entries always give
	// the same ε to the last bit.
	groups := slices.SortedFunc(maps.Keys(steps), func(a, b mech) int {
		return cmp.Or(cmp.Compare(a.noise, b.noise), cmp.Compare(a.rate, b.rate))
	})
	total := make([]float64, len(defaultOrders))
	for _, m := range groups {
		rdp, err := SampledGaussian{Noise: m.noise, Rate: m.rate, Steps: steps[m]}.RDP(defaultOrders)
		if err != nil {
			return nil, err
		}
		for i := range total {
			total[i] += rdp[i]
		}
	}
	return total, nil
}

// Spent is the ε the dataset has spent at delta over every charge recorded.
func (l *Ledger) Spent(dataset string, delta float64) (float64, error) {
	var eps float64
	err := l.with(func(f *ledgerFile) (bool, error) {
		rdp, err := curve(f.Datasets[dataset])
		if err != nil {
			return false, err
		}
		eps, _, err = Epsilon(defaultOrders, rdp, delta)
		return false, err
	})
	return eps, err
}

// EpsilonOf is the ε at delta of the given entries composed, such as one
// experiment's entries: what that experiment alone spent.
func EpsilonOf(entries []Entry, delta float64) (float64, error) {
	rdp, err := curve(entries)
	if err != nil {
		return 0, err
	}
	eps, _, err := Epsilon(defaultOrders, rdp, delta)
	return eps, err
}

// Entries returns the dataset's charges, oldest first.
func (l *Ledger) Entries(dataset string) ([]Entry, error) {
	var out []Entry
	err := l.with(func(f *ledgerFile) (bool, error) {
		out = slices.Clone(f.Datasets[dataset])
		return false, nil
	})
	return out, err
}

// Datasets lists the datasets the ledger has charges for, in name order.
func (l *Ledger) Datasets() ([]string, error) {
	var out []string
	err := l.with(func(f *ledgerFile) (bool, error) {
		for name := range f.Datasets {
			out = append(out, name)
		}
		slices.Sort(out)
		return false, nil
	})
	return out, err
}

// Check reports whether the dataset can afford next within the budget: nil,
// or an error matching ErrRefused (an *ExceededError once the budget is at
// stake) that says what would happen and what would still fit.
func (l *Ledger) Check(dataset string, b Budget, next Charge) error {
	return l.with(func(f *ledgerFile) (bool, error) {
		_, err := check(f, dataset, b, next, 1)
		return false, err
	})
}

// Charge records c against the dataset if the budget affords it, as one
// step with the check, and durably: call it before the noised update
// leaves the site, and send nothing if it fails. Charge once for every
// freshly noised release; re-sending the very same noised bytes (a retried
// upload) costs nothing more (see Charged), but noising again does.
func (l *Ledger) Charge(dataset string, b Budget, c Charge) (Entry, error) {
	e := Entry{Charge: c}
	err := l.with(func(f *ledgerFile) (bool, error) {
		if _, err := check(f, dataset, b, c, 1); err != nil {
			return false, err
		}
		e.At = time.Now().UTC()
		f.Datasets[dataset] = append(f.Datasets[dataset], e)
		return true, nil
	})
	if err != nil {
		return Entry{}, err
	}
	return e, nil
}

// Charged reports whether the ledger holds a charge for the experiment's
// round on the dataset: a collaborator that restarts with an update it had
// noised and charged before may send those bytes without a new charge.
func (l *Ledger) Charged(dataset, experiment string, round int) (bool, error) {
	var found bool
	err := l.with(func(f *ledgerFile) (bool, error) {
		found = slices.ContainsFunc(f.Datasets[dataset], func(e Entry) bool {
			return e.Experiment == experiment && e.Round == round
		})
		return false, nil
	})
	return found, err
}

// Review checks a whole plan when the site is offered an experiment:
// rounds releases like per on top of what the dataset has spent. It
// returns nil if they all fit, or an error matching ErrRefused; an
// *ExceededError says how many fit (Fit) and at what noise all would.
func (l *Ledger) Review(dataset string, b Budget, per Charge, rounds int) error {
	if rounds < 1 {
		return fmt.Errorf("review: %d rounds: want ≥ 1", rounds)
	}
	return l.with(func(f *ledgerFile) (bool, error) {
		_, err := check(f, dataset, b, per, rounds)
		return false, err
	})
}

// Remaining is how many more releases like per the dataset can afford
// (math.MaxInt when they cost nothing): the "you may run at most N more
// rounds" a site reports.
func (l *Ledger) Remaining(dataset string, b Budget, per Charge) (int, error) {
	var n int
	err := l.with(func(f *ledgerFile) (bool, error) {
		var err error
		n, err = remaining(f, dataset, b, per)
		return false, err
	})
	return n, err
}

func remaining(f *ledgerFile, dataset string, b Budget, per Charge) (int, error) {
	if err := validateDataset(dataset); err != nil {
		return 0, err
	}
	if err := b.Admit(per); err != nil {
		return 0, err
	}
	spent, err := curve(f.Datasets[dataset])
	if err != nil {
		return 0, err
	}
	steps, err := MaxSteps(spent, per.Noise, per.Rate, b.Epsilon, b.Delta)
	if err != nil || steps == math.MaxInt {
		return steps, err
	}
	return steps / per.Steps, nil
}

// check admits rounds releases like c on the dataset, or says why not.
func check(f *ledgerFile, dataset string, b Budget, c Charge, rounds int) (int, error) {
	if err := validateDataset(dataset); err != nil {
		return 0, err
	}
	if err := b.Admit(c); err != nil {
		return 0, err
	}
	spent, err := curve(f.Datasets[dataset])
	if err != nil {
		return 0, err
	}
	asked := c.SampledGaussian
	asked.Steps *= rounds
	add, err := asked.RDP(defaultOrders)
	if err != nil {
		return 0, err
	}
	total := make([]float64, len(spent))
	for i := range total {
		total[i] = spent[i] + add[i]
	}
	would, _, err := Epsilon(defaultOrders, total, b.Delta)
	if err != nil {
		return 0, err
	}
	if would <= b.Epsilon {
		return rounds, nil
	}
	before, _, err := Epsilon(defaultOrders, spent, b.Delta)
	if err != nil {
		return 0, err
	}
	fit, err := remaining(f, dataset, b, c)
	if err != nil {
		return 0, err
	}
	sigma, err := minNoise(spent, c.Rate, asked.Steps, b.Epsilon, b.Delta)
	if err != nil {
		sigma = 0 // nothing spent on top of this fits
	}
	return fit, &ExceededError{
		Dataset: dataset, Experiment: c.Experiment, Name: c.Name, Budget: b,
		Spent: before, Would: would, Rounds: rounds, Fit: min(fit, rounds),
		Noise: c.Noise, MinNoise: sigma,
	}
}
