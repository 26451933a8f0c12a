package envoy

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/fx-fl/fx/internal/atomicfile"
)

// The files of one experiment under <work_dir>/experiments/<id>/.
const (
	recordFile      = "record.json"  // the offer and the data owner's decision
	partFile        = "archive.part" // a download in progress; resumed at its size
	archiveFile     = "archive"      // the verified archive
	filesDir        = "files"        // the unpacked archive
	collaboratorDir = "collaborator" // the collaborator's own state
	runnerDir       = "runner"       // an exec runner's task directories
)

// Decisions a record may hold.
const (
	decisionAccept = "accept"
	decisionReject = "reject"
)

// record is what the envoy keeps on disk about one offered experiment, so
// that after a restart it answers a replayed offer the same way, and rejoins
// an accepted experiment without downloading it again.
type record struct {
	ID            string    `json:"id"`
	Name          string    `json:"name"`
	Owner         string    `json:"owner"`
	ArchiveSize   int64     `json:"archive_size"`
	ArchiveSHA256 string    `json:"archive_sha256"`
	PlanYAML      string    `json:"plan_yaml"`
	AnswerBy      time.Time `json:"answer_by,omitzero"`
	OfferedAt     time.Time `json:"offered_at"`
	// Decision is empty until the owner's policy or the owner decided.
	Decision string `json:"decision,omitempty"`
	Reason   string `json:"reason,omitempty"`
}

// experimentsDir holds one directory per offered experiment.
func (e *Envoy) experimentsDir() string { return filepath.Join(e.cfg.WorkDir, "experiments") }

// expDir is the directory of one experiment. The id was checked with
// experiment.ValidateName, so it is a single safe path element.
func (e *Envoy) expDir(id string) string { return filepath.Join(e.experimentsDir(), id) }

// saveRecord writes the record atomically and durably: a crash leaves the
// old record or the new one, never half of one.
func (e *Envoy) saveRecord(r record) error {
	if err := atomicfile.WriteJSON(filepath.Join(e.expDir(r.ID), recordFile), r); err != nil {
		return fmt.Errorf("saving the record of %s: %w", r.ID, err)
	}
	return nil
}

// loadRecords reads every experiment directory's record. Directories
// without a readable record are returned in broken, for the caller to clear.
func (e *Envoy) loadRecords() (records []record, broken []string, err error) {
	entries, err := os.ReadDir(e.experimentsDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("reading %s: %w", e.experimentsDir(), err)
	}
	for _, ent := range entries {
		if !ent.IsDir() {
			continue
		}
		data, err := os.ReadFile(filepath.Join(e.experimentsDir(), ent.Name(), recordFile))
		var r record
		if err == nil {
			err = json.Unmarshal(data, &r)
		}
		if err != nil || r.ID != ent.Name() {
			broken = append(broken, ent.Name())
			continue
		}
		records = append(records, r)
	}
	return records, broken, nil
}
