{{/* The base name of every object. */}}
{{- define "agentgate.name" -}}
{{- default "agentgate" .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "agentgate.labels" -}}
app.kubernetes.io/name: agentgate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "agentgate.selector" -}}
app.kubernetes.io/name: agentgate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "agentgate.operatorImage" -}}
{{- printf "%s:%s" .Values.image.operator.repository (default .Chart.AppVersion .Values.image.operator.tag) -}}
{{- end -}}

{{- define "agentgate.sidecarImage" -}}
{{- printf "%s:%s" .Values.image.sidecar.repository (default .Chart.AppVersion .Values.image.sidecar.tag) -}}
{{- end -}}

{{/* How the API server reaches a webhook path. */}}
{{- define "agentgate.clientConfig" -}}
{{- if .root.Values.webhook.url }}
url: {{ printf "%s%s" (trimSuffix "/" .root.Values.webhook.url) .path | quote }}
{{- else }}
service:
  namespace: {{ .root.Release.Namespace }}
  name: {{ include "agentgate.name" .root }}-webhook
  path: {{ .path }}
  port: 443
{{- end }}
{{- end -}}
