package app

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/fx-fl/fx/envoy"
	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// Reading an experiment's code before deciding on it: the admin fetches the
// archive from the director (fx director inspect), the data owner reads
// the one its envoy downloaded for a pending offer (fx envoy inspect). Both
// print the plan and every file with its size and sha256, and with
// --extract unpack the archive into a new directory with the rules envoys
// unpack by (no links, no paths leaving the directory, size limits).

func newDirectorInspectCommand() *cobra.Command {
	var o *researcherOptions
	var owner, id, extract string
	cmd := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Read an experiment's archive before approving it: plan, files, digests",
		Long: `Download an experiment's archive from the director, check it against the
digest the director recorded, and print its plan and every file with its size
and sha256. --extract DIR unpacks it into DIR (new or empty) for reading, as
an envoy would unpack it: regular files and directories only, nothing outside
DIR, within the size limits.

NAME is the experiment's name, whoever submitted it (the PENDING one when
researchers used the same name); OWNER/NAME or --owner picks one
researcher's, --id one experiment.

` + adminConnHelp,
		Args: cobra.RangeArgs(0, 1),
		RunE: func(cmd *cobra.Command, args []string) error {
			conn, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer conn.Close()
			ref, err := adminRef(cmd.Context(), conn, args, id, owner)
			if err != nil {
				return err
			}
			c := conn.RPC()
			const timeout = 15 * time.Second
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			e, err := c.GetExperiment(ctx, &fxv1.GetExperimentRequest{Experiment: ref})
			if err != nil {
				return statusError(err)
			}
			tmp, err := os.CreateTemp("", "fx-inspect-*")
			if err != nil {
				return err
			}
			defer os.Remove(tmp.Name())
			defer tmp.Close()
			// The download may take longer than one call: a second per MiB
			// more.
			dctx, dcancel := context.WithTimeout(cmd.Context(), timeout+time.Duration(e.GetArchiveSize()>>20)*time.Second)
			defer dcancel()
			if err := downloadArchive(dctx, c, e, tmp); err != nil {
				return err
			}
			head := fmt.Sprintf("experiment %s of %s (id %s, %s)", e.GetName(), e.GetOwner(), e.GetId(), e.GetState())
			decide := fmt.Sprintf("fx director approve %[1]s/%[2]s  |  fx director reject %[1]s/%[2]s --reason '...'", e.GetOwner(), e.GetName())
			if e.GetState() != fxv1.ExperimentState_PENDING {
				decide = ""
			}
			return review(cmd.OutOrStdout(), tmp.Name(), e.GetArchiveSize(), e.GetArchiveSha256(), head, extract, decide)
		},
	}
	o = adminOptions(cmd)
	cmd.Flags().StringVar(&owner, "owner", "", "the experiment's owner, when researchers used the same name")
	cmd.Flags().StringVar(&id, "id", "", "the experiment's id, instead of NAME")
	cmd.Flags().StringVar(&extract, "extract", "", "unpack the archive into this directory (new or empty)")
	return cmd
}

// experimentRef names an experiment from NAME (args), --id and --owner.
func experimentRef(args []string, id, owner string) (*fxv1.ExperimentRef, error) {
	ref := &fxv1.ExperimentRef{Id: id, Owner: owner}
	switch {
	case len(args) == 1 && id != "":
		return nil, errors.New("give NAME or --id, not both")
	case len(args) == 1:
		ref.Name = args[0]
	case id == "":
		return nil, errors.New("name the experiment: NAME [--owner OWNER], or --id ID")
	}
	return ref, nil
}

// downloadArchive writes e's archive to w, checking that the chunks are
// contiguous and that the bytes have the size and sha256 the director
// recorded at submission.
func downloadArchive(ctx context.Context, c fxv1.DirectorClient, e *fxv1.Experiment, w io.Writer) error {
	stream, err := c.DownloadArchive(ctx, &fxv1.DownloadArchiveRequest{ExperimentId: e.GetId()})
	if err != nil {
		return statusError(err)
	}
	h := sha256.New()
	var got int64
	for {
		chunk, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return statusError(err)
		}
		if chunk.GetOffset() != got {
			return fmt.Errorf("the director sent bytes from offset %d after %d: try again", chunk.GetOffset(), got)
		}
		if _, err := w.Write(chunk.GetData()); err != nil {
			return fmt.Errorf("keeping the archive: %w", err)
		}
		h.Write(chunk.GetData())
		got += int64(len(chunk.GetData()))
	}
	if sum := hex.EncodeToString(h.Sum(nil)); got != e.GetArchiveSize() || sum != e.GetArchiveSha256() {
		return fmt.Errorf("the archive downloaded is %d bytes with sha256 %s, but the director recorded %d bytes with sha256 %s: do not approve it; try again, and report it if it persists",
			got, sum, e.GetArchiveSize(), e.GetArchiveSha256())
	}
	return nil
}

func newEnvoyInspectCommand() *cobra.Command {
	var sf socketFlags
	var extract string
	cmd := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Read a pending offer's code before deciding: plan, files, digests",
		Long: `Print the plan of an offer awaiting the data owner's decision and every file
of its archive, as the envoy downloaded and verified it, with its size and
sha256. --extract DIR unpacks the archive into DIR (new or empty) for reading,
as the envoy unpacks it: regular files and directories only, nothing outside
DIR, within the size limits.

NAME is the offer's name, owner/name or id, as 'fx envoy pending' lists it.
Run it as the envoy's user: the archive is in the envoy's work directory.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			resp, err := adminCall(cmd.Context(), &sf, envoy.AdminRequest{Command: envoy.AdminInspect, Experiment: args[0]})
			if err != nil {
				return err
			}
			in := resp.Inspected
			if in == nil {
				return errors.New("the envoy answered without the offer")
			}
			p := in.Offer
			head := fmt.Sprintf("offer %s of %s (id %s)", p.Name, p.Owner, p.ID)
			if p.Summary != "" {
				head += "\n" + p.Summary
			}
			decide := fmt.Sprintf("fx envoy approve %s/%s  |  fx envoy reject %s/%s --reason '...'", p.Owner, p.Name, p.Owner, p.Name)
			return review(cmd.OutOrStdout(), in.Archive, p.ArchiveSize, p.ArchiveSHA256, head, extract, decide)
		},
	}
	sf.add(cmd.Flags())
	cmd.Flags().StringVar(&extract, "extract", "", "unpack the archive into this directory (new or empty)")
	return cmd
}

// review prints what the archive at path holds, after checking it is the
// one with size and sha256 that will run, and unpacks it into extract when
// given. decide, if any, says how to decide.
func review(w io.Writer, path string, size int64, sha, head, extract, decide string) error {
	gotSize, gotSHA, err := experiment.HashFile(path)
	if err != nil {
		return fmt.Errorf("reading the archive: %w", err)
	}
	if gotSize != size || gotSHA != sha {
		return fmt.Errorf("the archive at %s is %d bytes with sha256 %s, not the %d bytes with sha256 %s that were offered: do not approve it", path, gotSize, gotSHA, size, sha)
	}
	m, err := experiment.Review(path, extract, experiment.DefaultLimits())
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "%s\narchive: %d bytes, sha256 %s (verified)\n\n%s:\n", head, size, sha, experiment.PlanFile)
	for line := range strings.Lines(string(m.Plan)) {
		fmt.Fprintf(w, "  %s", line)
	}
	if !strings.HasSuffix(string(m.Plan), "\n") {
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "\n%d files, %d bytes unpacked:\n", len(m.Files), m.UnpackedBytes)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  SIZE\tSHA256\tPATH")
	for _, f := range m.Files {
		mark := ""
		if f.Executable {
			mark = "  (executable)"
		}
		fmt.Fprintf(tw, "  %d\t%s\t%s%s\n", f.Size, f.SHA256, f.Path, mark)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if extract != "" {
		fmt.Fprintf(w, "\nunpacked into %s\n", extract)
	}
	if decide != "" {
		fmt.Fprintf(w, "\ndecide with: %s\n", decide)
	}
	return nil
}
