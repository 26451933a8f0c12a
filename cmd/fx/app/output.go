package app

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"time"

	"github.com/spf13/cobra"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Output formats of --output.
const (
	outputTable = "table"
	outputJSON  = "json"
	outputYAML  = "yaml"
)

// The structured outputs show a message as plain values: fields under
// their proto names in declaration order, 64-bit integers as numbers (not
// the strings protojson writes, which scripts must convert), enums by
// name, times as RFC 3339, durations as Go durations ("10s"), bytes as
// base64. Unset fields are left out, as protojson does.

// object is a message's fields in declaration order.
type object []objectField

type objectField struct {
	key   string
	value any
}

// plain turns a message into plain values for JSON and YAML.
func plain(m proto.Message) object { return plainMessage(m.ProtoReflect()) }

func plainMessage(m protoreflect.Message) object {
	fields := m.Descriptor().Fields()
	o := object{}
	for i := range fields.Len() {
		fd := fields.Get(i)
		if !m.Has(fd) {
			continue
		}
		v := m.Get(fd)
		var x any
		switch {
		case fd.IsList():
			list := make([]any, v.List().Len())
			for j := range list {
				list[j] = plainValue(fd, v.List().Get(j))
			}
			x = list
		case fd.IsMap():
			type entry struct {
				key string
				v   protoreflect.Value
			}
			var entries []entry
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				entries = append(entries, entry{k.String(), mv})
				return true
			})
			slices.SortFunc(entries, func(a, b entry) int {
				if a.key < b.key {
					return -1
				}
				if a.key > b.key {
					return 1
				}
				return 0
			})
			mo := object{}
			for _, e := range entries {
				mo = append(mo, objectField{e.key, plainValue(fd.MapValue(), e.v)})
			}
			x = mo
		default:
			x = plainValue(fd, v)
		}
		o = append(o, objectField{string(fd.Name()), x})
	}
	return o
}

func plainValue(fd protoreflect.FieldDescriptor, v protoreflect.Value) any {
	switch fd.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		m := v.Message()
		switch m.Descriptor().FullName() {
		case "google.protobuf.Timestamp":
			f := m.Descriptor().Fields()
			return time.Unix(m.Get(f.ByName("seconds")).Int(), m.Get(f.ByName("nanos")).Int()).UTC().Format(time.RFC3339Nano)
		case "google.protobuf.Duration":
			f := m.Descriptor().Fields()
			return (time.Duration(m.Get(f.ByName("seconds")).Int())*time.Second + time.Duration(m.Get(f.ByName("nanos")).Int())).String()
		}
		return plainMessage(m)
	case protoreflect.EnumKind:
		if ev := fd.Enum().Values().ByNumber(v.Enum()); ev != nil {
			return string(ev.Name())
		}
		return int32(v.Enum())
	case protoreflect.BytesKind:
		return base64.StdEncoding.EncodeToString(v.Bytes())
	case protoreflect.FloatKind, protoreflect.DoubleKind:
		if f := v.Float(); math.IsNaN(f) || math.IsInf(f, 0) {
			return fmt.Sprint(f) // JSON has no such number
		}
		return v.Float()
	}
	return v.Interface()
}

// MarshalJSON writes the fields in order.
func (o object) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, f := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(f.key)
		b.Write(k)
		b.WriteByte(':')
		v, err := json.Marshal(f.value)
		if err != nil {
			return nil, err
		}
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// MarshalYAML writes the fields in order.
func (o object) MarshalYAML() (any, error) {
	n := &yaml.Node{Kind: yaml.MappingNode}
	for _, f := range o {
		var v yaml.Node
		if err := v.Encode(f.value); err != nil {
			return nil, err
		}
		n.Content = append(n.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: f.key}, &v)
	}
	return n, nil
}

// writeJSON prints a message as indented JSON.
func writeJSON(w io.Writer, m proto.Message) error { return writeJSONValue(w, plain(m)) }

func writeJSONValue(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// writeJSONLine prints a message as one compact JSON line, for streams.
func writeJSONLine(w io.Writer, m proto.Message) error {
	b, err := json.Marshal(plain(m))
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// writeYAML prints a message as a YAML document; a stream of them is
// separated by "---".
func writeYAML(w io.Writer, m proto.Message) error { return writeYAMLValue(w, plain(m)) }

func writeYAMLValue(w io.Writer, v any) error {
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return err
	}
	if err := enc.Close(); err != nil {
		return err
	}
	_, err := w.Write(append([]byte("---\n"), b.Bytes()...))
	return err
}

// structured reports whether the output is for scripts (json or yaml).
func (o *researcherOptions) structured() bool { return o.output != outputTable }

// json reports whether the output is JSON.
func (o *researcherOptions) json() bool { return o.output == outputJSON }

// write prints a message in the chosen structured format.
func (o *researcherOptions) write(w io.Writer, m proto.Message) error {
	if o.output == outputYAML {
		return writeYAML(w, m)
	}
	return writeJSON(w, m)
}

// writeObject prints a result that is not one message.
func (o *researcherOptions) writeObject(w io.Writer, v object) error {
	if o.output == outputYAML {
		return writeYAMLValue(w, v)
	}
	return writeJSONValue(w, v)
}

// writeItem prints one item of a stream (a metric event, a log line).
func (o *researcherOptions) writeItem(w io.Writer, m proto.Message) error {
	if o.output == outputYAML {
		return writeYAML(w, m)
	}
	return writeJSONLine(w, m)
}

func (o *researcherOptions) checkOutput() error {
	switch o.output {
	case outputTable, outputJSON, outputYAML:
		return nil
	}
	return usageError{fmt.Errorf("--output %q: use table, json or yaml", o.output)}
}

// writeValueAs prints v, any value encoding/json takes (the results that
// are not protocol messages: the envoy's admin answers, the CA's list), as
// json or yaml. The YAML is the JSON re-read as YAML, so both show the same
// keys in the same order.
func writeValueAs(w io.Writer, format string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if format != outputYAML {
		_, err = w.Write(append(b, '\n'))
		return err
	}
	var n yaml.Node
	if err := yaml.Unmarshal(b, &n); err != nil {
		return err
	}
	blockStyle(&n)
	var out bytes.Buffer
	enc := yaml.NewEncoder(&out)
	enc.SetIndent(2)
	if err := enc.Encode(&n); err != nil {
		return err
	}
	if err := enc.Close(); err != nil {
		return err
	}
	_, err = w.Write(append([]byte("---\n"), out.Bytes()...))
	return err
}

// blockStyle drops the flow and quoting styles JSON's syntax gave the
// nodes; the encoder quotes a string only where YAML needs it.
func blockStyle(n *yaml.Node) {
	n.Style = 0
	for _, c := range n.Content {
		blockStyle(c)
	}
}

// addOutputFlag adds --output table|json|yaml to a command that is not a
// researcher's, with --json kept as its old spelling.
func addOutputFlag(cmd *cobra.Command, output *string) {
	f := cmd.Flags()
	f.StringVar(output, "output", outputTable, "output format: table (for people), json or yaml (for scripts)")
	f.Bool("json", false, "the same as --output json")
	_ = f.MarkHidden("json")
	_ = cmd.RegisterFlagCompletionFunc("output", completeOutput)
	prev := cmd.PreRunE
	cmd.PreRunE = func(c *cobra.Command, args []string) error {
		if j, _ := c.Flags().GetBool("json"); j {
			*output = outputJSON
		}
		switch *output {
		case outputTable, outputJSON, outputYAML:
		default:
			return usageError{fmt.Errorf("--output %q: use table, json or yaml", *output)}
		}
		if prev != nil {
			return prev(c, args)
		}
		return nil
	}
}
