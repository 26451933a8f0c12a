package director

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8stesting "k8s.io/client-go/testing"

	"go.yaml.in/yaml/v3"

	"github.com/fx-fl/fx/internal/backoff"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// These tests run the Kubernetes launcher against client-go's fake
// dynamic client: it stores and watches objects, but no controller runs, so the
// tests play the Job controller and the kubelet (they create each Job's pod
// and move its status). No cluster runs on the machines that test fx.

const k8sNS = "fx"

type k8sFixture struct {
	// cs is the launcher's client, whose actions are the launcher's
	// alone; api is the test's, on the same objects.
	cs      *dynamicfake.FakeDynamicClient
	api     *dynamicfake.FakeDynamicClient
	k       *Kubernetes
	spec    LaunchSpec
	expDir  string
	served  func() int
	tlsData map[string][]byte
}

func newK8sFixture(t *testing.T, objects ...runtime.Object) *k8sFixture {
	t.Helper()
	dataDir := t.TempDir()
	expDir := filepath.Join(dataDir, "experiments", "e1")
	must(t, os.MkdirAll(expDir, 0o700))
	pkiDir := t.TempDir()
	tlsData := map[string][]byte{KubernetesTLSCertKey: []byte("CERT"), KubernetesTLSKeyKey: []byte("KEY"), KubernetesTLSCAKey: []byte("CA")}
	files := pki.Files{}
	for key, data := range tlsData {
		p := filepath.Join(pkiDir, key)
		must(t, os.WriteFile(p, data, 0o600))
		switch key {
		case KubernetesTLSCertKey:
			files.Cert = p
		case KubernetesTLSKeyKey:
			files.Key = p
		case KubernetesTLSCAKey:
			files.CA = p
		}
	}
	cs := dynamicfake.NewSimpleDynamicClient(k8sScheme(t), objects...)
	k := &Kubernetes{
		Client:          cs,
		Namespace:       k8sNS,
		Image:           "registry.example.org/fx:1",
		PVC:             "fx-data",
		DataDir:         dataDir,
		Resources:       corev1.ResourceRequirements{Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("2Gi")}},
		TLS:             files,
		Identity:        "director.test",
		DirectorAddress: "fx-director.fx.svc:50051",
		MaxRestarts:     2,
		RestartWindow:   time.Hour,
		RestartBackoff:  backoff.Config{Initial: time.Millisecond, Max: 5 * time.Millisecond},
		StopGrace:       7 * time.Second,
	}
	var mu sync.Mutex
	served := 0
	// The process launcher's fixture, less the listener, in data_dir.
	_, spec, _ := processFixture(t, "")
	spec.Listener.Close()
	spec.Listener, spec.DirectorAddress = nil, ""
	spec.Dir = filepath.Join(expDir, "aggregator")
	spec.ServerName = "director.test"
	spec.Serving = func() {
		mu.Lock()
		served++
		mu.Unlock()
	}
	return &k8sFixture{cs: cs, api: sharedClient(t, cs), k: k, spec: spec, expDir: expDir, tlsData: tlsData, served: func() int {
		mu.Lock()
		defer mu.Unlock()
		return served
	}}
}

// run launches the aggregator and runs it until ctx ends; the returned
// channel yields Run's error.
func (f *k8sFixture) run(t *testing.T, ctx context.Context) (*procAggregator, <-chan error) {
	t.Helper()
	agg, err := f.k.Launch(f.spec)
	must(t, err)
	done := make(chan error, 1)
	go func() { done <- agg.Run(ctx) }()
	return agg.(*procAggregator), done
}

// k8sScheme knows the kinds the launcher handles, as the fake client
// needs to store and list them.
func k8sScheme(t *testing.T) *runtime.Scheme {
	t.Helper()
	s := runtime.NewScheme()
	must(t, corev1.AddToScheme(s))
	must(t, batchv1.AddToScheme(s))
	return s
}

// sharedClient is a second client of cs's objects, wired as
// dynamicfake.NewSimpleDynamicClient wires its own.
func sharedClient(t *testing.T, cs *dynamicfake.FakeDynamicClient) *dynamicfake.FakeDynamicClient {
	o := cs.Tracker()
	api := dynamicfake.NewSimpleDynamicClient(k8sScheme(t))
	api.ReactionChain, api.WatchReactionChain = nil, nil
	api.AddReactor("*", "*", k8stesting.ObjectReaction(o))
	api.AddWatchReactor("*", func(action k8stesting.Action) (bool, watch.Interface, error) {
		var opts metav1.ListOptions
		if w, ok := action.(k8stesting.WatchActionImpl); ok {
			opts = w.ListOptions
		}
		w, err := o.Watch(action.GetResource(), action.GetNamespace(), opts)
		return err == nil, w, err
	})
	return api
}

// allowed checks that every call the launcher made is one KubernetesRBAC
// (and so the chart's Role) grants.
func (f *k8sFixture) allowed(t *testing.T) {
	t.Helper()
	for _, a := range f.cs.Actions() {
		r := a.GetResource()
		if a.GetSubresource() != "" || !slices.ContainsFunc(KubernetesRBAC, func(p rbacv1.PolicyRule) bool {
			return slices.Contains(p.APIGroups, r.Group) && slices.Contains(p.Resources, r.Resource) && slices.Contains(p.Verbs, a.GetVerb())
		}) {
			t.Errorf("the launcher called %s %s/%s %s, which KubernetesRBAC does not grant", a.GetVerb(), r.Group, r.Resource, a.GetSubresource())
		}
	}
}

func (f *k8sFixture) jobs(t *testing.T) []batchv1.Job {
	t.Helper()
	l, err := kubeJobs.in(f.api, k8sNS).List(context.Background(), "")
	must(t, err)
	return l
}

// waitJob waits for a Job other than those named in not, and returns it.
func (f *k8sFixture) waitJob(t *testing.T, not ...string) batchv1.Job {
	t.Helper()
	var got batchv1.Job
	eventually(t, "a new aggregator job", func() bool {
		for _, j := range f.jobs(t) {
			if !slices.Contains(not, j.Name) {
				got = j
				return true
			}
		}
		return false
	})
	return got
}

// podOf plays the Job controller: it makes the Job's pod, Pending.
func (f *k8sFixture) podOf(t *testing.T, job batchv1.Job) *corev1.Pod {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: job.Name + "-x1", Namespace: k8sNS, Labels: job.Spec.Template.Labels},
		Spec:       job.Spec.Template.Spec,
		Status:     corev1.PodStatus{Phase: corev1.PodPending},
	}
	pod, err := kubePods.in(f.api, k8sNS).Create(context.Background(), pod)
	must(t, err)
	return pod
}

// setPod plays the kubelet: it gives the pod a status.
func (f *k8sFixture) setPod(t *testing.T, pod *corev1.Pod, status corev1.PodStatus) *corev1.Pod {
	t.Helper()
	pod = pod.DeepCopy()
	pod.Status = status
	pod, err := updateStatus(f.api, kubePods, pod)
	must(t, err)
	return pod
}

// updateStatus plays a controller: it writes obj's status.
func updateStatus[T any](api *dynamicfake.FakeDynamicClient, kind kubeKind[T], obj *T) (*T, error) {
	o := kind.in(api, k8sNS)
	u, err := o.toUnstructured(obj)
	if err != nil {
		return nil, err
	}
	return o.typed(api.Resource(kind.gvr).Namespace(k8sNS).UpdateStatus(context.Background(), u, metav1.UpdateOptions{}))
}

func readyStatus() corev1.PodStatus {
	return corev1.PodStatus{
		Phase:      corev1.PodRunning,
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
		ContainerStatuses: []corev1.ContainerStatus{{
			Name: KubernetesContainer, Ready: true, State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}},
		}},
	}
}

func endedStatus(phase corev1.PodPhase, code int32, reason, message string) corev1.PodStatus {
	return corev1.PodStatus{
		Phase: phase,
		ContainerStatuses: []corev1.ContainerStatus{{
			Name: KubernetesContainer,
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
				ExitCode: code, Reason: reason, Message: message,
			}},
		}},
	}
}

func (f *k8sFixture) launchSpec(t *testing.T) ProcessSpec {
	t.Helper()
	s, err := kubeSecrets.in(f.api, k8sNS).Get(context.Background(), "fx-agg-e1")
	must(t, err)
	var spec ProcessSpec
	must(t, json.Unmarshal(s.Data[KubernetesSpecKey], &spec))
	return spec
}

// nothingLeft checks that the launcher deleted every object it made, the
// Jobs with background propagation (their pods with them).
func (f *k8sFixture) nothingLeft(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	if j := f.jobs(t); len(j) != 0 {
		t.Errorf("%d jobs left: %s", len(j), j[0].Name)
	}
	if l, err := kubeServices.in(f.api, k8sNS).List(ctx, ""); err != nil || len(l) != 0 {
		t.Errorf("services left: %v %v", l, err)
	}
	if l, err := kubeSecrets.in(f.api, k8sNS).List(ctx, ""); err != nil || len(l) != 0 {
		t.Errorf("secrets left: %v %v", l, err)
	}
	deletes := map[string]int{}
	f.allowed(t)
	for _, a := range f.cs.Actions() {
		d, ok := a.(k8stesting.DeleteActionImpl)
		if !ok {
			continue
		}
		deletes[d.GetResource().Resource]++
		if p := d.DeleteOptions.PropagationPolicy; p == nil || *p != metav1.DeletePropagationBackground {
			t.Errorf("%s %s deleted with propagation %v, want Background (a Job deleted without it orphans its pod)", d.GetResource().Resource, d.GetName(), p)
		}
	}
	for _, r := range []string{"jobs", "services", "secrets"} {
		if deletes[r] == 0 {
			t.Errorf("no %s deleted", r)
		}
	}
}

// The objects of a launch: a Secret with the spec (paths in the pod) and
// the director's certificate files, a Service on the aggregator port, and
// a Job running `fx aggregator run --spec` with the experiment's directory
// from the claim; a Job an earlier director left is deleted first. The
// address is announced when the pod is Ready (not on the channel's serving
// report), and a pod that ends having written the outcome ends Run, which
// deletes everything.
func TestKubernetesLauncherObjects(t *testing.T) {
	leftover := &batchv1.Job{ObjectMeta: metav1.ObjectMeta{Name: "fx-agg-e1-0ld", Namespace: k8sNS, Labels: map[string]string{
		LabelExperiment: "e1", LabelManagedBy: labelManagedByValue, LabelStart: "0ld",
	}}}
	other := &batchv1.Job{ObjectMeta: metav1.ObjectMeta{Name: "fx-agg-e2-abc", Namespace: k8sNS, Labels: map[string]string{
		LabelExperiment: "e2", LabelManagedBy: labelManagedByValue, LabelStart: "abc",
	}}}
	f := newK8sFixture(t, leftover, other)
	a, done := f.run(t, context.Background())
	job := f.waitJob(t, leftover.Name, other.Name)
	eventually(t, "the earlier director's job deleted", func() bool {
		_, err := kubeJobs.in(f.api, k8sNS).Get(context.Background(), leftover.Name)
		return err != nil
	})
	if _, err := kubeJobs.in(f.api, k8sNS).Get(context.Background(), other.Name); err != nil {
		t.Errorf("another experiment's job was touched: %v", err)
	}
	must(t, kubeJobs.in(f.api, k8sNS).Delete(context.Background(), other.Name))
	if n := len(f.jobs(t)); n != 1 {
		t.Errorf("%d jobs, want the new one", n)
	}

	// The Secret: the spec, with the pod's paths, and the TLS files.
	secret, err := kubeSecrets.in(f.api, k8sNS).Get(context.Background(), "fx-agg-e1")
	must(t, err)
	for key, want := range f.tlsData {
		if got := string(secret.Data[key]); got != string(want) {
			t.Errorf("secret %s = %q, want the file's %q", key, got, want)
		}
	}
	spec := f.launchSpec(t)
	for what, got := range map[string][2]string{
		"dir":           {spec.Dir, "/fx-data/experiments/e1/aggregator"},
		"outcome":       {spec.Outcome, "/fx-data/experiments/e1/" + ProcessOutcomeFile},
		"initial_model": {spec.InitialModel, "/fx-data/experiments/e1/" + ProcessInitialFile},
		"listen":        {spec.Listen, ":50052"},
		"tls.cert":      {spec.TLS.Cert, "/spec/tls.crt"},
		"tls.key":       {spec.TLS.Key, "/spec/tls.key"},
		"tls.ca":        {spec.TLS.CA, "/spec/ca.crt"},
		"director":      {spec.Director, "fx-director.fx.svc:50051"},
		"server_name":   {spec.ServerName, "director.test"},
	} {
		if got[0] != got[1] {
			t.Errorf("spec %s = %q, want %q", what, got[0], got[1])
		}
	}
	if _, err := os.Stat(filepath.Join(f.expDir, ProcessInitialFile)); err != nil {
		t.Errorf("the initial model for the pod is not on the claim: %v", err)
	}
	a.mu.Lock()
	token := a.token
	a.mu.Unlock()
	if spec.Token == "" || spec.Token != token {
		t.Errorf("the spec's token %q is not the running start's %q", spec.Token, token)
	}

	// The Job.
	if got := *job.Spec.BackoffLimit; got != 0 {
		t.Errorf("backoffLimit %d, want 0: the launcher restarts, with a new token", got)
	}
	ps := job.Spec.Template.Spec
	if ps.RestartPolicy != corev1.RestartPolicyNever || len(ps.Containers) != 1 {
		t.Fatalf("pod template: restart %s, %d containers", ps.RestartPolicy, len(ps.Containers))
	}
	c := ps.Containers[0]
	if c.Image != f.k.Image || strings.Join(c.Args, " ") != "aggregator run --spec /spec/aggregator.spec.json" {
		t.Errorf("container runs %s %v", c.Image, c.Args)
	}
	if len(c.Ports) != 1 || c.Ports[0].ContainerPort != DefaultKubernetesPort || c.ReadinessProbe == nil || c.ReadinessProbe.TCPSocket == nil {
		t.Errorf("ports %v, readiness probe %v: want %d with a TCP probe", c.Ports, c.ReadinessProbe, DefaultKubernetesPort)
	}
	if got := c.Resources.Limits.Memory().String(); got != "2Gi" {
		t.Errorf("memory limit %s, want 2Gi", got)
	}
	if sc := ps.SecurityContext; sc == nil || *sc.RunAsUser != KubernetesImageUser || *sc.FSGroup != KubernetesImageUser {
		t.Errorf("pod security context %+v: want the image's user and fsGroup, which the claim's and the Secrets' files are readable by", sc)
	}
	if *ps.TerminationGracePeriodSeconds != 7 {
		t.Errorf("grace %d s, want StopGrace's 7", *ps.TerminationGracePeriodSeconds)
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m
	}
	if m := mounts["data"]; m.MountPath != "/fx-data/experiments/e1" || m.SubPath != "experiments/e1" {
		t.Errorf("data mount %+v, want the claim's experiments/e1 at /fx-data/experiments/e1", m)
	}
	if m := mounts["spec"]; m.MountPath != KubernetesSpecDir || !m.ReadOnly {
		t.Errorf("spec mount %+v", m)
	}
	vols := map[string]corev1.Volume{}
	for _, v := range ps.Volumes {
		vols[v.Name] = v
	}
	if pvc := vols["data"].PersistentVolumeClaim; pvc == nil || pvc.ClaimName != "fx-data" {
		t.Errorf("data volume %+v, want claim fx-data", vols["data"])
	}
	var projected []string
	if p := vols["spec"].Projected; p != nil {
		for _, src := range p.Sources {
			for _, it := range src.Secret.Items {
				projected = append(projected, src.Secret.Name+":"+it.Key)
			}
		}
	}
	if want := []string{"fx-agg-e1:aggregator.spec.json", "fx-agg-e1:tls.crt", "fx-agg-e1:tls.key", "fx-agg-e1:ca.crt"}; !slices.Equal(projected, want) {
		t.Errorf("spec volume projects %v, want %v", projected, want)
	}
	if l := job.Labels; l[LabelExperiment] != "e1" || l[LabelManagedBy] != labelManagedByValue || l[LabelStart] == "" {
		t.Errorf("job labels %v", l)
	}
	if o := job.OwnerReferences; len(o) != 1 || o[0].Kind != "Secret" || o[0].Name != "fx-agg-e1" {
		t.Errorf("job owners %v, want the secret", o)
	}

	// The Service selects the pods of every start.
	svc, err := kubeServices.in(f.api, k8sNS).Get(context.Background(), "fx-agg-e1")
	must(t, err)
	if svc.Spec.Type != corev1.ServiceTypeClusterIP || len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != DefaultKubernetesPort || svc.Spec.Ports[0].TargetPort.StrVal != "grpc" {
		t.Errorf("service %s %v", svc.Spec.Type, svc.Spec.Ports)
	}
	for k, v := range svc.Spec.Selector {
		if job.Spec.Template.Labels[k] != v {
			t.Errorf("service selects %s=%s, which the pod does not carry", k, v)
		}
	}
	if _, ok := svc.Spec.Selector[LabelStart]; ok {
		t.Error("service selects one start's pod only")
	}

	// Readiness: the channel's serving report does not announce; the
	// pod's Ready condition does, with the Service's name.
	ch := &fakeChannel{ctx: pki.ContextWithIdentity(context.Background(), pki.Identity{Name: "director.test", Role: pki.RoleDirector}),
		in: make(chan *fxv1.AggregatorReport, 4), out: make(chan *fxv1.AggregatorCommand, 4)}
	ch.in <- &fxv1.AggregatorReport{ExperimentId: "e1", LaunchToken: token}
	ch.in <- &fxv1.AggregatorReport{Event: &fxv1.AggregatorReport_Serving{Serving: &fxv1.AggregatorServing{}}}
	ch.in <- &fxv1.AggregatorReport{Event: &fxv1.AggregatorReport_Progress{Progress: &fxv1.AggregatorProgress{Collaborator: "a", Round: 1}}}
	shutdown := make(chan struct{})
	defer close(shutdown)
	go func() { _ = f.k.serveChannel(ch, shutdown) }()
	sink := f.spec.Sink.(*recordingSink)
	eventually(t, "the progress after the serving report", func() bool { _, _, p := sink.snapshot(); return len(p) == 1 })
	pod := f.podOf(t, job)
	pod = f.setPod(t, pod, corev1.PodStatus{Phase: corev1.PodRunning, ContainerStatuses: []corev1.ContainerStatus{{Name: KubernetesContainer, State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}}}})
	if n := f.served(); n != 0 {
		t.Fatalf("announced %d times before the pod was ready", n)
	}
	pod = f.setPod(t, pod, readyStatus())
	eventually(t, "the address announced", func() bool { return f.served() == 1 })
	if got := a.Address(); got != "fx-agg-e1.fx.svc:50052" {
		t.Errorf("address %q, want the Service's DNS name", got)
	}

	// The aggregator finishes: it writes the outcome and exits 0.
	must(t, writeOutcome(filepath.Join(f.expDir, ProcessOutcomeFile), ProcessOutcome{Finished: true}))
	f.setPod(t, pod, endedStatus(corev1.PodSucceeded, 0, "Completed", ""))
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v, want nil (finished)", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("Run did not return after the pod finished")
	}
	f.nothingLeft(t)
	if _, err := os.Stat(filepath.Join(f.expDir, ProcessInitialFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the initial model file is left: %v", err)
	}
}

// A pod that fails, or is deleted, is followed by a new Job (a new token)
// on the same claim and directory, where the aggregator resumes from its
// checkpoint; the address is announced once. More than MaxRestarts deaths
// fail the experiment with the last pod's words, and everything is
// deleted.
func TestKubernetesLauncherPodFailure(t *testing.T) {
	f := newK8sFixture(t)
	must(t, os.MkdirAll(f.spec.Dir, 0o700))
	must(t, os.WriteFile(filepath.Join(f.spec.Dir, "checkpoint.json"), []byte("{}"), 0o600))
	_, done := f.run(t, context.Background())
	job1 := f.waitJob(t)
	spec1 := f.launchSpec(t)
	if spec1.InitialModel != "" {
		t.Errorf("initial model %q with a checkpoint on the claim", spec1.InitialModel)
	}
	pod1 := f.setPod(t, f.podOf(t, job1), readyStatus())
	eventually(t, "the address announced", func() bool { return f.served() == 1 })
	f.setPod(t, pod1, endedStatus(corev1.PodFailed, 137, "OOMKilled", ""))

	job2 := f.waitJob(t, job1.Name)
	eventually(t, "the failed pod's job deleted", func() bool {
		_, err := kubeJobs.in(f.api, k8sNS).Get(context.Background(), job1.Name)
		return err != nil
	})
	spec2 := f.launchSpec(t)
	if spec2.Token == spec1.Token || spec2.Dir != spec1.Dir || spec2.Outcome != spec1.Outcome {
		t.Errorf("second start: token %q (first %q), dir %s (first %s)", spec2.Token, spec1.Token, spec2.Dir, spec1.Dir)
	}
	if !slicesEqualVolumes(job1, job2) {
		t.Errorf("the second job mounts %v, the first %v", job2.Spec.Template.Spec.Volumes, job1.Spec.Template.Spec.Volumes)
	}
	// A pod deleted (its node lost) counts as a death too.
	pod2 := f.setPod(t, f.podOf(t, job2), readyStatus())
	must(t, kubePods.in(f.api, k8sNS).Delete(context.Background(), pod2.Name))

	job3 := f.waitJob(t, job1.Name, job2.Name)
	pod3 := f.setPod(t, f.podOf(t, job3), readyStatus())
	f.setPod(t, pod3, endedStatus(corev1.PodFailed, 2, "Error", "loading\npanic: the checkpoint is damaged"))
	var err error
	select {
	case err = <-done:
	case <-time.After(waitTimeout):
		t.Fatal("Run did not give up")
	}
	if err == nil {
		t.Fatal("Run succeeded with pods that keep dying")
	}
	for _, want := range []string{"aggregator pod died 3 times within 1h0m0s", "the most the kubernetes launcher restarts", "exit code 2 (Error)", "panic: the checkpoint is damaged", "kubectl logs -n fx"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if n := f.served(); n != 1 {
		t.Errorf("announced %d times, want once", n)
	}
	f.nothingLeft(t)
}

func slicesEqualVolumes(a, b batchv1.Job) bool {
	va, vb := a.Spec.Template.Spec.Volumes, b.Spec.Template.Spec.Volumes
	ma, mb := a.Spec.Template.Spec.Containers[0].VolumeMounts, b.Spec.Template.Spec.Containers[0].VolumeMounts
	return len(va) > 0 && reflect.DeepEqual(va, vb) && reflect.DeepEqual(ma, mb)
}

// Cancelling Run (the experiment cancelled or removed, the director
// stopping) deletes the Job, the Service and the Secret.
func TestKubernetesLauncherCancel(t *testing.T) {
	f := newK8sFixture(t)
	ctx, cancel := context.WithCancel(context.Background())
	_, done := f.run(t, ctx)
	job := f.waitJob(t)
	f.setPod(t, f.podOf(t, job), readyStatus())
	eventually(t, "the address announced", func() bool { return f.served() == 1 })
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Run: %v, want context.Canceled", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("Run did not return after cancel")
	}
	f.nothingLeft(t)
}

// An existing certificate Secret is projected instead of a copy; a
// NodePort Service is announced at advertise host and its node port.
func TestKubernetesLauncherTLSSecretNodePort(t *testing.T) {
	f := newK8sFixture(t)
	f.k.TLSSecret = "fx-director-pki"
	f.k.ServiceType = corev1.ServiceTypeNodePort
	f.k.AdvertiseHost = "node1.example.org"
	f.k.AddressPoll = time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, done := f.run(t, ctx)
	job := f.waitJob(t)
	secret, err := kubeSecrets.in(f.api, k8sNS).Get(context.Background(), "fx-agg-e1")
	must(t, err)
	if _, ok := secret.Data[KubernetesTLSKeyKey]; ok || len(secret.Data) != 1 {
		t.Errorf("the launcher's secret holds %d keys, the key among them: want the spec only", len(secret.Data))
	}
	srcs := job.Spec.Template.Spec.Volumes[0].Projected.Sources
	if len(srcs) != 2 || srcs[1].Secret.Name != "fx-director-pki" {
		t.Errorf("spec volume sources %+v, want the spec and fx-director-pki", srcs)
	}
	f.setPod(t, f.podOf(t, job), readyStatus())
	// The API server assigns node ports; the fake does not, so the test does.
	svc, err := kubeServices.in(f.api, k8sNS).Get(context.Background(), "fx-agg-e1")
	must(t, err)
	if svc.Spec.Type != corev1.ServiceTypeNodePort {
		t.Errorf("service type %s", svc.Spec.Type)
	}
	svc.Spec.Ports[0].NodePort = 31234
	_, err = kubeServices.in(f.api, k8sNS).Update(context.Background(), svc)
	must(t, err)
	eventually(t, "the address announced", func() bool { return f.served() == 1 })
	if got := a.Address(); got != "node1.example.org:31234" {
		t.Errorf("address %q", got)
	}
	cancel()
	<-done
	f.allowed(t)
}

// Launch refuses what cannot become a pod, saying what is missing.
func TestKubernetesLauncherChecks(t *testing.T) {
	f := newK8sFixture(t)
	k := &Kubernetes{Client: f.k.Client, Namespace: k8sNS, PVC: "fx-data", DataDir: f.k.DataDir, Identity: "director.test", TLS: f.k.TLS}
	if _, err := k.Launch(f.spec); err == nil || !strings.Contains(err.Error(), "missing Image, DirectorAddress") {
		t.Errorf("without image and director address: %v", err)
	}
	spec := f.spec
	spec.ExperimentID = "E_1"
	if _, err := f.k.Launch(spec); err == nil || !strings.Contains(err.Error(), "makes no Kubernetes name") {
		t.Errorf("experiment id E_1: %v", err)
	}
	spec = f.spec
	spec.Dir = filepath.Join(t.TempDir(), "e1", "aggregator")
	if _, err := f.k.Launch(spec); err == nil || !strings.Contains(err.Error(), "is not below the data directory") {
		t.Errorf("a directory off the claim: %v", err)
	}
}

// The kubernetes block's mistakes are named with what to write.
func TestKubernetesSettings(t *testing.T) {
	s := DefaultSettings()
	s.Launcher = LauncherKubernetes
	s.Kubernetes.ServiceType = "NodePort"
	s.Kubernetes.DirectorAddress = "fx-director"
	s.Kubernetes.Resources.Limits.Memory = "lots"
	_, err := s.Config(nil)
	if err == nil {
		t.Fatal("settings accepted")
	}
	for _, want := range []string{
		"kubernetes.image: is required with launcher kubernetes",
		"kubernetes.pvc: is required",
		"kubernetes.director_address: \"fx-director\": write host:port",
		"kubernetes.advertise_host: is required with kubernetes.service_type NodePort",
		"kubernetes.resources.limits.memory: \"lots\"",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not say %q:\n%v", want, err)
		}
	}
	s.Launcher = "k8s"
	if _, err := s.Config(nil); err == nil || !strings.Contains(err.Error(), "or kubernetes (each runs as a Job") {
		t.Errorf("launcher k8s: %v", err)
	}
}

// The fx-director chart's Role grants what the launcher uses, and no more.
func TestKubernetesRBACChart(t *testing.T) {
	data, err := os.ReadFile("../packaging/helm/fx-director/templates/rbac.yaml")
	must(t, err)
	text := string(data)
	_, rules, ok := strings.Cut(text, "\nrules:\n")
	rules, _, ok2 := strings.Cut(rules, "{{- end }}")
	if !ok || !ok2 {
		t.Fatal("rbac.yaml has no rules block ending the template")
	}
	var got []struct {
		APIGroups []string `yaml:"apiGroups"`
		Resources []string `yaml:"resources"`
		Verbs     []string `yaml:"verbs"`
	}
	must(t, yaml.Unmarshal([]byte(rules), &got))
	if len(got) != len(KubernetesRBAC) {
		t.Fatalf("the chart's Role has %d rules, KubernetesRBAC %d", len(got), len(KubernetesRBAC))
	}
	for i, r := range KubernetesRBAC {
		g := got[i]
		if !slices.Equal(g.APIGroups, r.APIGroups) || !slices.Equal(g.Resources, r.Resources) || !slices.Equal(g.Verbs, r.Verbs) {
			t.Errorf("the chart's rule %d is %+v, KubernetesRBAC's %+v", i, g, r)
		}
	}
}

// A LoadBalancer Service is announced at the balancer's address once it
// has one; while it has none the pod is still followed: one that fails
// meanwhile is followed by a new Job.
func TestKubernetesLauncherLoadBalancer(t *testing.T) {
	f := newK8sFixture(t)
	f.k.ServiceType = corev1.ServiceTypeLoadBalancer
	f.k.AddressPoll = time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, done := f.run(t, ctx)
	job1 := f.waitJob(t)
	pod1 := f.setPod(t, f.podOf(t, job1), readyStatus())
	f.setPod(t, pod1, endedStatus(corev1.PodFailed, 1, "Error", "lost"))
	job2 := f.waitJob(t, job1.Name)
	if n := f.served(); n != 0 {
		t.Fatalf("announced %d times before the balancer had an address", n)
	}
	f.setPod(t, f.podOf(t, job2), readyStatus())
	svc, err := kubeServices.in(f.api, k8sNS).Get(context.Background(), "fx-agg-e1")
	must(t, err)
	svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{Hostname: "lb.example.org"}}
	_, err = updateStatus(f.api, kubeServices, svc)
	must(t, err)
	eventually(t, "the address announced", func() bool { return f.served() == 1 })
	if got := a.Address(); got != "lb.example.org:50052" {
		t.Errorf("address %q, want the balancer's", got)
	}
	cancel()
	<-done
	f.nothingLeft(t)
}

// The client comes from kubeconfig, with its context's namespace unless
// kubernetes.namespace says otherwise; without kubeconfig outside a pod the
// error says what to set.
func TestKubernetesSettingsClient(t *testing.T) {
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	must(t, os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: t0k}}]
contexts: [{name: x, context: {cluster: c, user: u, namespace: fx-aggs}}]
current-context: x
`), 0o600))
	var ks KubernetesSettings
	ks.Kubeconfig, ks.Image, ks.PVC, ks.DirectorAddress = kubeconfig, "fx:1", "data", "d:1"
	ks.Resources.Limits.Memory = "4Gi"
	k, err := ks.launcher("/data")
	must(t, err)
	if k.Namespace != "fx-aggs" || k.Client == nil || k.DataDir != "/data" || k.Resources.Limits.Memory().String() != "4Gi" {
		t.Errorf("launcher: namespace %q, data %q, limits %v", k.Namespace, k.DataDir, k.Resources.Limits)
	}
	ks.Namespace = "other"
	if k, err = ks.launcher("/data"); err != nil || k.Namespace != "other" {
		t.Errorf("kubernetes.namespace other: %v, %v", k, err)
	}
	if _, err := os.Stat(inClusterNamespaceFile); err == nil {
		t.Skip("running in a pod")
	}
	ks.Kubeconfig = ""
	if _, err := ks.launcher("/data"); err == nil || !strings.Contains(err.Error(), "kubernetes.kubeconfig: not set, and the director does not run in a Kubernetes pod") {
		t.Errorf("without kubeconfig outside a pod: %v", err)
	}
}

// An API server that fails a call for a while costs a restart, with
// backoff; one that refuses the launcher's rights fails the experiment at
// once, saying so.
func TestKubernetesLauncherAPIErrors(t *testing.T) {
	f := newK8sFixture(t)
	var mu sync.Mutex
	refusals := 0
	f.cs.PrependReactor("create", "jobs", func(k8stesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		defer mu.Unlock()
		if refusals < 2 {
			refusals++
			return true, nil, apierrors.NewInternalError(errors.New("etcdserver: request timed out"))
		}
		return false, nil, nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	_, done := f.run(t, ctx)
	f.waitJob(t)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Run: %v, want context.Canceled after the job was made on the third try", err)
	}

	f = newK8sFixture(t)
	f.cs.PrependReactor("create", "services", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "services"}, "fx-agg-e1", errors.New(`User "system:serviceaccount:fx:fx" cannot create resource "services"`))
	})
	_, done = f.run(t, context.Background())
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "service fx/fx-agg-e1") || !strings.Contains(err.Error(), "cannot create resource") {
			t.Errorf("Run: %v, want the refusal", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("Run goes on without the rights to make a Service")
	}
	if n := len(f.jobs(t)); n != 0 {
		t.Errorf("%d jobs made without a Service", n)
	}
}

// A pod that is not Ready within ReadyTimeout (here its image cannot be
// pulled) counts as a death: a new Job, and past the bound the experiment
// fails saying why the pod waited.
func TestKubernetesLauncherReadyTimeout(t *testing.T) {
	f := newK8sFixture(t)
	f.k.ReadyTimeout = 2 * time.Second
	f.k.MaxRestarts = 1
	_, done := f.run(t, context.Background())
	pullFails := corev1.PodStatus{Phase: corev1.PodPending, ContainerStatuses: []corev1.ContainerStatus{{
		Name: KubernetesContainer, State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ImagePullBackOff", Message: "registry.example.org/fx:1: not found"}},
	}}}
	job1 := f.waitJob(t)
	f.setPod(t, f.podOf(t, job1), pullFails)
	job2 := f.waitJob(t, job1.Name)
	f.setPod(t, f.podOf(t, job2), pullFails)
	select {
	case err := <-done:
		for _, want := range []string{"died 2 times", "its pod was not Ready within 2s (ImagePullBackOff: registry.example.org/fx:1: not found)"} {
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("Run: %v, want it to say %q", err, want)
			}
		}
	case <-time.After(waitTimeout):
		t.Fatal("Run waits for a pod that never gets ready")
	}
	if n := f.served(); n != 0 {
		t.Errorf("announced %d times", n)
	}
	f.nothingLeft(t)
}
