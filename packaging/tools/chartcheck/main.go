// Command chartcheck reads what `helm template` renders from the fx-director
// chart (on stdin) and checks it: every document decodes strictly into its
// Kubernetes API type (an unknown or misspelt field, or a value of the
// wrong type, is an error, which `helm lint` does not catch), and the
// objects say what the chart promises: one StatefulSet with one replica,
// its data_dir on a PersistentVolumeClaim at /data, the PKI Secret mounted
// whole at /pki, the director's configuration from the ConfigMap, the
// probes on the metrics listener's /healthz and /readyz (or on the gRPC
// port without it), the metrics port kept off the main Service, and a
// director.yaml whose keys point at those mounts and ports. With
// -launcher kubernetes: a ServiceAccount that the director runs as, bound
// to a Role with exactly the rules of fx's director.KubernetesRBAC, and the
// config's kubernetes block pointing at the data claim, the PKI Secret and
// the director's Service; without it, none of those and no token mounted.
//
// packaging/check.sh runs it; -config-out writes the rendered director.yaml
// for the check that starts the director in the image with it.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"
)

type want struct {
	metrics     bool
	metricsPort int32
	grpcPort    int32
	secret      string
	advertise   string
	crl         bool
	aggMin      int32
	aggMax      int32
	claim       string
	launcher    string
}

type rendered struct {
	statefulSets []*appsv1.StatefulSet
	configMaps   []*corev1.ConfigMap
	services     []*corev1.Service
	accounts     []*corev1.ServiceAccount
	roles        []*rbacv1.Role
	bindings     []*rbacv1.RoleBinding
}

func main() {
	var w want
	var metricsPort, grpcPort, aggMin, aggMax int
	flag.BoolVar(&w.metrics, "metrics", true, "the chart was rendered with metrics.enabled")
	flag.IntVar(&metricsPort, "metrics-port", 9464, "metrics.port")
	flag.IntVar(&grpcPort, "grpc-port", 50051, "service.grpcPort")
	flag.StringVar(&w.secret, "secret", "", "pki.secretName")
	flag.StringVar(&w.advertise, "advertise", "", "config.advertise.host")
	flag.BoolVar(&w.crl, "crl", false, "pki.crl")
	flag.IntVar(&aggMin, "aggregator-min", 50100, "config.aggregator.port_min")
	flag.IntVar(&aggMax, "aggregator-max", 50109, "config.aggregator.port_max")
	flag.StringVar(&w.claim, "existing-claim", "", "persistence.existingClaim")
	flag.StringVar(&w.launcher, "launcher", "inprocess", "config.launcher")
	configOut := flag.String("config-out", "", "write the rendered director.yaml here")
	flag.Parse()
	w.metricsPort, w.grpcPort, w.aggMin, w.aggMax = int32(metricsPort), int32(grpcPort), int32(aggMin), int32(aggMax)

	r, err := decode(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "chartcheck:", err)
		os.Exit(1)
	}
	config, errs := check(r, w)
	if len(errs) > 0 {
		for _, err := range errs {
			fmt.Fprintln(os.Stderr, "chartcheck:", err)
		}
		os.Exit(1)
	}
	if *configOut != "" {
		if err := os.WriteFile(*configOut, []byte(config), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "chartcheck:", err)
			os.Exit(1)
		}
	}
	probes := "TCP on grpc"
	if w.metrics {
		probes = fmt.Sprintf("/healthz and /readyz on metrics:%d", w.metricsPort)
	}
	rbac := ""
	if w.launcher == "kubernetes" {
		rbac = fmt.Sprintf(", launcher kubernetes: %d ServiceAccount, %d Role (%d rules), %d RoleBinding", len(r.accounts), len(r.roles), len(kubernetesRBAC), len(r.bindings))
	}
	fmt.Printf("chartcheck: %d StatefulSet (1 replica, probes %s), %d ConfigMap, %d Services%s: ok\n",
		len(r.statefulSets), probes, len(r.configMaps), len(r.services), rbac)
}

// decode splits the YAML stream and decodes each document strictly.
func decode(in io.Reader) (rendered, error) {
	var r rendered
	codecs := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict)
	dec := codecs.UniversalDeserializer()
	reader := utilyaml.NewYAMLReader(bufio.NewReader(in))
	for n := 1; ; n++ {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return r, fmt.Errorf("document %d: %w", n, err)
		}
		if empty(doc) {
			continue
		}
		obj, gvk, err := dec.Decode(doc, nil, nil)
		if err != nil {
			return r, fmt.Errorf("document %d does not decode strictly: %w", n, err)
		}
		switch o := obj.(type) {
		case *appsv1.StatefulSet:
			r.statefulSets = append(r.statefulSets, o)
		case *corev1.ConfigMap:
			r.configMaps = append(r.configMaps, o)
		case *corev1.Service:
			r.services = append(r.services, o)
		case *corev1.ServiceAccount:
			r.accounts = append(r.accounts, o)
		case *rbacv1.Role:
			r.roles = append(r.roles, o)
		case *rbacv1.RoleBinding:
			r.bindings = append(r.bindings, o)
		default:
			return r, fmt.Errorf("document %d: unexpected %s", n, gvk)
		}
	}
	return r, nil
}

// empty says whether a YAML document holds only comments and blank lines.
func empty(doc []byte) bool {
	for line := range bytes.SplitSeq(doc, []byte("\n")) {
		line = bytes.TrimSpace(line)
		if len(line) > 0 && line[0] != '#' && string(line) != "---" {
			return false
		}
	}
	return true
}

func check(r rendered, w want) (string, []error) {
	var errs []error
	fail := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if len(r.statefulSets) != 1 || len(r.configMaps) != 1 || len(r.services) != 2 {
		fail("want 1 StatefulSet, 1 ConfigMap and 2 Services; got %d, %d and %d", len(r.statefulSets), len(r.configMaps), len(r.services))
		return "", errs
	}
	sts, cm := r.statefulSets[0], r.configMaps[0]

	// The StatefulSet.
	if sts.Spec.Replicas == nil || *sts.Spec.Replicas != 1 {
		fail("StatefulSet %s: want replicas 1 (one director per data_dir)", sts.Name)
	}
	pod := sts.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		fail("StatefulSet %s: want 1 container, got %d", sts.Name, len(pod.Containers))
		return "", errs
	}
	c := pod.Containers[0]
	if !slices.Equal(c.Args[len(c.Args)-3:], []string{"director", "start", "--config=/etc/fx/director.yaml"}) {
		fail("container args %q do not end in director start --config=/etc/fx/director.yaml", c.Args)
	}
	sc := pod.SecurityContext
	if sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.RunAsUser == nil || *sc.RunAsUser != 65532 || sc.FSGroup == nil || *sc.FSGroup != 65532 {
		fail("pod securityContext: want runAsNonRoot, runAsUser 65532 and fsGroup 65532 (the image's fx user)")
	}
	if c.SecurityContext == nil || c.SecurityContext.ReadOnlyRootFilesystem == nil || !*c.SecurityContext.ReadOnlyRootFilesystem {
		fail("container securityContext: want readOnlyRootFilesystem")
	}
	port := func(name string) (int32, bool) {
		for _, p := range c.Ports {
			if p.Name == name {
				return p.ContainerPort, true
			}
		}
		return 0, false
	}
	if p, ok := port("grpc"); !ok || p != w.grpcPort {
		fail("container port grpc: want %d", w.grpcPort)
	}
	for p := w.aggMin; p <= w.aggMax; p++ {
		if !slices.ContainsFunc(c.Ports, func(cp corev1.ContainerPort) bool { return cp.ContainerPort == p }) {
			fail("container: aggregator port %d is not declared", p)
		}
	}
	lp, rp := c.LivenessProbe, c.ReadinessProbe
	if lp == nil || rp == nil {
		fail("container: want liveness and readiness probes")
	} else if w.metrics {
		if p, ok := port("metrics"); !ok || p != w.metricsPort {
			fail("container port metrics: want %d", w.metricsPort)
		}
		if lp.HTTPGet == nil || lp.HTTPGet.Path != "/healthz" || lp.HTTPGet.Port.String() != "metrics" {
			fail("liveness probe: want GET /healthz on port metrics, got %+v", lp.ProbeHandler)
		}
		if rp.HTTPGet == nil || rp.HTTPGet.Path != "/readyz" || rp.HTTPGet.Port.String() != "metrics" {
			fail("readiness probe: want GET /readyz on port metrics, got %+v", rp.ProbeHandler)
		}
		a := sts.Spec.Template.Annotations
		if a["prometheus.io/scrape"] != "true" || a["prometheus.io/port"] != strconv.Itoa(int(w.metricsPort)) || a["prometheus.io/path"] != "/metrics" {
			fail("pod annotations: want prometheus.io/scrape true, port %d, path /metrics; got %v", w.metricsPort, a)
		}
	} else {
		if _, ok := port("metrics"); ok {
			fail("container: a metrics port without metrics.enabled")
		}
		if lp.TCPSocket == nil || rp.TCPSocket == nil || lp.TCPSocket.Port.String() != "grpc" || rp.TCPSocket.Port.String() != "grpc" {
			fail("probes without metrics: want TCP on port grpc")
		}
	}

	// Volumes and their mounts.
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m
		if m.SubPath != "" {
			fail("volume mount %s uses subPath %q: updated Secrets and ConfigMaps would not reach the director", m.Name, m.SubPath)
		}
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = v
	}
	if v := volumes["pki"]; v.Secret == nil || v.Secret.SecretName != w.secret || len(v.Secret.Items) != 0 {
		fail("volume pki: want the whole Secret %q", w.secret)
	}
	if m := mounts["pki"]; m.MountPath != "/pki" || !m.ReadOnly {
		fail("volume pki: want mounted read-only at /pki")
	}
	if v := volumes["config"]; v.ConfigMap == nil || v.ConfigMap.Name != cm.Name {
		fail("volume config: want ConfigMap %s", cm.Name)
	}
	if m := mounts["config"]; m.MountPath != "/etc/fx" {
		fail("volume config: want mounted at /etc/fx")
	}
	if w.claim == "" {
		if len(sts.Spec.VolumeClaimTemplates) != 1 || sts.Spec.VolumeClaimTemplates[0].Name != "data" {
			fail("want one volumeClaimTemplate, data")
		}
	} else if v := volumes["data"]; v.PersistentVolumeClaim == nil || v.PersistentVolumeClaim.ClaimName != w.claim || len(sts.Spec.VolumeClaimTemplates) != 0 {
		fail("volume data: want the existing claim %q and no volumeClaimTemplates", w.claim)
	}
	if m := mounts["data"]; m.MountPath != "/data" || m.ReadOnly {
		fail("volume data: want mounted read-write at /data")
	}
	if m := mounts["tmp"]; m.MountPath != "/tmp" {
		fail("volume tmp: want an emptyDir at /tmp (the root file system is read-only)")
	}

	// The Services.
	var main, headless *corev1.Service
	for _, s := range r.services {
		if s.Spec.ClusterIP == corev1.ClusterIPNone {
			headless = s
		} else {
			main = s
		}
	}
	if main == nil || headless == nil {
		fail("want a Service and a headless Service")
		return "", errs
	}
	if sts.Spec.ServiceName != headless.Name {
		fail("StatefulSet serviceName %q: want the headless Service %q", sts.Spec.ServiceName, headless.Name)
	}
	svcPort := func(s *corev1.Service, p int32) bool {
		return slices.ContainsFunc(s.Spec.Ports, func(sp corev1.ServicePort) bool { return sp.Port == p })
	}
	if !svcPort(main, w.grpcPort) {
		fail("Service %s: no port %d", main.Name, w.grpcPort)
	}
	for p := w.aggMin; p <= w.aggMax; p++ {
		if !svcPort(main, p) {
			fail("Service %s: aggregator port %d is not exposed", main.Name, p)
		}
	}
	if svcPort(main, w.metricsPort) {
		fail("Service %s exposes the metrics port %d, which has no TLS", main.Name, w.metricsPort)
	}
	if w.metrics != svcPort(headless, w.metricsPort) {
		fail("headless Service %s: metrics port %d present %v, want %v", headless.Name, w.metricsPort, !w.metrics, w.metrics)
	}
	for _, s := range r.services {
		for k, v := range sts.Spec.Selector.MatchLabels {
			if s.Spec.Selector[k] != v {
				fail("Service %s does not select the StatefulSet's pods (%s=%s)", s.Name, k, v)
			}
		}
	}

	// The director's configuration.
	text, ok := cm.Data["director.yaml"]
	if !ok {
		fail("ConfigMap %s: no director.yaml", cm.Name)
		return "", errs
	}
	var cfg struct {
		ListenAddress string `json:"listen_address"`
		DataDir       string `json:"data_dir"`
		Advertise     struct {
			Host string `json:"host"`
		} `json:"advertise"`
		TLS struct {
			Cert, Key, CA, CRL string
		} `json:"tls"`
		Aggregator struct {
			Host    string `json:"host"`
			PortMin int32  `json:"port_min"`
			PortMax int32  `json:"port_max"`
		} `json:"aggregator"`
		Metrics *struct {
			Listen string `json:"listen"`
		} `json:"metrics"`
		Launcher   string `json:"launcher"`
		Kubernetes *struct {
			PVC             string `json:"pvc"`
			Namespace       string `json:"namespace"`
			DirectorAddress string `json:"director_address"`
			TLSSecret       string `json:"tls_secret"`
			Image           string `json:"image"`
		} `json:"kubernetes"`
	}
	if err := yaml.Unmarshal([]byte(text), &cfg); err != nil {
		fail("director.yaml: %v", err)
		return "", errs
	}
	if cfg.ListenAddress != fmt.Sprintf("0.0.0.0:%d", w.grpcPort) {
		fail("director.yaml listen_address %q: want 0.0.0.0:%d", cfg.ListenAddress, w.grpcPort)
	}
	if cfg.DataDir != "/data" {
		fail("director.yaml data_dir %q: want /data (the volume)", cfg.DataDir)
	}
	if cfg.Advertise.Host != w.advertise {
		fail("director.yaml advertise.host %q: want %q", cfg.Advertise.Host, w.advertise)
	}
	wantCRL := ""
	if w.crl {
		wantCRL = "/pki/crl.pem"
	}
	if cfg.TLS.Cert != "/pki/tls.crt" || cfg.TLS.Key != "/pki/tls.key" || cfg.TLS.CA != "/pki/ca.crt" || cfg.TLS.CRL != wantCRL {
		fail("director.yaml tls %+v: want the Secret's files under /pki (crl %q)", cfg.TLS, wantCRL)
	}
	if cfg.Aggregator.Host != "0.0.0.0" || cfg.Aggregator.PortMin != w.aggMin || cfg.Aggregator.PortMax != w.aggMax {
		fail("director.yaml aggregator %+v: want host 0.0.0.0, ports %d-%d", cfg.Aggregator, w.aggMin, w.aggMax)
	}
	switch {
	case w.metrics && (cfg.Metrics == nil || cfg.Metrics.Listen != fmt.Sprintf("0.0.0.0:%d", w.metricsPort)):
		fail("director.yaml metrics %+v: want listen 0.0.0.0:%d", cfg.Metrics, w.metricsPort)
	case !w.metrics && cfg.Metrics != nil:
		fail("director.yaml has metrics without metrics.enabled")
	}
	checkLauncher(r, w, sts, fail)
	if w.launcher == "kubernetes" {
		claim := w.claim
		if claim == "" {
			claim = "data-" + sts.Name + "-0"
		}
		wantAddr := fmt.Sprintf("%s.%s.svc:%d", main.Name, namespace, w.grpcPort)
		switch k := cfg.Kubernetes; {
		case cfg.Launcher != "kubernetes" || k == nil:
			fail("director.yaml: launcher %q, kubernetes %v: want launcher kubernetes and its block", cfg.Launcher, k)
		case k.PVC != claim || k.TLSSecret != w.secret || k.DirectorAddress != wantAddr || k.Namespace != namespace || k.Image == "":
			fail("director.yaml kubernetes %+v: want pvc %s (data_dir's claim), tls_secret %s, director_address %s, namespace %s and an image", *k, claim, w.secret, wantAddr, namespace)
		}
	} else if cfg.Kubernetes != nil {
		fail("director.yaml has a kubernetes block with launcher %q", cfg.Launcher)
	}
	return text, errs
}

// namespace is helm template's release namespace.
const namespace = "default"

// kubernetesRBAC mirrors fx's director.KubernetesRBAC (director/
// launcher_kubernetes.go): what the kubernetes launcher asks of the API
// server. A test in fx compares that with the chart's rbac.yaml too.
var kubernetesRBAC = []rbacv1.PolicyRule{
	{APIGroups: []string{"batch"}, Resources: []string{"jobs"}, Verbs: []string{"create", "list", "delete"}},
	{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"watch"}},
	{APIGroups: []string{""}, Resources: []string{"services"}, Verbs: []string{"create", "get", "delete"}},
	{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"create", "get", "update", "delete"}},
}

// checkLauncher checks the ServiceAccount, Role and RoleBinding that the
// kubernetes launcher needs, and their absence otherwise.
func checkLauncher(r rendered, w want, sts *appsv1.StatefulSet, fail func(string, ...any)) {
	pod := sts.Spec.Template.Spec
	automount := pod.AutomountServiceAccountToken != nil && *pod.AutomountServiceAccountToken
	if w.launcher != "kubernetes" {
		if len(r.accounts)+len(r.roles)+len(r.bindings) > 0 || automount || pod.ServiceAccountName != "" {
			fail("launcher %s: want no ServiceAccount, Role or RoleBinding and no service account token in the pod", w.launcher)
		}
		return
	}
	if len(r.accounts) != 1 || len(r.roles) != 1 || len(r.bindings) != 1 {
		fail("launcher kubernetes: want 1 ServiceAccount, 1 Role and 1 RoleBinding; got %d, %d and %d", len(r.accounts), len(r.roles), len(r.bindings))
		return
	}
	sa, role, rb := r.accounts[0], r.roles[0], r.bindings[0]
	if pod.ServiceAccountName != sa.Name || !automount {
		fail("StatefulSet %s: runs as %q (token mounted %v), want ServiceAccount %s with its token", sts.Name, pod.ServiceAccountName, automount, sa.Name)
	}
	if len(role.Rules) != len(kubernetesRBAC) {
		fail("Role %s: %d rules, want %d", role.Name, len(role.Rules), len(kubernetesRBAC))
	} else {
		for i, want := range kubernetesRBAC {
			got := role.Rules[i]
			if !slices.Equal(got.APIGroups, want.APIGroups) || !slices.Equal(got.Resources, want.Resources) || !slices.Equal(got.Verbs, want.Verbs) ||
				len(got.ResourceNames)+len(got.NonResourceURLs) > 0 {
				fail("Role %s rule %d: %+v, want %+v", role.Name, i, got, want)
			}
		}
	}
	if rb.RoleRef.Kind != "Role" || rb.RoleRef.Name != role.Name || rb.RoleRef.APIGroup != rbacv1.GroupName {
		fail("RoleBinding %s: binds %+v, want Role %s", rb.Name, rb.RoleRef, role.Name)
	}
	if len(rb.Subjects) != 1 || rb.Subjects[0].Kind != "ServiceAccount" || rb.Subjects[0].Name != sa.Name || rb.Subjects[0].Namespace != namespace {
		fail("RoleBinding %s: subjects %+v, want ServiceAccount %s/%s", rb.Name, rb.Subjects, namespace, sa.Name)
	}
}
