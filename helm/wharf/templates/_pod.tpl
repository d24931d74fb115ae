{{/* The pod template, shared by the StatefulSet (a cache volume per pod) and, with
     storage.backend=s3, the Deployment (replicas on one bucket, an emptyDir local tier). */}}
{{- define "wharf.pod" -}}
metadata:
  labels:
    {{- include "wharf.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "wharf.config" . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: wharf
      image: {{ include "wharf.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["wharf", "serve"]
      args: ["--config", "/etc/wharf/config.toml"]
      {{- $s3creds := and (eq .Values.storage.backend "s3") .Values.storage.s3.credentialsSecret }}
      {{- if or .Values.env $s3creds }}
      env:
        {{- if $s3creds }}
        - name: AWS_ACCESS_KEY_ID
          valueFrom:
            secretKeyRef:
              name: {{ .Values.storage.s3.credentialsSecret }}
              key: {{ .Values.storage.s3.accessKeyIdKey }}
        - name: AWS_SECRET_ACCESS_KEY
          valueFrom:
            secretKeyRef:
              name: {{ .Values.storage.s3.credentialsSecret }}
              key: {{ .Values.storage.s3.secretAccessKeyKey }}
        {{- end }}
        {{- with .Values.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      ports:
        - name: http
          containerPort: {{ .Values.service.port }}
        {{- if .Values.metrics.port }}
        - name: metrics
          containerPort: {{ .Values.metrics.port }}
        {{- end }}
      startupProbe:
        {{- include "wharf.probe" (dict "ctx" . "path" "/_wharf/health") | nindent 8 }}
        periodSeconds: {{ .Values.startupProbe.periodSeconds }}
        failureThreshold: {{ .Values.startupProbe.failureThreshold }}
      livenessProbe:
        {{- include "wharf.probe" (dict "ctx" . "path" "/_wharf/health") | nindent 8 }}
        periodSeconds: 10
        failureThreshold: 3
      readinessProbe:
        {{- include "wharf.probe" (dict "ctx" . "path" "/_wharf/ready") | nindent 8 }}
        periodSeconds: 10
        failureThreshold: 2
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/wharf/config.toml
          subPath: config.toml
          readOnly: true
        - name: data
          mountPath: /data
        {{- if .Values.tls.enabled }}
        - name: tls
          mountPath: /etc/wharf/tls
          readOnly: true
        {{- end }}
        {{- range $name, $c := .Values.upstreamCredentials }}
        - name: upstream-{{ $name | replace "." "-" | replace ":" "-" }}
          mountPath: /etc/wharf/upstreams/{{ $name }}
          readOnly: true
        {{- end }}
        {{- range $name, $c := .Values.upstreamCA }}
        - name: upstream-ca-{{ $name | replace "." "-" | replace ":" "-" }}
          mountPath: /etc/wharf/upstream-ca/{{ $name }}
          readOnly: true
        {{- end }}
        {{- if and (eq .Values.storage.backend "s3") .Values.storage.s3.caSecret }}
        - name: storage-ca
          mountPath: /etc/wharf/storage-ca
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "wharf.fullname" . }}
    {{- if .Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ required "tls.secretName is required when tls.enabled" .Values.tls.secretName }}
    {{- end }}
    {{- range $name, $c := .Values.upstreamCredentials }}
    - name: upstream-{{ $name | replace "." "-" | replace ":" "-" }}
      secret:
        secretName: {{ required (printf "upstreamCredentials.%s.secretName is required" $name) $c.secretName }}
        items:
          - key: {{ default "password" $c.passwordKey }}
            path: {{ default "password" $c.passwordKey }}
    {{- end }}
    {{- range $name, $c := .Values.upstreamCA }}
    - name: upstream-ca-{{ $name | replace "." "-" | replace ":" "-" }}
      secret:
        secretName: {{ required (printf "upstreamCA.%s.secretName is required" $name) $c.secretName }}
        items:
          - key: {{ default "ca.crt" $c.key }}
            path: {{ default "ca.crt" $c.key }}
    {{- end }}
    {{- if and (eq .Values.storage.backend "s3") .Values.storage.s3.caSecret }}
    - name: storage-ca
      secret:
        secretName: {{ .Values.storage.s3.caSecret }}
        items:
          - key: {{ .Values.storage.s3.caKey }}
            path: {{ .Values.storage.s3.caKey }}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- if or (not .Values.persistence.enabled) (eq .Values.storage.backend "s3") }}
    - name: data
      emptyDir:
        sizeLimit: {{ .Values.persistence.size }}
    {{- end }}
{{- end -}}
