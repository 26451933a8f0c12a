package app

import (
	"context"
	"encoding/json"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"
)

// A listen address other machines could reach is refused, before any
// connection is made, with the reason and the way out.
func TestDashboardRefusesRemote(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:8642", ":8642", "192.0.2.1:8642"} {
		_, _, err := fx(t, "dashboard", "--listen", addr, "--director", "127.0.0.1:1")
		if err == nil || exitCode(err) != exitUsage || !strings.Contains(err.Error(), "--allow-remote") || !strings.Contains(err.Error(), "certificate") {
			t.Errorf("dashboard --listen %s: %v (exit %d)", addr, err, exitCode(err))
		}
	}
}

// fx dashboard connects with the profile's certificate, prints its URL,
// serves the API as the profile's researcher, and stops with its context.
func TestDashboardCommand(t *testing.T) {
	f := newResearchFederation(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer // quickstart_test.go
	cmd := newRootCommand()
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs([]string{"dashboard", "--profile", f.profile, "--listen", "127.0.0.1:0"})
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()

	urlRE := regexp.MustCompile(`http://127\.0\.0\.1:\d+/`)
	deadline := time.Now().Add(20 * time.Second)
	var url string
	for url == "" {
		url = urlRE.FindString(out.String())
		select {
		case err := <-done:
			t.Fatalf("fx dashboard ended: %v\n%s", err, out.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("fx dashboard printed no URL: %q", out.String())
		}
	}
	if !strings.Contains(out.String(), "as researcher alice") || !strings.Contains(out.String(), f.Addr) {
		t.Errorf("fx dashboard printed %q", out.String())
	}
	resp, err := http.Get(url + "api/identity")
	if err != nil {
		t.Fatal(err)
	}
	var id struct{ Name, Role, Director string }
	err = json.NewDecoder(resp.Body).Decode(&id)
	resp.Body.Close()
	if err != nil || id.Name != "alice" || id.Role != "researcher" || id.Director != f.Addr {
		t.Errorf("identity = %+v, %v", id, err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("fx dashboard stopped with %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("fx dashboard did not stop with its context")
	}
}
