{{/* The chart's name, or nameOverride. */}}
{{- define "interceptor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The objects' name: fullnameOverride, the release's name when it holds the chart's, else release-chart. */}}
{{- define "interceptor.fullname" -}}
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

{{/* Labels on every object. */}}
{{- define "interceptor.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "interceptor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The agent pods' selector. */}}
{{- define "interceptor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "interceptor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{/*
Whether extraArgs turns the agent's boolean flag .key on ("true" or ""), as the agent reads the
DaemonSet's rendering of it: true, "true" and "" render --key; false and "false" render --key=false.
The schema allows nothing else for the flags the ClusterRole follows.
*/}}
{{- define "interceptor.flagOn" -}}
{{- if hasKey .args .key -}}
{{- $value := toString (index .args .key) -}}
{{- if or (eq $value "true") (eq $value "") -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* The agent's image: repository@digest when image.digest is set, else repository:tag (the appVersion by
default). kube2iam's image is refused: a kube2iam values file brings image.repository jtblin/kube2iam,
which would deploy kube2iam under interceptor's flags. */}}
{{- define "interceptor.image" -}}
{{- if contains "kube2iam" .Values.image.repository -}}
{{- fail (printf "image.repository is %s, kube2iam's image: remove the image block (image.repository, image.tag) from the kube2iam values file, or set it to interceptor's image" .Values.image.repository) -}}
{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* The health server's port: kube2iam's prometheus.metricsPort when set, else metricsPort. */}}
{{- define "interceptor.metricsPort" -}}
{{- $port := dig "prometheus" "metricsPort" .Values.metricsPort .Values.AsMap -}}
{{- if eq (int $port) (int .Values.host.port) -}}
{{- fail (printf "the metrics port (%v) is host.port: interceptor serves metrics and health on a port of their own; remove prometheus.metricsPort or set it apart" $port) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/* Where and how the chart's pods run, shared by the agent's and the uninstall DaemonSets. A kube2iam
values file's defaults must not weaken it: an empty tolerations list would leave tainted nodes without an
agent (their pods reaching the node's metadata service unguarded), an empty priorityClassName would let
the agent be preempted; both keep the chart's defaults (deploy/README.md, "Migrating from kube2iam").
kube2iam's image.pullSecrets (names) join imagePullSecrets. */}}
{{- define "interceptor.podPlacement" -}}
priorityClassName: {{ .Values.priorityClassName | default "system-node-critical" }}
{{- $secrets := list -}}
{{- range .Values.imagePullSecrets -}}
{{- $secrets = append $secrets . -}}
{{- end -}}
{{- range (.Values.image.pullSecrets | default list) -}}
{{- $secrets = append $secrets (dict "name" .) -}}
{{- end -}}
{{- with $secrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
tolerations:
  {{- toYaml (.Values.tolerations | default (list (dict "operator" "Exists"))) | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* kube2iam's: with rbac.create false, rbac.serviceAccountName names an existing ServiceAccount. */}}
{{- define "interceptor.externalServiceAccount" -}}
{{- if and (not .Values.rbac.create) .Values.rbac.serviceAccountName -}}
{{- .Values.rbac.serviceAccountName -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount the agent runs as. */}}
{{- define "interceptor.serviceAccountName" -}}
{{- $external := include "interceptor.externalServiceAccount" . -}}
{{- if $external -}}
{{- $external -}}
{{- else if .Values.serviceAccount.create -}}
{{- default (include "interceptor.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The agent's container security context: root without privileged, and exactly these capabilities.
*/}}
{{- define "interceptor.securityContext" -}}
runAsUser: 0
runAsNonRoot: false
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
{{- if include "interceptor.appArmorField" . }}
# containerd's and CRI-O's default AppArmor profiles deny mount(2); the agent mounts a cgroup2 in its
# own cgroup namespace to find its own cgroup id (and bpffs where none is mounted).
appArmorProfile:
  type: Unconfined
{{- end }}
# The runtime's default seccomp profile allows bpf, mount, open_by_handle_at and perf_event_open to a
# process holding the capabilities below.
seccompProfile:
  type: RuntimeDefault
capabilities:
  drop:
    - ALL
  add:
    # bpf(2): load the programs (their verifier checks need what CAP_PERFMON grants too), create,
    # pin and open their maps and links, attach them to the cgroup, list them for `interceptor
    # status`; mount(2): a cgroup2 in its own cgroup namespace to find its own cgroup id (and bpffs
    # where none is). SYS_ADMIN implies what BPF and PERFMON would grant, so those are not added:
    # the runtime tests show the agent works the same without each of them.
    - SYS_ADMIN
    # attach the cgroup_skb program: kernels before 6.9 ask for CAP_NET_ADMIN itself there
    - NET_ADMIN
    # open_by_handle_at: turn cgroup ids into cgroup paths (which pod a connection came from)
    - DAC_READ_SEARCH
{{- end -}}

{{/* The host mounts the agent and the uninstaller need. */}}
{{- define "interceptor.volumeMounts" -}}
# the cgroup2 hierarchy: where the programs attach, and cgroup ids to pod UIDs
- name: cgroup
  mountPath: /sys/fs/cgroup
  readOnly: true
# the host's bpffs, where the programs' links and maps are pinned so they outlive the agent.
# HostToContainer: pins made here land in the host's bpffs (mounted at boot by systemd) and survive
# restarts; Bidirectional would need a privileged container.
- name: bpffs
  mountPath: /sys/fs/bpf
  mountPropagation: HostToContainer
# the root filesystem is read-only; the agent mounts a temporary cgroup2 under its temp dir
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "interceptor.volumes" -}}
- name: cgroup
  hostPath:
    path: /sys/fs/cgroup
    type: Directory
- name: bpffs
  hostPath:
    path: /sys/fs/bpf
    type: DirectoryOrCreate
- name: tmp
  emptyDir:
    sizeLimit: 16Mi
{{- end -}}

{{/* "true" when kube2iam's prometheus.serviceMonitor.enabled asks for a ServiceMonitor. */}}
{{- define "interceptor.kube2iamServiceMonitor" -}}
{{- if dig "prometheus" "serviceMonitor" "enabled" false .Values.AsMap -}}true{{- end -}}
{{- end -}}

{{/* "true" where the cluster takes securityContext.appArmorProfile (Kubernetes 1.30 on); before, the pod
template says the same with the beta annotation (interceptor.appArmorAnnotation). */}}
{{- define "interceptor.appArmorField" -}}
{{- if semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version -}}true{{- end -}}
{{- end -}}

{{/* The pod template's annotations: podAnnotations, and before Kubernetes 1.30 the AppArmor annotation of
`.container` (the field's form from 1.30). */}}
{{- define "interceptor.podAnnotations" -}}
{{- $annotations := deepCopy (.root.Values.podAnnotations | default dict) -}}
{{- if not (include "interceptor.appArmorField" .root) -}}
{{- $_ := set $annotations (printf "container.apparmor.security.beta.kubernetes.io/%s" .container) "unconfined" -}}
{{- end -}}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
