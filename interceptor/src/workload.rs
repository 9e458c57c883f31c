//! workload: who a caller is and which role it asks for, given its cgroup. One interface
//! ([`WorkloadSource`]) with its sources: the static TOML file of DESIGN.md ([`StaticWorkloads`],
//! reloaded when it changes) and the node's pods from Kubernetes ([`kube::KubeWorkloads`]); with both,
//! [`FirstMatch`] asks the static file first.

#[cfg(feature = "kubernetes")]
pub mod kube;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Deserialize;

use crate::{
    identity::CgroupPath,
    policy::{
        RequestedTags, RoleRequest,
        tags::{SessionTags, TagError},
    },
    telemetry::ResultLabels,
};

/// A caller the source knows, and what it asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// How logs name it: `static/<name>` for the static source, `<namespace>/<pod>` for pods.
    pub name: String,
    /// The STS session name when the request names none: CloudTrail shows it beside every call.
    pub session_name: String,
    pub request: RoleRequest,
    /// The pod, for workloads from Kubernetes: where Events about its refusals go.
    pub pod: Option<PodRef>,
}

/// A pod: what Events about it name, and how it runs (what the node-credentials setting reads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.hostNetwork`: it runs in the node's own network namespace.
    pub host_network: bool,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("no workload is known for cgroup {0}")]
    Unknown(CgroupPath),
    #[error("pod {uid} is not known on this node (waited {waited:?} for the API server to deliver it)")]
    PodNotKnown {
        uid: crate::identity::PodUid,
        waited: Duration,
    },
    /// With ServiceAccount roles, the pod names no role and its ServiceAccount is not in the store
    /// (listed not yet, or the list failed): what the account names is unknown, so nothing is
    /// given, neither the default role nor the node's credentials.
    #[error(
        "pod {pod} names no role and its ServiceAccount {account} is not known on this node yet, so its role is not known"
    )]
    ServiceAccountNotKnown { pod: String, account: String },
    #[error("pod {uid} was deleted")]
    PodDeleted { uid: crate::identity::PodUid },
    #[error("pod {pod} has finished ({phase})")]
    PodFinished { pod: String, phase: String },
    #[error(
        "static pod {uid} is claimed by more than one pod object (kubernetes.io/config.mirror): no role until one claim is left"
    )]
    MirrorContested { uid: crate::identity::PodUid },
}

/// Why a workload was refused a role, for the sources that tell someone (Kubernetes Events).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Its role annotation, external id or session name is not valid, or is over AWS's limit.
    BadAnnotation,
    /// Its namespace does not allow the role.
    NamespaceRestricted,
    /// Its session tags (`--session-tags`) break STS's rules.
    BadSessionTags,
    /// STS refused to let the node assume the role.
    AssumeRoleFailed,
}

/// Where workloads come from.
#[async_trait::async_trait]
pub trait WorkloadSource: Send + Sync {
    /// The workload whose processes live in `cgroup` (relative to the cgroup2 mount).
    async fn workload_for(&self, cgroup: &CgroupPath) -> Result<Arc<Workload>, WorkloadError>;

    /// Tells whoever the source tells that `workload` was refused (`message` says why). Must not block.
    fn refused(&self, _workload: &Workload, _refusal: Refusal, _message: &str) {}
}

/// Several sources, asked in order: the first that knows the cgroup answers.
pub struct FirstMatch(pub Vec<Arc<dyn WorkloadSource>>);

#[async_trait::async_trait]
impl WorkloadSource for FirstMatch {
    async fn workload_for(&self, cgroup: &CgroupPath) -> Result<Arc<Workload>, WorkloadError> {
        for source in &self.0 {
            match source.workload_for(cgroup).await {
                Err(WorkloadError::Unknown(_)) => continue,
                decided => return decided,
            }
        }
        Err(WorkloadError::Unknown(cgroup.clone()))
    }

    fn refused(&self, workload: &Workload, refusal: Refusal, message: &str) {
        for source in &self.0 {
            source.refused(workload, refusal, message);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StaticFileError {
    #[error("cannot read workload file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workload file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("workload file {path}, entry {index}: bad cgroup glob {glob:?}")]
    Glob {
        path: PathBuf,
        index: usize,
        glob: String,
        #[source]
        source: globset::Error,
    },
    #[error("workload file {path}: its cgroup globs cannot be matched together (too many or too large)")]
    Globs {
        path: PathBuf,
        #[source]
        source: globset::Error,
    },
    #[error("workload file {path}, entry {index}: `role` is empty (leave it out for the default role)")]
    EmptyRole { path: PathBuf, index: usize },
    #[error("workload file {path}, entry {index}: its `tags` cannot be sent to STS")]
    Tags {
        path: PathBuf,
        index: usize,
        #[source]
        source: TagError,
    },
}

/// The static file: `[[workload]]` entries, matched outermost cgroup first, then in file order
/// ([`Table::lookup`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticFile {
    #[serde(default)]
    workload: Vec<StaticEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticEntry {
    /// Glob relative to the cgroup2 mount, e.g. `system.slice/billing.service`.
    cgroup: String,
    /// Role name (joined to the base ARN) or full role ARN; without one, the default role.
    role: Option<String>,
    /// How logs and the default session name call it; defaults to the glob's last segment.
    name: Option<String>,
    external_id: Option<String>,
    session_name: Option<String>,
    /// STS session tags every session of the entry carries (key = value), whatever `--session-tags`
    /// says: writing them is the opt-in.
    #[serde(default)]
    tags: BTreeMap<String, String>,
    /// Whether the tags stay on the sessions the entry's session assumes in turn.
    #[serde(default)]
    tags_transitive: bool,
}

/// The parsed file: each glob with the workload it names. Public for the fuzz target of the parser.
#[derive(Debug, Default)]
pub struct Table {
    /// Entry `i`'s glob is glob `i` of the set.
    entries: Vec<(Glob, Arc<Workload>)>,
    /// All globs in one matcher: one pass over a path finds every entry that matches it (exact paths
    /// by a hash lookup), where a matcher per entry cost a regex run per entry and ancestor.
    globs: GlobSet,
}

impl Table {
    /// Parses the text of the file at `path` (which only names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, StaticFileError> {
        let file: StaticFile = toml::from_str(text).map_err(|source| StaticFileError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let entries: Vec<(Glob, Arc<Workload>)> = file
            .workload
            .into_iter()
            .enumerate()
            .map(|(index, entry)| Self::entry(path, index, entry))
            .collect::<Result<_, _>>()?;
        let mut globs = GlobSetBuilder::new();
        for (glob, _) in &entries {
            globs.add(glob.clone());
        }
        let globs = globs.build().map_err(|source| StaticFileError::Globs {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self { entries, globs })
    }

    fn entry(
        path: &Path,
        index: usize,
        entry: StaticEntry,
    ) -> Result<(Glob, Arc<Workload>), StaticFileError> {
        let glob = entry.cgroup.trim_matches('/');
        // `*` stays within one path segment; `**` crosses them.
        let compiled = GlobBuilder::new(glob)
            .literal_separator(true)
            .build()
            .map_err(|source| StaticFileError::Glob {
                path: path.to_owned(),
                index,
                glob: entry.cgroup.clone(),
                source,
            })?;
        if entry.role.as_ref().is_some_and(|role| role.trim().is_empty()) {
            return Err(StaticFileError::EmptyRole {
                path: path.to_owned(),
                index,
            });
        }
        let tags =
            SessionTags::new(entry.tags, entry.tags_transitive).map_err(|source| StaticFileError::Tags {
                path: path.to_owned(),
                index,
                source,
            })?;
        let name = entry
            .name
            .unwrap_or_else(|| glob.rsplit('/').next().unwrap_or(glob).to_owned());
        let name = format!("static/{name}");
        let workload = Workload {
            session_name: name.clone(),
            request: RoleRequest {
                role: entry.role,
                external_id: entry.external_id,
                session_name: entry.session_name,
                origin: Some(format!("workload file {}, entry {name}", path.display()).into()),
                allowed: None,
                tags: RequestedTags(Ok(tags)),
            },
            name,
            pod: None,
        };
        Ok((compiled, Arc::new(workload)))
    }

    /// The workload of `cgroup`: an entry for a cgroup covers the cgroups below it, so the entry may
    /// match the cgroup itself or any ancestor. Ancestors are tried from the outermost inward, and the
    /// first (outermost) ancestor that any entry matches decides; among the entries that match it, the
    /// first in file order wins. Deeper cgroups are never looked at once an ancestor matched.
    ///
    /// Why outermost first: a process that may create cgroups (a service with `Delegate=yes`, a
    /// container runtime) names everything below its own cgroup. Tried any other way (the innermost
    /// cgroup first, or each entry in file order against every ancestor), `system.slice/a.service`
    /// could create `system.slice/a.service/x/b.service` and take the role of an entry for
    /// `**/b.service` listed before its own; outermost first, the entry for `system.slice/a.service`
    /// has already matched above it. What a caller names below its own cgroup can only matter when nothing above
    /// matched. The flip side: an entry that matches an ancestor shadows every entry for the cgroups
    /// below it (a catch-all `**` matches `system.slice` itself, so everything gets its role); a
    /// fallback goes last in the file at the depth it covers (`system.slice/*.service`).
    pub fn lookup(&self, cgroup: &CgroupPath) -> Option<Arc<Workload>> {
        outermost_first(cgroup.as_str()).find_map(|ancestor| self.first_entry_matching(ancestor))
    }

    fn first_entry_matching(&self, cgroup: &str) -> Option<Arc<Workload>> {
        let first = self.globs.matches(cgroup).into_iter().min()?;
        Some(self.entries[first].1.clone())
    }
}

/// A cgroup path and its ancestors, outermost first: `a/b/c` -> `a`, `a/b`, `a/b/c` (nothing for the
/// root, which no entry names).
fn outermost_first(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/')
        .map(|(end, _)| &path[..end])
        .chain(std::iter::once(path))
        .filter(|ancestor| !ancestor.is_empty())
}

/// The workload source's state: how many workloads it knows and how its reloads went.
#[derive(Clone, Debug, Default)]
pub struct WorkloadMetrics {
    workloads: Gauge,
    reloads: Family<ResultLabels, Counter>,
}

impl WorkloadMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "workloads",
            "Workloads the workload source knows",
            self.workloads.clone(),
        );
        registry.register(
            "workload_reloads",
            "Reloads of the static workload file by result (an error keeps the previous file)",
            self.reloads.clone(),
        );
    }

    fn loaded(&self, table: &Table) {
        self.workloads
            .set(i64::try_from(table.entries.len()).unwrap_or(i64::MAX));
    }

    fn reload(&self, ok: bool) {
        self.reloads.get_or_create(&ResultLabels::outcome(ok)).inc();
    }
}

/// The static workload file, reloaded when it changes; a file that does not parse keeps the last good
/// one in force.
pub struct StaticWorkloads {
    path: PathBuf,
    state: RwLock<Loaded>,
    metrics: WorkloadMetrics,
}

struct Loaded {
    table: Arc<Table>,
    /// Modification time and length of the file the table came from.
    stamp: Option<(SystemTime, u64)>,
}

impl StaticWorkloads {
    /// Loads the file; fails when it cannot be read or parsed (the agent must not start without it).
    pub fn load(path: &Path) -> Result<Self, StaticFileError> {
        let stamp = file_stamp(path);
        let table = read_table(path)?;
        tracing::info!(path = %path.display(), workloads = table.entries.len(), "workload file loaded");
        let metrics = WorkloadMetrics::default();
        metrics.loaded(&table);
        Ok(Self {
            path: path.to_owned(),
            state: RwLock::new(Loaded {
                table: Arc::new(table),
                stamp,
            }),
            metrics,
        })
    }

    pub fn metrics(&self) -> &WorkloadMetrics {
        &self.metrics
    }

    /// Re-reads the file when its modification time or length changed. Returns whether a new table
    /// took effect; a bad file is logged and the old table stays.
    pub fn reload_if_changed(&self) -> bool {
        let stamp = file_stamp(&self.path);
        if stamp == self.state.read().unwrap_or_else(|e| e.into_inner()).stamp {
            return false;
        }
        let result = read_table(&self.path);
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.stamp = stamp;
        self.metrics.reload(result.is_ok());
        match result {
            Ok(table) => {
                tracing::info!(path = %self.path.display(), workloads = table.entries.len(), "workload file reloaded");
                self.metrics.loaded(&table);
                state.table = Arc::new(table);
                true
            }
            Err(err) => {
                tracing::warn!(error = %crate::error_chain(&err), "workload file not reloaded; keeping the previous one");
                false
            }
        }
    }

    /// Checks the file every `interval` while the source lives.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        crate::periodic::every(interval, self, |source| async move {
            source.reload_if_changed();
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's entries in force: each cgroup glob with the workload it names.
    pub fn entries(&self) -> Vec<(String, Arc<Workload>)> {
        self.table()
            .entries
            .iter()
            .map(|(glob, workload)| (glob.glob().to_owned(), workload.clone()))
            .collect()
    }

    fn table(&self) -> Arc<Table> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).table.clone()
    }
}

#[async_trait::async_trait]
impl WorkloadSource for StaticWorkloads {
    async fn workload_for(&self, cgroup: &CgroupPath) -> Result<Arc<Workload>, WorkloadError> {
        self.table()
            .lookup(cgroup)
            .ok_or_else(|| WorkloadError::Unknown(cgroup.clone()))
    }
}

fn read_table(path: &Path) -> Result<Table, StaticFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| StaticFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    Table::parse(path, &text)
}

/// Follows symlinks, so a ConfigMap's atomic symlink swap counts as a change.
fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[workload]]
cgroup = "system.slice/billing.service"
role = "billing"

[[workload]]
name = "batch"
cgroup = "system.slice/batch-*.service"
role = "arn:aws:iam::123456789012:role/batch"
external_id = "ext-1"
session_name = "batch-jobs"

[[workload]]
cgroup = "**/kubepods-besteffort-pod*.slice"
role = "pods"
"#;

    fn table() -> Table {
        Table::parse(Path::new("workloads.toml"), FILE).unwrap()
    }

    fn lookup(path: &str) -> Option<String> {
        table()
            .lookup(&CgroupPath::new(path))
            .map(|workload| workload.name.clone())
    }

    #[test]
    fn matches_the_cgroup_or_an_ancestor_first_entry_wins() {
        assert_eq!(
            lookup("system.slice/billing.service").as_deref(),
            Some("static/billing.service")
        );
        assert_eq!(
            lookup("system.slice/billing.service/worker").as_deref(),
            Some("static/billing.service")
        );
        assert_eq!(
            lookup("system.slice/batch-7.service").as_deref(),
            Some("static/batch")
        );
        assert_eq!(
            lookup("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podab_cd.slice/cri-containerd-1.scope")
                .as_deref(),
            Some("static/kubepods-besteffort-pod*.slice")
        );
        assert_eq!(lookup("system.slice/other.service"), None);
        assert_eq!(lookup("system.slice"), None);
        assert_eq!(lookup(""), None);
    }

    #[test]
    fn an_entry_carries_its_own_session_tags_checked_as_sts_checks_them() {
        let file = r#"
[[workload]]
cgroup = "system.slice/billing.service"
role = "billing"
tags = { team = "payments", cost-center = "cc 42" }
tags_transitive = true

[[workload]]
cgroup = "system.slice/batch.service"
"#;
        let table = Table::parse(Path::new("workloads.toml"), file).unwrap();
        let tags_of = |path: &str| {
            let workload = table.lookup(&CgroupPath::new(path)).unwrap();
            workload.request.tags.0.clone().unwrap()
        };
        let billing = tags_of("system.slice/billing.service");
        assert_eq!(billing.to_string(), "cost-center=cc 42,team=payments");
        assert_eq!(billing.transitive_keys().count(), 2);
        assert!(tags_of("system.slice/batch.service").is_empty());
        for (bad, problem) in [
            (r#"tags = { "aws:team" = "x" }"#, "`aws:`"),
            (r#"tags = { team = "a;b" }"#, "may only hold"),
            (r#"tags = { Team = "a", team = "b" }"#, "twice"),
        ] {
            let text = format!("[[workload]]\ncgroup = \"a.service\"\n{bad}\n");
            let err = Table::parse(Path::new("w.toml"), &text).unwrap_err();
            assert!(
                matches!(err, StaticFileError::Tags { index: 0, .. }),
                "{bad}: {err}"
            );
            assert!(
                crate::error_chain(&err).contains(problem),
                "{bad}: {}",
                crate::error_chain(&err)
            );
        }
    }

    fn role_of(table: &Table, path: &str) -> Option<String> {
        table
            .lookup(&CgroupPath::new(path))
            .and_then(|workload| workload.request.role.clone())
    }

    /// The attack outermost-first matching stops: `a.service` creates a child cgroup named like
    /// another entry's service, and that entry comes first in the file.
    #[test]
    fn a_child_cgroup_cannot_name_itself_into_another_entry() {
        let file = r#"
[[workload]]
cgroup = "**/b.service"
role = "b"

[[workload]]
cgroup = "system.slice/a.service"
role = "a"
"#;
        let table = Table::parse(Path::new("w.toml"), file).unwrap();
        let role_of = |path: &str| role_of(&table, path);
        assert_eq!(
            role_of("system.slice/a.service/x/b.service").as_deref(),
            Some("a")
        );
        assert_eq!(role_of("system.slice/a.service/b.service").as_deref(), Some("a"));
        assert_eq!(role_of("system.slice/b.service").as_deref(), Some("b"));
        assert_eq!(role_of("system.slice/b.service/a.service").as_deref(), Some("b"));
        assert_eq!(role_of("other.slice/c.service/b.service").as_deref(), Some("b"));
    }

    #[test]
    fn the_outermost_match_decides_and_file_order_breaks_ties() {
        let file = r#"
[[workload]]
cgroup = "system.slice/billing.service/worker"
role = "worker"

[[workload]]
cgroup = "system.slice/billing.service"
role = "billing"

[[workload]]
cgroup = "system.slice/*.service"
role = "fallback"
"#;
        let table = Table::parse(Path::new("w.toml"), file).unwrap();
        let role_of = |path: &str| role_of(&table, path);
        assert_eq!(
            role_of("system.slice/billing.service/worker").as_deref(),
            Some("billing"),
            "an entry below a matched ancestor is shadowed"
        );
        assert_eq!(
            role_of("system.slice/billing.service").as_deref(),
            Some("billing")
        );
        assert_eq!(
            role_of("system.slice/cron.service/job").as_deref(),
            Some("fallback")
        );
    }

    #[test]
    fn ancestors_come_outermost_first() {
        assert_eq!(
            outermost_first("a/b/c").collect::<Vec<_>>(),
            ["a", "a/b", "a/b/c"]
        );
        assert_eq!(outermost_first("a").collect::<Vec<_>>(), ["a"]);
        assert_eq!(outermost_first("").count(), 0);
    }

    #[test]
    fn a_single_star_stays_in_one_segment() {
        assert_eq!(lookup("system.slice/batch-a/b.service"), None);
    }

    #[test]
    fn entries_carry_their_role_request() {
        let workload = table()
            .lookup(&CgroupPath::new("system.slice/batch-1.service"))
            .unwrap();
        assert_eq!(
            workload.request,
            RoleRequest {
                role: Some("arn:aws:iam::123456789012:role/batch".to_owned()),
                external_id: Some("ext-1".to_owned()),
                session_name: Some("batch-jobs".to_owned()),
                origin: Some("workload file workloads.toml, entry static/batch".into()),
                allowed: None,
                tags: RequestedTags::default(),
            }
        );
    }

    #[test]
    fn bad_files_say_why() {
        let path = Path::new("w.toml");
        let unknown_field = "[[workload]]\ncgroup = \"a\"\nrole = \"r\"\nrol = \"typo\"\n";
        assert!(matches!(
            Table::parse(path, unknown_field),
            Err(StaticFileError::Parse { .. })
        ));
        let missing_cgroup = "[[workload]]\nrole = \"r\"\n";
        assert!(matches!(
            Table::parse(path, missing_cgroup),
            Err(StaticFileError::Parse { .. })
        ));
        let no_role = Table::parse(path, "[[workload]]\ncgroup = \"a\"\n").unwrap();
        assert_eq!(
            no_role.entries[0].1.request.role, None,
            "no role: the default role applies"
        );
        let empty_role = "[[workload]]\ncgroup = \"a\"\nrole = \" \"\n";
        assert!(matches!(
            Table::parse(path, empty_role),
            Err(StaticFileError::EmptyRole { index: 0, .. })
        ));
        let bad_glob = "[[workload]]\ncgroup = \"a[\"\nrole = \"r\"\n";
        assert!(matches!(
            Table::parse(path, bad_glob),
            Err(StaticFileError::Glob { .. })
        ));
        assert_eq!(Table::parse(path, "").unwrap().entries.len(), 0);
    }

    #[tokio::test]
    async fn reload_takes_a_good_file_and_keeps_the_old_one_for_a_bad_one() {
        let dir = std::env::temp_dir().join(format!("interceptor-workloads-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.toml");
        std::fs::write(&path, "[[workload]]\ncgroup = \"a.service\"\nrole = \"one\"\n").unwrap();
        let source = StaticWorkloads::load(&path).unwrap();
        let role_of = |source: &StaticWorkloads| {
            source
                .table()
                .lookup(&CgroupPath::new("a.service"))
                .and_then(|w| w.request.role.clone())
        };
        assert_eq!(role_of(&source).as_deref(), Some("one"));
        assert!(!source.reload_if_changed(), "unchanged file is not re-read");

        std::fs::write(&path, "[[workload]]\ncgroup = \"a.service\"\nrole = \"second\"\n").unwrap();
        assert!(source.reload_if_changed());
        assert_eq!(role_of(&source).as_deref(), Some("second"));

        std::fs::write(
            &path,
            "[[workload]]\ncgroup = \"a.service\"\nrole = \"third\"\nbroken",
        )
        .unwrap();
        assert!(!source.reload_if_changed());
        assert_eq!(role_of(&source).as_deref(), Some("second"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
