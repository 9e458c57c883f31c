//! What the kubelet and the container runtime do to start a container of a rendered pod spec on the
//! simulated node: the container's environment (downward-API fields, `$(VAR)` references, the
//! `kubernetes` Service's variables), its args with `$(VAR)` expanded, and its view of the machine: a
//! mount namespace of its own where each hostPath volume is the simulated node's counterpart, each
//! emptyDir a tmpfs, and the ServiceAccount's files are at `/var/run/secrets/kubernetes.io/serviceaccount`,
//! and a cgroup namespace of its own rooted at its container cgroup, as containerd gives every
//! container under cgroup v2. (On a hybrid host containerd gives none, and the agent reads its cgroup's
//! full path; the simulated node cannot: its cgroup tree is a subtree of the host's, which only a
//! namespace makes look like a node's whole tree. `tests/tests/runtime.rs` runs that path for real.)

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{kube_api::FakeApiServer, sim::SimNode};

/// Where the kubelet mounts a pod's ServiceAccount token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `$(VAR)` expansion as the kubelet does it in env values, command and args (Kubernetes'
/// `third_party/forked/golang/expansion`): `$(NAME)` becomes `lookup(NAME)`, a reference `lookup`
/// does not know stays as written, `$$` becomes `$`, and any other `$` is kept.
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let input = text.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(input.len());
    let mut cursor = 0;
    while cursor < input.len() {
        if input[cursor] != b'$' || cursor + 1 == input.len() {
            out.push(input[cursor]);
            cursor += 1;
            continue;
        }
        match input[cursor + 1] {
            b'$' => {
                out.push(b'$');
                cursor += 2;
            }
            b'(' => match input[cursor + 2..].iter().position(|&byte| byte == b')') {
                Some(length) => {
                    let name = &text[cursor + 2..cursor + 2 + length];
                    match lookup(name) {
                        Some(value) => out.extend_from_slice(value.as_bytes()),
                        None => out.extend_from_slice(format!("$({name})").as_bytes()),
                    }
                    cursor += length + 3;
                }
                // An unclosed reference is kept as written.
                None => {
                    out.extend_from_slice(b"$(");
                    cursor += 2;
                }
            },
            _ => {
                out.push(b'$');
                cursor += 1;
            }
        }
    }
    String::from_utf8(out).expect("pieces of a string and whole values are UTF-8")
}

/// A container's environment as the kubelet makes it: each entry of `env` in order, a `value` with
/// references to the entries before it (and to `service_env`) expanded, a `fieldRef` read from
/// `fields`; then the variables of `service_env` the container does not set itself.
pub fn container_env(
    container: &Value,
    fields: &BTreeMap<String, String>,
    service_env: &[(String, String)],
) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = Vec::new();
    let declared = container["env"].as_array().map(Vec::as_slice).unwrap_or_default();
    for var in declared {
        let name = var["name"].as_str().context("an env entry without a name")?;
        let value = if let Some(value) = var["value"].as_str() {
            expand(value, |reference| {
                lookup(&env, reference).or_else(|| lookup(service_env, reference))
            })
        } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            fields
                .get(path)
                .with_context(|| format!("{name}: the downward API field {path} is not simulated"))?
                .clone()
        } else {
            bail!("{name}: only values and fieldRefs are simulated: {var}");
        };
        env.retain(|(existing, _)| existing != name);
        env.push((name.to_owned(), value));
    }
    for (name, value) in service_env {
        if lookup(&env, name).is_none() {
            env.push((name.clone(), value.clone()));
        }
    }
    Ok(env)
}

/// A container's args with their references expanded against its whole environment `env`.
pub fn container_args(container: &Value, env: &[(String, String)]) -> Vec<String> {
    container["args"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|arg| {
            let arg = arg
                .as_str()
                .unwrap_or_else(|| panic!("an arg that is no string: {arg}"));
            expand(arg, |reference| lookup(env, reference))
        })
        .collect()
}

/// The container or init container `name` of `pod_spec`.
pub fn container_of<'a>(pod_spec: &'a Value, name: &str) -> Result<&'a Value> {
    ["containers", "initContainers"]
        .iter()
        .filter_map(|list| pod_spec[list].as_array())
        .flatten()
        .find(|container| container["name"] == name)
        .with_context(|| format!("no container {name} in {pod_spec}"))
}

fn lookup(env: &[(String, String)], name: &str) -> Option<String> {
    env.iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.clone())
}

/// The kubelet of the simulated node, in a cluster whose API server is a [`FakeApiServer`] started
/// with `start_in_cluster`.
pub struct Kubelet {
    /// Downward-API field path -> value.
    fields: BTreeMap<String, String>,
    service_env: Vec<(String, String)>,
    /// A hostPath of the pod spec -> its counterpart on the simulated node.
    host_paths: BTreeMap<String, PathBuf>,
    /// The pod's ServiceAccount files, as the kubelet projects them.
    service_account: tempfile::TempDir,
}

impl Kubelet {
    /// The kubelet of `node`, named `node_name`, for a pod of `namespace`. The node's hostPaths the
    /// chart mounts are the simulated node's: `/sys/fs/cgroup` its cgroup tree (the parent of its
    /// `kubepods.slice`), `/sys/fs/bpf` its bpffs.
    pub fn new(node: &SimNode, node_name: &str, api: &FakeApiServer, namespace: &str) -> Result<Self> {
        let service_account = tempfile::tempdir()?;
        api.write_service_account(service_account.path(), namespace)?;
        let cgroup_tree = node.kubepods().parent().context("kubepods.slice has a parent")?;
        let bpffs = node.bpffs_dir();
        let bpffs = bpffs.parent().context("the bpffs dir has a parent")?;
        Ok(Self {
            fields: BTreeMap::from([
                ("status.hostIP".to_owned(), crate::sim::NODE_IP.to_string()),
                ("spec.nodeName".to_owned(), node_name.to_owned()),
            ]),
            service_env: FakeApiServer::in_cluster_env(),
            host_paths: BTreeMap::from([
                ("/sys/fs/cgroup".to_owned(), cgroup_tree.to_path_buf()),
                ("/sys/fs/bpf".to_owned(), bpffs.to_path_buf()),
            ]),
            service_account,
        })
    }

    /// The container (or init container) `name` of `pod_spec`, as this kubelet starts it.
    pub fn container(&self, pod_spec: &Value, name: &str) -> Result<Container> {
        let container = container_of(pod_spec, name)?;
        let env = container_env(container, &self.pod_fields(pod_spec), &self.service_env)?;
        let args = container_args(container, &env);
        let mut mounts = self.volume_mounts(pod_spec, container)?;
        // The ServiceAccount admission adds this volume to every pod that does not opt out.
        if pod_spec["automountServiceAccountToken"] != Value::Bool(false) {
            mounts.push(Mount {
                target: SERVICE_ACCOUNT_DIR.to_owned(),
                volume: Volume::Bind {
                    host: self.service_account.path().to_path_buf(),
                    read_only: true,
                },
            });
        }
        Ok(Container {
            args,
            env,
            mounts,
            staging: tempfile::tempdir()?,
        })
    }

    /// The downward-API fields of a pod of `pod_spec`: the node's, and a hostNetwork pod's IP, which
    /// is the node's (kube2iam's chart takes its HOST_IP from `status.podIP`).
    fn pod_fields(&self, pod_spec: &Value) -> BTreeMap<String, String> {
        let mut fields = self.fields.clone();
        if pod_spec["hostNetwork"] == Value::Bool(true) {
            fields.insert("status.podIP".to_owned(), fields["status.hostIP"].clone());
        }
        fields
    }

    fn volume_mounts(&self, pod_spec: &Value, container: &Value) -> Result<Vec<Mount>> {
        let volumes = pod_spec["volumes"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let declared = container["volumeMounts"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        declared
            .iter()
            .map(|mount| {
                let name = &mount["name"];
                let volume = volumes
                    .iter()
                    .find(|volume| &volume["name"] == name)
                    .with_context(|| format!("no volume {name} for {mount}"))?;
                let target = mount["mountPath"].as_str().context("a mount without a path")?;
                let volume = if let Some(path) = volume["hostPath"]["path"].as_str() {
                    Volume::Bind {
                        host: self
                            .host_paths
                            .get(path)
                            .with_context(|| {
                                format!("hostPath {path} has no counterpart on the simulated node")
                            })?
                            .clone(),
                        read_only: mount["readOnly"] == Value::Bool(true),
                    }
                } else if volume["emptyDir"].is_object() {
                    Volume::EmptyDir
                } else {
                    bail!("only hostPath and emptyDir volumes are simulated: {volume}");
                };
                Ok(Mount {
                    target: target.to_owned(),
                    volume,
                })
            })
            .collect()
    }
}

/// Where a container's program is in its own mount namespace (on the container's own /run).
const IMAGE_PROGRAM: &str = "/run/.image-program";

/// A container ready to start: its args and environment as the kubelet resolved them, and its mounts.
pub struct Container {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    mounts: Vec<Mount>,
    /// Where each bind is first mounted, while its source is still in view.
    staging: tempfile::TempDir,
}

struct Mount {
    target: String,
    volume: Volume,
}

enum Volume {
    Bind { host: PathBuf, read_only: bool },
    EmptyDir,
}

impl Container {
    /// `program` with the container's args and only its environment, run as the runtime runs a
    /// container of a hostNetwork pod: in the node's network namespace, in `cgroup` (the container's
    /// cgroup), with a cgroup namespace and a mount namespace of its own.
    /// `base_env` is what the image (or the simulation) sets; the container's own variables win.
    pub fn command(
        &self,
        node: &SimNode,
        cgroup: &Path,
        program: &Path,
        base_env: &[(String, String)],
    ) -> Result<Command> {
        let mut command = node.command(cgroup, "unshare")?;
        command
            .args(["--mount", "--cgroup", "--propagation", "private", "--"])
            .args(["sh", "-c", &self.mount_script()?])
            .arg(program)
            .args(&self.args)
            .env_clear()
            .envs(base_env.iter().map(|(name, value)| (name, value)))
            .envs(self.env.iter().map(|(name, value)| (name, value)));
        Ok(command)
    }

    /// The shell script that builds the container's view and then execs its program (`$0`).
    fn mount_script(&self) -> Result<String> {
        let mut script = vec![
            "set -e".to_owned(),
            // The image's own /run and home: empty. Mount points under /run are made in it, so nothing
            // is created on the host; no kubeconfig of the host's user is in view.
            "mount -t tmpfs -o mode=0755 tmpfs /run".to_owned(),
            "mount -t tmpfs -o mode=0700 tmpfs /root".to_owned(),
            // The program, where the image has it: in view whatever the mounts below hide (an
            // emptyDir at /tmp hides a checkout under /tmp).
            format!("touch {IMAGE_PROGRAM}"),
            format!("mount --bind \"$0\" {IMAGE_PROGRAM}"),
        ];
        // Every bind's source is mounted aside first: a target may hide a source (the node's cgroup
        // tree is below the host's /sys/fs/cgroup, the bpffs and ServiceAccount dirs below /tmp).
        let mut binds = Vec::new();
        for (index, mount) in self.mounts.iter().enumerate() {
            if let Volume::Bind { host, read_only } = &mount.volume {
                let stage = self.staging.path().join(index.to_string());
                std::fs::create_dir_all(&stage)?;
                script.push(format!("mount --bind {} {}", quote(host), quote(&stage)));
                binds.push((mount.target.as_str(), stage, *read_only));
            }
        }
        for (target, stage, read_only) in binds {
            script.push(mount_point(target)?);
            script.push(format!("mount --move {} {}", quote(&stage), quote(target)));
            if read_only {
                script.push(format!("mount -o remount,bind,ro {}", quote(target)));
            }
        }
        for mount in &self.mounts {
            if let Volume::EmptyDir = mount.volume {
                script.push(mount_point(&mount.target)?);
                script.push(format!("mount -t tmpfs tmpfs {}", quote(&mount.target)));
            }
        }
        script.push(format!("exec {IMAGE_PROGRAM} \"$@\""));
        Ok(script.join("\n"))
    }
}

/// Shell that makes `target` an empty mount point: what the host had mounted there (and below) is
/// unmounted, so the container's mount table shows only its own mount there, as a runtime's does.
/// Only a directory under /run (the container's own, see `mount_script`) may be created.
fn mount_point(target: &str) -> Result<String> {
    let path = Path::new(target);
    let under_run = path.starts_with("/run") || path.starts_with("/var/run");
    ensure!(
        under_run || path.is_dir(),
        "mount point {target} is not on this host: only /run is the container's own"
    );
    let target = quote(target);
    Ok(format!(
        "mkdir -p {target}; if mountpoint -q {target}; then umount -R {target}; fi"
    ))
}

fn quote(text: impl AsRef<Path>) -> String {
    format!("'{}'", text.as_ref().display().to_string().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![
            ("HOST_IP".to_owned(), "10.0.1.23".to_owned()),
            ("EMPTY".to_owned(), String::new()),
        ]
    }

    #[test]
    fn references_expand_and_unknown_ones_stay() {
        let env = env();
        let expand = |text: &str| expand(text, |name| lookup(&env, name));
        assert_eq!(
            expand("--agent-addr=$(HOST_IP):8181"),
            "--agent-addr=10.0.1.23:8181"
        );
        assert_eq!(expand("$(HOST_IP)$(HOST_IP)"), "10.0.1.2310.0.1.23");
        assert_eq!(expand("$(NOPE) and $(EMPTY)."), "$(NOPE) and .");
        assert_eq!(expand("$$(HOST_IP) $$ $x $"), "$(HOST_IP) $ $x $");
        assert_eq!(expand("$(HOST_IP"), "$(HOST_IP");
        assert_eq!(expand("é$(HOST_IP)ü"), "é10.0.1.23ü");
    }

    #[test]
    fn env_values_see_earlier_entries_and_the_service_variables_only() {
        let container = serde_json::json!({"env": [
            {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
            {"name": "ADDR", "value": "$(HOST_IP):$(PORT) $(KUBERNETES_SERVICE_HOST)"},
            {"name": "PORT", "value": "8181"},
        ]});
        let fields = BTreeMap::from([("status.hostIP".to_owned(), "10.0.1.23".to_owned())]);
        let service = vec![("KUBERNETES_SERVICE_HOST".to_owned(), "10.96.0.1".to_owned())];
        let env = container_env(&container, &fields, &service).unwrap();
        assert_eq!(
            lookup(&env, "ADDR").as_deref(),
            Some("10.0.1.23:$(PORT) 10.96.0.1")
        );
        assert_eq!(env.len(), 4);
    }
}
