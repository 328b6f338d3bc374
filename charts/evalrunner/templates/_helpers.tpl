{{/* The release's full name, used for every object of the chart. */}}
{{- define "evalrunner.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "evalrunner.labels" -}}
app.kubernetes.io/name: evalrunner
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: controller
app.kubernetes.io/part-of: evalrunner
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "evalrunner.selectorLabels" -}}
app.kubernetes.io/name: evalrunner
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "evalrunner.serviceAccountName" -}}
{{- default (include "evalrunner.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "evalrunner.adminSecretName" -}}
{{- default (printf "%s-admin" (include "evalrunner.fullname" .)) .Values.adminToken.existingSecret -}}
{{- end -}}

{{/* "true" when reading /evals and /metrics needs the read token, else empty. */}}
{{- define "evalrunner.readTokenEnabled" -}}
{{- if or .Values.readToken.enabled .Values.readToken.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "evalrunner.readSecretName" -}}
{{- default (printf "%s-read" (include "evalrunner.fullname" .)) .Values.readToken.existingSecret -}}
{{- end -}}

{{/* The store service URL as runner pods in any namespace reach it. */}}
{{- define "evalrunner.storeURL" -}}
{{- printf "http://%s.%s.svc:%d" (include "evalrunner.fullname" .) .Release.Namespace (int .Values.service.port) -}}
{{- end -}}

{{/* Rules for the namespaces the controller serves: exactly the verbs the code uses (controller/kube.py, kopf). */}}
{{- define "evalrunner.namespacedRules" -}}
- apiGroups: ["evals.workshop.dev"]
  resources: ["evalruns"]
  verbs: ["get", "list", "watch"]          # kopf's watch, the reconciler's reads
- apiGroups: ["evals.workshop.dev"]
  resources: ["evalruns/status"]
  verbs: ["patch"]                         # status only: never the spec
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete"] # runner pods into the index; delete a replaced run's pod
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]  # a Job per suite attempt; watched into the index;
                                         # deleted (replaced, never started, finished past jobTTLSeconds)
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create"]                 # inline suites; get to adopt its own after a restart
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]                        # Events on EvalRuns
{{- end -}}

{{/* The audience of runner pods' store tokens: one per release, so a pod of one release cannot write to another's store. */}}
{{- define "evalrunner.tokenAudience" -}}
{{ .Values.controller.tokenAudience | default (printf "evalrunner-store.%s.%s" .Release.Namespace (include "evalrunner.fullname" .)) }}
{{- end -}}

{{/* The controller's image, which runner pods use too unless an EvalRun names one. */}}
{{- define "evalrunner.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
