{{/*
Names and labels.
*/}}
{{- define "wsgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "wsgate.fullname" -}}
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

{{- define "wsgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wsgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wsgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "wsgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/*
wsgate.durationSeconds: a humantime duration ("250ms", "5s", "2m", "1m 30s", or a bare integer
meaning seconds) as a number of seconds. Used only for the checks in wsgate.validate; the
container gets the original string.
*/}}
{{- define "wsgate.durationSeconds" -}}
{{- $s := toString . | trim -}}
{{- if regexMatch "^[0-9]+$" $s -}}
{{- $s -}}
{{- else -}}
{{- $units := dict "ns" 0.000000001 "us" 0.000001 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0 -}}
{{- $total := 0.0 -}}
{{- range $part := regexFindAll "[0-9]+\\s*(ns|us|ms|s|m|h|d)" $s -1 -}}
{{- $num := regexFind "^[0-9]+" $part -}}
{{- $unit := trimPrefix $num $part | trim -}}
{{- $total = addf $total (mulf (float64 $num) (get $units $unit)) -}}
{{- end -}}
{{- $total -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.validate: the checks values.schema.json cannot express, because JSON Schema cannot compare
two values. Fails the render with a message naming the values.
*/}}
{{- define "wsgate.validate" -}}
{{- $grace := include "wsgate.durationSeconds" .Values.shutdownGrace | float64 -}}
{{- $delay := include "wsgate.durationSeconds" .Values.shutdownDelay | float64 -}}
{{- $drain := include "wsgate.durationSeconds" .Values.drainPeriod | float64 -}}
{{- $term := .Values.terminationGracePeriodSeconds | float64 -}}
{{- if ge $grace $term -}}
{{- fail (printf "shutdownGrace (%v) must be shorter than terminationGracePeriodSeconds (%v s): the kubelet kills the pod when the termination period ends, so wsgate's grace has to end first" .Values.shutdownGrace .Values.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- if gt (addf $delay $drain) $grace -}}
{{- fail (printf "shutdownDelay (%v) + drainPeriod (%v) must not exceed shutdownGrace (%v); wsgate would exit with code 2" .Values.shutdownDelay .Values.drainPeriod .Values.shutdownGrace) -}}
{{- end -}}
{{- if and (not .Values.app.enabled) .Values.deployment.enabled -}}
{{- if .Values.nativeSidecar -}}
{{- fail "app.enabled=false leaves wsgate alone in the pod, where it cannot be a native sidecar: set nativeSidecar=false" -}}
{{- end -}}
{{- if not .Values.upstream -}}
{{- fail "app.enabled=false: set upstream (host:port of the service wsgate fronts)" -}}
{{- end -}}
{{- end -}}
{{- if and (not (kindIs "invalid" .Values.readyLowWatermark)) (ge (float64 .Values.readyLowWatermark) (float64 .Values.readyHighWatermark)) -}}
{{- fail (printf "readyLowWatermark (%v) must be below readyHighWatermark (%v)" .Values.readyLowWatermark .Values.readyHighWatermark) -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.env: one WSGATE_* variable per configuration value (SPEC §2, §7, §8).
*/}}
{{- define "wsgate.env" -}}
{{- $v := .Values -}}
- name: WSGATE_LISTEN
  value: {{ printf "%s:%d" $v.listenHost (int $v.ports.client) | quote }}
- name: WSGATE_ADMIN_LISTEN
  value: {{ printf "%s:%d" $v.listenHost (int $v.ports.admin) | quote }}
- name: WSGATE_UPSTREAM
  value: {{ $v.upstream | default (printf "127.0.0.1:%d" (int $v.app.port)) | quote }}
- name: WSGATE_MAX_CLIENTS
  value: {{ $v.maxClients | int64 | quote }}
- name: WSGATE_RETRY_AFTER
  value: {{ $v.retryAfter | toString | quote }}
- name: WSGATE_UPSTREAM_CONNECT_TIMEOUT
  value: {{ $v.upstreamConnectTimeout | toString | quote }}
- name: WSGATE_HEADER_READ_TIMEOUT
  value: {{ $v.headerReadTimeout | toString | quote }}
- name: WSGATE_HALF_CLOSE_TIMEOUT
  value: {{ $v.halfCloseTimeout | toString | quote }}
- name: WSGATE_IDLE_TIMEOUT
  value: {{ $v.idleTimeout | toString | quote }}
- name: WSGATE_TCP_KEEPALIVE
  value: {{ $v.tcpKeepalive | toString | quote }}
- name: WSGATE_SHUTDOWN_GRACE
  value: {{ $v.shutdownGrace | toString | quote }}
- name: WSGATE_LOG_FORMAT
  value: {{ $v.logFormat | quote }}
- name: WSGATE_READY_HIGH_WATERMARK
  value: {{ $v.readyHighWatermark | toString | quote }}
{{- if not (kindIs "invalid" $v.readyLowWatermark) }}
- name: WSGATE_READY_LOW_WATERMARK
  value: {{ $v.readyLowWatermark | toString | quote }}
{{- end }}
- name: WSGATE_SHUTDOWN_DELAY
  value: {{ $v.shutdownDelay | toString | quote }}
- name: WSGATE_DRAIN_PERIOD
  value: {{ $v.drainPeriod | toString | quote }}
- name: WSGATE_ADMISSION_RATE
  value: {{ $v.admissionRate | toString | quote }}
- name: WSGATE_ADMISSION_BURST
  value: {{ $v.admissionBurst | int64 | quote }}
- name: WSGATE_MAX_CLIENTS_PER_IP
  value: {{ $v.maxClientsPerIp | int64 | quote }}
- name: WSGATE_TRUSTED_HOPS
  value: {{ $v.trustedHops | int64 | quote }}
- name: WSGATE_ENFORCE
  value: {{ $v.enforce | toString | quote }}
- name: WSGATE_MAX_CONNECTION_LIFETIME
  value: {{ $v.maxConnectionLifetime | toString | quote }}
- name: WSGATE_LIFETIME_JITTER
  value: {{ $v.lifetimeJitter | toString | quote }}
- name: WSGATE_CLOSE_CODE_DRAIN
  value: {{ $v.closeCodeDrain | int64 | quote }}
- name: WSGATE_CLOSE_CODE_LIFETIME
  value: {{ $v.closeCodeLifetime | int64 | quote }}
- name: WSGATE_CLOSE_CODE_IDLE
  value: {{ $v.closeCodeIdle | int64 | quote }}
- name: WSGATE_CLOSE_TIMEOUT
  value: {{ $v.closeTimeout | toString | quote }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
wsgate.container: the wsgate sidecar container, for this chart's Deployment and for other charts.

Context: anything with .Values holding this chart's values (the chart's root context, or from a
parent chart that depends on wsgate: (dict "Values" .Values.wsgate)). With nativeSidecar true the
container carries restartPolicy: Always and belongs under initContainers; otherwise under
containers. Example, in a parent chart's pod spec:

  initContainers:
    - {{ include "wsgate.container" (dict "Values" .Values.wsgate) | nindent 6 | trim }}

It runs wsgate.validate, so a grace longer than the termination period fails the parent's render
too (set terminationGracePeriodSeconds in the parent's pod spec to .Values.wsgate.terminationGracePeriodSeconds).
*/}}
{{- define "wsgate.container" -}}
{{- include "wsgate.validate" . -}}
{{- $v := .Values -}}
name: {{ $v.sidecarName | default "wsgate" }}
image: {{ printf "%s:%s" $v.image.repository (toString $v.image.tag) | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
{{- if $v.nativeSidecar }}
# Native sidecar (Kubernetes >= 1.29): started before the app, stopped after it.
restartPolicy: Always
{{- end }}
ports:
  - name: ws
    containerPort: {{ int $v.ports.client }}
    protocol: TCP
  - name: admin
    containerPort: {{ int $v.ports.admin }}
    protocol: TCP
env:
{{- include "wsgate.env" . | nindent 2 }}
{{- if $v.probes.startup.enabled }}
startupProbe:
  httpGet:
    path: /healthz
    port: admin
  periodSeconds: {{ int $v.probes.startup.periodSeconds }}
  failureThreshold: {{ int $v.probes.startup.failureThreshold }}
  timeoutSeconds: {{ int $v.probes.startup.timeoutSeconds }}
{{- end }}
readinessProbe:
  httpGet:
    path: /readyz
    port: admin
  periodSeconds: {{ int $v.probes.readiness.periodSeconds }}
  failureThreshold: {{ int $v.probes.readiness.failureThreshold }}
  successThreshold: {{ int $v.probes.readiness.successThreshold }}
  timeoutSeconds: {{ int $v.probes.readiness.timeoutSeconds }}
livenessProbe:
  httpGet:
    path: /healthz
    port: admin
  periodSeconds: {{ int $v.probes.liveness.periodSeconds }}
  failureThreshold: {{ int $v.probes.liveness.failureThreshold }}
  timeoutSeconds: {{ int $v.probes.liveness.timeoutSeconds }}
{{- with $v.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
wsgate.appPreStopSleep: seconds the app container sleeps in preStop (see values: app.preStopSleepSeconds).
*/}}
{{- define "wsgate.appPreStopSleep" -}}
{{- if not (kindIs "invalid" .Values.app.preStopSleepSeconds) -}}
{{- .Values.app.preStopSleepSeconds | int -}}
{{- else if .Values.nativeSidecar -}}
0
{{- else -}}
{{- $delay := include "wsgate.durationSeconds" .Values.shutdownDelay | float64 -}}
{{- $drain := include "wsgate.durationSeconds" .Values.drainPeriod | float64 -}}
{{- addf $delay $drain | ceil | int -}}
{{- end -}}
{{- end -}}
