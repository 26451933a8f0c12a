package dataset

import (
	"cmp"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
)

// LoadCSV loads a table whose first row names the columns: the label column
// (c.LabelColumn, "label" by default) holds the classes, every other column a
// numeric feature. Labels are mapped to 0..K-1 in the order of their sorted
// distinct values — numerically when all of them are numbers, so "10" comes
// after "9", and as strings otherwise — and ClassNames keeps the values.
// A c.ValidFraction share of the rows, chosen at random with c.Seed, becomes
// the validation split. A CSV file has no test split: keep the test rows in
// a file of their own, away from the sites.
func LoadCSV(c Config) (*Dataset, error) {
	if c.Kind == "" {
		c.Kind = KindCSV
	}
	if c.Kind != KindCSV {
		return nil, fmt.Errorf("dataset: LoadCSV given kind %q", c.Kind)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	c = c.withDefaults()
	f, err := os.Open(c.Path)
	if err != nil {
		return nil, fmt.Errorf("dataset: csv: %w", err)
	}
	defer f.Close()
	all, names, features, err := readCSV(f, c.Path, c.LabelColumn)
	if err != nil {
		return nil, err
	}
	if all.N < 2 {
		return nil, fmt.Errorf("dataset: csv %s: %d data rows, need at least 2 to hold out a validation split", c.Path, all.N)
	}
	train, valid := holdOut(&all, features, c.ValidFraction, c.Seed)
	d := &Dataset{
		Train:       train,
		Valid:       valid,
		SampleShape: []int64{int64(features)},
		Classes:     len(names),
		ClassNames:  names,
		Description: fmt.Sprintf("CSV %s (label column %q, %g validation, seed %d)", c.Path, c.LabelColumn, c.ValidFraction, c.Seed),
	}
	if err := d.Validate(); err != nil {
		return nil, fmt.Errorf("%w, in %s", err, c.Path)
	}
	return shardAsConfigured(d, c)
}

// readCSV parses the whole table. Errors name the file, the line and the
// column, since the fix is an edit of that cell.
func readCSV(r io.Reader, path, labelColumn string) (s Split, classNames []string, features int, err error) {
	cr := csv.NewReader(r)
	cr.ReuseRecord = true
	header, err := cr.Read()
	if errors.Is(err, io.EOF) {
		return Split{}, nil, 0, fmt.Errorf("dataset: csv %s: empty file, need a header row", path)
	}
	if err != nil {
		return Split{}, nil, 0, fmt.Errorf("dataset: csv %s: %w", path, err)
	}
	header = slices.Clone(header)
	labelAt := -1
	seen := map[string]int{}
	for i, h := range header {
		h = strings.TrimSpace(h)
		header[i] = h
		if h == "" {
			return Split{}, nil, 0, fmt.Errorf("dataset: csv %s: line 1: column %d has an empty name", path, i+1)
		}
		if j, dup := seen[h]; dup {
			return Split{}, nil, 0, fmt.Errorf("dataset: csv %s: line 1: column %q appears twice (columns %d and %d)", path, h, j+1, i+1)
		}
		seen[h] = i
		if h == labelColumn {
			labelAt = i
		}
	}
	if labelAt < 0 {
		return Split{}, nil, 0, fmt.Errorf("dataset: csv %s: line 1: no label column %q among %q", path, labelColumn, header)
	}
	features = len(header) - 1
	if features == 0 {
		return Split{}, nil, 0, fmt.Errorf("dataset: csv %s: line 1: only the label column, no feature columns", path)
	}
	var labels []string
	for {
		rec, err := cr.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			// csv.ParseError already names the line and column.
			return Split{}, nil, 0, fmt.Errorf("dataset: csv %s: %w", path, err)
		}
		line, _ := cr.FieldPos(0)
		for i, field := range rec {
			field = strings.TrimSpace(field)
			if i == labelAt {
				if field == "" {
					return Split{}, nil, 0, fmt.Errorf("dataset: csv %s: line %d, column %d (%q): empty label", path, line, i+1, header[i])
				}
				labels = append(labels, field)
				continue
			}
			v, err := strconv.ParseFloat(field, 32)
			if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
				return Split{}, nil, 0, fmt.Errorf("dataset: csv %s: line %d, column %d (%q): %q is not a finite number", path, line, i+1, header[i], field)
			}
			s.X = append(s.X, float32(v))
		}
	}
	s.N = len(labels)
	classNames, s.Y = encodeLabels(labels)
	return s, classNames, features, nil
}

// encodeLabels maps label strings to 0..K-1 in sorted order of the distinct
// values: numeric order when every value is a number, string order otherwise.
func encodeLabels(labels []string) (names []string, codes []int32) {
	distinct := slices.Clone(labels)
	slices.Sort(distinct)
	distinct = slices.Compact(distinct)
	numeric := make(map[string]float64, len(distinct))
	for _, l := range distinct {
		v, err := strconv.ParseFloat(l, 64)
		if err != nil || math.IsNaN(v) {
			numeric = nil
			break
		}
		numeric[l] = v
	}
	if numeric != nil {
		slices.SortStableFunc(distinct, func(a, b string) int { return cmp.Compare(numeric[a], numeric[b]) })
	}
	code := make(map[string]int32, len(distinct))
	for i, l := range distinct {
		code[l] = int32(i)
	}
	codes = make([]int32, len(labels))
	for i, l := range labels {
		codes[i] = code[l]
	}
	return distinct, codes
}
