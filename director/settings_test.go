package director

import (
	"net"
	"os"
	"testing"

	"go.yaml.in/yaml/v3"
)

// A director serves other machines only when told to: the defaults and the
// example configuration listen on loopback, and the example reads the CRL
// where pki-bootstrap.sh writes it.
func TestDefaultsListenOnLoopback(t *testing.T) {
	data, err := os.ReadFile("../configs/director.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var example struct {
		ListenAddress string `yaml:"listen_address"`
		TLS           struct {
			CRL string `yaml:"crl"`
		} `yaml:"tls"`
		Aggregator struct {
			Host string `yaml:"host"`
		} `yaml:"aggregator"`
	}
	if err := yaml.Unmarshal(data, &example); err != nil {
		t.Fatal(err)
	}
	def := DefaultSettings()
	var cfg Config
	cfg.setDefaults()
	for what, addr := range map[string]string{
		"default listen_address":               def.ListenAddress,
		"configs/director.yaml listen_address": example.ListenAddress,
	} {
		host, _, err := net.SplitHostPort(addr)
		if err != nil || !net.ParseIP(host).IsLoopback() {
			t.Errorf("%s is %q, want a loopback address", what, addr)
		}
	}
	for what, host := range map[string]string{
		"default aggregator.host":               def.Aggregator.Host,
		"Config's default aggregator host":      cfg.AggregatorHost,
		"configs/director.yaml aggregator.host": example.Aggregator.Host,
	} {
		if !net.ParseIP(host).IsLoopback() {
			t.Errorf("%s is %q, want a loopback address", what, host)
		}
	}
	if example.TLS.CRL != "pki/ca/crl.pem" {
		t.Errorf("configs/director.yaml reads the CRL from %q; scripts/pki-bootstrap.sh writes it to pki/ca/crl.pem", example.TLS.CRL)
	}
}
