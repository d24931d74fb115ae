{{- define "wharf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "wharf.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "wharf.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "wharf.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "wharf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wharf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wharf.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "wharf.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "wharf.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* cache.max_size: persistence.size × cache.maxSizeFraction, in MiB. */}}
{{- define "wharf.maxSize" -}}
{{- $s := toString .Values.persistence.size -}}
{{- $mib := 0.0 -}}
{{- if hasSuffix "Ti" $s -}}{{- $mib = mulf (float64 (trimSuffix "Ti" $s)) 1048576 -}}
{{- else if hasSuffix "Gi" $s -}}{{- $mib = mulf (float64 (trimSuffix "Gi" $s)) 1024 -}}
{{- else if hasSuffix "Mi" $s -}}{{- $mib = float64 (trimSuffix "Mi" $s) -}}
{{- else -}}{{- fail "persistence.size must end in Mi, Gi or Ti (or set config.cache.max_size)" -}}
{{- end -}}
{{- printf "%dMiB" (int64 (mulf $mib (float64 .Values.cache.maxSizeFraction))) -}}
{{- end -}}

{{/* wharf's config.toml: the values' config plus what the chart owns. */}}
{{- define "wharf.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $_ := set $cfg "listen" (printf "0.0.0.0:%d" (int .Values.service.port)) -}}
{{- $_ := set $cfg "data_dir" "/data" -}}
{{- if .Values.metrics.port -}}
{{- $_ := set $cfg "admin" (dict "listen" (printf "0.0.0.0:%d" (int .Values.metrics.port))) -}}
{{- end -}}
{{- if .Values.tls.enabled -}}
{{- $_ := set $cfg "tls" (dict "cert_file" "/etc/wharf/tls/tls.crt" "key_file" "/etc/wharf/tls/tls.key") -}}
{{- end -}}
{{- $cache := deepCopy (default dict $cfg.cache) -}}
{{- if eq .Values.storage.backend "s3" -}}
{{- $s3 := .Values.storage.s3 -}}
{{- $st := dict "backend" "s3" "bucket" (required "storage.s3.bucket is required with storage.backend=s3" $s3.bucket) "region" $s3.region "prefix" $s3.prefix "path_style" $s3.pathStyle "insecure" $s3.insecure "redirect" $s3.redirect "redirect_ttl" $s3.redirectTTL "local_max_size" (include "wharf.maxSize" .) -}}
{{- with $s3.endpoint -}}{{- $_ := set $st "endpoint" . -}}{{- end -}}
{{- with $s3.redirectEndpoint -}}{{- $_ := set $st "redirect_endpoint" . -}}{{- end -}}
{{- if $s3.caSecret -}}{{- $_ := set $st "ca_file" (printf "/etc/wharf/storage-ca/%s" $s3.caKey) -}}{{- end -}}
{{- $_ := set $cfg "storage" $st -}}
{{- if not (hasKey $cache "max_size") -}}
{{- $_ := set $cache "max_size" (toString $s3.maxSize) -}}
{{- end -}}
{{- else if not (hasKey $cache "max_size") -}}
{{- $_ := set $cache "max_size" (include "wharf.maxSize" .) -}}
{{- end -}}
{{- $_ := set $cfg "cache" $cache -}}
{{- $ups := list -}}
{{- range $u := $cfg.upstreams -}}
{{- $u = deepCopy $u -}}
{{- with (index $.Values.upstreamCredentials $u.name) -}}
{{- if .username -}}{{- $_ := set $u "username" .username -}}{{- end -}}
{{- $_ := set $u "password_file" (printf "/etc/wharf/upstreams/%s/%s" $u.name (default "password" .passwordKey)) -}}
{{- end -}}
{{- with (index $.Values.upstreamCA $u.name) -}}
{{- $_ := set $u "ca_file" (printf "/etc/wharf/upstream-ca/%s/%s" $u.name (default "ca.crt" .key)) -}}
{{- end -}}
{{- $ups = append $ups $u -}}
{{- end -}}
{{- $_ := set $cfg "upstreams" $ups -}}
{{- include "wharf.integers" $cfg -}}
{{- toToml $cfg -}}
{{- end -}}

{{/* YAML numbers reach templates as floats, and toToml would write 4096 as 4096.0, which
     wharf refuses for an integer key: whole numbers become integers, in place. */}}
{{- define "wharf.integers" -}}
{{- range $k, $v := . -}}
{{- if kindIs "float64" $v -}}
{{- if eq $v (floor $v) -}}{{- $_ := set $ $k (int64 $v) -}}{{- end -}}
{{- else if kindIs "map" $v -}}
{{- include "wharf.integers" $v -}}
{{- else if kindIs "slice" $v -}}
{{- range $v -}}{{- if kindIs "map" . -}}{{- include "wharf.integers" . -}}{{- end -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Probes: the admin port when there is one (plain HTTP), else the mirror port. */}}
{{- define "wharf.probe" -}}
httpGet:
  path: {{ .path }}
  {{- if .ctx.Values.metrics.port }}
  port: metrics
  {{- else }}
  port: http
  scheme: {{ ternary "HTTPS" "HTTP" .ctx.Values.tls.enabled }}
  {{- end }}
{{- end -}}

{{/* The mirror address nodes use. */}}
{{- define "wharf.nodeMirror" -}}
{{- if .Values.nodeConfig.mirror -}}
{{- .Values.nodeConfig.mirror -}}
{{- else if .Values.service.clusterIP -}}
{{- printf "%s://%s:%d" (ternary "https" "http" .Values.tls.enabled) .Values.service.clusterIP (int .Values.service.port) -}}
{{- else -}}
{{- fail "nodeConfig.enabled needs an address nodes can reach without cluster DNS: set nodeConfig.mirror or service.clusterIP" -}}
{{- end -}}
{{- end -}}
