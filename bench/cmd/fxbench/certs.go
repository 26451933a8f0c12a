package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/pki"
)

// benchPKI is a CA directory cached between runs: the director's
// certificate (CN localhost, SANs localhost and 127.0.0.1) and one
// certificate per simulated envoy, each with CN = the envoy's name, because
// the director refuses an envoy_name that is not the caller's CN.
type benchPKI struct {
	dir      string
	ca       *pki.CA
	Director pki.Files
}

// issueStats says what the certificate step cost.
type issueStats struct {
	Wanted, Issued, Reused int
	Workers                int
	Seconds                float64
	// PerCertMS is wall time per issued certificate with Workers workers.
	PerCertMS float64
	// Earlier is the record of the run that issued most of the cached set,
	// when this run reused it.
	Earlier *issueStats `json:",omitempty"`
}

func envoyName(i int) string { return fmt.Sprintf("envoy-%05d", i) }

func openBenchPKI(dir string) (*benchPKI, error) {
	caDir := filepath.Join(dir, "ca")
	ca, err := pki.OpenCA(caDir)
	if err != nil {
		if ca, err = pki.InitCA(caDir, pki.InitOptions{Organization: "fx bench"}); err != nil {
			return nil, fmt.Errorf("pki: %w", err)
		}
	}
	p := &benchPKI{dir: dir, ca: ca}
	ddir := filepath.Join(dir, "director")
	files := pki.PartyFiles(ddir, "localhost")
	if _, err := pki.NewKeyring(pki.KeyringConfig{Files: files}); err != nil {
		if _, files, err = ca.IssueTo(ddir, pki.IssueRequest{Role: pki.RoleDirector, Name: "localhost", Hosts: []string{"localhost", "127.0.0.1"}}); err != nil {
			return nil, fmt.Errorf("director certificate: %w", err)
		}
	}
	files.CRL = ca.CRLPath()
	p.Director = files
	return p, nil
}

func (p *benchPKI) envoyFiles(i int) pki.Files {
	return pki.PartyFiles(filepath.Join(p.dir, "envoys"), envoyName(i))
}

func (p *benchPKI) statsPath() string { return filepath.Join(p.dir, "envoys", "issuance.json") }

// envoys makes sure certificates for envoys 1..n exist, issuing the missing
// ones in parallel with ca.Issue (an ECDSA P-384 key and a cfssl signature
// each, plus the CA's fsynced record of the issued certificate), and says
// what that cost.
func (p *benchPKI) envoys(n, workers int) (issueStats, error) {
	st := issueStats{Wanted: n, Workers: workers}
	edir := filepath.Join(p.dir, "envoys")
	if err := os.MkdirAll(edir, 0o700); err != nil {
		return st, err
	}
	if err := os.WriteFile(filepath.Join(edir, "ca.crt"), p.ca.RootPEM(), 0o644); err != nil {
		return st, err
	}
	var missing []int
	for i := 1; i <= n; i++ {
		f := p.envoyFiles(i)
		_, e1 := os.Stat(f.Cert)
		_, e2 := os.Stat(f.Key)
		if e1 != nil || e2 != nil {
			missing = append(missing, i)
		}
	}
	st.Reused = n - len(missing)
	if workers < 1 {
		workers = runtime.NumCPU()
	}
	st.Workers = workers
	start := time.Now()
	var next atomic.Int64
	var firstErr error
	var mu sync.Mutex
	var done atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				k := int(next.Add(1)) - 1
				if k >= len(missing) {
					return
				}
				i := missing[k]
				iss, err := p.ca.Issue(pki.IssueRequest{Role: pki.RoleEnvoy, Name: envoyName(i)})
				if err == nil {
					f := p.envoyFiles(i)
					if err = os.WriteFile(f.Key, iss.KeyPEM, 0o600); err == nil {
						err = os.WriteFile(f.Cert, iss.ChainPEM, 0o644)
					}
				}
				if err != nil {
					mu.Lock()
					firstErr = errors.Join(firstErr, fmt.Errorf("%s: %w", envoyName(i), err))
					mu.Unlock()
					return
				}
				if d := done.Add(1); d%1000 == 0 {
					fmt.Printf("  issued %d/%d certificates (%.1fs)\n", d, len(missing), time.Since(start).Seconds())
				}
			}
		})
	}
	wg.Wait()
	st.Issued = int(done.Load())
	st.Seconds = time.Since(start).Seconds()
	if st.Issued > 0 {
		st.PerCertMS = st.Seconds * 1000 / float64(st.Issued)
	}
	if firstErr != nil {
		return st, firstErr
	}
	// Keep the record of the largest issuance, so that a rerun which
	// reuses the set can still report what issuing it cost.
	var earlier issueStats
	if b, err := os.ReadFile(p.statsPath()); err == nil && json.Unmarshal(b, &earlier) == nil {
		if st.Issued < earlier.Issued {
			st.Earlier = &earlier
		}
	}
	if st.Earlier == nil && st.Issued > 0 {
		_ = atomicfile.ReplaceJSON(p.statsPath(), st)
	}
	return st, nil
}
