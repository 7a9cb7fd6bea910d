{{/*
Helpers, all named outrigger.*. Resource names derive from outrigger.fullname; labels follow
the app.kubernetes.io recommendations, with a component label per part of the chart.
*/}}

{{- define "outrigger.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every resource name: the release name, or release-chart, at most 63 chars. */}}
{{- define "outrigger.fullname" -}}
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

{{- define "outrigger.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "control-plane"). */}}
{{- define "outrigger.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outrigger.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Every label of one component: (dict "root" $ "component" "control-plane"). */}}
{{- define "outrigger.labels" -}}
helm.sh/chart: {{ include "outrigger.chart" .root }}
{{ include "outrigger.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: outrigger
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "outrigger.serviceAccountName" -}}
{{- if .Values.controlPlane.serviceAccount.create -}}
{{- default (include "outrigger.fullname" .) .Values.controlPlane.serviceAccount.name -}}
{{- else -}}
{{- required "controlPlane.serviceAccount.name: name an existing ServiceAccount when controlPlane.serviceAccount.create is false" .Values.controlPlane.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The outrigger image: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "outrigger.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The control plane Service's in-cluster DNS name (what the API server and sidecars dial). */}}
{{- define "outrigger.controlPlane.host" -}}
{{- printf "%s.%s.svc" (include "outrigger.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "outrigger.controlPlane.xdsAddress" -}}
{{- printf "%s:%d" (include "outrigger.controlPlane.host" .) (int .Values.controlPlane.ports.xds) -}}
{{- end -}}

{{/* Where the mesh file is mounted, and where webhook certificates are mounted. */}}
{{- define "outrigger.meshDir" -}}/etc/outrigger{{- end -}}
{{- define "outrigger.webhook.certDir" -}}/var/run/secrets/outrigger/webhook{{- end -}}

{{- define "outrigger.meshConfigMapName" -}}
{{- printf "%s-mesh" (include "outrigger.fullname" .) -}}
{{- end -}}

{{- define "outrigger.webhook.mutatingName" -}}
{{- printf "%s-inject" (include "outrigger.fullname" .) -}}
{{- end -}}

{{- define "outrigger.webhook.validatingName" -}}
{{- printf "%s-validate" (include "outrigger.fullname" .) -}}
{{- end -}}

{{- define "outrigger.webhook.certificateName" -}}
{{- printf "%s-webhook" (include "outrigger.fullname" .) -}}
{{- end -}}

{{/* The Secret holding the webhook's serving certificate, whichever mode makes it. */}}
{{- define "outrigger.webhook.secretName" -}}
{{- if eq .Values.webhook.certificates "secret" -}}
{{- required "webhook.secret.name: name the kubernetes.io/tls Secret when webhook.certificates is secret" .Values.webhook.secret.name -}}
{{- else -}}
{{- printf "%s-webhook-tls" (include "outrigger.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
certificates=chart: the CA and serving certificate, base64 PEM, as JSON {ca, cert, key}.
Made once per render and remembered on the root context, so the Secret and both webhook
configurations carry the same CA. Kept across `helm upgrade`: an existing Secret with all three
keys is reused (lookup; an offline render, `helm template` or a GitOps tool without cluster
access sees no Secret and makes new ones, which the control plane reloads).
*/}}
{{- define "outrigger.webhook.chartTLS" -}}
{{- if not (hasKey . "outriggerWebhookTLS") -}}
{{- $name := include "outrigger.webhook.secretName" . -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $name -}}
{{- $data := dict -}}
{{- if $existing -}}{{- $data = default (dict) $existing.data -}}{{- end -}}
{{- $tls := dict -}}
{{- if and (hasKey $data "ca.crt") (hasKey $data "tls.crt") (hasKey $data "tls.key") -}}
{{- $tls = dict "ca" (index $data "ca.crt") "cert" (index $data "tls.crt") "key" (index $data "tls.key") -}}
{{- else -}}
{{- $days := int .Values.webhook.chart.validityDays -}}
{{- $host := include "outrigger.controlPlane.host" . -}}
{{- $ca := genCA (printf "%s-webhook-ca" (include "outrigger.fullname" .)) $days -}}
{{- $names := list $host (printf "%s.%s" $host .Values.clusterDomain) -}}
{{- $cert := genSignedCert $host nil $names $days $ca -}}
{{- $tls = dict "ca" ($ca.Cert | b64enc) "cert" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc) -}}
{{- end -}}
{{- $_ := set . "outriggerWebhookTLS" $tls -}}
{{- end -}}
{{- toJson (get . "outriggerWebhookTLS") -}}
{{- end -}}

{{/*
clientConfig.caBundle for both webhook configurations, or nothing where another party fills it
in (self: the control plane patches it; certManager: cert-manager's CA injector).
*/}}
{{- define "outrigger.webhook.caBundle" -}}
{{- if eq .Values.webhook.certificates "chart" -}}
caBundle: {{ (include "outrigger.webhook.chartTLS" . | fromJson).ca }}
{{- else if eq .Values.webhook.certificates "secret" -}}
caBundle: {{ required "webhook.secret.caBundle: give the base64 PEM CA that signed the Secret's tls.crt" .Values.webhook.secret.caBundle }}
{{- end -}}
{{- end -}}

{{/* Annotations of both webhook configurations (certManager: where the CA injector reads). */}}
{{- define "outrigger.webhook.annotations" -}}
{{- if eq .Values.webhook.certificates "certManager" -}}
annotations:
  cert-manager.io/inject-ca-from: {{ printf "%s/%s" .Release.Namespace (include "outrigger.webhook.certificateName" .) }}
{{- end -}}
{{- end -}}

{{/* clientConfig.service of a webhook: (dict "root" $ "path" "/inject"). */}}
{{- define "outrigger.webhook.clientConfig" -}}
clientConfig:
  service:
    name: {{ include "outrigger.fullname" .root }}
    namespace: {{ .root.Release.Namespace }}
    path: {{ .path }}
    port: 443
  {{- include "outrigger.webhook.caBundle" .root | nindent 2 }}
{{- end -}}

{{/* Namespaces no webhook ever sees: the system ones and the control plane's own. */}}
{{- define "outrigger.webhook.excludedNamespaces" -}}
- key: kubernetes.io/metadata.name
  operator: NotIn
  values: [kube-system, kube-public, {{ .Release.Namespace }}]
{{- end -}}

{{/* The restricted Pod Security profile for a container running as `uid`. */}}
{{- define "outrigger.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "outrigger.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The OTLP endpoint sidecars send traces to: tracing.otlpEndpoint, or the chart's Jaeger. */}}
{{- define "outrigger.tracing.endpoint" -}}
{{- if and .Values.tracing.otlpEndpoint .Values.tracing.jaeger.enabled -}}
{{- fail "tracing.otlpEndpoint and tracing.jaeger.enabled are both set: choose one (an existing collector, or the chart's Jaeger)" -}}
{{- else if .Values.tracing.otlpEndpoint -}}
{{- .Values.tracing.otlpEndpoint -}}
{{- else if .Values.tracing.jaeger.enabled -}}
{{- printf "http://%s.%s.svc:4317" .Values.tracing.jaeger.name .Release.Namespace -}}
{{- end -}}
{{- end -}}
