{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "ipvsproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, with the chart name unless the release
already contains it.
*/}}
{{- define "ipvsproxy.fullname" -}}
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

{{- define "ipvsproxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "ipvsproxy.labels" -}}
helm.sh/chart: {{ include "ipvsproxy.chart" . }}
{{ include "ipvsproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: service-proxy
{{- end }}

{{/*
Selector labels (immutable on a DaemonSet: keep them few and stable).
*/}}
{{- define "ipvsproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ipvsproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "ipvsproxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ipvsproxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ipvsproxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
host:port -> dict(host, port); "[::1]:10256" -> host "::1".
*/}}
{{- define "ipvsproxy.splitHostPort" -}}
{{- $parts := splitList ":" . }}
{{- $port := last $parts }}
{{- $host := trimSuffix (printf ":%s" $port) . | trimPrefix "[" | trimSuffix "]" }}
{{- dict "host" $host "port" (atoi $port) | toJson }}
{{- end }}

{{/*
The address /metrics is served on: config.metricsBindAddress, else all addresses when
metrics.enabled (Prometheus must reach it), else loopback only.
*/}}
{{- define "ipvsproxy.metricsBindAddress" -}}
{{- if .Values.config.metricsBindAddress }}
{{- .Values.config.metricsBindAddress }}
{{- else if .Values.metrics.enabled }}
{{- printf "0.0.0.0:%d" (int .Values.metrics.port) }}
{{- else }}
{{- printf "127.0.0.1:%d" (int .Values.metrics.port) }}
{{- end }}
{{- end }}

{{- define "ipvsproxy.metricsPort" -}}
{{- (include "ipvsproxy.splitHostPort" (include "ipvsproxy.metricsBindAddress" .) | fromJson).port }}
{{- end }}

{{/*
Probe target for /healthz. The pod is on the host network and the kubelet probes from the
host network too: a wildcard bind is probed at the pod IP (the node's IP, the default); a
specific bind address (127.0.0.1, ::1, a node IP) is probed at that address.
*/}}
{{- define "ipvsproxy.healthzProbe" -}}
{{- $hp := include "ipvsproxy.splitHostPort" .root.Values.config.healthzBindAddress | fromJson -}}
httpGet:
  path: {{ .path }}
  port: healthz
  scheme: HTTP
  {{- if not (has $hp.host (list "" "0.0.0.0" "::")) }}
  host: {{ $hp.host | quote }}
  {{- end }}
{{- end }}

{{/*
Capabilities of the agent container: exactly what it uses.
*/}}
{{- define "ipvsproxy.agentLoadsModules" -}}
{{- /* The init container loads the modules when it runs; the agent only when asked to, or
when there is no init container (sysctlInit off, or privileged). */ -}}
{{- $init := and .Values.sysctlInit.enabled (not .Values.securityContext.privileged) -}}
{{- if and .Values.config.loadModules (or .Values.securityContext.sysModule (not $init)) }}true{{ end }}
{{- end }}

{{- define "ipvsproxy.capabilities" -}}
{{- $caps := list "NET_ADMIN" }}
{{- if .Values.securityContext.netRaw }}
{{- $caps = append $caps "NET_RAW" }}
{{- end }}
{{- if include "ipvsproxy.agentLoadsModules" . }}
{{- $caps = append $caps "SYS_MODULE" }}
{{- end }}
{{- concat $caps .Values.securityContext.extraCapabilities | uniq | toJson }}
{{- end }}

{{/*
Arguments of `ipvsproxy run`, one flag per config key.
*/}}
{{- define "ipvsproxy.args" -}}
{{- $c := .Values.config -}}
- {{ printf "--scheduler=%s" ($c.scheduler) | quote }}
- {{ printf "--sync-period=%s" ($c.syncPeriod) | quote }}
- {{ printf "--resync=%s" ($c.resync) | quote }}
- {{ printf "--min-sync-period=%s" ($c.minSyncPeriod) | quote }}
- {{ printf "--interface=%s" ($c.interface) | quote }}
{{- with $c.excludeCIDRs }}
- {{ printf "--exclude-cidrs=%s" (join "," .) | quote }}
{{- end }}
{{- with $c.nodePortAddresses }}
- {{ printf "--nodeport-addresses=%s" (join "," .) | quote }}
{{- end }}
- {{ printf "--healthz-bind-address=%s" ($c.healthzBindAddress) | quote }}
- {{ printf "--metrics-bind-address=%s" (include "ipvsproxy.metricsBindAddress" .) | quote }}
- {{ printf "--tcp-timeout=%s" ($c.tcpTimeout) | quote }}
- {{ printf "--tcpfin-timeout=%s" ($c.tcpfinTimeout) | quote }}
- {{ printf "--udp-timeout=%s" ($c.udpTimeout) | quote }}
{{- if $c.strictARP }}
- --strict-arp
{{- end }}
{{- with $c.clusterCIDR }}
- {{ printf "--cluster-cidr=%s" (.) | quote }}
{{- end }}
{{- if $c.masqueradeAll }}
- --masquerade-all
{{- end }}
{{- if not $c.nftables }}
- --no-nftables
{{- end }}
- {{ printf "--drain-grace-period=%s" ($c.drainGracePeriod) | quote }}
{{- if ne $c.endpointsSource "auto" }}
- {{ printf "--endpoints-source=%s" ($c.endpointsSource) | quote }}
{{- end }}
{{- with .Values.apiServer.host }}
- {{ printf "--api-server=https://%s:%v" (contains ":" . | ternary (printf "[%s]" .) .) $.Values.apiServer.port | quote }}
{{- end }}
{{- if not (include "ipvsproxy.agentLoadsModules" .) }}
- --no-load-modules
{{- end }}
- {{ printf "--state-dir=%s" ($c.stateDir) | quote }}
{{- range $c.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
