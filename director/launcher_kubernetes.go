package director

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/utils/ptr"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/internal/backoff"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// LauncherKubernetes runs each experiment's aggregator as a Kubernetes Job
// (Kubernetes).
const LauncherKubernetes = "kubernetes"

// What the Kubernetes launcher puts in a pod.
const (
	// KubernetesSpecDir is where the pod finds its launch spec
	// (KubernetesSpecKey) and the director's certificate, key, CA and CRL
	// (the KubernetesTLS* keys), all from Secrets.
	KubernetesSpecDir = "/spec"
	KubernetesSpecKey = ProcessSpecFile
	// The keys of the certificate Secret, as the fx-director chart's pki
	// Secret has them.
	KubernetesTLSCertKey = "tls.crt"
	KubernetesTLSKeyKey  = "tls.key"
	KubernetesTLSCAKey   = "ca.crt"
	KubernetesTLSCRLKey  = "crl.pem"
	// KubernetesDataDir is where the pod mounts its experiment's directory
	// from the PersistentVolumeClaim, at the same path below it as below
	// the director's data_dir.
	KubernetesDataDir = "/fx-data"
	// DefaultKubernetesPort is the port aggregators serve on in their pods
	// and on their Services.
	DefaultKubernetesPort = 50052
	// KubernetesContainer is the aggregator's container in its pod.
	KubernetesContainer = "aggregator"
	// KubernetesImageUser is the user and group the fx image runs as
	// (packaging/container/Containerfile), and the pods' fsGroup.
	KubernetesImageUser = 65532
)

// Labels on everything the Kubernetes launcher creates.
const (
	LabelName       = "app.kubernetes.io/name"
	LabelManagedBy  = "app.kubernetes.io/managed-by"
	LabelExperiment = "fx-fl.io/experiment"
	// LabelStart tells one start's Job and pod from another's.
	LabelStart = "fx-fl.io/start"

	labelNameValue      = "fx-aggregator"
	labelManagedByValue = "fx-director"
)

// KubernetesRBAC is everything the Kubernetes launcher asks of the API
// server, in its namespace: the rules of the Role the fx-director chart
// gives the director (packaging/helm/fx-director/templates/rbac.yaml,
// which a test compares with these).
var KubernetesRBAC = []rbacv1.PolicyRule{
	{APIGroups: []string{"batch"}, Resources: []string{"jobs"}, Verbs: []string{"create", "list", "delete"}},
	{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"watch"}},
	{APIGroups: []string{""}, Resources: []string{"services"}, Verbs: []string{"create", "get", "delete"}},
	{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"create", "get", "update", "delete"}},
}

// Kubernetes runs each experiment's aggregator in the cluster, through
// client-go: per experiment a Secret (fx-agg-ID: the launch spec and, unless
// TLSSecret names one, the director's certificate, key, CA and CRL), a
// Service (fx-agg-ID) on Port, and for each start a Job (fx-agg-ID-XXXX, no
// retries of its own) whose one pod runs `fx aggregator run --spec
// /spec/aggregator.spec.json` in Image, with the experiment's directory
// mounted from the PersistentVolumeClaim PVC. The director mounts that
// claim at its data_dir (DataDir), so the checkpoints, round files and the
// outcome the pod writes are where the director reads them.
//
// The Service's address is announced to the participants once the pod is
// Ready (a TCP readiness probe on the port: the Service routes to it). A
// pod that fails, is deleted, or is not Ready within ReadyTimeout is
// followed by a new Job after a backoff,
// resuming from the checkpoint on the claim; more than MaxRestarts deaths
// within RestartWindow fail the experiment, as with Process (they share
// procAggregator). Every start has a new token in the spec Secret; the pod
// reports to the director over Director.AggregatorChannel, presenting the
// director's certificate. When the aggregator's Run ends — the experiment
// finished, failed, was cancelled or removed, or the director stops — the
// Jobs (with their pods: background propagation), the Service and the
// Secret are deleted; a start deletes the Jobs an earlier director left.
type Kubernetes struct {
	// Client reaches the cluster (see kubeapi.go for why not the typed
	// clientset). Required.
	Client dynamic.Interface
	// Namespace holds everything the launcher creates. Required.
	Namespace string
	// Image is the fx container image the pods run. Required.
	Image           string
	ImagePullPolicy corev1.PullPolicy
	// PVC is the PersistentVolumeClaim mounted at the director's DataDir,
	// which the pods mount too. Both required.
	PVC     string
	DataDir string
	// ServiceType is ClusterIP (the default: the Service's DNS name is
	// announced), NodePort (AdvertiseHost:the node port) or LoadBalancer
	// (the balancer's address once it has one, or AdvertiseHost).
	ServiceType   corev1.ServiceType
	AdvertiseHost string
	// Port is what aggregators serve on; DefaultKubernetesPort when zero.
	Port int32
	// Resources are the aggregator container's requests and limits.
	Resources corev1.ResourceRequirements
	// TLSSecret, if set, names an existing Secret with the director's
	// certificate files under the KubernetesTLS* keys (crl.pem when TLS.CRL
	// is set); otherwise the launcher copies TLS's files into its Secret.
	TLSSecret string
	TLS       pki.Files
	// Identity is the CN of the director's certificate: the only caller
	// whose aggregator channel is accepted. Required.
	Identity string
	// DirectorAddress is where a pod reaches the director (its Service's
	// host:port). Required.
	DirectorAddress string
	// MaxRestarts, RestartWindow, RestartBackoff: as Process's.
	MaxRestarts    int
	RestartWindow  time.Duration
	RestartBackoff backoff.Config
	// StopGrace is the pods' termination grace period; DefaultStopGrace
	// when zero.
	StopGrace time.Duration
	// DirectorGrace: see ProcessSpec.
	DirectorGrace time.Duration
	// ReadyTimeout is how long a start's pod may take to be Ready before
	// the start counts as a death; DefaultKubernetesReadyTimeout when zero.
	ReadyTimeout time.Duration
	// AddressPoll is how often a NodePort or LoadBalancer Service is read
	// until its address is known; 2 s when zero.
	AddressPoll time.Duration

	chans channels
}

// History implements Launcher: the pods write where the director reads.
func (*Kubernetes) History(dir string) ([]aggregator.RoundSummary, *aggregator.Best, error) {
	return aggregator.History(dir)
}

// serveChannel hands the channel to the Kubernetes launcher's aggregators.
func (k *Kubernetes) serveChannel(stream grpc.BidiStreamingServer[fxv1.AggregatorReport, fxv1.AggregatorCommand], shutdown <-chan struct{}) error {
	return k.chans.serve(k.Identity, stream, shutdown)
}

// DefaultKubernetesReadyTimeout: see Kubernetes.ReadyTimeout.
const DefaultKubernetesReadyTimeout = 10 * time.Minute

func (k *Kubernetes) readyTimeout() time.Duration {
	if k.ReadyTimeout > 0 {
		return k.ReadyTimeout
	}
	return DefaultKubernetesReadyTimeout
}

func (k *Kubernetes) port() int32 {
	if k.Port > 0 {
		return k.Port
	}
	return DefaultKubernetesPort
}

// check says which required field is missing.
func (k *Kubernetes) check() error {
	var missing []string
	for _, f := range []struct {
		name string
		ok   bool
	}{
		{"Client", k.Client != nil}, {"Namespace", k.Namespace != ""}, {"Image", k.Image != ""},
		{"PVC", k.PVC != ""}, {"DataDir", k.DataDir != ""}, {"Identity", k.Identity != ""},
		{"DirectorAddress", k.DirectorAddress != ""},
	} {
		if !f.ok {
			missing = append(missing, f.name)
		}
	}
	if k.TLSSecret == "" && (k.TLS.Cert == "" || k.TLS.Key == "" || k.TLS.CA == "") {
		missing = append(missing, "TLS (or TLSSecret)")
	}
	if len(missing) > 0 {
		return fmt.Errorf("kubernetes launcher: missing %s", strings.Join(missing, ", "))
	}
	return nil
}

// Launch implements Launcher. It prepares the initial model (when the
// aggregator directory holds no checkpoint) and the pod's launch spec; Run
// creates the objects. The director's listener is not used: the pod
// serves on Port behind the Service.
func (k *Kubernetes) Launch(spec LaunchSpec) (Aggregator, error) {
	if spec.Listener != nil {
		_ = spec.Listener.Close()
	}
	if err := k.check(); err != nil {
		return nil, err
	}
	name := "fx-agg-" + spec.ExperimentID
	if errs := validation.IsDNS1035Label(name); len(errs) > 0 {
		return nil, fmt.Errorf("kubernetes launcher: experiment id %q makes no Kubernetes name (%s): %s", spec.ExperimentID, name, strings.Join(errs, "; "))
	}
	expDir := filepath.Dir(spec.Dir)
	podPath, err := k.podPaths(expDir)
	if err != nil {
		return nil, err
	}
	child, log, err := newChildSpec(spec, k.Identity, expDir)
	if err != nil {
		return nil, err
	}
	initial, outcome := child.InitialModel, child.Outcome
	// The pod's paths, and what only the pod has: its certificate files
	// from the Secrets, its port, the director's address in the cluster.
	child.Dir, child.Outcome = podPath(child.Dir), podPath(outcome)
	if initial != "" {
		child.InitialModel = podPath(initial)
	}
	child.TLS = pki.Files{
		Cert: path.Join(KubernetesSpecDir, KubernetesTLSCertKey),
		Key:  path.Join(KubernetesSpecDir, KubernetesTLSKeyKey),
		CA:   path.Join(KubernetesSpecDir, KubernetesTLSCAKey),
	}
	if k.TLS.CRL != "" {
		child.TLS.CRL = path.Join(KubernetesSpecDir, KubernetesTLSCRLKey)
	}
	child.Listen = net.JoinHostPort("", strconv.Itoa(int(k.port())))
	child.Director = k.DirectorAddress
	child.DirectorGrace = k.DirectorGrace
	rel, _ := filepath.Rel(k.absDataDir(), mustAbs(expDir))
	a := &procAggregator{
		chans:        &k.chans,
		policy:       newRestartPolicy(k.MaxRestarts, k.RestartWindow, k.RestartBackoff, "aggregator pod", LauncherKubernetes),
		spec:         spec,
		log:          log.Named("aggregator-pod"),
		child:        child,
		outcome:      outcome,
		ownReadiness: true,
		dropsChanged: make(chan struct{}),
	}
	a.starter = &kubeStarter{
		k: k, a: a, name: name, subPath: filepath.ToSlash(rel), mountPath: podPath(expDir),
		spec: spec, initial: initial, log: a.log,
	}
	return a, nil
}

func mustAbs(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return filepath.Clean(p)
}

func (k *Kubernetes) absDataDir() string { return mustAbs(k.DataDir) }

// podPaths maps the director's paths below expDir to the pod's: the same
// path below KubernetesDataDir as below DataDir.
func (k *Kubernetes) podPaths(expDir string) (func(string) string, error) {
	data := k.absDataDir()
	rel, err := filepath.Rel(data, mustAbs(expDir))
	if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return nil, fmt.Errorf("kubernetes launcher: the experiment directory %s is not below the data directory %s on the claim", expDir, data)
	}
	return func(p string) string {
		r, err := filepath.Rel(data, mustAbs(p))
		if err != nil {
			return p
		}
		return path.Join(KubernetesDataDir, filepath.ToSlash(r))
	}, nil
}

// kubeStarter runs one experiment's aggregator as Jobs in the cluster.
type kubeStarter struct {
	k         *Kubernetes
	a         *procAggregator
	name      string // of the Secret and the Service
	subPath   string // the experiment's directory on the claim
	mountPath string // and in the pod
	spec      LaunchSpec
	initial   string // the initial model written for the pod, if any
	log       hclog.Logger

	secretUID types.UID // the Secret's, which owns the rest
	made      bool      // the Secret and Service exist

	mu        sync.Mutex
	lastWords string // the pod's termination message
}

func (s *kubeStarter) labels() map[string]string {
	return map[string]string{
		LabelName:       labelNameValue,
		LabelManagedBy:  labelManagedByValue,
		LabelExperiment: s.spec.ExperimentID,
	}
}

func (s *kubeStarter) ns() string { return s.k.Namespace }

// apiTimeout bounds each call to the API server.
const apiTimeout = 30 * time.Second

func (s *kubeStarter) why(how string) string {
	s.mu.Lock()
	last := s.lastWords
	s.mu.Unlock()
	if last != "" {
		how += "; it last logged: " + last
	}
	return how + fmt.Sprintf("; its log: kubectl logs -n %s -l %s=%s", s.ns(), LabelExperiment, s.spec.ExperimentID)
}

// start writes this start's spec into the Secret, makes the Service (once)
// and a Job, and follows the Job's pod until it ends or ctx does.
func (s *kubeStarter) start(ctx context.Context, spec ProcessSpec) (string, error) {
	data, err := json.Marshal(&spec)
	if err != nil {
		return "", fmt.Errorf("launch spec: %w", err)
	}
	if !s.made {
		if err := s.deleteJobs(ctx, ""); err != nil {
			return notStarted(fmt.Errorf("kubernetes launcher: the jobs an earlier director left: %w", err))
		}
	}
	if err := s.putSecret(ctx, data); err != nil {
		return notStarted(fmt.Errorf("kubernetes launcher: secret %s/%s: %w", s.ns(), s.name, err))
	}
	if !s.made {
		if err := s.makeService(ctx); err != nil {
			return notStarted(fmt.Errorf("kubernetes launcher: service %s/%s: %w", s.ns(), s.name, err))
		}
		s.made = true
	}
	startID, err := newToken()
	if err != nil {
		return "", err
	}
	startID = startID[:8]
	job := s.job(startID)
	cctx, cancel := context.WithTimeout(ctx, apiTimeout)
	_, err = kubeJobs.in(s.k.Client, s.ns()).Create(cctx, job)
	cancel()
	if err != nil {
		return notStarted(fmt.Errorf("kubernetes launcher: job %s/%s: %w", s.ns(), job.Name, err))
	}
	s.log.Info("aggregator job created", "job", job.Name, "namespace", s.ns())
	how := s.follow(ctx, startID)
	// The Job is done with, whichever way: its pod has ended, or is to
	// stop now (the pod gets SIGTERM and its grace period).
	if err := s.deleteJobs(context.WithoutCancel(ctx), startID); err != nil {
		s.log.Warn("cannot delete the aggregator's job", "job", job.Name, "error", err)
	}
	s.log.Info("aggregator pod ended", "job", job.Name, "how", how)
	return how, nil
}

// notStarted is how a start that could not be made ends: an error, which
// fails the experiment, when no retry can mend it (the API server refuses
// the launcher's rights or its objects, the certificate files cannot be
// read); otherwise (the API server unreachable, overloaded) a death, which
// the restart policy retries with backoff and bounds.
func notStarted(err error) (string, error) {
	var pathErr *fs.PathError
	if errors.As(err, &pathErr) || apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err) ||
		apierrors.IsInvalid(err) || apierrors.IsBadRequest(err) || apierrors.IsNotFound(err) {
		return "", err
	}
	return "could not be started: " + err.Error(), nil
}

// follow watches the pods of a start until one ends (how it did) or ctx
// ends ("stopped"). The first time a pod is Ready the Service's address is
// announced.
func (s *kubeStarter) follow(ctx context.Context, startID string) string {
	sel := labels.SelectorFromSet(map[string]string{LabelExperiment: s.spec.ExperimentID, LabelStart: startID}).String()
	pods := kubePods.in(s.k.Client, s.ns())
	b := backoff.New(backoff.Config{Initial: 200 * time.Millisecond, Max: 10 * time.Second})
	var waiting string
	// The address is found (a load balancer's may take a while) beside the
	// watch, which must go on seeing the pod end meanwhile.
	actx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	// A pod that is not Ready in time (an image that cannot be pulled, a
	// quota that admits no pod, a node that never comes) counts as a death.
	late := time.NewTimer(s.k.readyTimeout())
	defer late.Stop()
	readied := false
	onReady := func() {
		if !readied {
			readied = true
			late.Stop()
			wg.Go(func() { s.ready(actx) })
		}
	}
	for {
		// A watch without a resource version starts with every pod that
		// matches: a pod made before it opened is seen too.
		w, err := pods.Watch(ctx, sel)
		if err != nil {
			if ctx.Err() != nil {
				return "stopped"
			}
			s.log.Warn("cannot watch the aggregator's pod; trying again", "error", err)
			if !b.Wait(ctx) {
				return "stopped"
			}
			continue
		}
		how, done := s.watchPods(ctx, pods, w, startID, &waiting, onReady, late.C)
		w.Stop()
		if done {
			return how
		}
		if ctx.Err() != nil {
			return "stopped"
		}
		if !b.Wait(ctx) {
			return "stopped"
		}
	}
}

// watchPods reads one watch until a pod ends (done) or the watch closes.
func (s *kubeStarter) watchPods(ctx context.Context, pods kubeObjects[corev1.Pod], w watch.Interface, startID string, waiting *string, onReady func(), late <-chan time.Time) (string, bool) {
	for {
		select {
		case <-ctx.Done():
			return "stopped", true
		case <-late:
			how := fmt.Sprintf("its pod was not Ready within %s", s.k.readyTimeout())
			if *waiting != "" {
				how += " (" + *waiting + ")"
			}
			return how, true
		case ev, ok := <-w.ResultChan():
			if !ok {
				return "", false
			}
			pod := pods.Object(ev.Object)
			if pod == nil {
				if ev.Type == watch.Error {
					s.log.Debug("the pod watch reported an error; opening it again", "status", apierrors.FromObject(ev.Object))
					return "", false
				}
				continue
			}
			// The API server filters by the selector; a watch that does
			// not (client-go's fake) is filtered here.
			if pod.Labels[LabelExperiment] != s.spec.ExperimentID || pod.Labels[LabelStart] != startID {
				continue
			}
			if ev.Type == watch.Deleted {
				return fmt.Sprintf("pod %s was deleted", pod.Name), true
			}
			st := podStatus(pod)
			if st.lastWords != "" {
				s.mu.Lock()
				s.lastWords = st.lastWords
				s.mu.Unlock()
			}
			if st.ended {
				return st.how, true
			}
			if st.waiting != "" && st.waiting != *waiting {
				s.log.Warn("the aggregator's container is waiting", "pod", pod.Name, "reason", st.waiting)
			}
			*waiting = st.waiting
			if st.ready {
				onReady()
			}
		}
	}
}

// podState is what the launcher makes of a pod.
type podState struct {
	ready, ended bool
	how          string // how it ended
	lastWords    string // the container's termination message, last line
	waiting      string // why the container is not running yet
}

func podStatus(pod *corev1.Pod) podState {
	var st podState
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			st.ready = true
		}
	}
	for _, cs := range pod.Status.ContainerStatuses {
		if cs.Name != KubernetesContainer {
			continue
		}
		if w := cs.State.Waiting; w != nil {
			st.waiting = strings.TrimSpace(w.Reason + ": " + w.Message)
		}
		if t := cs.State.Terminated; t != nil {
			st.how = fmt.Sprintf("pod %s: exit code %d", pod.Name, t.ExitCode)
			if t.Signal != 0 {
				st.how += fmt.Sprintf(", signal %d", t.Signal)
			}
			if t.Reason != "" {
				st.how += " (" + t.Reason + ")"
			}
			lines := strings.Split(strings.TrimSpace(t.Message), "\n")
			st.lastWords = fxv1.Clip(strings.TrimSpace(lines[len(lines)-1]), 512)
		}
	}
	switch pod.Status.Phase {
	case corev1.PodSucceeded, corev1.PodFailed:
		st.ended, st.ready = true, false
		if st.how == "" {
			st.how = fmt.Sprintf("pod %s %s", pod.Name, strings.ToLower(string(pod.Status.Phase)))
			if r := strings.TrimSpace(pod.Status.Reason + " " + pod.Status.Message); r != "" {
				st.how += ": " + r
			}
		}
	}
	return st
}

// ready announces the aggregator's address, once it is known, the first
// time its pod is Ready.
func (s *kubeStarter) ready(ctx context.Context) {
	s.a.mu.Lock()
	known := s.a.address != "" || s.a.served
	s.a.mu.Unlock()
	if known {
		s.a.announce()
		return
	}
	addr, err := s.address(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.log.Error("the aggregator's service has no address", "error", err)
		}
		return
	}
	s.a.mu.Lock()
	s.a.address = addr
	s.a.mu.Unlock()
	s.log.Info("aggregator pod ready", "address", addr)
	s.a.announce()
}

// address is where participants reach the Service: its DNS name
// (ClusterIP), AdvertiseHost and its node port (NodePort), or its load
// balancer's address (LoadBalancer), read until it has one.
func (s *kubeStarter) address(ctx context.Context) (string, error) {
	port := strconv.Itoa(int(s.k.port()))
	typ := s.k.ServiceType
	if typ == "" || typ == corev1.ServiceTypeClusterIP {
		return net.JoinHostPort(fmt.Sprintf("%s.%s.svc", s.name, s.ns()), port), nil
	}
	poll := s.k.AddressPoll
	if poll <= 0 {
		poll = 2 * time.Second
	}
	for {
		cctx, cancel := context.WithTimeout(ctx, apiTimeout)
		svc, err := kubeServices.in(s.k.Client, s.ns()).Get(cctx, s.name)
		cancel()
		if err == nil && len(svc.Spec.Ports) > 0 {
			switch typ {
			case corev1.ServiceTypeNodePort:
				if np := svc.Spec.Ports[0].NodePort; np != 0 {
					return net.JoinHostPort(s.k.AdvertiseHost, strconv.Itoa(int(np))), nil
				}
			case corev1.ServiceTypeLoadBalancer:
				if s.k.AdvertiseHost != "" {
					return net.JoinHostPort(s.k.AdvertiseHost, port), nil
				}
				for _, in := range svc.Status.LoadBalancer.Ingress {
					if h := in.Hostname; h != "" {
						return net.JoinHostPort(h, port), nil
					}
					if in.IP != "" {
						return net.JoinHostPort(in.IP, port), nil
					}
				}
			}
		}
		if err != nil {
			s.log.Warn("cannot read the aggregator's service", "error", err)
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return "", ctx.Err()
		case <-t.C:
		}
	}
}

// putSecret creates the Secret, or writes this start's spec into it.
func (s *kubeStarter) putSecret(ctx context.Context, spec []byte) error {
	secret := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: s.name, Namespace: s.ns(), Labels: s.labels()},
		Type:       corev1.SecretTypeOpaque,
		Data:       map[string][]byte{KubernetesSpecKey: spec},
	}
	if s.k.TLSSecret == "" {
		files := map[string]string{KubernetesTLSCertKey: s.k.TLS.Cert, KubernetesTLSKeyKey: s.k.TLS.Key, KubernetesTLSCAKey: s.k.TLS.CA}
		if s.k.TLS.CRL != "" {
			files[KubernetesTLSCRLKey] = s.k.TLS.CRL
		}
		for key, file := range files {
			b, err := os.ReadFile(file)
			if err != nil {
				return err
			}
			secret.Data[key] = b
		}
	}
	secrets := kubeSecrets.in(s.k.Client, s.ns())
	cctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	got, err := secrets.Create(cctx, secret)
	if apierrors.IsAlreadyExists(err) {
		var old *corev1.Secret
		if old, err = secrets.Get(cctx, s.name); err == nil {
			secret.ResourceVersion = old.ResourceVersion
			got, err = secrets.Update(cctx, secret)
		}
	}
	if err != nil {
		return err
	}
	s.secretUID = got.UID
	return nil
}

// ownedBy makes the Secret the owner of an object, so that deleting the
// Secret (kubectl delete secret fx-agg-ID) takes the rest with it.
func (s *kubeStarter) ownedBy() []metav1.OwnerReference {
	return []metav1.OwnerReference{{APIVersion: "v1", Kind: "Secret", Name: s.name, UID: s.secretUID}}
}

func (s *kubeStarter) makeService(ctx context.Context) error {
	typ := s.k.ServiceType
	if typ == "" {
		typ = corev1.ServiceTypeClusterIP
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: s.name, Namespace: s.ns(), Labels: s.labels(), OwnerReferences: s.ownedBy()},
		Spec: corev1.ServiceSpec{
			Type:     typ,
			Selector: s.labels(),
			Ports: []corev1.ServicePort{{
				Name: "grpc", Protocol: corev1.ProtocolTCP, Port: s.k.port(), TargetPort: intstr.FromString("grpc"),
			}},
		},
	}
	cctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	_, err := kubeServices.in(s.k.Client, s.ns()).Create(cctx, svc)
	if apierrors.IsAlreadyExists(err) {
		return nil // an earlier director's: the same selector and port
	}
	return err
}

// job is one start's Job: one pod, never retried by Kubernetes (the
// launcher starts the next, with a new token).
func (s *kubeStarter) job(startID string) *batchv1.Job {
	l := s.labels()
	l[LabelStart] = startID
	tlsSource := s.name
	if s.k.TLSSecret != "" {
		tlsSource = s.k.TLSSecret
	}
	projections := []corev1.VolumeProjection{{Secret: &corev1.SecretProjection{
		LocalObjectReference: corev1.LocalObjectReference{Name: s.name},
		Items:                []corev1.KeyToPath{{Key: KubernetesSpecKey, Path: KubernetesSpecKey}},
	}}}
	tlsKeys := []string{KubernetesTLSCertKey, KubernetesTLSKeyKey, KubernetesTLSCAKey}
	if s.k.TLS.CRL != "" {
		tlsKeys = append(tlsKeys, KubernetesTLSCRLKey)
	}
	tlsItems := make([]corev1.KeyToPath, len(tlsKeys))
	for i, key := range tlsKeys {
		tlsItems[i] = corev1.KeyToPath{Key: key, Path: key}
	}
	projections = append(projections, corev1.VolumeProjection{Secret: &corev1.SecretProjection{
		LocalObjectReference: corev1.LocalObjectReference{Name: tlsSource}, Items: tlsItems,
	}})
	grace := int64(stopGrace(s.k.StopGrace) / time.Second)
	return &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: s.name + "-" + startID, Namespace: s.ns(), Labels: l, OwnerReferences: s.ownedBy()},
		Spec: batchv1.JobSpec{
			BackoffLimit: ptr.To[int32](0),
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: l},
				Spec: corev1.PodSpec{
					RestartPolicy:                 corev1.RestartPolicyNever,
					TerminationGracePeriodSeconds: &grace,
					AutomountServiceAccountToken:  ptr.To(false),
					EnableServiceLinks:            ptr.To(false),
					// The fx image's user, as the fx-director chart runs the
					// director: the files on the claim and the Secrets'
					// (group-readable) are theirs.
					SecurityContext: &corev1.PodSecurityContext{
						RunAsNonRoot:        ptr.To(true),
						RunAsUser:           ptr.To[int64](KubernetesImageUser),
						RunAsGroup:          ptr.To[int64](KubernetesImageUser),
						FSGroup:             ptr.To[int64](KubernetesImageUser),
						FSGroupChangePolicy: ptr.To(corev1.FSGroupChangeOnRootMismatch),
						SeccompProfile:      &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
					},
					Containers: []corev1.Container{{
						Name:                     KubernetesContainer,
						Image:                    s.k.Image,
						ImagePullPolicy:          s.k.ImagePullPolicy,
						Args:                     []string{"aggregator", "run", "--spec", path.Join(KubernetesSpecDir, KubernetesSpecKey)},
						Ports:                    []corev1.ContainerPort{{Name: "grpc", ContainerPort: s.k.port(), Protocol: corev1.ProtocolTCP}},
						Resources:                s.k.Resources,
						TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromString("grpc")}},
							PeriodSeconds: 2,
						},
						VolumeMounts: []corev1.VolumeMount{
							{Name: "spec", MountPath: KubernetesSpecDir, ReadOnly: true},
							{Name: "data", MountPath: s.mountPath, SubPath: s.subPath},
							{Name: "tmp", MountPath: "/tmp"},
						},
						SecurityContext: &corev1.SecurityContext{
							AllowPrivilegeEscalation: ptr.To(false),
							ReadOnlyRootFilesystem:   ptr.To(true),
							RunAsNonRoot:             ptr.To(true),
							Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
						},
					}},
					Volumes: []corev1.Volume{
						{Name: "spec", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
							Sources: projections, DefaultMode: ptr.To[int32](0o440),
						}}},
						{Name: "tmp", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
						{Name: "data", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: s.k.PVC}}},
					},
				},
			},
		},
	}
}

// deleteJobs deletes the experiment's Jobs (one start's, or all when
// startID is ""), their pods with them.
func (s *kubeStarter) deleteJobs(ctx context.Context, startID string) error {
	set := map[string]string{LabelExperiment: s.spec.ExperimentID, LabelManagedBy: labelManagedByValue}
	if startID != "" {
		set[LabelStart] = startID
	}
	jobs := kubeJobs.in(s.k.Client, s.ns())
	cctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	list, err := jobs.List(cctx, labels.SelectorFromSet(set).String())
	if err != nil {
		return err
	}
	var errs []error
	for _, j := range list {
		err := jobs.Delete(cctx, j.Name)
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// close deletes what the launch made: the Jobs, the Service, the Secret.
func (s *kubeStarter) close() {
	removeInitialModel(s.initial, s.spec.Dir)
	ctx, cancel := context.WithTimeout(context.Background(), apiTimeout)
	defer cancel()
	errs := []error{s.deleteJobs(ctx, "")}
	if err := kubeServices.in(s.k.Client, s.ns()).Delete(ctx, s.name); err != nil && !apierrors.IsNotFound(err) {
		errs = append(errs, err)
	}
	if err := kubeSecrets.in(s.k.Client, s.ns()).Delete(ctx, s.name); err != nil && !apierrors.IsNotFound(err) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		s.log.Error("cannot delete every object of the aggregator; delete them with kubectl delete jobs,services,secrets -l "+LabelExperiment+"="+s.spec.ExperimentID, "namespace", s.ns(), "error", err)
		return
	}
	s.log.Info("aggregator's jobs, service and secret deleted", "namespace", s.ns())
}
