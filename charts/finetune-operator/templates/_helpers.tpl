{{- define "finetune-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "finetune-operator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The image references, each tag defaulting to the chart's appVersion. */}}
{{- define "finetune-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "finetune-operator.trainerImage" -}}
{{- .Values.trainer.image | default (printf "%s:%s" .Values.trainer.repository (.Values.trainer.tag | default .Chart.AppVersion)) -}}
{{- end -}}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The rules the operator needs wherever it watches FineTuneJobs. */}}
{{- define "finetune-operator.watchRules" -}}
# delete: ttlSecondsAfterFinished removes finished jobs.
- apiGroups: [finetune.ai]
  resources: [finetunejobs]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [finetune.ai]
  resources: [finetunejobs/status, models/status]
  verbs: [get, patch]
- apiGroups: [finetune.ai]
  resources: [models]
  verbs: [get, list, watch, create]
# patch: suspend/resume and activeDeadlineSeconds are carried over to the trainer Job.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# update: a ConfigMap this job controls but whose content is not the job's is replaced;
# delete: likewise a Service (its clusterIP cannot change in place).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, update]
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, delete]
# Each job's checkpoint key: created, never read (no get). delete: a Secret of that name found
# before the trainer Job exists is replaced, since the operator cannot know its key (docs/outputs.md).
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, delete]
# Each job's NetworkPolicy admits only its own pods (and metrics scrapes) to its trainers.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, update]
# get: the claims a trainer pod mounts must exist before its Job is created.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
# delete: a multi-node attempt whose peer failed is restarted by deleting its other pods.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, delete]
# list: Karpenter explains why it cannot provision in events on the trainer pods.
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
{{- end -}}

{{/* Values that render but cannot work together: refuse them at install, naming the fix
(values.schema.json checks each value on its own). */}}
{{- define "finetune-operator.validate" -}}
{{- if and (eq .Values.provisioner "karpenter") (not .Values.karpenter.enabled) -}}
{{- fail "provisioner is karpenter but karpenter.enabled is false: the operator would have no RBAC for NodePools; set karpenter.enabled=true or choose provisioner existing or none" -}}
{{- end -}}
{{- if and (eq .Values.provisioner "karpenter") (not .Values.karpenter.nodeClassRef) -}}
{{- fail "provisioner is karpenter but karpenter.nodeClassRef is empty: jobs that name no node class would have none; set karpenter.nodeClassRef (group, kind, name)" -}}
{{- end -}}
{{- if and .Values.podDisruptionBudget.enabled (lt (int .Values.replicaCount) 2) -}}
{{- fail "podDisruptionBudget.enabled needs replicaCount of 2 or more: with one replica it would block every node drain" -}}
{{- end -}}
{{- end -}}
