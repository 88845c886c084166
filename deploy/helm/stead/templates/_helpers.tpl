{{/*
The labels of every object: deploy/base's (app.kubernetes.io/part-of) and
Helm's own. tests/helm/render-check.py sets exactly the Helm ones aside when
it compares a render with `kubectl kustomize deploy`.
*/}}
{{- define "stead.labels" -}}
app.kubernetes.io/part-of: stead
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/*
The agent's pods: the DaemonSet's selector, its pod template's labels and the
metrics Service's selector. Fixed, as in deploy/base: a selector cannot change
once the DaemonSet exists.
*/}}
{{- define "stead.selectorLabels" -}}
app.kubernetes.io/name: stead
app.kubernetes.io/component: node
{{- end }}

{{- define "stead.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* A pool's folder inside the agent's container. */}}
{{- define "stead.poolPath" -}}
/var/lib/stead/pools/{{ .name }}
{{- end }}

{{/*
STEAD_POOLS: NAME:BACKEND:PATH[:reserve=AMOUNT], comma-separated, the first
the default. A reserve of 0 is given (kindIs, not `with`, which would drop it).
*/}}
{{- define "stead.poolsEnv" -}}
{{- $pools := list }}
{{- range .Values.pools }}
{{- $pool := printf "%s:%s:%s" .name .backend (include "stead.poolPath" .) }}
{{- if not (kindIs "invalid" .reserve) }}
{{- $pool = printf "%s:reserve=%v" $pool .reserve }}
{{- end }}
{{- $pools = append $pools $pool }}
{{- end }}
{{- join "," $pools }}
{{- end }}

{{/*
What the schema cannot say: pool names are distinct, and every class names a
pool of `pools` with parameters its backend takes.
*/}}
{{- define "stead.validate" -}}
{{- $backends := dict }}
{{- range .Values.pools }}
{{- if hasKey $backends .name }}
{{- fail (printf "pools: pool %q is given twice" .name) }}
{{- end }}
{{- $_ := set $backends .name .backend }}
{{- end }}
{{- range .Values.storageClasses }}
{{- $backend := get $backends .pool }}
{{- if not $backend }}
{{- fail (printf "storageClasses: class %q names pool %q, which is not in pools (%s)" .name .pool (keys $backends | sortAlpha | join ", ")) }}
{{- end }}
{{- if and (eq $backend "dir") (or .fsType .allocation) }}
{{- fail (printf "storageClasses: class %q: pool %q is a dir pool, which takes neither fsType nor allocation" .name .pool) }}
{{- end }}
{{- end }}
{{- end }}
