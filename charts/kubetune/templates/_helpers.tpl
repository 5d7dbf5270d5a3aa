{{/* The chart's name, or nameOverride. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects. Truncated to 63 characters because some Kubernetes
name fields are limited to that (DNS-1123 labels); the release name is used alone when it
already contains the chart's name.
*/}}
{{- define "kubetune.fullname" -}}
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

{{/* The chart label: name and version. */}}
{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the release. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the operator's pods; they never change after the first install. */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "ERROR: serviceAccount.create is false, so serviceAccount.name must name an existing ServiceAccount" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator's image: repository, then the digest if set, else the tag (default appVersion). */}}
{{- define "kubetune.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The worker image the operator gives jobs that keep the default. */}}
{{- define "kubetune.trainerImage" -}}
{{- default (printf "kubetune/trainer:%s" .Chart.AppVersion) .Values.operator.trainerImage }}
{{- end }}

{{/* The namespace the operator serves; empty for every namespace. */}}
{{- define "kubetune.watchNamespace" -}}
{{- if eq .Values.scope "Namespace" }}
{{- default .Release.Namespace .Values.watchNamespace }}
{{- end }}
{{- end }}

{{/* Labels of the pods the operator creates (workers and preflight), as in kubetune.operator.manifests. */}}
{{- define "kubetune.trainingPodLabels" -}}
app.kubernetes.io/managed-by: kubetune
{{- end }}

{{/* Refuse values that contradict each other, before anything is created. */}}
{{- define "kubetune.validate" -}}
{{- if and .Values.watchNamespace (ne .Values.scope "Namespace") }}
{{- fail "ERROR: watchNamespace is set but scope is Cluster (which serves every namespace); set scope: Namespace, or leave watchNamespace empty" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "ERROR: metrics.serviceMonitor.enabled needs metrics.service.enabled: the ServiceMonitor scrapes through that Service" }}
{{- end }}
{{- if eq (int .Values.operator.metricsPort) (int .Values.operator.healthPort) }}
{{- fail "ERROR: operator.metricsPort and operator.healthPort must differ" }}
{{- end }}
{{- end }}
