{{- define "rlhf-operator.monitoringLabels" -}}
{{ include "rlhf-operator.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The namespaces whose pods the workload PodMonitors select: the watched ones, or all. */}}
{{- define "rlhf-operator.monitoredNamespaces" -}}
{{- if .Values.watchNamespaces -}}
matchNames:
{{- toYaml .Values.watchNamespaces | nindent 2 }}
{{- else -}}
any: true
{{- end -}}
{{- end -}}

{{/*
Children carry rlhf.dev/run, rlhf.dev/stage and rlhf.dev/component; they become the `run`,
`stage` and `component` target labels that the alerts and the dashboard group by.
*/}}
{{- define "rlhf-operator.runRelabelings" -}}
- sourceLabels: [__meta_kubernetes_pod_label_rlhf_dev_run]
  targetLabel: run
- sourceLabels: [__meta_kubernetes_pod_label_rlhf_dev_stage]
  targetLabel: stage
- sourceLabels: [__meta_kubernetes_pod_label_rlhf_dev_component]
  targetLabel: component
{{- end -}}
