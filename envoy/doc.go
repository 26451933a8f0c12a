// Package envoy is a data site's agent: it keeps the site known to the
// director, reviews the experiments offered to it under the data owner's
// policy, and runs a collaborator for each experiment it accepted. The data
// never leaves the site; only its description (tags, shapes, counts) does.
//
// # Life
//
// Config → New → Run(ctx), stopped by cancelling ctx. New checks everything
// it can without the network, so a site with a wrong setting fails at once
// with a message naming it: the configuration (Config.Validate), the
// certificate (its OU must be the envoy role; a configured name must equal
// its CN, which is the envoy's name), and the data shard, which it loads.
// Run creates the admin socket, reloads the work directory and then keeps a
// session with the director until ctx ends.
//
// # Session
//
// A session is RegisterEnvoy, then heartbeats at the period the director
// names and a WatchAssignments stream, side by side. When either fails the
// session ends and, after a capped exponential backoff with jitter, a new
// one starts with a new registration. Registering is idempotent, so this one
// rule covers a network outage, a director restart that lost the envoy (it
// answers FAILED_PRECONDITION "not registered") and a closed stream. The
// backoff starts over once a session proved healthy (a heartbeat answered or
// an assignment arrived). Losing and regaining the director is logged once
// each; the attempts in between go to the debug level. Every unary call has
// Config.RPCTimeout as its deadline; the assignment stream lives as long as
// the heartbeats succeed; a download is abandoned when silent for
// RPCTimeout.
//
// # Assignments
//
// The director replays an envoy's current assignments on every new stream,
// so each handler treats a repeat as a no-op, and none blocks the stream:
// each experiment's work runs in its own goroutine.
//
//   - Offer: the archive is downloaded into the work directory, resuming at
//     the size of the partial file after any interruption (also across an
//     envoy restart); verified against the offer's size and sha256; unpacked
//     with experiment.Unpack, the director's own safety rules, and its
//     plan.yaml must be the plan the offer showed; the plan is
//     checked to be runnable here (its runner is built on the site's data:
//     a built-in model with its hyperparameters, or an exec runner whose
//     command must resolve inside the experiment or in PATH, and which a
//     site refuses altogether with exec.allow: false); then the data
//     owner's policy decides and AnswerOffer carries the decision and its
//     reason.
//   - Start: the accepted experiment's collaborator starts with the plan's
//     runner on the site's data and the envoy's certificate. A Start naming
//     another aggregator address restarts it. A collaborator that fails is
//     reported with ReportFailure and the reason; one stopped by Stop or by
//     the envoy's shutdown is not a failure.
//   - Stop: the collaborator (or the review in progress) stops and the
//     experiment's directory is removed.
//
// A digest mismatch is handled as follows: the file is discarded and
// downloaded once more from byte 0, since a partial file from a crash may be
// what is wrong; a second mismatch rejects the offer through AnswerOffer
// with a reason naming both digests ("archive sha256 mismatch: the offer
// announces … but the downloaded bytes hash to …"). It is not sent through
// ReportFailure: that call is for experiments the envoy takes part in, and
// a rejection reaches the researcher as the participant's reason.
//
// # Review policies
//
//   - auto accepts every archive that verifies, unpacks and can run here.
//   - manual holds the offer until a person at the site decides with
//     `fx envoy approve NAME` or `fx envoy reject NAME --reason …`;
//     `fx envoy pending` lists what waits, with the plan's summary and the
//     archive's digest. Only the waiting offer waits: heartbeats, other
//     offers and running experiments go on. An offer whose answer time
//     passes before anyone decides is dropped.
//   - allowlist accepts an archive whose sha256 is listed in
//     Config.Review.Allowlist (one digest a line, as sha256sum prints them;
//     '#' comments) and rejects the rest. The file is read at each decision.
//
// # Admin socket
//
// A unix socket, by default <work_dir>/admin/envoy.sock, created 0600 in a
// directory of mode 0700; a directory other users can enter is refused. On
// Linux the caller's user is also checked from the kernel's peer credentials
// (the envoy's user or root).
// The protocol is one JSON line each way per connection: an AdminRequest
// ({"command":"pending"}, {"command":"approve","experiment":"NAME"},
// {"command":"reject","experiment":"NAME","reason":"…"},
// {"command":"status"}) and an AdminResponse ({"ok":true,"pending":[…]},
// {"ok":true,"status":{…}} or {"ok":false,"error":"…"}).
// NAME is an experiment id, a name, or owner/name. AdminCall is the client.
//
// # Work directory
//
//	<work_dir>/experiments/<id>/record.json   the offer and the decision (written atomically)
//	<work_dir>/experiments/<id>/archive.part  a download in progress
//	<work_dir>/experiments/<id>/archive       the verified archive
//	<work_dir>/experiments/<id>/files/        the unpacked archive
//	<work_dir>/experiments/<id>/collaborator/ the collaborator's state
//	<work_dir>/experiments/<id>/runner/       an exec runner's task directories
//	<work_dir>/admin/envoy.sock               the admin socket
//
// Decisions are recorded before they are sent, so an envoy restarted at any
// point answers a replayed offer the same way, and rejoins an accepted,
// running experiment when the director replays its Start, without
// downloading the archive again.
package envoy
