package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	"github.com/fx-fl/fx/director"
	"github.com/fx-fl/fx/pki"
)

// serveMain is the child process of capacity: a real director, or the
// baseline (a gRPC server with the director's certificate, TLS settings,
// authorisation interceptors and keepalive, serving only grpc.health.v1).
// It prints "LISTEN host:port" once serving and stops when its stdin closes
// (the parent went away) or on SIGTERM.
func serveMain(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	mode := fs.String("mode", "director", "director or raw")
	pkiDir := fs.String("pki", "", "the benchmark's PKI directory")
	dataDir := fs.String("data", "", "director data directory")
	logFile := fs.String("log", "", "director log file")
	period := fs.Duration("period", 10*time.Second, "heartbeat period the director announces")
	nofile := fs.Uint64("nofile", 1024, "descriptors needed")
	_ = fs.Parse(args)
	if _, err := raiseNoFile(*nofile); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); stop() }()

	p, err := openBenchPKI(*pkiDir)
	if err != nil {
		return err
	}
	switch *mode {
	case "director":
		log := hclog.NewNullLogger()
		if *logFile != "" {
			f, err := os.Create(*logFile)
			if err != nil {
				return err
			}
			defer f.Close()
			log = hclog.New(&hclog.LoggerOptions{Name: "director", Output: f, Level: hclog.Info})
		}
		s := director.DefaultSettings()
		s.ListenAddress = "127.0.0.1:0"
		s.Advertise.Host = "127.0.0.1"
		s.Aggregator.Host = "127.0.0.1"
		s.TLS.Cert, s.TLS.Key, s.TLS.CA, s.TLS.CRL = p.Director.Cert, p.Director.Key, p.Director.CA, p.Director.CRL
		s.DataDir = *dataDir
		s.HeartbeatPeriod = *period
		s.OfflineAfter = 3 * *period
		s.ReviewPolicy = director.ReviewAuto
		cfg, err := s.Config(log)
		if err != nil {
			return err
		}
		d, err := director.New(cfg)
		if err != nil {
			return err
		}
		errc := make(chan error, 1)
		go func() { errc <- d.Run(ctx) }()
		fmt.Printf("LISTEN %s\n", d.Addr())
		return <-errc
	case "raw":
		k, err := pki.NewKeyring(pki.KeyringConfig{Files: p.Director})
		if err != nil {
			return err
		}
		rules := pki.Rules{
			"/grpc.health.v1.Health/Check": {pki.AnyRole},
			"/grpc.health.v1.Health/Watch": {pki.AnyRole},
		}
		// The director's keepalive settings (director.keepaliveOptions).
		opts := append(pki.ServerOptions(k, rules),
			grpc.KeepaliveParams(keepalive.ServerParameters{Time: time.Minute, Timeout: 20 * time.Second}),
			grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}))
		srv := grpc.NewServer(opts...)
		hs := health.NewServer()
		healthpb.RegisterHealthServer(srv, hs)
		hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		go func() { <-ctx.Done(); hs.Shutdown(); srv.Stop() }()
		fmt.Printf("LISTEN %s\n", lis.Addr())
		if err := srv.Serve(lis); err != nil && ctx.Err() == nil {
			return err
		}
		return nil
	default:
		return fmt.Errorf("-mode %q: director or raw", *mode)
	}
}
