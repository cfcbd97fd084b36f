{{/*
Helpers of the objects that fit the chart into a cluster's ecosystem: PodDisruptionBudget,
NetworkPolicy, the Prometheus Operator's PodMonitor / ServiceMonitor / PrometheusRule and KEDA's
ScaledObject. Each object's own checks run in its template, so they apply exactly when it renders.
*/}}

{{/*
wsgate.requireApi: (list $root "group/version/Kind" "value.enabled" "what to install"). Fails the
render when the cluster does not serve the object's API. Without it `helm install` stops with
"no matches for kind", and `helm template` output is rejected only when applied; this says which
value asked for the object and what is missing. Helm fills .Capabilities.APIVersions from the
cluster; `helm template` has no cluster and knows only what --api-versions names.
*/}}
{{- define "wsgate.requireApi" -}}
{{- $root := index . 0 -}}
{{- $api := index . 1 -}}
{{- $value := index . 2 -}}
{{- $install := index . 3 -}}
{{- if not ($root.Capabilities.APIVersions.Has $api) -}}
{{- fail (printf "%s=true needs the %s API, which this cluster does not serve: install %s first, or set %s=false. Rendering without a cluster (helm template): name the API with --api-versions %s" $value $api $install $value $api) -}}
{{- end -}}
{{- end -}}

{{- define "wsgate.requirePrometheusOperator" -}}
{{- include "wsgate.requireApi" (list (index . 0) (printf "monitoring.coreos.com/v1/%s" (index . 1)) (index . 2) "the Prometheus Operator's CRDs (kube-prometheus-stack, or the prometheus-operator-crds chart)") -}}
{{- end -}}

{{/*
wsgate.monitoringMetadata: (list $root $values) the namespace, labels and annotations of a
PodMonitor, ServiceMonitor or PrometheusRule: the chart's labels plus the object's `labels`
(kube-prometheus-stack selects by `release`), its `annotations`, and its `namespace` when set.
*/}}
{{- define "wsgate.monitoringMetadata" -}}
{{- $root := index . 0 -}}
{{- $v := index . 1 -}}
name: {{ include "wsgate.fullname" $root }}
{{- with $v.namespace }}
namespace: {{ . }}
{{- end }}
labels:
  {{- include "wsgate.labels" $root | nindent 2 }}
  {{- with $v.labels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $v.annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
wsgate.monitorNamespaceSelector: a monitor placed in another namespace (podMonitor.namespace,
serviceMonitor.namespace) selects in its own namespace by default; this points it back at the
release's. Empty when the monitor lives in the release's namespace.
*/}}
{{- define "wsgate.monitorNamespaceSelector" -}}
{{- $root := index . 0 -}}
{{- $v := index . 1 -}}
{{- if and $v.namespace (ne $v.namespace $root.Release.Namespace) -}}
namespaceSelector:
  matchNames:
    - {{ $root.Release.Namespace }}
{{- end -}}
{{- end -}}

{{/*
wsgate.scrapeJob: the `job` label the Prometheus Operator gives the release's targets: a PodMonitor's
is <its namespace>/<its name>, a ServiceMonitor's the name of the Service it scrapes. "" when the
chart renders neither.
*/}}
{{- define "wsgate.scrapeJob" -}}
{{- if .Values.podMonitor.enabled -}}
{{- printf "%s/%s" (.Values.podMonitor.namespace | default .Release.Namespace) (include "wsgate.fullname" .) -}}
{{- else if .Values.serviceMonitor.enabled -}}
{{- include "wsgate.metricsServiceName" . -}}
{{- end -}}
{{- end -}}

{{- define "wsgate.metricsServiceName" -}}
{{- printf "%s-metrics" (include "wsgate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
wsgate.targetSelector: the label matchers of WsgateTargetMissing's `up` series (see values:
prometheusRule.targetMissing.selector); "" when the chart cannot know them (no selector given and
neither monitor rendered): the alert is then left out, as a guess could only be wrong.
*/}}
{{- define "wsgate.targetSelector" -}}
{{- $sel := .Values.prometheusRule.targetMissing.selector -}}
{{- if $sel -}}
{{- $sel -}}
{{- else if include "wsgate.scrapeJob" . -}}
{{- printf "namespace=%q, job=%q" .Release.Namespace (include "wsgate.scrapeJob" .) -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.runbookUrl: (list $root "AlertName") the alert's runbook section in docs/operations.md:
GitHub's anchor of a heading is its text in lower case.
*/}}
{{- define "wsgate.runbookUrl" -}}
{{- printf "%s#%s" ((index . 0).Values.prometheusRule.runbookBaseUrl | trimSuffix "/") (lower (index . 1)) -}}
{{- end -}}

{{/*
wsgate.autoscaled: "true" when something else owns the replica count (the HPA or KEDA's).
*/}}
{{- define "wsgate.autoscaled" -}}
{{- if or .Values.autoscaling.enabled .Values.keda.enabled -}}true{{- end -}}
{{- end -}}

{{/*
wsgate.targetConnectionsPerPod: (list $root $target "value name") the scaling target: the value
given, or 70 % of maxClients.
*/}}
{{- define "wsgate.targetConnectionsPerPod" -}}
{{- $root := index . 0 -}}
{{- $target := index . 1 -}}
{{- if kindIs "invalid" $target -}}
{{- if le (int64 $root.Values.maxClients) 0 -}}
{{- fail (printf "%s is required when maxClients is 0 (unlimited)" (index . 2)) -}}
{{- end -}}
{{- mulf (float64 $root.Values.maxClients) 0.7 | floor | int64 -}}
{{- else -}}
{{- $target | int64 -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.pdbEnabled: "true" when the PodDisruptionBudget renders (see values: podDisruptionBudget.enabled).
*/}}
{{- define "wsgate.pdbEnabled" -}}
{{- $p := .Values.podDisruptionBudget -}}
{{- if kindIs "invalid" $p.enabled -}}
{{- if and .Values.deployment.enabled (or (gt (int64 .Values.replicaCount) 1) (include "wsgate.autoscaled" .)) -}}true{{- end -}}
{{- else if $p.enabled -}}true{{- end -}}
{{- end -}}

{{/*
wsgate.validatePdb: exactly one of minAvailable / maxUnavailable, and a budget that can ever allow
an eviction: one that never does makes every node drain hang until someone deletes it.
*/}}
{{- define "wsgate.validatePdb" -}}
{{- $p := .Values.podDisruptionBudget -}}
{{- $min := $p.minAvailable -}}
{{- $max := $p.maxUnavailable -}}
{{- if eq (kindIs "invalid" $min) (kindIs "invalid" $max) -}}
{{- fail (printf "podDisruptionBudget: set exactly one of minAvailable (%v) and maxUnavailable (%v); the other must be null" $min $max) -}}
{{- end -}}
{{- if not (kindIs "invalid" $max) -}}
{{- if or (eq (toString $max) "0") (eq (toString $max) "0%") -}}
{{- fail (printf "podDisruptionBudget.maxUnavailable (%v) allows no eviction at all: every node drain would hang on these pods" $max) -}}
{{- end -}}
{{- else -}}
{{- if eq (toString $min) "100%" -}}
{{- fail "podDisruptionBudget.minAvailable (100%) allows no eviction at all: every node drain would hang on these pods" -}}
{{- end -}}
{{- if not (kindIs "string" $min) -}}
{{- $pods := int64 .Values.replicaCount -}}
{{- $what := "replicaCount" -}}
{{- if .Values.autoscaling.enabled -}}
{{- $pods = int64 .Values.autoscaling.minReplicas -}}{{- $what = "autoscaling.minReplicas" -}}
{{- else if .Values.keda.enabled -}}
{{- $pods = int64 .Values.keda.minReplicas -}}{{- $what = "keda.minReplicas" -}}
{{- end -}}
{{- if ge (int64 $min) $pods -}}
{{- fail (printf "podDisruptionBudget.minAvailable (%v) must be below %s (%v): with as many pods as the budget keeps, no eviction is ever allowed and every node drain would hang" $min $what $pods) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.validatePorts: the app and wsgate share the pod's network namespace, so no two of app.port,
ports.client and ports.admin can be the same. An app.port equal to ports.client would also make
wsgate (upstream 127.0.0.1:<app.port>) forward every request to itself. app.port matters when the
app runs in the pod or is the upstream (upstream empty).
*/}}
{{- define "wsgate.validatePorts" -}}
{{- $client := int64 .Values.ports.client -}}
{{- $admin := int64 .Values.ports.admin -}}
{{- if eq $client $admin -}}
{{- fail (printf "ports.client (%d) and ports.admin (%d) must differ: wsgate listens on both" $client $admin) -}}
{{- end -}}
{{- if or .Values.app.enabled (not .Values.upstream) -}}
{{- $app := int64 .Values.app.port -}}
{{- if eq $app $client -}}
{{- fail (printf "app.port (%d) equals ports.client (%d): the app and wsgate share the pod's network, and wsgate would forward to its own client port (a loop); give the app another port" $app $client) -}}
{{- end -}}
{{- if eq $app $admin -}}
{{- fail (printf "app.port (%d) equals ports.admin (%d): the app and wsgate share the pod's network, and wsgate would forward clients to its own admin port; give the app another port" $app $admin) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.extraVolumeMounts / wsgate.extraVolumes: the operator's extras (values: extraVolumeMounts,
extraVolumes), appended to the chart's own.
*/}}
{{- define "wsgate.extraVolumeMounts" -}}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "wsgate.extraVolumes" -}}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
wsgate.alertMeta: (list $root $alertValues "AlertName") the labels of one alert (its severity and
prometheusRule.additionalAlertLabels) and the start of its annotations (runbook_url), to be
followed by the alert's own annotations.
*/}}
{{- define "wsgate.alertMeta" -}}
{{- $root := index . 0 -}}
{{- $a := index . 1 -}}
labels:
  severity: {{ $a.severity }}
  {{- with $root.Values.prometheusRule.additionalAlertLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  runbook_url: {{ include "wsgate.runbookUrl" (list $root (index . 2)) }}
{{- end -}}
