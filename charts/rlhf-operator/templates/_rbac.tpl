{{/*
RBAC rules from the one list in files/rbac-rules.yaml.
`rlhf-operator.rbacRules` takes (list $ "all"|"namespaced"|"cluster") and renders PolicyRules:
"all" every rule for cluster-wide mode, "namespaced" the rules a Role can grant, "cluster" the
clusterScoped ones for namespaced mode (including the namespacedModeOnly ones).
*/}}
{{- define "rlhf-operator.rbacRules" -}}
{{- $root := index . 0 -}}
{{- $which := index . 1 -}}
{{- $rules := list -}}
{{- range $rule := $root.Files.Get "files/rbac-rules.yaml" | fromYamlArray -}}
{{- $cluster := default false $rule.clusterScoped -}}
{{- $nsOnly := default false $rule.namespacedModeOnly -}}
{{- if or (and (eq $which "all") (not $nsOnly)) (and (eq $which "cluster") $cluster) (and (eq $which "namespaced") (not $cluster)) -}}
{{- $rules = append $rules (omit $rule "clusterScoped" "namespacedModeOnly") -}}
{{- end -}}
{{- end -}}
{{- toYaml $rules -}}
{{- end -}}
