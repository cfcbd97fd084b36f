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
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | toString | quote }}
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
{{- $high := include "wsgate.readyHighWatermark" . -}}
{{- if and (not (kindIs "invalid" .Values.readyLowWatermark)) (ge (float64 .Values.readyLowWatermark) (float64 $high)) -}}
{{- $how := "" -}}
{{- if kindIs "invalid" .Values.readyHighWatermark -}}
{{- $how = ternary ", automatic: 0.9 because maxClients is set" ", automatic: off because maxClients is 0" (gt (int64 .Values.maxClients) 0) -}}
{{- end -}}
{{- fail (printf "readyLowWatermark (%v) must be below readyHighWatermark (%v%s)" .Values.readyLowWatermark $high $how) -}}
{{- end -}}
{{- include "wsgate.validateKeyLimits" . -}}
{{- include "wsgate.validateFleet" . -}}
{{- include "wsgate.validateMessageGuards" . -}}
{{- include "wsgate.validateHandshake" . -}}
{{- include "wsgate.validateClientSignals" . -}}
{{- include "wsgate.validateRebalance" . -}}
{{- include "wsgate.validateUpstreamSocket" . -}}
{{- include "wsgate.validatePodDeletion" . -}}
{{- include "wsgate.validatePorts" . -}}
{{- end -}}

{{/*
wsgate.validateUpstreamSocket: with upstreamSocket.emptyDir, `upstream` must name a socket file in
the shared directory, or wsgate would look for the app's socket where the app cannot put it.
*/}}
{{- define "wsgate.validateUpstreamSocket" -}}
{{- $s := .Values.upstreamSocket -}}
{{- if $s.emptyDir -}}
{{- $dir := printf "unix:%s/" (trimSuffix "/" (toString $s.mountPath)) -}}
{{- $file := trimPrefix $dir (toString .Values.upstream) -}}
{{- if or (not (hasPrefix $dir (toString .Values.upstream))) (not $file) (contains "/" $file) -}}
{{- fail (printf "upstreamSocket.emptyDir shares %s between the app and wsgate: set upstream to %s<file>, the socket the app creates there (upstream is %q)" $s.mountPath $dir (toString .Values.upstream)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.readyHighWatermark: the ready_high_watermark the container gets. readyHighWatermark null
(the default) = automatic: 0.9 whenever maxClients > 0, 0 (off) when it is 0; an explicit number,
0 included, wins. docs/operations.md#rollouts: without it a rolling update sends the drained clients round-robin to a
replacement that is already full, and they are refused while other pods have room.
*/}}
{{- define "wsgate.readyHighWatermark" -}}
{{- if not (kindIs "invalid" .Values.readyHighWatermark) -}}
{{- .Values.readyHighWatermark | toString -}}
{{- else if gt (int64 .Values.maxClients) 0 -}}
0.9
{{- else -}}
0
{{- end -}}
{{- end -}}

{{/*
wsgate.validateKeyLimits: what values.schema.json cannot say about keyLimits and jwt, because
JSON Schema cannot compare list items with each other or look at another value.
*/}}
{{- define "wsgate.validateKeyLimits" -}}
{{- $jwks := .Values.jwt.jwksSecret.name -}}
{{- $seen := dict -}}
{{- range $i, $r := .Values.keyLimits -}}
{{- if hasKey $seen (toString $r.name) -}}
{{- fail (printf "keyLimits[%d]: the rule name %q is used twice (keyLimits[%v] has it too); names must be unique: they are the rule label of the metrics and of /keys?rule=" $i $r.name (get $seen (toString $r.name))) -}}
{{- end -}}
{{- $_ := set $seen (toString $r.name) $i -}}
{{- if and (hasPrefix "jwt_claim:" (toString $r.key)) (not $jwks) -}}
{{- fail (printf "keyLimits[%d] (%s): key %q needs jwt.jwksSecret.name, the Secret with the JWKS that verifies the tokens; an unverified claim is never used as a key" $i $r.name $r.key) -}}
{{- end -}}
{{- end -}}
{{- if and (not $jwks) (or .Values.jwt.issuer .Values.jwt.audience .Values.jwt.from) -}}
{{- fail "jwt.issuer, jwt.audience and jwt.from take effect only with jwt.jwksSecret.name (the Secret with the JWKS): set it, or unset them" -}}
{{- end -}}
{{- $prefix := include "wsgate.jwtSubprotocolPrefix" . -}}
{{- if and $prefix (or (not $jwks) (ne (toString .Values.jwt.from) "subprotocol")) -}}
{{- fail (printf "jwt.subprotocolPrefix (%q) is used only with jwt.from: subprotocol and jwt.jwksSecret.name (the Secret with the JWKS): set them, or leave it at its default" $prefix) -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.jwtSubprotocolPrefix: jwt.subprotocolPrefix when it differs from wsgate's default
(base64url.bearer.authorization.k8s.io., Kubernetes' convention), else "": only then is it
rendered into config.toml.
*/}}
{{- define "wsgate.jwtSubprotocolPrefix" -}}
{{- $jwt := .Values.jwt | default dict -}}
{{- $prefix := toString ($jwt.subprotocolPrefix | default "base64url.bearer.authorization.k8s.io.") -}}
{{- if ne $prefix "base64url.bearer.authorization.k8s.io." -}}{{- $prefix -}}{{- end -}}
{{- end -}}

{{/*
wsgate.fleetEnabled: "true" when a Redis is configured for the fleet-wide limits (docs/operations.md#fleet-wide-limits), else "".
Only then does the chart render the WSGATE_FLEET_* variables.
*/}}
{{- define "wsgate.fleetEnabled" -}}
{{- if or .Values.fleet.redisUrl .Values.fleet.redisUrlSecret.name -}}true{{- end -}}
{{- end -}}

{{/*
wsgate.fleetNamespace: fleet.namespace, or the release's fullname when it is empty, so that two
releases sharing one Redis do not share caps. A parent chart that includes wsgate.container with
only its Values has no release to name: it must set fleet.namespace, or pass Release and Chart.
*/}}
{{- define "wsgate.fleetNamespace" -}}
{{- if .Values.fleet.namespace -}}
{{- .Values.fleet.namespace -}}
{{- else if and (hasKey . "Release") (hasKey . "Chart") -}}
{{- include "wsgate.fullname" . -}}
{{- else -}}
{{- fail "fleet.namespace is empty, and wsgate.container was included without Release and Chart, so the release's fullname (the default fleet namespace) is unknown: set fleet.namespace, or include it with (dict \"Values\" .Values.wsgate \"Release\" .Release \"Chart\" .Subcharts.wsgate.Chart)" -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.validateFleet: what values.schema.json cannot say about the fleet-wide limits (docs/operations.md#fleet-wide-limits),
because it cannot look at another value or compare durations.
*/}}
{{- define "wsgate.validateFleet" -}}
{{- $f := .Values.fleet -}}
{{- if not (has (toString $f.failMode) (list "open" "closed")) -}}
{{- fail (printf "fleet.failMode %q: must be open (Redis unreachable: admit on the per-pod limits alone) or closed (Redis unreachable: new WebSocket upgrades get 503 fleet_unavailable)" (toString $f.failMode)) -}}
{{- end -}}
{{- if and $f.redisUrl $f.redisUrlSecret.name -}}
{{- fail "fleet.redisUrl and fleet.redisUrlSecret.name are both set: set one, redisUrl for a URL without a password or redisUrlSecret for a Secret holding the whole URL" -}}
{{- end -}}
{{- $fleetRules := list -}}
{{- range .Values.keyLimits -}}
{{- if .fleet -}}
{{- $fleetRules = append $fleetRules (toString .name) -}}
{{- end -}}
{{- end -}}
{{- if not (include "wsgate.fleetEnabled" .) -}}
{{- if gt (int64 $f.maxClients) 0 -}}
{{- fail (printf "fleet.maxClients (%v) counts the connections of all pods in a Redis they share: set fleet.redisUrl or fleet.redisUrlSecret.name, or leave fleet.maxClients at 0" (int64 $f.maxClients)) -}}
{{- end -}}
{{- with $fleetRules -}}
{{- fail (printf "keyLimits rule(s) %s have fleet: true, which counts across pods in a Redis they share: set fleet.redisUrl or fleet.redisUrlSecret.name, or drop fleet: true to count per pod" (join ", " .)) -}}
{{- end -}}
{{- else -}}
{{- if or (regexMatch "^[a-z+]+://[^/@]*:[^/@]*@" $f.redisUrl) (regexMatch "[?&](pass|password|sentinel_password)=" $f.redisUrl) -}}
{{- fail "fleet.redisUrl holds a password, which would be rendered in plain text into the Deployment: put the whole URL into a Secret and set fleet.redisUrlSecret.name (and .key) instead" -}}
{{- end -}}
{{- $ttl := include "wsgate.durationSeconds" $f.leaseTtl | float64 -}}
{{- $timeout := include "wsgate.durationSeconds" $f.timeout | float64 -}}
{{- if or (lt $ttl 3.0) (gt $ttl 3600.0) -}}
{{- fail (printf "fleet.leaseTtl (%v) must be between 3s and 1h; wsgate would exit with code 2" $f.leaseTtl) -}}
{{- end -}}
{{- if le $timeout 0.0 -}}
{{- fail (printf "fleet.timeout (%v) must be longer than 0: it bounds each Redis round trip of an admission" $f.timeout) -}}
{{- end -}}
{{- if ge (mulf $timeout 3.0) $ttl -}}
{{- fail (printf "fleet.timeout (%v) must be below fleet.leaseTtl / 3 (%v / 3): holds are renewed every leaseTtl / 3, and a renewal has to finish within that interval; wsgate would exit with code 2" $f.timeout $f.leaseTtl) -}}
{{- end -}}
{{- $ns := include "wsgate.fleetNamespace" . -}}
{{- if not (regexMatch "^[A-Za-z0-9_.-]{1,64}$" $ns) -}}
{{- fail (printf "the fleet namespace %q (fleet.namespace, or the release's fullname when it is empty) must be 1 to 64 of A-Z a-z 0-9 _ . -: set fleet.namespace" $ns) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Limits per key (docs/operations.md#limits-per-key): where the chart mounts the config file and the Secrets. Directories,
never subPath mounts: the kubelet updates a ConfigMap or Secret volume in place by swapping a
symlink in the directory, and a subPath mount pins the file that was there at start, so edits
would never reach wsgate.
*/}}
{{- define "wsgate.configDir" -}}/etc/wsgate/config{{- end -}}
{{- define "wsgate.jwksDir" -}}/etc/wsgate/jwks{{- end -}}
{{- define "wsgate.adminTokenDir" -}}/etc/wsgate/admin{{- end -}}

{{/*
wsgate.configFile: the path of the rendered config file, or "" when nothing needs one (no
keyLimits and no JWT verifier: then the chart renders exactly what it did before them).
*/}}
{{- define "wsgate.configFile" -}}
{{- if or .Values.keyLimits .Values.jwt.jwksSecret.name -}}
{{- include "wsgate.configDir" . }}/config.toml
{{- end -}}
{{- end -}}

{{/*
wsgate.tomlString: a string as a TOML basic string. toJson of a string is a JSON string, and every
escape JSON uses (\" \\ \n \t \b \f \r \uXXXX, including Go's \u003c \u003e \u0026 for < > &)
means the same in TOML. The one difference: TOML forbids a raw DEL (U+007F) that JSON leaves
as it is, so it is escaped too. Quotes and backslashes in key values and overrides are safe.
*/}}
{{- define "wsgate.tomlString" -}}
{{- toJson (toString .) | replace "\x7f" "\\u007f" -}}
{{- end -}}

{{/*
wsgate.configToml: config.toml for the ConfigMap: the JWT verifier's top-level keys, then one
[[key_limits]] table per rule, in values order (wsgate checks rules in file order). Optional rule
fields are written only when given, so wsgate's own defaults apply otherwise. Integers through
int64, so large values never come out as 1e+06.
*/}}
{{- define "wsgate.configToml" -}}
# Rendered by the wsgate Helm chart from keyLimits and jwt (docs/operations.md#limits-per-key). All other settings reach
# wsgate as WSGATE_* environment variables, which take precedence over this file.
{{- with .Values.jwt }}
{{- if .jwksSecret.name }}
jwt_jwks_file = {{ include "wsgate.tomlString" (printf "%s/jwks.json" (include "wsgate.jwksDir" $)) }}
{{- with .issuer }}
jwt_issuer = {{ include "wsgate.tomlString" . }}
{{- end }}
{{- with .audience }}
jwt_audience = {{ include "wsgate.tomlString" . }}
{{- end }}
{{- if eq .requireExp false }}
jwt_require_exp = false
{{- end }}
{{- with .from }}
jwt_from = {{ include "wsgate.tomlString" . }}
{{- end }}
{{- with include "wsgate.jwtSubprotocolPrefix" $ }}
jwt_subprotocol_prefix = {{ include "wsgate.tomlString" . }}
{{- end }}
{{- end }}
{{- end }}
{{- range $r := .Values.keyLimits }}

[[key_limits]]
name = {{ include "wsgate.tomlString" $r.name }}
key = {{ include "wsgate.tomlString" $r.key }}
max_per_key = {{ $r.maxPerKey | int64 }}
{{- if hasKey $r "pathPrefix" }}
path_prefix = {{ include "wsgate.tomlString" $r.pathPrefix }}
{{- end }}
{{- if hasKey $r "missing" }}
missing = {{ include "wsgate.tomlString" $r.missing }}
{{- end }}
{{- if hasKey $r "status" }}
status = {{ $r.status | int64 }}
{{- end }}
{{- if hasKey $r "maxKeys" }}
max_keys = {{ $r.maxKeys | int64 }}
{{- end }}
{{- if hasKey $r "fleet" }}
fleet = {{ $r.fleet | toString }}
{{- end }}
{{- with $r.overrides }}
[key_limits.overrides]
{{- range $value, $limit := . }}
{{ include "wsgate.tomlString" $value }} = {{ $limit | int64 }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
wsgate.volumeMounts / wsgate.volumes: the config file and the Secrets, each only when used; both
empty otherwise. A chart that includes wsgate.container into its own pod spec must add
wsgate.volumes to that pod (see README: Using the container in your own chart).
*/}}
{{- define "wsgate.volumeMounts" -}}
{{- if include "wsgate.configFile" . }}
- name: wsgate-config
  mountPath: {{ include "wsgate.configDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.jwt.jwksSecret.name }}
- name: wsgate-jwks
  mountPath: {{ include "wsgate.jwksDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.adminToken.secretName }}
- name: wsgate-admin-token
  mountPath: {{ include "wsgate.adminTokenDir" . }}
  readOnly: true
{{- end }}
{{- include "wsgate.upstreamSocketMount" . }}
{{- include "wsgate.extraVolumeMounts" . }}
{{- end -}}

{{/*
wsgate.upstreamSocketMount: the shared emptyDir of an upstream on a Unix socket (docs/operations.md#unix-socket-upstream), the
same mount for the wsgate and the app container (read-write: connecting to a socket needs write
permission on its file); empty without upstreamSocket.emptyDir.
*/}}
{{- define "wsgate.upstreamSocketMount" -}}
{{- if .Values.upstreamSocket.emptyDir }}
- name: wsgate-upstream-socket
  mountPath: {{ .Values.upstreamSocket.mountPath }}
{{- end }}
{{- end -}}

{{- define "wsgate.volumes" -}}
{{- if include "wsgate.configFile" . }}
- name: wsgate-config
  configMap:
    name: {{ include "wsgate.fullname" . }}-config
{{- end }}
{{- with .Values.jwt.jwksSecret }}
{{- if .name }}
# The Secret's key under a fixed file name. Mode stays the default 0644: the files belong to
# root and wsgate runs as 65532, so anything tighter would need a pod fsGroup.
- name: wsgate-jwks
  secret:
    secretName: {{ .name }}
    items:
      - key: {{ .key }}
        path: jwks.json
{{- end }}
{{- end }}
{{- with .Values.adminToken }}
{{- if .secretName }}
- name: wsgate-admin-token
  secret:
    secretName: {{ .secretName }}
    items:
      - key: {{ .key }}
        path: token
{{- end }}
{{- end }}
{{- if .Values.upstreamSocket.emptyDir }}
# The directory the app creates its socket in and wsgate connects through (docs/operations.md#unix-socket-upstream).
- name: wsgate-upstream-socket
  emptyDir: {}
{{- end }}
{{- include "wsgate.extraVolumes" . }}
{{- end -}}

{{/*
wsgate.number: a number for an environment variable, never in float notation: whole numbers as
integers (1000000, not 1e+06), others as given (0.5).
*/}}
{{- define "wsgate.number" -}}
{{- $f := float64 . -}}
{{- if eq $f (floor $f) -}}{{- int64 $f -}}{{- else -}}{{- toString . -}}{{- end -}}
{{- end -}}

{{/*
wsgate.messageGuardsEnv: the WSGATE_* variables of the message guards (docs/operations.md#message-guards), each only when its
value differs from the default (0 = off, messageRateAction throttle, maxFragments 1024), so that a
release without guards renders exactly what it did before them. "" when every guard is at its
default. maxFragments is read with hasKey, not `default`: its 0 (off) is not its default.
*/}}
{{- define "wsgate.messageGuardsEnv" -}}
{{- $g := .Values.messageGuards | default dict -}}
{{- if gt (int64 ($g.maxMessageSize | default 0)) 0 }}
- name: WSGATE_MAX_MESSAGE_SIZE
  value: {{ $g.maxMessageSize | int64 | quote }}
{{- end }}
{{- if gt (float64 ($g.messageRate | default 0)) 0.0 }}
- name: WSGATE_MESSAGE_RATE
  value: {{ include "wsgate.number" $g.messageRate | quote }}
{{- end }}
{{- if gt (int64 ($g.messageBurst | default 0)) 0 }}
- name: WSGATE_MESSAGE_BURST
  value: {{ $g.messageBurst | int64 | quote }}
{{- end }}
{{- if ne (toString ($g.messageRateAction | default "throttle")) "throttle" }}
- name: WSGATE_MESSAGE_RATE_ACTION
  value: {{ $g.messageRateAction | toString | quote }}
{{- end }}
{{- if gt (int64 ($g.byteRate | default 0)) 0 }}
- name: WSGATE_BYTE_RATE
  value: {{ $g.byteRate | int64 | quote }}
{{- end }}
{{- if gt (int64 ($g.byteBurst | default 0)) 0 }}
- name: WSGATE_BYTE_BURST
  value: {{ $g.byteBurst | int64 | quote }}
{{- end }}
{{- $fragments := ternary $g.maxFragments 1024 (hasKey $g "maxFragments") | int64 }}
{{- if ne $fragments 1024 }}
- name: WSGATE_MAX_FRAGMENTS
  value: {{ $fragments | quote }}
{{- end }}
{{- end -}}

{{/*
wsgate.validateMessageGuards: messageRateAction, which the schema refuses first; checked here as well
for a parent chart that skips schema validation or pins an older copy of the schema.
*/}}
{{- define "wsgate.validateMessageGuards" -}}
{{- $g := .Values.messageGuards | default dict -}}
{{- $action := toString ($g.messageRateAction | default "throttle") -}}
{{- if not (has $action (list "throttle" "close")) -}}
{{- fail (printf "messageGuards.messageRateAction %q: must be throttle (stop reading from the client until the rate allows the next message) or close (end the connection with Close 1008)" $action) -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.originPattern / wsgate.subprotocolPattern: what values.schema.json's origin and
subprotocolName accept, for wsgate.validateHandshake. An origin is scheme://host[:port] (port 1 to
65535) with an optional leading *. or null; a subprotocol name is an HTTP token, so neither can hold the comma
that separates the entries of WSGATE_ALLOWED_ORIGINS and WSGATE_SUBPROTOCOLS.
*/}}
{{- define "wsgate.originPattern" -}}
^null$|^[A-Za-z][A-Za-z0-9+.-]*://((\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?$
{{- end -}}
{{- define "wsgate.subprotocolPattern" -}}
^[!#$%&'*+.^_`|~0-9A-Za-z-]+$
{{- end -}}

{{/*
wsgate.handshakeEnv: the WSGATE_* variables of the handshake policy (allowed_origins,
require_origin, subprotocols, require_subprotocol), each only when it differs from wsgate's default
(empty lists = any, false), so that a release without them renders exactly what it did before.
The lists become one comma-separated value, the form wsgate reads from its environment. "" when
every value is at its default.
*/}}
{{- define "wsgate.handshakeEnv" -}}
{{- $h := .Values.handshake | default dict -}}
{{- with $h.allowedOrigins }}
- name: WSGATE_ALLOWED_ORIGINS
  value: {{ join "," . | quote }}
{{- end }}
{{- if $h.requireOrigin }}
- name: WSGATE_REQUIRE_ORIGIN
  value: "true"
{{- end }}
{{- with $h.subprotocols }}
- name: WSGATE_SUBPROTOCOLS
  value: {{ join "," . | quote }}
{{- end }}
{{- if $h.requireSubprotocol }}
- name: WSGATE_REQUIRE_SUBPROTOCOL
  value: "true"
{{- end }}
{{- end -}}

{{/*
wsgate.validateHandshake: the handshake lists (which the schema checks first; here too for a parent
chart that skips schema validation, since an entry with a comma would be split in two in the
variable), and what the schema cannot say: requireSubprotocol with an empty subprotocols would
refuse every upgrade, and wsgate refuses it (exit 2). requireOrigin with an empty allowedOrigins is
fine: it only requires the header.
*/}}
{{- define "wsgate.validateHandshake" -}}
{{- $h := .Values.handshake | default dict -}}
{{- range $value := list "allowedOrigins" "subprotocols" -}}
{{- $list := index $h $value -}}
{{- if and (not (kindIs "invalid" $list)) (not (kindIs "slice" $list)) -}}
{{- fail (printf "handshake.%s must be a list of strings, not %q" $value (toString $list)) -}}
{{- end -}}
{{- end -}}
{{- $origin := include "wsgate.originPattern" . -}}
{{- range $i, $o := $h.allowedOrigins | default list -}}
{{- if not (and (kindIs "string" $o) (regexMatch $origin $o)) -}}
{{- fail (printf "handshake.allowedOrigins[%d] %q: must be an origin as browsers send it, scheme://host[:port] without a path or trailing slash (https://app.example.com, https://*.example.com for any subdomain), or null" $i (toString $o)) -}}
{{- end -}}
{{- end -}}
{{- $token := include "wsgate.subprotocolPattern" . -}}
{{- range $i, $p := $h.subprotocols | default list -}}
{{- if not (and (kindIs "string" $p) (regexMatch $token $p)) -}}
{{- fail (printf "handshake.subprotocols[%d] %q: must be a subprotocol name, an HTTP token (letters, digits and !#$%%&'*+-.^_`|~; no comma, no space)" $i (toString $p)) -}}
{{- end -}}
{{- end -}}
{{- if and $h.requireSubprotocol (not $h.subprotocols) -}}
{{- fail "handshake.requireSubprotocol is true but handshake.subprotocols is empty: no upgrade could offer one of them, and wsgate refuses that configuration (exit 2). List the subprotocols clients must offer in handshake.subprotocols, or set handshake.requireSubprotocol to false" -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.clientSignalsEnv: the WSGATE_* variables of the signals to clients (refusal_mode,
max_close_refusals, ping_interval, pong_timeout, send_timeout), each only when it differs from
wsgate's default (status, 1024, 0s = off, 10s, 0s = off), so that a release without them renders
exactly what it did before. Durations are compared in seconds ("10s", "10" and "10000ms" are the
default) and rendered as given. maxCloseRefusals is read with hasKey: its 0 is not its default.
*/}}
{{- define "wsgate.clientSignalsEnv" -}}
{{- $v := .Values -}}
{{- $mode := toString ($v.refusalMode | default "status") }}
{{- if ne $mode "status" }}
- name: WSGATE_REFUSAL_MODE
  value: {{ $mode | quote }}
{{- end }}
{{- $maxClose := ternary $v.maxCloseRefusals 1024 (hasKey $v "maxCloseRefusals") | int64 }}
{{- if ne $maxClose 1024 }}
- name: WSGATE_MAX_CLOSE_REFUSALS
  value: {{ $maxClose | quote }}
{{- end }}
{{- $pings := $v.clientPings | default dict }}
{{- $interval := $pings.interval | default "0s" }}
{{- if gt (include "wsgate.durationSeconds" $interval | float64) 0.0 }}
- name: WSGATE_PING_INTERVAL
  value: {{ $interval | toString | quote }}
{{- end }}
{{- $pong := ternary $pings.pongTimeout "10s" (hasKey $pings "pongTimeout") }}
{{- if ne (include "wsgate.durationSeconds" $pong | float64) 10.0 }}
- name: WSGATE_PONG_TIMEOUT
  value: {{ $pong | toString | quote }}
{{- end }}
{{- $send := $v.sendTimeout | default "0s" }}
{{- if gt (include "wsgate.durationSeconds" $send | float64) 0.0 }}
- name: WSGATE_SEND_TIMEOUT
  value: {{ $send | toString | quote }}
{{- end }}
{{- end -}}

{{/*
wsgate.validateClientSignals: refusalMode and a pongTimeout above 0 (wsgate refuses 0: every Ping
would end its session at once), which the schema refuses first; checked here as well for a parent
chart that skips schema validation or pins an older copy of the schema.
*/}}
{{- define "wsgate.validateClientSignals" -}}
{{- $mode := toString (.Values.refusalMode | default "status") -}}
{{- if not (has $mode (list "status" "close")) -}}
{{- fail (printf "refusalMode %q: must be status (refusals are HTTP answers) or close (capacity, rate, key, fleet and draining refusals of a WebSocket upgrade become wsgate's own 101 and Close 1013, which a browser's page can see)" $mode) -}}
{{- end -}}
{{- $pings := .Values.clientPings | default dict -}}
{{- if hasKey $pings "pongTimeout" -}}
{{- if le (include "wsgate.durationSeconds" $pings.pongTimeout | float64) 0.0 -}}
{{- fail (printf "clientPings.pongTimeout (%v) must be longer than 0: it is how long a client has to answer wsgate's Ping, and wsgate refuses 0 (exit 2)" $pings.pongTimeout) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.env: one WSGATE_* variable per configuration value (docs/configuration.md), plus the
WSGATE_FLEET_* ones (docs/operations.md#fleet-wide-limits) when a Redis is configured and those of the message guards
(docs/operations.md#message-guards), the handshake policy and the signals to clients that are set.
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
- name: WSGATE_LOG_LEVEL
  value: {{ $v.logLevel | toString | quote }}
- name: WSGATE_LOG_FORMAT
  value: {{ $v.logFormat | quote }}
- name: WSGATE_ACCESS_LOG
  value: {{ $v.accessLog | toString | quote }}
{{- if not (kindIs "invalid" $v.workers) }}
- name: WSGATE_WORKERS
  value: {{ $v.workers | toString | quote }}
{{- end }}
- name: WSGATE_READY_HIGH_WATERMARK
  value: {{ include "wsgate.readyHighWatermark" . | quote }}
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
- name: WSGATE_MAX_PLAIN_REQUESTS
  value: {{ $v.maxPlainRequests | int64 | quote }}
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
{{- if include "wsgate.fleetEnabled" . }}
# Fleet-wide limits through Redis (docs/operations.md#fleet-wide-limits). WSGATE_FLEET_INSTANCE_ID stays unset: wsgate then
# uses $HOSTNAME (the pod name) plus a random suffix.
- name: WSGATE_FLEET_REDIS_URL
{{- with $v.fleet.redisUrlSecret }}
{{- if .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .name | quote }}
      key: {{ .key | quote }}
{{- else }}
  value: {{ $v.fleet.redisUrl | quote }}
{{- end }}
{{- end }}
- name: WSGATE_FLEET_NAMESPACE
  value: {{ include "wsgate.fleetNamespace" . | quote }}
- name: WSGATE_FLEET_MAX_CLIENTS
  value: {{ $v.fleet.maxClients | int64 | quote }}
- name: WSGATE_FLEET_LEASE_TTL
  value: {{ $v.fleet.leaseTtl | toString | quote }}
- name: WSGATE_FLEET_TIMEOUT
  value: {{ $v.fleet.timeout | toString | quote }}
- name: WSGATE_FLEET_FAIL_MODE
  value: {{ $v.fleet.failMode | quote }}
{{- with include "wsgate.rebalanceEnv" . }}
# Automatic rebalancing (docs/operations.md#automatic-rebalancing): only the values that are not the default.
{{- . }}
{{- end }}
{{- end }}
{{- with include "wsgate.messageGuardsEnv" . }}
# Message guards (docs/operations.md#message-guards): only the values that are not off / not the default.
{{- . }}
{{- end }}
{{- with include "wsgate.handshakeEnv" . }}
# Handshake policy (docs/security.md#handshake-policy): only the values that are not the default (any origin, any subprotocol).
{{- . }}
{{- end }}
{{- with include "wsgate.clientSignalsEnv" . }}
# Signals to clients (docs/configuration.md#keys): refusal mode, pings, send timeout; only the values that are not the default.
{{- . }}
{{- end }}
{{- with include "wsgate.configFile" . }}
# keyLimits / jwt (docs/operations.md#limits-per-key), rendered into the mounted ConfigMap; reloaded in place on an edit.
- name: WSGATE_CONFIG
  value: {{ . | quote }}
{{- end }}
{{- if $v.adminToken.secretName }}
- name: WSGATE_ADMIN_TOKEN_FILE
  value: {{ printf "%s/token" (include "wsgate.adminTokenDir" .) | quote }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
wsgate.image: the container's image reference. repository@digest when image.digest is set (the tag
is then ignored); else repository:tag, the tag defaulting to the chart's appVersion. Included from
another chart with Values alone there is no appVersion at hand: pass "Chart" .Subcharts.wsgate.Chart
as well, or set image.tag or image.digest.
*/}}
{{- define "wsgate.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- $tag := toString ($image.tag | default "") -}}
{{- if and (not $tag) (hasKey . "Chart") -}}
{{- $tag = toString (.Chart.AppVersion | default "") -}}
{{- end -}}
{{- if not $tag -}}
{{- fail "image.tag is empty and wsgate.container was included without this chart's Chart, so its appVersion (the default tag) is unknown: set image.tag or image.digest, or include it with (dict \"Values\" .Values.wsgate \"Chart\" .Subcharts.wsgate.Chart)" -}}
{{- end -}}
{{- printf "%s:%s" $image.repository $tag -}}
{{- end -}}
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
image: {{ include "wsgate.image" . | quote }}
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
{{- with include "wsgate.volumeMounts" . | trim }}
volumeMounts:
  {{- . | nindent 2 }}
{{- end }}
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
{{- else -}}
{{- include "wsgate.drainSeconds" . -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.drainSeconds: how long after the start of a pod's deletion wsgate's drain can last, rounded
up: shutdownDelay + drainPeriod, plus closeTimeout for the last Close handshakes. The app must keep
serving at least that long (docs/operations.md#pod-deletion).
*/}}
{{- define "wsgate.drainSeconds" -}}
{{- $delay := include "wsgate.durationSeconds" .Values.shutdownDelay | float64 -}}
{{- $drain := include "wsgate.durationSeconds" .Values.drainPeriod | float64 -}}
{{- $close := include "wsgate.durationSeconds" .Values.closeTimeout | float64 -}}
{{- addf $delay $drain $close | ceil | int -}}
{{- end -}}

{{/*
wsgate.validatePodDeletion: the values that would break the drain on pod deletion. The app is
signalled when its preStop sleep ends, which must come after wsgate's drain; the kubelet kills
whatever runs at terminationGracePeriodSeconds, which must leave the app time to exit after that.
*/}}
{{- define "wsgate.validatePodDeletion" -}}
{{- if .Values.app.enabled -}}
{{- $sleep := include "wsgate.appPreStopSleep" . | int -}}
{{- $need := include "wsgate.drainSeconds" . | int -}}
{{- if lt $sleep $need -}}
{{- fail (printf "app.preStopSleepSeconds (%d) must be at least shutdownDelay (%v) + drainPeriod (%v) + closeTimeout (%v), rounded up: %d; the app would be signalled while wsgate still drains its sessions (docs/operations.md#pod-deletion)" $sleep .Values.shutdownDelay .Values.drainPeriod .Values.closeTimeout $need) -}}
{{- end -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) (add $sleep 2 | int) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be at least the app's preStop sleep (%d s: shutdownDelay + drainPeriod + closeTimeout) + 2 s for the app to exit after its SIGTERM; the kubelet would kill it (docs/operations.md#pod-deletion)" .Values.terminationGracePeriodSeconds $sleep) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
wsgate.prestopContainer: the pod-deletion hook of the native layout, as a `containers` entry. A
chart that includes wsgate.container with nativeSidecar: true adds this beside its app, and gives
its app a preStop sleep of wsgate.appPreStopSleep seconds.
*/}}
{{- define "wsgate.prestopContainer" -}}
{{- $v := .Values -}}
name: {{ printf "%s-prestop" ($v.sidecarName | default "wsgate") }}
image: {{ include "wsgate.image" . | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
# Idles until the pod is deleted; then has wsgate drain over the pod's loopback and exits when
# it has (docs/operations.md#pod-deletion).
args:
  - prestop
  - --admin
  - {{ printf "%s:%d" (ternary "[::1]" "127.0.0.1" (contains ":" $v.listenHost)) (int $v.ports.admin) | quote }}
{{- with $v.prestopHook.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
wsgate.rebalanceEnv: the WSGATE_* variables of automatic rebalancing (rebalance, its tolerance,
after, period, cooldown, close_code_rebalance), each only when it differs from wsgate's default
(false, 0.1, 30s, 30s, 2m, 1012), so that a release without them renders what it did before.
Durations are compared in seconds and rendered as given; the variables come in the order of
docs/configuration.md.
*/}}
{{- define "wsgate.rebalanceEnv" -}}
{{- $r := .Values.fleet.rebalance | default dict }}
{{- if $r.enabled }}
- name: WSGATE_REBALANCE
  value: "true"
{{- end }}
{{- $tol := ternary $r.tolerance 0.1 (hasKey $r "tolerance") | float64 }}
{{- if ne $tol 0.1 }}
- name: WSGATE_REBALANCE_TOLERANCE
  value: {{ $tol | toString | quote }}
{{- end }}
{{- $defaults := dict "after" 30.0 "period" 30.0 "cooldown" 120.0 }}
{{- range $name := list "after" "period" "cooldown" }}
{{- $default := get $defaults $name }}
{{- $d := ternary (get $r $name) (printf "%vs" $default) (hasKey $r $name) }}
{{- if ne (include "wsgate.durationSeconds" $d | float64) $default }}
- name: {{ printf "WSGATE_REBALANCE_%s" (upper $name) }}
  value: {{ $d | toString | quote }}
{{- end }}
{{- end }}
{{- $code := ternary $r.closeCode 1012 (hasKey $r "closeCode") | int64 }}
{{- if ne $code 1012 }}
- name: WSGATE_CLOSE_CODE_REBALANCE
  value: {{ $code | quote }}
{{- end }}
{{- end -}}

{{/*
wsgate.validateRebalance: rebalancing finds the other pods through the fleet's Redis; without one
wsgate exits 2, so the render fails first.
*/}}
{{- define "wsgate.validateRebalance" -}}
{{- $r := .Values.fleet.rebalance | default dict -}}
{{- if and $r.enabled (not (include "wsgate.fleetEnabled" .)) -}}
{{- fail "fleet.rebalance.enabled is true, but no Redis is configured: pods find each other through the fleet's Redis. Set fleet.redisUrl or fleet.redisUrlSecret.name, or set fleet.rebalance.enabled to false" -}}
{{- end -}}
{{- end -}}
