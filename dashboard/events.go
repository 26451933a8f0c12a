package dashboard

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// pingEvery is how long an event stream may stay silent before a comment
// line is sent, so that idle connections are not taken for dead.
const pingEvery = 15 * time.Second

// events is GET /api/experiments/OWNER/NAME/events, a Server-Sent Events
// stream of the experiment:
//
//	event: experiment   the experiment (as in the list), first and whenever it changes
//	event: metric       a metric event, with its sequence as the event id
//	event: end          the experiment ended and every metric event was sent; data: the experiment
//	event: problem      the watch failed ({"error", "code"}); the stream ends after it
//
// Metric events start after the Last-Event-ID header (a browser's
// EventSource sends it when it reconnects) or the after query parameter,
// whichever is later, so a reconnecting page misses nothing and repeats
// nothing. The server follows the director's WatchMetrics stream, which
// itself reconnects across a dropped connection or a restarting director.
// An unknown experiment is a 404 before the stream starts.
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	name := ref(r)
	after, err := afterSequence(r)
	if err != nil {
		writeJSONError(w, http.StatusBadRequest, "InvalidArgument", err.Error())
		return
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	e, err := s.c.Get(ctx, name)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	out := &sse{w: w, rc: http.NewResponseController(w)}
	// A browser reconnects by itself this long after the stream breaks.
	fmt.Fprint(w, "retry: 3000\n\n")

	var sent []byte
	show := func(e *fxv1.Experiment) error {
		b, err := json.Marshal(experimentView(e, false))
		if err != nil || string(b) == string(sent) {
			return err
		}
		sent = b
		return out.event("experiment", 0, b)
	}
	// refresh re-reads the experiment, briefly bounded: while the director
	// is away the page just keeps what it has.
	refresh := func() error {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		e, err := s.c.Get(rctx, name)
		if err != nil {
			return nil
		}
		return show(e)
	}
	if err := show(e); err != nil {
		return
	}
	out.flush()

	last := after
	items := s.watch(ctx, name, last)
	tick := time.NewTicker(s.poll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			if refresh() != nil {
				return
			}
			if time.Since(out.lastWrite) > pingEvery {
				if _, err := io.WriteString(w, ": ping\n\n"); err != nil {
					return
				}
			}
			out.flush()
		case it, ok := <-items:
			switch {
			case !ok:
				// The director ended the stream: the experiment has ended
				// and every event was sent.
				e, err := s.c.Get(ctx, name)
				if err != nil {
					out.problem(err)
					return
				}
				if !experiment.Ended(e.GetState()) {
					// A director does not end a live experiment's stream;
					// follow a new one rather than report an end.
					items = s.watch(ctx, name, last)
					continue
				}
				if show(e) == nil {
					b, _ := json.Marshal(experimentView(e, false))
					out.event("end", 0, b)
					out.flush()
				}
				return
			case it.err != nil:
				out.problem(it.err)
				return
			}
			last = it.ev.GetSequence()
			b, err := json.Marshal(metricView(it.ev))
			if err != nil || out.event("metric", last, b) != nil {
				return
			}
			// A round's aggregate means the round moved on: show it, once
			// the backlog of past events is through.
			if len(items) == 0 {
				if it.ev.GetCollaborator() == "" && refresh() != nil {
					return
				}
				out.flush()
			}
		}
	}
}

type watchItem struct {
	ev  *fxv1.MetricEvent
	err error
}

// watch follows the experiment's metric events after a sequence number in
// a goroutine of its own, until ctx ends; the channel closes when the
// director ends the stream.
func (s *Server) watch(ctx context.Context, name string, after int64) <-chan watchItem {
	items := make(chan watchItem, 256)
	go func() {
		defer close(items)
		for ev, err := range s.c.Metrics(ctx, name, after) {
			select {
			case items <- watchItem{ev, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return items
}

// afterSequence is where a stream starts: after the later of the
// Last-Event-ID header and the after parameter.
func afterSequence(r *http.Request) (int64, error) {
	var after int64
	for what, v := range map[string]string{"Last-Event-ID": r.Header.Get("Last-Event-ID"), "after": r.URL.Query().Get("after")} {
		if v == "" {
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("%s %q: want a metric sequence number, 0 or more", what, v)
		}
		after = max(after, n)
	}
	return after, nil
}

// sse writes Server-Sent Events.
type sse struct {
	w         io.Writer
	rc        *http.ResponseController
	lastWrite time.Time
}

// event writes one event; data is one line of JSON.
func (s *sse) event(name string, id int64, data []byte) error {
	s.lastWrite = time.Now()
	msg := "event: " + name + "\n"
	if id > 0 {
		msg += "id: " + strconv.FormatInt(id, 10) + "\n"
	}
	_, err := io.WriteString(s.w, msg+"data: "+string(data)+"\n\n")
	return err
}

func (s *sse) flush() { _ = s.rc.Flush() }

// problem reports a failed watch as the stream's last event.
func (s *sse) problem(err error) {
	b, _ := json.Marshal(APIError{Error: err.Error(), Code: status.Code(err).String()})
	s.event("problem", 0, b)
	s.flush()
}
