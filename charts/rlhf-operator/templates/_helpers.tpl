{{/* Names, labels and the fixed ports of the operator. */}}

{{- define "rlhf-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rlhf-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "rlhf-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rlhf-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "rlhf-operator.labels" -}}
helm.sh/chart: {{ include "rlhf-operator.chart" . }}
{{ include "rlhf-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhf-operator
{{- end -}}

{{- define "rlhf-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rlhf-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* `repository:tag`, the tag defaulting to the chart's appVersion. */}}
{{- define "rlhf-operator.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}

{{/* The operator's ports are fixed by `rlhf operator`; they are not values. */}}
{{- define "rlhf-operator.metricsPort" -}}8080{{- end -}}
{{- define "rlhf-operator.healthPort" -}}8081{{- end -}}
{{- define "rlhf-operator.webhookPort" -}}9443{{- end -}}
{{- define "rlhf-operator.webhookCertDir" -}}/etc/rlhf/webhook-tls{{- end -}}
{{- define "rlhf-operator.webhookPath" -}}/validate-rlhfrun{{- end -}}

{{- define "rlhf-operator.webhookServiceName" -}}
{{- printf "%s-webhook" (include "rlhf-operator.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rlhf-operator.webhookSecretName" -}}
{{- if .Values.webhook.certManager.enabled -}}
{{- printf "%s-webhook-tls" (include "rlhf-operator.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- .Values.webhook.tlsSecretName -}}
{{- end -}}
{{- end -}}

{{/*
Values that contradict each other fail the render with a message that says what to change.
Included once, from deployment.yaml, so every install passes through it.
*/}}
{{- define "rlhf-operator.validateValues" -}}
{{- $webhook := .Values.webhook -}}
{{- if and $webhook.enabled (not $webhook.certManager.enabled) (not $webhook.tlsSecretName) -}}
{{- fail "webhook.enabled needs TLS for the webhook server: set webhook.certManager.enabled=true (cert-manager issues the certificate), or webhook.tlsSecretName to an existing kubernetes.io/tls Secret together with webhook.caBundle" -}}
{{- end -}}
{{- if and $webhook.certManager.enabled $webhook.tlsSecretName -}}
{{- fail "webhook.certManager.enabled and webhook.tlsSecretName both name the webhook's certificate: set only one of them" -}}
{{- end -}}
{{- if and $webhook.tlsSecretName (not $webhook.caBundle) -}}
{{- fail "webhook.tlsSecretName needs webhook.caBundle (the base64 PEM CA that signed it), or the API server cannot verify the webhook; or use webhook.certManager.enabled=true instead" -}}
{{- end -}}
{{- if and (not $webhook.enabled) (or $webhook.certManager.enabled $webhook.tlsSecretName) -}}
{{- fail "webhook.certManager.enabled or webhook.tlsSecretName is set but webhook.enabled is false: set webhook.enabled=true, or unset the certificate settings" -}}
{{- end -}}
{{- $mon := .Values.monitoring -}}
{{- if and $mon.podMonitor.enabled $mon.podMonitor.operator $mon.serviceMonitor.enabled -}}
{{- fail "monitoring.podMonitor.operator and monitoring.serviceMonitor.enabled would both scrape the operator, doubling its series: set monitoring.podMonitor.operator=false, or monitoring.serviceMonitor.enabled=false" -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) -}}
{{- fail "serviceAccount.create=false needs serviceAccount.name: the name of an existing ServiceAccount for the operator" -}}
{{- end -}}
{{- if ne (len (uniq .Values.watchNamespaces)) (len .Values.watchNamespaces) -}}
{{- fail (printf "watchNamespaces lists a namespace more than once: %v" .Values.watchNamespaces) -}}
{{- end -}}
{{- end -}}
