{{/* Names, labels and small computed values shared by every template. */}}

{{- define "kscope.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
"<release>-<chart>", or just the release name when it already contains the chart name. Truncated
to 53 so that "-processor" still fits the 63-character DNS label limit.
*/}}
{{- define "kscope.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 53 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 53 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 53 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kscope.agent.fullname" -}}
{{- printf "%s-agent" (include "kscope.fullname" .) }}
{{- end }}

{{- define "kscope.processor.fullname" -}}
{{- printf "%s-processor" (include "kscope.fullname" .) }}
{{- end }}

{{- define "kscope.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "kscope.labels" -}}
helm.sh/chart: {{ include "kscope.chart" . }}
{{ include "kscope.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kscope
{{- end }}

{{/* Selector labels: stable across upgrades (a selector cannot change). */}}
{{- define "kscope.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kscope.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kscope.agent.labels" -}}
{{ include "kscope.labels" . }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "kscope.agent.selectorLabels" -}}
{{ include "kscope.selectorLabels" . }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "kscope.processor.labels" -}}
{{ include "kscope.labels" . }}
app.kubernetes.io/component: processor
{{- end }}

{{- define "kscope.processor.selectorLabels" -}}
{{ include "kscope.selectorLabels" . }}
app.kubernetes.io/component: processor
{{- end }}

{{- define "kscope.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "kscope.agent.fullname" .) .Values.agent.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kscope.processor.serviceAccountName" -}}
{{- if .Values.processor.serviceAccount.create }}
{{- default (include "kscope.processor.fullname" .) .Values.processor.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.processor.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository:tag" for one component; call with (dict "image" .Values.agent.image "root" $). */}}
{{- define "kscope.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The processor Service's cluster DNS name, the name its TLS certificate must carry. */}}
{{- define "kscope.processor.host" -}}
{{- printf "%s.%s.svc" (include "kscope.processor.fullname" .) .Release.Namespace }}
{{- end }}

{{/* Where agents send batches. */}}
{{- define "kscope.processor.address" -}}
{{- printf "%s:%d" (include "kscope.processor.host" .) (int .Values.processor.service.grpcPort) }}
{{- end }}

{{- define "kscope.tls.serverName" -}}
{{- default (include "kscope.processor.host" .) .Values.tls.serverName }}
{{- end }}

{{- define "kscope.tls.secretName" -}}
{{- required "tls.secretName is required when tls.enabled is true" .Values.tls.secretName }}
{{- end }}

{{- define "kscope.otlp.headersSecretName" -}}
{{- if .Values.otlp.headersSecret.name }}
{{- .Values.otlp.headersSecret.name }}
{{- else if .Values.otlp.headers }}
{{- printf "%s-otlp-headers" (include "kscope.fullname" .) }}
{{- end }}
{{- end }}

{{/* Where the TLS Secret is mounted in both components. */}}
{{- define "kscope.tls.mountPath" -}}
/etc/kscope/tls
{{- end }}
