package exec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"

	"github.com/fx-fl/fx/tensor"
)

// Limits on metrics.json, so a runner cannot make the envoy hold or forward
// an unbounded document.
const (
	MaxMetricsBytes   = 1 << 20
	MaxMetrics        = 256
	maxMetricNameSize = 128
)

// metricsFile is the shape of metrics.json. Samples stays raw so that a
// missing value, a string or a fraction each get their own message.
type metricsFile struct {
	Samples json.RawMessage            `json:"samples"`
	Metrics map[string]json.RawMessage `json:"metrics"`
}

// readMetrics reads and checks output/metrics.json.
func readMetrics(path string) (int64, map[string]float64, error) {
	b, err := readRegular(path, MaxMetricsBytes, "metrics ("+MetricsFileName+")")
	if err != nil {
		return 0, nil, err
	}
	var mf metricsFile
	if err := decodeStrict(b, &mf); err != nil {
		return 0, nil, fmt.Errorf("%s is not the expected JSON object {\"samples\": N, \"metrics\": {...}}: %w", MetricsFileName, err)
	}
	return checkResult(MetricsFileName, mf.Samples, mf.Metrics)
}

// decodeStrict decodes one JSON document into v, refusing unknown keys
// (usually typos, such as "sample") and trailing values. The bare NaN and
// Infinity tokens Python writes are quoted first, so the check that follows
// can name the metric that holds one.
func decodeStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(quoteNonFinite(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("more than one JSON value")
	}
	return nil
}

// checkResult checks a task's reported sample count and metrics; where
// names the document they came from.
func checkResult(where string, rawSamples json.RawMessage, rawMetrics map[string]json.RawMessage) (int64, map[string]float64, error) {
	if rawSamples == nil || string(rawSamples) == "null" {
		return 0, nil, fmt.Errorf("%s has no \"samples\" (the number of local samples the task used)", where)
	}
	samples, err := parseCount(rawSamples)
	if err != nil {
		return 0, nil, fmt.Errorf("%s: \"samples\" %w", where, err)
	}
	if len(rawMetrics) > MaxMetrics {
		return 0, nil, fmt.Errorf("%s has %d metrics, more than %d", where, len(rawMetrics), MaxMetrics)
	}
	metrics := make(map[string]float64, len(rawMetrics))
	for name, raw := range rawMetrics {
		if err := validateMetricName(name); err != nil {
			return 0, nil, fmt.Errorf("%s: %w", where, err)
		}
		v, err := parseMetric(raw)
		if err != nil {
			return 0, nil, fmt.Errorf("%s: metric %q %w", where, name, err)
		}
		metrics[name] = v
	}
	return samples, metrics, nil
}

// parseCount reads a non-negative whole number (1e3 and 12.0 included).
func parseCount(raw json.RawMessage) (int64, error) {
	s := string(raw)
	if s == "" || !(s[0] == '-' || (s[0] >= '0' && s[0] <= '9')) {
		return 0, fmt.Errorf("is %s, want a whole number", s)
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		f, ferr := strconv.ParseFloat(s, 64)
		if ferr != nil || f != math.Trunc(f) || math.Abs(f) > 1<<53 {
			return 0, fmt.Errorf("is %s, want a whole number", s)
		}
		n = int64(f)
	}
	if n < 0 {
		return 0, fmt.Errorf("is %d, want a number of samples ≥ 0", n)
	}
	return n, nil
}

// parseMetric reads a finite number; the non-finite tokens Python's json
// module writes arrive here quoted by quoteNonFinite.
func parseMetric(raw json.RawMessage) (float64, error) {
	s := string(raw)
	switch s {
	case `"NaN"`, `"Infinity"`, `"-Infinity"`:
		return 0, fmt.Errorf("is %s: metrics must be finite numbers", strings.Trim(s, `"`))
	}
	if s == "" || !(s[0] == '-' || (s[0] >= '0' && s[0] <= '9')) {
		return 0, fmt.Errorf("is %s, want a number", s)
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsInf(v, 0) || math.IsNaN(v) {
		return 0, fmt.Errorf("is %s, which is not a finite float64", s)
	}
	return v, nil
}

// validateMetricName keeps names printable and short: they end up in logs,
// events and the researcher's tables.
func validateMetricName(name string) error {
	if name == "" {
		return errors.New("a metric has an empty name")
	}
	if len(name) > maxMetricNameSize {
		return fmt.Errorf("metric name %.40q... is longer than %d bytes", name, maxMetricNameSize)
	}
	if strings.ContainsFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f || r == 0xfffd }) {
		return fmt.Errorf("metric name %q holds control or invalid characters", name)
	}
	return nil
}

// nonFiniteTokens are the bare tokens quoteNonFinite quotes, longest first.
var nonFiniteTokens = [][]byte{[]byte("-Infinity"), []byte("Infinity"), []byte("NaN")}

// quoteNonFinite rewrites the bare tokens NaN, Infinity and -Infinity that
// Python's json module (and others) write for non-finite floats into JSON
// strings, so that the document parses and the metric holding one can be
// named in the error instead of a bare syntax error.
func quoteNonFinite(b []byte) []byte {
	if !bytes.Contains(b, []byte("NaN")) && !bytes.Contains(b, []byte("Infinity")) {
		return b
	}
	var out []byte
	inString, escaped := false, false
	last := 0
	for i := 0; i < len(b); i++ {
		c := b[i]
		if inString {
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
			continue
		}
		if c == '"' {
			inString = true
			continue
		}
		for _, tok := range nonFiniteTokens {
			if bytes.HasPrefix(b[i:], tok) {
				out = append(out, b[last:i]...)
				out = append(out, '"')
				out = append(out, tok...)
				out = append(out, '"')
				i += len(tok) - 1
				last = i + 1
				break
			}
		}
	}
	if out == nil {
		return b
	}
	return append(out, b[last:]...)
}

// statOutput finds a file the command had to write and refuses anything but
// a regular file: a FIFO would block the envoy, a link could point anywhere.
func statOutput(path, what string) (os.FileInfo, error) {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("the command exited 0 but wrote no %s at %s", what, path)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s at %s is not a regular file (%s)", what, path, fi.Mode().Type())
	}
	return fi, nil
}

// readRegular reads a file the command wrote, refusing anything but a
// regular file (a FIFO would block the envoy, a link could point anywhere)
// and anything larger than limit.
func readRegular(path string, limit int64, what string) ([]byte, error) {
	fi, err := statOutput(path, what)
	if err != nil {
		return nil, err
	}
	if fi.Size() > limit {
		return nil, fmt.Errorf("%s at %s is %d bytes, more than the %d allowed", what, path, fi.Size(), limit)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return b, nil
}

// readModel reads and checks output/model.safetensors against the input
// model: the same tensors, dtypes and shapes, every value finite. The header
// is checked before any data is read, so a wrong or oversized file costs no
// allocation. The tensors are returned in the input model's order, read
// into reuse's memory where it fits (a model handed back by Recycle).
func readModel(path string, input, reuse tensor.Model) (tensor.Model, error) {
	what := "output model (" + ModelFileName + ")"
	if _, err := statOutput(path, what); err != nil {
		return nil, err
	}
	hdr, err := tensor.ReadHeaderFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s is not a valid safetensors file: %w", what, err)
	}
	if err := input.Matches(hdr.Layout()); err != nil {
		return nil, fmt.Errorf("%s does not match the input model: %w", what, err)
	}
	m, _, err := tensor.ReadFileReusing(path, reuse)
	if err != nil {
		return nil, fmt.Errorf("%s is not a valid safetensors file: %w", what, err)
	}
	if err := input.Matches(m); err != nil {
		return nil, fmt.Errorf("%s does not match the input model: %w", what, err)
	}
	idx := m.Index()
	out := make(tensor.Model, len(input))
	for i, t := range input {
		out[i] = idx[t.Name]
		if err := out[i].CheckFinite(); err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
	}
	return out, nil
}
