package envoy

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/fx-fl/fx/experiment"
)

// The admin socket speaks JSON lines: the client connects, writes one
// AdminRequest as a line of JSON, reads one AdminResponse line, and the
// connection closes. Access control is the file system's: the socket is
// created 0600 inside a directory of mode 0700, so only the envoy's user
// (and root) can connect.

// Admin commands.
const (
	AdminPending = "pending"
	AdminApprove = "approve"
	AdminReject  = "reject"
	AdminStatus  = "status"
	AdminInspect = "inspect"
	AdminPrivacy = "privacy"
)

// adminIOTimeout bounds one admin exchange, so a stuck client cannot hold a
// connection open forever.
const adminIOTimeout = 10 * time.Second

// maxSocketPath is the longest unix socket path Linux accepts (sun_path
// holds 108 bytes with the terminating NUL); macOS allows less, and bind
// reports that itself.
const maxSocketPath = 107

// maxAdminRequest bounds a request line.
const maxAdminRequest = 64 << 10

// AdminRequest is one command on the admin socket.
type AdminRequest struct {
	// Command is pending, approve, reject, inspect, status or privacy.
	Command string `json:"command"`
	// Experiment names the offer to decide or inspect: its id, its name,
	// or owner/name when two owners used the same name.
	Experiment string `json:"experiment,omitempty"`
	// Reason is shown to the researcher when rejecting.
	Reason string `json:"reason,omitempty"`
	// Noise lists the noise multipliers to tell the rounds left at
	// (privacy); none: the budget's minimum, those used, 5 and 10.
	Noise []float64 `json:"noise,omitempty"`
}

// AdminResponse answers an AdminRequest.
type AdminResponse struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	// Pending lists the offers awaiting a decision (command pending).
	Pending []PendingOffer `json:"pending,omitempty"`
	// Decided is the offer a decision was given for (approve, reject).
	Decided *PendingOffer `json:"decided,omitempty"`
	// Status is the envoy's state (command status).
	Status *Status `json:"status,omitempty"`
	// Inspected is the offer to inspect (command inspect).
	Inspected *Inspection `json:"inspected,omitempty"`
	// Privacy is the privacy policy and ledger (command privacy).
	Privacy *PrivacyStatus `json:"privacy,omitempty"`
}

// Inspection is where a pending offer's verified archive is, so that the
// data owner can read its code before deciding: the admin socket answers
// with the path (its client runs as the envoy's user, who can read it),
// never with the archive itself.
type Inspection struct {
	Offer PendingOffer `json:"offer"`
	// Archive is the path of the archive the envoy downloaded and
	// verified against Offer.ArchiveSHA256.
	Archive string `json:"archive"`
}

// Status is what an envoy is doing, for its operator.
type Status struct {
	Name     string `json:"name"`
	Director string `json:"director"`
	// Connected reports whether the last session with the director is up.
	Connected bool   `json:"connected"`
	Data      string `json:"data"`
	Review    string `json:"review"`
	// Experiments are the experiments the envoy holds, by id.
	Experiments []ExperimentStatus `json:"experiments"`
}

// ExperimentStatus is one experiment at this envoy.
type ExperimentStatus struct {
	ID    string `json:"id"`
	Name  string `json:"name"`
	Owner string `json:"owner"`
	// Phase is reviewing, pending, accepted, rejected, running, finished
	// or failed.
	Phase string `json:"phase"`
	// Reason is the decision's reason, once decided.
	Reason string `json:"reason,omitempty"`
	// Aggregator is where its collaborator connects, once started.
	Aggregator string `json:"aggregator,omitempty"`
}

// PendingOffer is an offer awaiting the data owner's decision, with what the
// owner needs to decide: who sent it, what it will run, and the digest of
// the archive that was downloaded and verified.
type PendingOffer struct {
	ID            string    `json:"id"`
	Name          string    `json:"name"`
	Owner         string    `json:"owner"`
	ArchiveSHA256 string    `json:"archive_sha256"`
	ArchiveSize   int64     `json:"archive_size"`
	OfferedAt     time.Time `json:"offered_at"`
	AnswerBy      time.Time `json:"answer_by,omitzero"`
	// Summary is the plan in one line: rounds, runner, aggregation, tasks.
	Summary string `json:"summary"`
	// Plan is the archive's plan.yaml as the experiment will run it.
	Plan string `json:"plan"`
}

// listenAdmin creates the admin socket. Its directory is created 0700 and
// refused when other users can enter it; a socket left by an envoy that died
// is replaced, one that answers means another envoy uses the path.
func (e *Envoy) listenAdmin() (net.Listener, error) {
	path := e.cfg.AdminSocketPath()
	if len(path) > maxSocketPath {
		return nil, fmt.Errorf("admin_socket: %s is %d bytes long, but a unix socket path may have at most %d: set admin_socket to a shorter path", path, len(path), maxSocketPath)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("admin_socket: creating %s: %w", dir, err)
	}
	if e.cfg.AdminSocket == "" {
		// The default directory is the envoy's own.
		if err := os.Chmod(dir, 0o700); err != nil {
			return nil, fmt.Errorf("admin_socket: %w", err)
		}
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("admin_socket: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("admin_socket: directory %s has mode %04o: other users could reach the socket; use a directory only the envoy's user can open (chmod 700 %s)",
			dir, fi.Mode().Perm(), dir)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("admin_socket: %s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("admin_socket: %s is in use: is another envoy running with this work_dir?", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("admin_socket: removing the stale socket %s: %w", path, err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin_socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin_socket: %w", err)
	}
	return ln, nil
}

// serveAdmin answers admin connections until ctx ends.
func (e *Envoy) serveAdmin(ctx context.Context, ln net.Listener) {
	log := e.log.Named("admin")
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer ln.Close()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil {
				log.Error("admin socket failed; `fx envoy approve|reject|pending` will not work until the envoy restarts", "error", err)
			}
			return
		}
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			defer c.Close()
			c.SetDeadline(time.Now().Add(adminIOTimeout))
			resp := e.adminExchange(c)
			if !resp.OK {
				log.Debug("admin request refused", "error", resp.Error)
			}
			json.NewEncoder(c).Encode(resp)
		}()
	}
}

func (e *Envoy) adminExchange(c net.Conn) AdminResponse {
	if err := checkPeer(c); err != nil {
		return AdminResponse{Error: err.Error()}
	}
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 4096), maxAdminRequest)
	if !sc.Scan() {
		return AdminResponse{Error: "no request: send one JSON object on a line"}
	}
	var req AdminRequest
	if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
		return AdminResponse{Error: fmt.Sprintf("malformed request: %v", err)}
	}
	switch req.Command {
	case AdminPending:
		return AdminResponse{OK: true, Pending: e.Pending()}
	case AdminStatus:
		st := e.Status()
		return AdminResponse{OK: true, Status: &st}
	case AdminApprove, AdminReject:
		p, err := e.Decide(req.Experiment, req.Command == AdminApprove, req.Reason)
		if err != nil {
			return AdminResponse{Error: err.Error()}
		}
		return AdminResponse{OK: true, Decided: &p}
	case AdminInspect:
		in, err := e.Inspect(req.Experiment)
		if err != nil {
			return AdminResponse{Error: err.Error()}
		}
		return AdminResponse{OK: true, Inspected: &in}
	case AdminPrivacy:
		st, err := e.Privacy(req.Noise)
		if err != nil {
			return AdminResponse{Error: err.Error()}
		}
		return AdminResponse{OK: true, Privacy: &st}
	}
	return AdminResponse{Error: fmt.Sprintf("unknown command %q: use %s, %s, %s, %s, %s or %s", req.Command, AdminPending, AdminInspect, AdminApprove, AdminReject, AdminStatus, AdminPrivacy)}
}

// Status reports the connection and every experiment the envoy holds.
func (e *Envoy) Status() Status {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := Status{
		Name:        e.name,
		Director:    e.cfg.Director.Address,
		Connected:   e.link == linkUp,
		Data:        e.data.String(),
		Review:      e.cfg.Review.Policy,
		Experiments: []ExperimentStatus{},
	}
	for _, x := range e.exps {
		es := ExperimentStatus{ID: x.rec.ID, Name: x.rec.Name, Owner: x.rec.Owner, Phase: string(x.phase), Reason: x.rec.Reason}
		if x.start != nil && (x.phase == phaseRunning || x.phase == phaseFinished || x.phase == phaseFailed) {
			es.Aggregator = x.start.GetAggregatorAddress()
		}
		st.Experiments = append(st.Experiments, es)
	}
	slices.SortFunc(st.Experiments, func(a, b ExperimentStatus) int { return strings.Compare(a.ID, b.ID) })
	return st
}

// Pending lists the offers awaiting the data owner, oldest first.
func (e *Envoy) Pending() []PendingOffer {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := []PendingOffer{}
	for _, x := range e.exps {
		if x.phase == phasePending {
			out = append(out, pendingOffer(x))
		}
	}
	slices.SortFunc(out, func(a, b PendingOffer) int {
		if c := a.OfferedAt.Compare(b.OfferedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out
}

func pendingOffer(x *exp) PendingOffer {
	p := PendingOffer{
		ID:            x.rec.ID,
		Name:          x.rec.Name,
		Owner:         x.rec.Owner,
		ArchiveSHA256: x.rec.ArchiveSHA256,
		ArchiveSize:   x.rec.ArchiveSize,
		OfferedAt:     x.rec.OfferedAt,
		AnswerBy:      x.rec.AnswerBy,
		Plan:          x.rec.PlanYAML,
	}
	if x.plan != nil {
		p.Summary = summarize(x.plan)
		if b, err := x.plan.Marshal(); err == nil {
			p.Plan = string(b)
		}
	}
	return p
}

// summarize says in one line what a plan will do with the site's data.
func summarize(p *experiment.Plan) string {
	runner := p.Runner.Kind
	switch p.Runner.Kind {
	case experiment.RunnerBuiltin:
		runner += " " + p.Runner.Model
	case experiment.RunnerExec:
		runner += " " + strings.Join(p.Runner.Command, " ")
	}
	if len(p.Runner.Hyperparameters) > 0 {
		if b, err := json.Marshal(p.Runner.Hyperparameters); err == nil {
			runner += " " + string(b)
		}
	}
	dp := "no differential privacy"
	if d := p.Privacy.DP; d != nil {
		dp = fmt.Sprintf("differential privacy with noise multiplier %v and clip norm %v", d.NoiseMultiplier, d.ClipNorm)
	}
	return fmt.Sprintf("%d rounds; runner %s; aggregation %s; tasks %s; at least %d participants; %s",
		p.Rounds, runner, p.Aggregation.Algorithm, strings.Join(p.Tasks, ", "), p.Participants.Min, dp)
}

// Inspect tells where the archive of a pending offer (named as for
// Decide) is.
func (e *Envoy) Inspect(ref string) (Inspection, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	x, err := e.pendingLocked(ref, "inspect")
	if err != nil {
		return Inspection{}, err
	}
	return Inspection{Offer: pendingOffer(x), Archive: filepath.Join(e.expDir(x.rec.ID), archiveFile)}, nil
}

// Decide gives the data owner's decision on a pending offer, named by id,
// name, or owner/name. A rejection without a reason gets a generic one,
// since the director requires a reason.
func (e *Envoy) Decide(ref string, accept bool, reason string) (PendingOffer, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	x, err := e.pendingLocked(ref, "decide on")
	if err != nil {
		return PendingOffer{}, err
	}
	if accept {
		reason = strings.TrimSpace(reason)
		if reason == "" {
			reason = "approved by the data owner"
		}
	} else if strings.TrimSpace(reason) == "" {
		reason = "rejected by the data owner"
	}
	select {
	case x.decide <- decision{accept: accept, reason: reason}:
	default:
		return PendingOffer{}, fmt.Errorf("a decision on %q was already given", ref)
	}
	// The intake goroutine records and sends the decision; until then the
	// offer must not be listed or decided again.
	x.phase = phaseReviewing
	return pendingOffer(x), nil
}

// pendingLocked finds the pending offer ref names: its id, its name, or
// owner/name when two owners used the same name. what says what the
// caller wants to do with it, for the messages.
func (e *Envoy) pendingLocked(ref, what string) (*exp, error) {
	ref = strings.TrimSpace(ref)
	if ref == "" {
		return nil, fmt.Errorf("name the experiment to %s (its id or name, as `fx envoy pending` lists it)", what)
	}
	var matches []*exp
	var names []string
	for _, x := range e.exps {
		if x.phase != phasePending {
			continue
		}
		names = append(names, x.rec.Name)
		if x.rec.ID == ref {
			matches = []*exp{x}
			break
		}
		if x.rec.Name == ref || x.rec.Owner+"/"+x.rec.Name == ref {
			matches = append(matches, x)
		}
	}
	switch {
	case len(matches) == 0 && len(names) == 0:
		return nil, fmt.Errorf("no offer awaits a decision (%q is not pending)", ref)
	case len(matches) == 0:
		slices.Sort(names)
		return nil, fmt.Errorf("no pending offer is called %q; pending: %s", ref, strings.Join(names, ", "))
	case len(matches) > 1:
		var ids []string
		for _, x := range matches {
			ids = append(ids, x.rec.Owner+"/"+x.rec.Name+" (id "+x.rec.ID+")")
		}
		slices.Sort(ids)
		return nil, fmt.Errorf("%q names several pending offers: %s; give the id or owner/name", ref, strings.Join(ids, ", "))
	}
	return matches[0], nil
}

// AdminCall sends one request to an envoy's admin socket and returns its
// answer; a refused request comes back as an error carrying the envoy's
// message.
func AdminCall(ctx context.Context, socket string, req AdminRequest) (AdminResponse, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return AdminResponse{}, fmt.Errorf("cannot reach the envoy's admin socket %s (is the envoy running, and are you its user?): %w", socket, err)
	}
	defer c.Close()
	deadline := time.Now().Add(adminIOTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	c.SetDeadline(deadline)
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return AdminResponse{}, fmt.Errorf("admin socket %s: %w", socket, err)
	}
	var resp AdminResponse
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&resp); err != nil {
		return AdminResponse{}, fmt.Errorf("admin socket %s: reading the answer: %w", socket, err)
	}
	if !resp.OK {
		return resp, errors.New(resp.Error)
	}
	return resp, nil
}
