package dataset

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func writeCSV(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "data.csv")
	writeFile(t, path, []byte(content))
	return path
}

func TestLoadCSV(t *testing.T) {
	var b strings.Builder
	b.WriteString("a, species ,b\n")
	for i := range 100 {
		fmt.Fprintf(&b, "%d,%s,%g\n", i, []string{"setosa", "virginica", "versicolor"}[i%3], float64(i)/2)
	}
	path := writeCSV(t, b.String())
	d, err := LoadCSV(Config{Path: path, LabelColumn: "species", ValidFraction: 0.25, Seed: 3})
	if err != nil {
		t.Fatal(err)
	}
	if d.Train.N != 75 || d.Valid.N != 25 {
		t.Errorf("split %d/%d, want 75/25", d.Train.N, d.Valid.N)
	}
	if !slices.Equal(d.SampleShape, []int64{2}) {
		t.Errorf("sample shape %v, want [2]", d.SampleShape)
	}
	if !slices.Equal(d.ClassNames, []string{"setosa", "versicolor", "virginica"}) {
		t.Errorf("class names %q, want sorted", d.ClassNames)
	}
	// Every row keeps its features and label: a = i, b = i/2, label by i%3.
	code := map[int]int32{0: 0, 1: 2, 2: 1}
	seen := map[int]bool{}
	for _, s := range []*Split{&d.Train, &d.Valid} {
		for r := range s.N {
			i := int(s.X[2*r])
			if s.X[2*r+1] != float32(i)/2 || s.Y[r] != code[i%3] {
				t.Fatalf("row %d came out as %v, label %d", i, s.X[2*r:2*r+2], s.Y[r])
			}
			seen[i] = true
		}
	}
	if len(seen) != 100 {
		t.Errorf("%d distinct rows, want 100", len(seen))
	}
	again, err := LoadCSV(Config{Path: path, LabelColumn: "species", ValidFraction: 0.25, Seed: 3})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(again.Valid.X, d.Valid.X) {
		t.Error("the same seed gave a different validation split")
	}
	other, err := LoadCSV(Config{Path: path, LabelColumn: "species", ValidFraction: 0.25, Seed: 4})
	if err != nil {
		t.Fatal(err)
	}
	if slices.Equal(other.Valid.X, d.Valid.X) {
		t.Error("seeds 3 and 4 gave the same validation split")
	}
}

func TestCSVNumericLabels(t *testing.T) {
	path := writeCSV(t, "x,label\n1,10\n2,9\n3,2\n4,10\n5,9\n")
	d, err := LoadCSV(Config{Path: path, ValidFraction: 0.2})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(d.ClassNames, []string{"2", "9", "10"}) {
		t.Errorf("class names %q, want numeric order [2 9 10]", d.ClassNames)
	}
	for _, s := range []*Split{&d.Train, &d.Valid} {
		for r := range s.N {
			want := map[float32]int32{1: 2, 2: 1, 3: 0, 4: 2, 5: 1}[s.X[r]]
			if s.Y[r] != want {
				t.Errorf("x=%v has label %d, want %d", s.X[r], s.Y[r], want)
			}
		}
	}
}

func TestCSVShards(t *testing.T) {
	var b strings.Builder
	b.WriteString("id,label\n")
	for i := range 200 {
		fmt.Fprintf(&b, "%d,%d\n", i, i%4)
	}
	path := writeCSV(t, b.String())
	seen := map[float32]int{}
	for i := 1; i <= 3; i++ {
		d, err := Load(Config{Kind: KindCSV, Path: path, Shard: fmt.Sprintf("%d/3", i), DirichletAlpha: 1, Seed: 9})
		if err != nil {
			t.Fatal(err)
		}
		if d.Test.N != 0 {
			t.Errorf("shard %d has %d test rows: a CSV file has no test split", i, d.Test.N)
		}
		for _, s := range []*Split{&d.Train, &d.Valid} {
			for _, v := range s.X {
				seen[v]++
			}
		}
	}
	if len(seen) != 200 {
		t.Fatalf("shards hold %d distinct rows, want 200", len(seen))
	}
	for v, k := range seen {
		if k != 1 {
			t.Fatalf("row %v is in %d shards", v, k)
		}
	}
}

func TestCSVErrors(t *testing.T) {
	tests := []struct {
		name    string
		content string
		label   string
		want    []string
	}{
		{"empty file", "", "", []string{"empty file"}},
		{"no label column", "a,b\n1,2\n", "", []string{"line 1", `no label column "label"`}},
		{"named label missing", "a,label\n1,2\n", "class", []string{`no label column "class"`}},
		{"duplicate column", "a,a,label\n1,2,3\n", "", []string{"line 1", `"a" appears twice`}},
		{"empty column name", "a,,label\n1,2,3\n", "", []string{"line 1", "column 2 has an empty name"}},
		{"only label", "label\n1\n2\n", "", []string{"no feature columns"}},
		{"not a number", "a,b,label\n1,2,x\n3,oops,y\n", "", []string{"line 3", "column 2", `"b"`, `"oops"`}},
		{"NaN feature", "a,label\n1,x\nNaN,y\n", "", []string{"line 3", "column 1", "not a finite number"}},
		{"ragged row", "a,b,label\n1,2,x\n3,y\n", "", []string{"line 3", "wrong number of fields"}},
		{"empty label", "a,label\n1,x\n2,\n", "", []string{"line 3", "empty label"}},
		{"one class", "a,label\n1,x\n2,x\n3,x\n", "", []string{"1 classes"}},
		{"one row", "a,label\n1,x\n", "", []string{"1 data rows"}},
		{"bad quote", "a,label\n1,\"x\n", "", []string{"line"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := writeCSV(t, tc.content)
			_, err := LoadCSV(Config{Path: path, LabelColumn: tc.label})
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range append(tc.want, "data.csv") {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}
