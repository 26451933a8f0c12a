{{/* The chart's name, and the release's full name (at most 63 characters). */}}
{{- define "fx-director.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fx-director.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fx-director.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fx-director.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fx-director.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fx-director.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: director
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The director's configuration: .Values.config with the keys the chart owns
(where the pod listens, keeps its data and finds its PKI) laid over it.
*/}}
{{- define "fx-director.config" -}}
{{- range $key := list "listen_address" "data_dir" "tls" "metrics" }}
{{- if hasKey $.Values.config $key }}
{{- fail (printf "config.%s is set by the chart (from service.grpcPort, persistence, pki and metrics): remove it from config" $key) }}
{{- end }}
{{- end }}
{{- $pki := required "pki.secretName is required: the Secret with the director's tls.crt, tls.key and ca.crt" .Values.pki.secretName -}}
{{- $host := required "config.advertise.host is required: the host envoys dial to reach aggregators (among the certificate's SANs)" .Values.config.advertise.host -}}
{{- $tls := dict "cert" "/pki/tls.crt" "key" "/pki/tls.key" "ca" "/pki/ca.crt" "crl" (ternary "/pki/crl.pem" "" (.Values.pki.crl | default false)) -}}
{{- $owned := dict "listen_address" (printf "0.0.0.0:%d" (int .Values.service.grpcPort)) "data_dir" "/data" "tls" $tls -}}
{{- if .Values.metrics.enabled -}}
{{- $_ := set $owned "metrics" (dict "listen" (printf "0.0.0.0:%d" (int .Values.metrics.port))) -}}
{{- end -}}
{{- if eq (include "fx-director.launcher" .) "kubernetes" -}}
{{- $k := deepCopy (.Values.config.kubernetes | default dict) -}}
{{- range $key := list "pvc" "namespace" "director_address" "tls_secret" "kubeconfig" }}
{{- if hasKey $k $key }}
{{- fail (printf "config.kubernetes.%s is set by the chart (the data claim, the release's namespace, the director's Service, pki.secretName, the pod's service account): remove it from config" $key) }}
{{- end }}
{{- end }}
{{- $_ := set $k "pvc" (include "fx-director.dataClaim" .) -}}
{{- $_ := set $k "namespace" .Release.Namespace -}}
{{- $_ := set $k "director_address" (printf "%s.%s.svc:%d" (include "fx-director.fullname" .) .Release.Namespace (int .Values.service.grpcPort)) -}}
{{- $_ := set $k "tls_secret" $pki -}}
{{- if not $k.image }}
{{- $_ := set $k "image" (include "fx-director.image" .) -}}
{{- $_ := set $k "image_pull_policy" .Values.image.pullPolicy -}}
{{- end }}
{{- $_ := set $owned "kubernetes" $k -}}
{{- end -}}
{{- toYaml (mergeOverwrite (deepCopy .Values.config) $owned) -}}
{{- end }}

{{/* The aggregator ports, checked: both set, min ≤ max, at most 100. */}}
{{- define "fx-director.aggregatorPorts" -}}
{{- $lo := int (.Values.config.aggregator.port_min | default 0) -}}
{{- $hi := int (.Values.config.aggregator.port_max | default 0) -}}
{{- if or (eq $lo 0) (eq $hi 0) (gt $lo $hi) (gt (sub $hi $lo) 99) -}}
{{- fail (printf "config.aggregator.port_min/port_max = %d-%d: give a range of 1 to 100 ports (the Service exposes each; ephemeral ports cannot be exposed)" $lo $hi) -}}
{{- end -}}
{{- range $p := untilStep $lo (int (add $hi 1)) 1 }}
{{ $p }}
{{- end -}}
{{- end }}

{{/* The fx image, which the director and its aggregator pods run. */}}
{{- define "fx-director.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* config.launcher: inprocess (the default), process or kubernetes. */}}
{{- define "fx-director.launcher" -}}
{{ .Values.config.launcher | default "inprocess" }}
{{- end }}

{{/* The claim data_dir is on: the existing one, or the StatefulSet's. */}}
{{- define "fx-director.dataClaim" -}}
{{- if .Values.persistence.existingClaim -}}
{{ .Values.persistence.existingClaim }}
{{- else -}}
data-{{ include "fx-director.fullname" . }}-0
{{- end -}}
{{- end }}
