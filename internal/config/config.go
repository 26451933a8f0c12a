// Package config loads a command's settings from, in order of precedence,
// command-line flags, FX_* environment variables, a YAML file and the defaults
// held in the settings struct itself.
//
// Every key is derived from the struct's `mapstructure` tags, nested with dots
// ("tls.cert"). The environment variable for a key is FX_ followed by the key
// in upper case with dots turned into underscores (FX_TLS_CERT). Keys are bound
// one by one because viper's AutomaticEnv alone does not see nested keys when
// unmarshalling. A key in the file that the struct does not have, and a value
// that does not parse, are errors that name the key.
package config

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// EnvPrefix starts every environment variable fx reads.
const EnvPrefix = "FX"

// Source says where to read settings from.
type Source struct {
	// File is a YAML file; empty means none.
	File string
	// Flags are the command's flags. A flag overrides its key only when the
	// user set it, so flag defaults never mask the file or environment.
	Flags *pflag.FlagSet
	// FlagKeys maps a flag name to the key it sets ("listen" -> "listen_address").
	// A flag whose name equals its key needs no entry.
	FlagKeys map[string]string
	// Environ replaces os.Environ for tests; nil reads the process environment.
	Environ []string
}

// EnvName is the environment variable that sets key.
func EnvName(key string) string {
	return EnvPrefix + "_" + strings.ToUpper(strings.NewReplacer(".", "_", "-", "_").Replace(key))
}

// Load fills target, a pointer to a struct already holding the defaults.
func Load(src Source, target any) error {
	rv := reflect.ValueOf(target)
	if rv.Kind() != reflect.Pointer || rv.Elem().Kind() != reflect.Struct {
		return fmt.Errorf("config: target must be a pointer to a struct, got %T", target)
	}
	v := viper.New()
	keys := map[string]bool{}
	collectDefaults(v, "", rv.Elem(), keys)

	env := envMap(src.Environ)
	for key := range keys {
		if val, ok := env[EnvName(key)]; ok {
			v.Set(key, val)
		}
	}
	if src.File != "" {
		v.SetConfigFile(src.File)
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			var notFound viper.ConfigFileNotFoundError
			if errors.As(err, &notFound) || errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("config file %s does not exist", src.File)
			}
			return fmt.Errorf("config file %s: %w", src.File, err)
		}
		if err := checkKnown(v.AllSettings(), "", keys, src.File); err != nil {
			return err
		}
		// Re-apply the environment over the file: v.Set outranks the file in
		// viper, but reading the file after Set must not be left to chance.
		for key := range keys {
			if val, ok := env[EnvName(key)]; ok {
				v.Set(key, val)
			}
		}
	}
	if src.Flags != nil {
		src.Flags.Visit(func(f *pflag.Flag) {
			key := f.Name
			if k, ok := src.FlagKeys[f.Name]; ok {
				key = k
			}
			if !keys[key] {
				return // a flag that is not a setting, such as --config itself
			}
			if sv, ok := f.Value.(pflag.SliceValue); ok {
				v.Set(key, sv.GetSlice())
				return
			}
			v.Set(key, f.Value.String())
		})
	}
	err := v.UnmarshalExact(target, viper.DecodeHook(mapstructure.ComposeDecodeHookFunc(
		durationHook,
		mapstructure.StringToSliceHookFunc(","),
	)))
	if err != nil {
		return fmt.Errorf("invalid setting: %w", cleanDecodeError(err))
	}
	return nil
}

// collectDefaults registers every leaf key of the struct with its current
// value as the default.
func collectDefaults(v *viper.Viper, prefix string, sv reflect.Value, keys map[string]bool) {
	st := sv.Type()
	for i := range st.NumField() {
		f := st.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("mapstructure"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		key := name
		if prefix != "" {
			key = prefix + "." + name
		}
		fv := sv.Field(i)
		if fv.Kind() == reflect.Struct && fv.Type() != reflect.TypeFor[time.Time]() {
			collectDefaults(v, key, fv, keys)
			continue
		}
		keys[key] = true
		v.SetDefault(key, fv.Interface())
	}
}

// checkKnown reports the first key in the file that the struct does not have.
func checkKnown(settings map[string]any, prefix string, keys map[string]bool, file string) error {
	for k, val := range settings {
		key := k
		if prefix != "" {
			key = prefix + "." + k
		}
		if keys[key] {
			continue
		}
		if sub, ok := val.(map[string]any); ok && hasPrefix(keys, key+".") {
			if err := checkKnown(sub, key, keys, file); err != nil {
				return err
			}
			continue
		}
		return fmt.Errorf("config file %s: unknown key %q (known keys: %s)", file, key, strings.Join(sortedKeys(keys), ", "))
	}
	return nil
}

func hasPrefix(keys map[string]bool, prefix string) bool {
	for k := range keys {
		if strings.HasPrefix(k, prefix) {
			return true
		}
	}
	return false
}

func sortedKeys(keys map[string]bool) []string {
	out := make([]string, 0, len(keys))
	for k := range keys {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func envMap(environ []string) map[string]string {
	if environ == nil {
		environ = os.Environ()
	}
	m := make(map[string]string, len(environ))
	for _, kv := range environ {
		if k, val, ok := strings.Cut(kv, "="); ok && strings.HasPrefix(k, EnvPrefix+"_") {
			m[k] = val
		}
	}
	return m
}

// cleanDecodeError turns mapstructure's "decoding failed due to the following
// error(s):\n\n'a.b' ..." into a single line that still names the key.
func cleanDecodeError(err error) error {
	msg := err.Error()
	msg = strings.TrimPrefix(msg, "decoding failed due to the following error(s):")
	msg = strings.Join(strings.Fields(msg), " ")
	return errors.New(msg)
}

// durationHook reads durations, which must carry a unit: a bare number in
// YAML (`heartbeat_period: 10`) would otherwise be taken as nanoseconds
// and a bare number in the environment refused with Go's terse message.
// mapstructure names the key in front of the error.
func durationHook(from, to reflect.Type, data any) (any, error) {
	if to != reflect.TypeOf(time.Duration(0)) || from == to {
		return data, nil // not a duration, or one already (a default)
	}
	switch from.Kind() {
	case reflect.String:
		s := strings.TrimSpace(data.(string))
		d, err := time.ParseDuration(s)
		if err != nil {
			return nil, fmt.Errorf("%q is not a duration: write one with its unit, such as 10s, 500ms or 2m", s)
		}
		return d, nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Float32, reflect.Float64:
		return nil, fmt.Errorf("%v has no unit: write a duration such as %vs (seconds), 500ms or 2m", data, data)
	}
	return data, nil
}
