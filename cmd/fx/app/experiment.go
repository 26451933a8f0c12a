package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"
	"golang.org/x/term"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/config"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// connSettings say how a researcher's command reaches the director. They
// come from the flags, the FX_* environment (FX_DIRECTOR, FX_SERVER_NAME,
// FX_CERT, FX_KEY, FX_CA, FX_TIMEOUT) and the profile file, in that order of
// precedence.
type connSettings struct {
	Director   string        `mapstructure:"director"`
	ServerName string        `mapstructure:"server_name"`
	Cert       string        `mapstructure:"cert"`
	Key        string        `mapstructure:"key"`
	CA         string        `mapstructure:"ca"`
	Timeout    time.Duration `mapstructure:"timeout"`
}

// The defaults follow scripts/pki-bootstrap.sh's layout, so a researcher in
// the directory it ran in needs no settings at all.
func defaultConnSettings() connSettings {
	return connSettings{
		Director: "localhost:50051",
		Cert:     filepath.Join("pki", "researcher", "researcher.crt"),
		Key:      filepath.Join("pki", "researcher", "researcher.key"),
		CA:       filepath.Join("pki", "researcher", "ca.crt"),
		Timeout:  experiment.DefaultConnectTimeout,
	}
}

// profileEnv names the profile file when --profile is not given.
const profileEnv = "FX_PROFILE"

// researcherOptions are the flags shared by `fx experiment` and `fx envoys`,
// and by the admin's `fx director approve|reject|inspect`.
type researcherOptions struct {
	profile string
	output  string
	// defaults are the settings before any flag, variable or profile;
	// nil means defaultConnSettings (a researcher's).
	defaults func() connSettings
}

const connFlagsHelp = `Connection settings come from flags, then the environment (FX_DIRECTOR,
FX_SERVER_NAME, FX_CERT, FX_KEY, FX_CA, FX_TIMEOUT), then a profile file:
--profile, else $FX_PROFILE, else ~/.config/fx/config.yaml if it exists. A
profile holds the same keys, and relative paths in it are relative to the
profile's directory:

  director: director.example.org:50051
  server_name: director.example.org
  cert: alice.crt
  key: alice.key
  ca: ca.crt
  timeout: 10s

Without any of them fx uses localhost:50051 and pki/researcher/researcher.crt,
.key and pki/researcher/ca.crt, the layout scripts/pki-bootstrap.sh writes.`

// addPersistent registers the connection and output flags on a command
// group.
func (o *researcherOptions) addPersistent(f *pflag.FlagSet) {
	f.String("director", "", "director address, host:port (default localhost:50051)")
	f.String("server-name", "", "name on the director's certificate (default: the host of --director)")
	f.String("cert", "", "your certificate (PEM): a researcher's, or an admin's")
	f.String("key", "", "your private key (PEM)")
	f.String("ca", "", "the federation root certificate (PEM)")
	f.Duration("timeout", 0, "how long to wait for the director to answer (default 10s)")
	f.StringVar(&o.profile, "profile", "", "profile file with connection settings (default $FX_PROFILE or ~/.config/fx/config.yaml)")
	f.StringVar(&o.output, "output", outputTable, "output format: table (for people), json or yaml (for scripts; 64-bit numbers are numbers)")
}

// profilePath is the profile to read: the one the user named, which must
// exist, else the default one if it exists, else none.
func (o *researcherOptions) profilePath() string {
	if o.profile != "" {
		return o.profile
	}
	if p := os.Getenv(profileEnv); p != "" {
		return p
	}
	dir, err := os.UserConfigDir()
	if err != nil {
		return ""
	}
	p := filepath.Join(dir, "fx", "config.yaml")
	if _, err := os.Stat(p); err != nil {
		return ""
	}
	return p
}

// settings loads the connection settings for cmd.
func (o *researcherOptions) settings(cmd *cobra.Command) (connSettings, error) {
	s := defaultConnSettings()
	if o.defaults != nil {
		s = o.defaults()
	}
	profile := o.profilePath()
	if profile != "" {
		if _, err := os.Stat(profile); errors.Is(err, fs.ErrNotExist) {
			return s, fmt.Errorf("profile %s does not exist (it was named by --profile or %s)", profile, profileEnv)
		} else if err != nil {
			return s, fmt.Errorf("profile %s: %w", profile, err)
		}
	}
	if err := config.Load(config.Source{File: profile, Flags: cmd.Flags(), FlagKeys: map[string]string{"server-name": "server_name"}}, &s); err != nil {
		return s, err
	}
	if profile != "" {
		if err := resolveProfilePaths(profile, &s); err != nil {
			return s, err
		}
	}
	return s, nil
}

// resolveProfilePaths makes the relative certificate paths a profile gives
// relative to the profile's directory, so ~/.config/fx/config.yaml can say
// "cert: alice.crt" and work from any directory. Paths from flags and the
// environment stay relative to the working directory.
func resolveProfilePaths(profile string, s *connSettings) error {
	data, err := os.ReadFile(profile)
	if err != nil {
		return fmt.Errorf("profile %s: %w", profile, err)
	}
	var inFile map[string]any
	if err := yaml.Unmarshal(data, &inFile); err != nil {
		return fmt.Errorf("profile %s: %w", profile, err)
	}
	dir := filepath.Dir(profile)
	for key, v := range map[string]*string{"cert": &s.Cert, "key": &s.Key, "ca": &s.CA} {
		given, _ := inFile[key].(string)
		if given != "" && *v == given && !filepath.IsAbs(given) {
			*v = filepath.Join(dir, given)
		}
	}
	return nil
}

// dial connects to the director with the researcher's certificate.
func (o *researcherOptions) dial(cmd *cobra.Command) (*experiment.Client, error) {
	if err := o.checkOutput(); err != nil {
		return nil, err
	}
	s, err := o.settings(cmd)
	if err != nil {
		return nil, err
	}
	c, err := experiment.Dial(cmd.Context(), experiment.ClientConfig{
		Director: s.Director, ServerName: s.ServerName,
		Cert: s.Cert, Key: s.Key, CA: s.CA,
		ConnectTimeout: s.Timeout,
	})
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w\n(say where your certificate, key and CA are with --cert, --key and --ca, FX_CERT, FX_KEY and FX_CA, or a profile: see 'fx experiment --help')", err)
	}
	return c, err
}

func newExperimentCommand() *cobra.Command {
	o := &researcherOptions{}
	cmd := &cobra.Command{
		Use:     "experiment",
		Aliases: []string{"exp"},
		Short:   "Submit experiments, follow them and fetch their models",
		Long: `Submit an experiment (a directory holding plan.yaml, see docs/experiments.md),
follow its rounds and metrics, download its models, cancel and remove it.
Experiments are named by the name they were submitted under; an admin names
another researcher's as OWNER/NAME.

` + connFlagsHelp,
		Example: `  fx experiment submit ./fashion-mlp --wait
  fx experiment list
  fx experiment watch fashion-mlp
  fx experiment metrics fashion-mlp --tensorboard runs/fashion-mlp
  fx experiment model fashion-mlp --best -o best.safetensors`,
	}
	o.addPersistent(cmd.PersistentFlags())
	cmd.AddCommand(
		newExperimentSubmitCommand(o),
		newExperimentListCommand(o),
		newExperimentStatusCommand(o),
		newExperimentWatchCommand(o),
		newExperimentMetricsCommand(o),
		newExperimentLogsCommand(o),
		newExperimentModelCommand(o),
		newExperimentCancelCommand(o),
		newExperimentRemoveCommand(o),
	)
	o.addCompletion(cmd)
	for _, sub := range cmd.Commands() {
		switch sub.Name() {
		case "status", "watch", "metrics", "logs", "model", "cancel", "remove":
			sub.ValidArgsFunction = o.completeExperiments
		case "list":
			_ = sub.RegisterFlagCompletionFunc("state", completeStates)
		}
	}
	return cmd
}

func newExperimentSubmitCommand(o *researcherOptions) *cobra.Command {
	var name string
	var wait bool
	cmd := &cobra.Command{
		Use:   "submit DIR|ARCHIVE",
		Short: "Pack an experiment directory and submit it to the director",
		Long: `Pack DIR (which must hold plan.yaml at its root) into a tar.gz and upload it to
the director, or upload a .tar.gz or .zip archive as it is. The plan is
checked before connecting, so a mistake is reported with every problem at
once. The experiment takes the plan's name unless --name gives another.

With --wait, follow the experiment until it ends, showing its round, its
participants and its latest metrics; the command then fails unless the
experiment FINISHED, so scripts can chain on it.`,
		Example: `  fx experiment submit ./fashion-mlp
  fx experiment submit ./fashion-mlp --name fashion-mlp-lr01 --wait
  fx experiment submit fashion-mlp.tar.gz --output json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := o.checkOutput(); err != nil {
				return err
			}
			u, err := experiment.PrepareUpload(args[0])
			if err != nil {
				return err
			}
			defer u.Close()
			c, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			bar := newProgressBar(cmd.ErrOrStderr(), fmt.Sprintf("uploading %s", args[0]))
			e, err := c.SubmitUpload(cmd.Context(), u, experiment.SubmitOptions{Name: name, Progress: bar.update})
			bar.done()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if !wait {
				if o.structured() {
					return o.write(out, e)
				}
				_, err := fmt.Fprintf(out, "submitted %s (id %s): %s\nfollow it with: fx experiment watch %s\n", e.GetName(), e.GetId(), e.GetState(), e.GetName())
				return err
			}
			if !o.structured() {
				fmt.Fprintf(out, "submitted %s (id %s)\n", e.GetName(), e.GetId())
			}
			return followExperiment(cmd.Context(), c, out, e.GetName(), o)
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "the experiment's name (default: the plan's name)")
	cmd.Flags().BoolVar(&wait, "wait", false, "follow the experiment until it ends; fail unless it FINISHED")
	return cmd
}

// followExperiment shows an experiment's progress until it ends: a line
// whenever its state, round or participants change, or a round's metrics
// arrive. With asJSON it prints only the final experiment. It returns the
// *EndedError of an experiment that did not finish.
func followExperiment(ctx context.Context, c *experiment.Client, out io.Writer, name string, o *researcherOptions) error {
	v := &liveView{out: out, quiet: o.structured()}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Metric events say when rounds complete; a slow ticker shows state
	// changes before the first one (offered, accepted, running).
	ticks := time.NewTicker(2 * time.Second)
	defer ticks.Stop()
	type result struct {
		e   *fxv1.Experiment
		err error
	}
	done := make(chan result, 1)
	aggregates := make(chan *fxv1.MetricEvent, 16)
	go func() {
		e, err := c.WaitFunc(ctx, name, func(ev *fxv1.MetricEvent) {
			if ev.GetCollaborator() == "" {
				select {
				case aggregates <- ev:
				case <-ctx.Done():
				}
			}
		})
		done <- result{e, err}
	}()
	v.refresh(ctx, c, name)
	for {
		select {
		case ev := <-aggregates:
			v.refresh(ctx, c, name)
			v.metrics(ev)
		case <-ticks.C:
			v.refresh(ctx, c, name)
		case r := <-done:
			for len(aggregates) > 0 {
				v.metrics(<-aggregates)
			}
			if r.e != nil {
				v.show(r.e)
				if o.structured() {
					if err := o.write(out, r.e); err != nil {
						return err
					}
				}
			}
			return interrupted(r.err, name)
		}
	}
}

// interrupted explains a watch the user stopped (Ctrl-C): the experiment
// itself goes on at the director.
func interrupted(err error, name string) error {
	if errors.Is(err, context.Canceled) {
		return fmt.Errorf("stopped watching; experiment %s goes on at the director: follow it again with `fx experiment watch %s`, stop it with `fx experiment cancel %s`: %w", name, name, name, err)
	}
	return err
}

// liveView prints an experiment's progress, one line per change.
type liveView struct {
	out    io.Writer
	quiet  bool
	last   string
	rounds int32
}

// refresh shows the experiment's current state. It is best effort and
// briefly bounded: while the director is away the view just goes quiet, and
// the metric stream behind it reconnects by itself.
func (v *liveView) refresh(ctx context.Context, c *experiment.Client, name string) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	e, err := c.Get(ctx, name)
	if err == nil {
		v.show(e)
	}
}

func (v *liveView) show(e *fxv1.Experiment) {
	v.rounds = e.GetRounds()
	line := fmt.Sprintf("%s  round %d/%d  %s", e.GetState(), e.GetRound(), e.GetRounds(), participantSummary(e.GetParticipants()))
	if e.GetReason() != "" {
		line += "  (" + e.GetReason() + ")"
	}
	if e.GetState() == fxv1.ExperimentState_PENDING {
		line += fmt.Sprintf("  (waiting for the director's admin to approve it: fx director approve %s/%s; Ctrl-C stops only this watch)", e.GetOwner(), e.GetName())
	}
	if line == v.last || v.quiet {
		return
	}
	v.last = line
	fmt.Fprintln(v.out, line)
}

func (v *liveView) metrics(ev *fxv1.MetricEvent) {
	if v.quiet {
		return
	}
	round := fmt.Sprintf("round %d", ev.GetRound())
	if v.rounds > 0 && ev.GetRound() > v.rounds {
		// After the last round the final model is validated once more.
		round = "final"
	}
	fmt.Fprintf(v.out, "  %s %s: %s\n", round, ev.GetTask(), formatMetrics(ev.GetMetrics()))
}

// participantSummary is "site-1 TRAINING, site-2 ACCEPTED".
func participantSummary(ps []*fxv1.Participant) string {
	if len(ps) == 0 {
		return "no participants yet"
	}
	parts := make([]string, len(ps))
	for i, p := range ps {
		parts[i] = p.GetEnvoy() + " " + p.GetState().String()
	}
	return strings.Join(parts, ", ")
}

// formatMetrics is "accuracy=0.8125 loss=0.4432", keys in order.
func formatMetrics(m map[string]float64) string {
	if len(m) == 0 {
		return "-"
	}
	keys := slices.Sorted(maps.Keys(m))
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%.4g", k, m[k])
	}
	return strings.Join(parts, " ")
}

// progressBar draws upload progress on a terminal, and nothing otherwise,
// so logs and pipes stay clean.
type progressBar struct {
	w     io.Writer
	label string
	on    bool
	drawn bool
}

func newProgressBar(w io.Writer, label string) *progressBar {
	f, ok := w.(*os.File)
	return &progressBar{w: w, label: label, on: ok && term.IsTerminal(int(f.Fd()))}
}

func (b *progressBar) update(sent, total int64) {
	if !b.on || total <= 0 {
		return
	}
	const width = 30
	filled := int(sent * width / total)
	fmt.Fprintf(b.w, "\r\033[K%s [%s%s] %3d%% %s / %s", b.label, strings.Repeat("#", filled), strings.Repeat("-", width-filled), sent*100/total, humanBytes(sent), humanBytes(total))
	b.drawn = true
}

func (b *progressBar) done() {
	if b.drawn {
		fmt.Fprintln(b.w)
	}
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func newExperimentListCommand(o *researcherOptions) *cobra.Command {
	var states []string
	var owner string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List your experiments, newest first",
		Long: `List your experiments (an admin sees everyone's, or one researcher's with
--owner), newest first, with their state, round and best score. --state keeps
only those in the given states.`,
		Example: `  fx experiment list
  fx experiment list --state RUNNING,OFFERED
  fx experiment list --output json | jq -r '.experiments[].name'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var filter []fxv1.ExperimentState
			for _, s := range states {
				v, ok := fxv1.ExperimentState_value[strings.ToUpper(strings.TrimSpace(s))]
				if !ok || v == 0 {
					return fmt.Errorf("--state %q: use PENDING, QUEUED, OFFERED, RUNNING, FINISHED, FAILED, CANCELLED or REJECTED", s)
				}
				filter = append(filter, fxv1.ExperimentState(v))
			}
			c, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			list, err := c.ListOf(cmd.Context(), owner, filter...)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if o.structured() {
				return o.write(out, &fxv1.ListExperimentsResponse{Experiments: list})
			}
			if len(list) == 0 {
				_, err := fmt.Fprintln(out, "no experiments")
				return err
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tOWNER\tSTATE\tROUND\tBEST\tCREATED\tID")
			for _, e := range list {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d\t%s\t%s\t%s\n", e.GetName(), e.GetOwner(), e.GetState(), e.GetRound(), e.GetRounds(),
					bestSummary(e.GetBest()), formatTime(e.GetCreatedAt().AsTime()), e.GetId())
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringSliceVar(&states, "state", nil, "only experiments in these states (comma-separated)")
	cmd.Flags().StringVar(&owner, "owner", "", "admins: only this researcher's experiments")
	return cmd
}

func bestSummary(b *fxv1.ModelSummary) string {
	if b == nil {
		return "-"
	}
	return fmt.Sprintf("%s=%.4g (round %d)", b.GetMetric(), b.GetValue(), b.GetRound())
}

func formatTime(t time.Time) string {
	if t.IsZero() || t.Unix() == 0 {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04:05")
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newExperimentStatusCommand(o *researcherOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status NAME",
		Short: "Show an experiment's state, progress, participants and latest metrics",
		Example: `  fx experiment status fashion-mlp
  fx experiment status alice/fashion-mlp   # an admin, another researcher's
  fx experiment status fashion-mlp --output json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			e, err := c.Get(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if o.structured() {
				return o.write(cmd.OutOrStdout(), e)
			}
			if err := printExperiment(cmd.OutOrStdout(), e); err != nil {
				return err
			}
			if !isEvaluation(e) || !experiment.Ended(e.GetState()) {
				return nil
			}
			ev, err := c.Evaluation(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return printEvaluation(cmd.OutOrStdout(), ev)
		},
	}
	return cmd
}

func printExperiment(w io.Writer, e *fxv1.Experiment) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "name:\t%s\n", e.GetName())
	fmt.Fprintf(tw, "id:\t%s\n", e.GetId())
	fmt.Fprintf(tw, "owner:\t%s\n", e.GetOwner())
	fmt.Fprintf(tw, "state:\t%s\n", e.GetState())
	if e.GetReason() != "" {
		fmt.Fprintf(tw, "reason:\t%s\n", e.GetReason())
	}
	fmt.Fprintf(tw, "round:\t%d of %d\n", e.GetRound(), e.GetRounds())
	fmt.Fprintf(tw, "best:\t%s\n", bestSummary(e.GetBest()))
	fmt.Fprintf(tw, "latest metrics:\t%s\n", formatMetrics(e.GetLatestMetrics()))
	fmt.Fprintf(tw, "archive:\t%s, sha256 %s\n", humanBytes(e.GetArchiveSize()), e.GetArchiveSha256())
	fmt.Fprintf(tw, "created:\t%s\n", formatTime(e.GetCreatedAt().AsTime()))
	fmt.Fprintf(tw, "updated:\t%s\n", formatTime(e.GetUpdatedAt().AsTime()))
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(e.GetParticipants()) == 0 {
		_, err := fmt.Fprintln(w, "\nno participants yet")
		return err
	}
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nENVOY\tSTATE\tLAST ROUND\tTASK\tREASON")
	for _, p := range e.GetParticipants() {
		last := "-"
		if p.GetLastRound() >= 0 {
			last = fmt.Sprint(p.GetLastRound())
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", p.GetEnvoy(), p.GetState(), last, orDash(p.GetTask()), orDash(p.GetReason()))
	}
	return tw.Flush()
}

// isEvaluation reports whether e's plan only scores a given model.
func isEvaluation(e *fxv1.Experiment) bool {
	p, err := experiment.ParseStoredPlan([]byte(e.GetPlanYaml()))
	return err == nil && p.Evaluation()
}

// printEvaluation lists each site's score of an evaluated model and the
// overall one, a column per metric.
func printEvaluation(w io.Writer, ev *experiment.Evaluation) error {
	if ev.Overall == nil && len(ev.Sites) == 0 {
		_, err := fmt.Fprintln(w, "\nno site reported an evaluation")
		return err
	}
	names := map[string]bool{}
	for _, s := range append([]*fxv1.MetricEvent{ev.Overall}, ev.Sites...) {
		for k := range s.GetMetrics() {
			names[k] = true
		}
	}
	metrics := slices.Sorted(maps.Keys(names))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "\nEVALUATION\tSAMPLES\t%s\n", strings.ToUpper(strings.Join(metrics, "\t")))
	row := func(name string, s *fxv1.MetricEvent) {
		cells := []string{name, fmt.Sprint(s.GetSamples())}
		for _, m := range metrics {
			cell := "-"
			if v, ok := s.GetMetrics()[m]; ok {
				cell = fmt.Sprintf("%.4g", v)
			}
			cells = append(cells, cell)
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	for _, s := range ev.Sites {
		row(s.GetCollaborator(), s)
	}
	if ev.Overall != nil {
		row("overall (weighted by samples)", ev.Overall)
	}
	return tw.Flush()
}

func newExperimentWatchCommand(o *researcherOptions) *cobra.Command {
	var after int64
	cmd := &cobra.Command{
		Use:   "watch NAME",
		Short: "Print an experiment's metric events as they happen, until it ends",
		Long: `Print every metric event of the experiment, one line each: each
collaborator's task results and, with COLLABORATOR "-", each round's
aggregate. The watch survives a dropped connection or a restarting director:
it reconnects and resumes after the last event it printed, without gaps or
repeats. It ends when the experiment ends, and fails unless it FINISHED.

--after N skips the events up to sequence N, to resume an earlier watch.
--output json prints one JSON object per line.`,
		Example: `  fx experiment watch fashion-mlp
  fx experiment watch fashion-mlp --after 42 --output json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if after < 0 {
				return fmt.Errorf("--after %d: use 0 for every event, or the last sequence seen", after)
			}
			c, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			out := cmd.OutOrStdout()
			// Fixed columns rather than a tabwriter: a watch is read live,
			// line by line, and cannot wait for the widest row.
			const row = "%6v  %5v  %-30s  %-16s  %8v  %s\n"
			if !o.structured() {
				fmt.Fprintf(out, row, "SEQ", "ROUND", "TASK", "COLLABORATOR", "SAMPLES", "METRICS")
			}
			var werr error
			e, err := c.Follow(cmd.Context(), args[0], after, func(ev *fxv1.MetricEvent) {
				if werr != nil {
					return
				}
				if o.structured() {
					werr = o.writeItem(out, ev)
					return
				}
				_, werr = fmt.Fprintf(out, row, ev.GetSequence(), ev.GetRound(), ev.GetTask(), orDash(ev.GetCollaborator()), ev.GetSamples(), formatMetrics(ev.GetMetrics()))
			})
			if werr != nil {
				return werr
			}
			if e != nil && !o.structured() {
				fmt.Fprintf(out, "%s ended %s (best %s)\n", e.GetName(), e.GetState(), bestSummary(e.GetBest()))
			}
			return interrupted(err, args[0])
		},
	}
	cmd.Flags().Int64Var(&after, "after", 0, "start after this sequence number")
	return cmd
}

func newExperimentLogsCommand(o *researcherOptions) *cobra.Command {
	var envoy string
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs NAME [--envoy E] [--follow]",
		Short: "Print what the experiment's runners printed at the sites that share it",
		Long: `Print the lines the experiment's exec runners wrote to stdout and stderr, at
the sites whose operators share them (exec.share_logs in the envoy's
configuration; off by default, since a runner's output may quote the site's
data). Each line shows the site, the task and round it belongs to, and the
stream. Sites share at most 20 lines a second; lines over that are counted
in a line of stream "fx". The director keeps an experiment's last 10,000
lines, in memory.

--envoy shows one site's lines. --follow keeps printing new lines until the
experiment ends. --output json prints one JSON object per line.`,
		Example: `  fx experiment logs fashion-cnn
  fx experiment logs fashion-cnn --envoy site-a --follow`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := o.checkOutput(); err != nil {
				return err
			}
			c, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			out := cmd.OutOrStdout()
			n := 0
			for line, err := range c.RunnerLogs(cmd.Context(), args[0], envoy, follow) {
				if err != nil {
					return err
				}
				n++
				if o.structured() {
					if err := o.writeItem(out, line); err != nil {
						return err
					}
					continue
				}
				where := "-"
				if line.GetTask() != "" {
					where = fmt.Sprintf("%s r%d", line.GetTask(), line.GetRound())
				}
				if _, err := fmt.Fprintf(out, "%s  %s  %s  %s: %s\n", line.GetTime().AsTime().Local().Format("15:04:05"),
					line.GetEnvoy(), where, line.GetStream(), line.GetText()); err != nil {
					return err
				}
			}
			if n == 0 && !o.structured() {
				fmt.Fprintf(cmd.ErrOrStderr(), "no runner output shared for %s (sites share it only with exec.share_logs: true)\n", args[0])
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&envoy, "envoy", "", "only this site's lines")
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new lines until the experiment ends")
	return cmd
}

func newExperimentModelCommand(o *researcherOptions) *cobra.Command {
	var best, last bool
	var round int
	var file string
	cmd := &cobra.Command{
		Use:   "model NAME [--best | --last | --round N] [-o FILE]",
		Short: "Download one of an experiment's models as a safetensors file",
		Long: `Download a model of the experiment: the best (by the plan's best_model metric,
the default), the last completed round's, or a given round's (0 is the
initial model). The file is written atomically: its size and sha256 are
checked against what the director announced before it replaces FILE. It
loads in PyTorch (safetensors.torch.load_file) and numpy.

FILE defaults to NAME-best.safetensors, NAME-last.safetensors or
NAME-roundN.safetensors in the current directory.`,
		Example: `  fx experiment model fashion-mlp --best -o best.safetensors
  fx experiment model fashion-mlp --round 3 -o round3.safetensors`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			chosen := 0
			sel, suffix := experiment.SelectBest, "best"
			if best {
				chosen++
			}
			if last {
				chosen++
				sel, suffix = experiment.SelectLast, "last"
			}
			if cmd.Flags().Changed("round") {
				chosen++
				if round < 0 {
					return fmt.Errorf("--round %d: rounds count from 1 (0 is the initial model)", round)
				}
				sel, suffix = experiment.SelectRound(round), fmt.Sprintf("round%d", round)
			}
			if chosen > 1 {
				return errors.New("choose one of --best, --last and --round N")
			}
			if file == "" {
				file = strings.ReplaceAll(args[0], "/", "-") + "-" + suffix + ".safetensors"
			}
			c, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			info, err := c.ModelToFile(cmd.Context(), args[0], sel, file)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if o.structured() {
				return o.writeObject(out, object{{"file", file}, {"model", plain(info)}})
			}
			_, err = fmt.Fprintf(out, "wrote %s: the %s model (round %d), %s, sha256 %s\nmetrics: %s\n", file, sel, info.GetRound(), humanBytes(info.GetSize()), info.GetSha256(), formatMetrics(info.GetMetrics()))
			return err
		},
	}
	cmd.Flags().BoolVar(&best, "best", false, "the best model by the plan's best_model metric (the default)")
	cmd.Flags().BoolVar(&last, "last", false, "the last completed round's model")
	cmd.Flags().IntVar(&round, "round", 0, "the model after round N (0: the initial model)")
	cmd.Flags().StringVarP(&file, "file", "o", "", "where to write the model")
	return cmd
}

func newExperimentCancelCommand(o *researcherOptions) *cobra.Command {
	var reason string
	cmd := &cobra.Command{
		Use:   "cancel NAME",
		Short: "Stop an experiment that has not ended",
		Long: `Stop the experiment: its aggregator and collaborators stop and it becomes
CANCELLED. Models of the rounds it completed stay downloadable until you
remove it.`,
		Example: `  fx experiment cancel fashion-mlp --reason "wrong learning rate"`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			e, err := c.Cancel(cmd.Context(), args[0], reason)
			if err != nil {
				return err
			}
			if o.structured() {
				return o.write(cmd.OutOrStdout(), e)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s is now %s\n", e.GetName(), e.GetState())
			return err
		},
	}
	cmd.Flags().StringVar(&reason, "reason", "", "why, recorded with the experiment")
	return cmd
}

func newExperimentRemoveCommand(o *researcherOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "remove NAME",
		Short: "Delete an ended experiment with its archive, models and metrics",
		Long: `Delete an experiment that has ended (FINISHED, FAILED, CANCELLED or REJECTED)
from the director: its record, archive, checkpoints, models and metrics.
Download the models you want to keep first. A running experiment must be
cancelled before it can be removed.`,
		Example: `  fx experiment model fashion-mlp --best -o best.safetensors && fx experiment remove fashion-mlp`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			if err := c.Remove(cmd.Context(), args[0]); err != nil {
				return err
			}
			if o.structured() {
				return o.writeObject(cmd.OutOrStdout(), object{{"removed", args[0]}})
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "removed %s\n", args[0])
			return err
		},
	}
	return cmd
}
