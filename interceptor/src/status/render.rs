//! status::render: the [`Report`] as the human table `interceptor status` prints by default: a section
//! for the kernel and one for the agent, each with aligned tables.

use std::fmt::Write;

use super::report::{AgentStatus, AttributionStatus, KernelReport, NodeCredentialsStatus, PodReport, Report};

/// The whole report as text.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    kernel(&mut out, &report.kernel);
    out.push('\n');
    let agent = &report.agent;
    let _ = writeln!(out, "AGENT ({})", agent.socket.display());
    match (&agent.status, &agent.error) {
        (Some(status), _) => agent_status(&mut out, status),
        (None, error) => {
            let _ = writeln!(out, "not reachable: {}", error.as_deref().unwrap_or("no answer"));
        }
    }
    out
}

fn kernel(out: &mut String, kernel: &KernelReport) {
    out.push_str("KERNEL\n");
    match (&kernel.cgroup_root, kernel.cgroup_root_from) {
        (Some(root), Some(from)) => {
            let _ = writeln!(out, "cgroup root: {} (from {from})", root.display());
        }
        (Some(root), None) => {
            let _ = writeln!(out, "cgroup root: {}", root.display());
        }
        (None, _) => out.push_str("cgroup root: unknown (pass --cgroup-root)\n"),
    }
    for error in &kernel.errors {
        let _ = writeln!(out, "error: {error}");
    }
    out.push_str("\nAttached programs\n");
    let rows = kernel
        .attached
        .iter()
        .map(|program| {
            vec![
                program.attach_type.clone(),
                program.program_id.to_string(),
                program.name.clone(),
            ]
        })
        .collect();
    table(out, &["ATTACH TYPE", "PROGRAM ID", "NAME"], rows);
    let _ = writeln!(out, "\nPinned links under {}", kernel.bpffs_dir.display());
    let rows = kernel
        .pins
        .links
        .iter()
        .map(|link| {
            vec![
                link.link_id.to_string(),
                link.program_id.to_string(),
                link.path.display().to_string(),
            ]
        })
        .collect();
    table(out, &["LINK ID", "PROGRAM ID", "PATH"], rows);
    let _ = writeln!(out, "\nPinned maps under {}", kernel.bpffs_dir.display());
    let rows = kernel
        .pins
        .maps
        .iter()
        .map(|map| {
            // The pin's name is the map's whole name; the kernel keeps 15 characters of it.
            let name = map
                .path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned());
            vec![
                name.unwrap_or_else(|| map.name.clone()),
                map.map_id.to_string(),
                format!("{}/{}", map.entries, map.max_entries),
                map.path.display().to_string(),
            ]
        })
        .collect();
    table(out, &["NAME", "MAP ID", "ENTRIES", "PATH"], rows);
    for pin in &kernel.pins.unreadable {
        let _ = writeln!(out, "unreadable: {}: {}", pin.path.display(), pin.error);
    }
}

fn agent_status(out: &mut String, status: &AgentStatus) {
    let _ = writeln!(
        out,
        "version {}, pid {}, started {}",
        status.version, status.pid, status.started_at
    );
    let _ = writeln!(
        out,
        "listening on {}, cgroup root {}, bpffs dir {}",
        status.agent_addr,
        status.cgroup_root.display(),
        status.bpffs_dir.display()
    );
    if status.ready {
        out.push_str("ready\n");
    } else {
        let _ = writeln!(out, "not ready: {}", status.not_ready.join(", "));
    }
    out.push_str("\nSources\n");
    let rows = status
        .sources
        .iter()
        .map(|source| {
            vec![
                source.kind.clone(),
                source.from.clone(),
                yes_no(source.synced),
                source.workloads.to_string(),
            ]
        })
        .collect();
    table(out, &["KIND", "FROM", "SYNCED", "WORKLOADS"], rows);
    out.push_str("\nWorkloads\n");
    let rows = status
        .workloads
        .iter()
        .map(|workload| {
            let matched_by = match (&workload.pod, &workload.cgroup) {
                (Some(pod), _) => format!("pod {}", pod.uid),
                (None, Some(cgroup)) => cgroup.clone(),
                (None, None) => "-".to_owned(),
            };
            let role = match (&workload.role_arn, &workload.no_role, &workload.node_credentials) {
                (_, _, Some(grant)) => node_credentials(grant),
                (Some(arn), _, None) => arn.clone(),
                (None, Some(why), None) => format!("no role: {why}"),
                (None, None, None) => "-".to_owned(),
            };
            vec![workload.name.clone(), workload.source.clone(), matched_by, role]
        })
        .collect();
    table(out, &["NAME", "SOURCE", "CGROUP OR POD", "ROLE"], rows);
    out.push_str("\nPods given the node's credentials (most recent first)\n");
    let rows = status.node_credentials.iter().map(node_credentials_row).collect();
    table(
        out,
        &["POD", "UID", "GRANT", "ANSWERS", "FIRST (UTC)", "LAST (UTC)"],
        rows,
    );
    out.push_str("\nRecent requests (newest first)\n");
    attributions(out, &status.attributions);
}

/// Answered requests, a row each.
fn attributions(out: &mut String, requests: &[AttributionStatus]) {
    let rows = requests.iter().map(attribution_row).collect();
    table(
        out,
        &[
            "TIME (UTC)",
            "CGROUP ID",
            "WORKLOAD",
            "ROUTE",
            "STATUS",
            "ROLE OR REFUSAL",
        ],
        rows,
    );
}

/// `status --pod`: one pod, explained.
pub fn render_pod(pod: &PodReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "POD {}/{}", pod.namespace, pod.name);
    let Some(workload) = &pod.workload else {
        out.push_str("not known to the agent on this node\n");
        return out;
    };
    if let Some(status) = &workload.pod {
        let _ = writeln!(out, "uid:   {}", status.uid);
    }
    match (&workload.role_arn, &workload.node_credentials, &workload.no_role) {
        (_, Some(grant), _) => {
            let _ = writeln!(out, "gets:  {}", node_credentials(grant));
        }
        (Some(arn), None, _) => {
            let _ = writeln!(out, "role:  {arn}");
        }
        (None, None, Some(why)) => {
            let _ = writeln!(out, "role:  none: {why}");
        }
        (None, None, None) => out.push_str("role:  none\n"),
    }
    let _ = writeln!(
        out,
        "from:  {}",
        workload.role_from.as_deref().unwrap_or("nothing names a role")
    );
    let _ = writeln!(
        out,
        "rule:  {}",
        workload
            .rule
            .as_deref()
            .unwrap_or("no namespace restriction applies")
    );
    out.push_str("\nCgroups\n");
    let rows = pod
        .cgroups
        .iter()
        .map(|cgroup| vec![cgroup.id.to_string(), cgroup.path.display().to_string()])
        .collect();
    table(&mut out, &["ID", "PATH"], rows);
    out.push_str("\nLast requests (newest first)\n");
    attributions(&mut out, &pod.requests);
    out
}

fn node_credentials_row(served: &NodeCredentialsStatus) -> Vec<String> {
    vec![
        format!("{}/{}", served.pod.namespace, served.pod.name),
        served.pod.uid.clone(),
        served.grant.clone(),
        served.answers.to_string(),
        time_of_day(&served.first_at),
        time_of_day(&served.last_at),
    ]
}

fn node_credentials(grant: &str) -> String {
    format!("node credentials ({grant})")
}

fn attribution_row(request: &AttributionStatus) -> Vec<String> {
    let outcome = match (&request.role_arn, &request.reason, &request.node_credentials) {
        (_, Some(reason), _) => format!("refused: {reason}"),
        (_, None, Some(grant)) => node_credentials(grant),
        (Some(arn), None, None) => arn.clone(),
        (None, None, None) => "-".to_owned(),
    };
    vec![
        time_of_day(&request.at),
        request
            .cgroup_id
            .map_or_else(|| "-".to_owned(), |id| id.to_string()),
        request.workload.clone().unwrap_or_else(|| "-".to_owned()),
        request.route.clone(),
        request.status.to_string(),
        outcome,
    ]
}

/// The time of day is enough beside events seconds apart; the JSON has the whole timestamp.
fn time_of_day(rfc3339: &str) -> String {
    rfc3339.get(11..19).unwrap_or(rfc3339).to_owned()
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

/// `headers` and `rows` in columns as wide as their widest cell, two spaces apart; `(none)` for no
/// rows. The last column is not padded, so lines carry no trailing blanks.
fn table(out: &mut String, headers: &[&str], rows: Vec<Vec<String>>) {
    if rows.is_empty() {
        out.push_str("(none)\n");
        return;
    }
    let mut widths: Vec<usize> = headers.iter().map(|header| header.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let headers = headers.iter().map(|header| (*header).to_owned()).collect();
    for row in std::iter::once(headers).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (column, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if column == last {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::{
        bpf::inspect::{AttachedProgram, PinnedMapInfo, Pins},
        status::report::{AgentReport, NodeCredentialsStatus, PodStatus, SourceStatus, WorkloadStatus},
    };

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let mut out = String::new();
        table(
            &mut out,
            &["A", "LONG HEADER", "LAST"],
            vec![
                vec!["wide cell".into(), "x".into(), "end".into()],
                vec!["y".into(), "z".into(), "".into()],
            ],
        );
        assert_eq!(
            out,
            "A          LONG HEADER  LAST\n\
             wide cell  x            end\n\
             y          z\n"
        );
        let mut empty = String::new();
        table(&mut empty, &["A"], Vec::new());
        assert_eq!(empty, "(none)\n");
    }

    fn aws_node() -> PodStatus {
        PodStatus {
            namespace: "kube-system".into(),
            name: "aws-node-x".into(),
            uid: "u-2".into(),
        }
    }

    fn kernel() -> KernelReport {
        KernelReport {
            cgroup_root: Some(PathBuf::from("/sys/fs/cgroup/kubepods.slice")),
            cgroup_root_from: Some("agent"),
            attached: vec![AttachedProgram {
                attach_type: "connect4".into(),
                program_id: 812,
                name: "connect4".into(),
            }],
            bpffs_dir: PathBuf::from("/sys/fs/bpf/interceptor"),
            pins: Pins {
                maps: vec![PinnedMapInfo {
                    path: PathBuf::from("/sys/fs/bpf/interceptor/v2/maps/CONNECTS_BY_COOKIE"),
                    name: "CONNECTS_BY_COO".into(),
                    map_id: 90,
                    entries: 3,
                    max_entries: 65536,
                }],
                ..Pins::default()
            },
            errors: Vec::new(),
        }
    }

    #[test]
    fn a_report_renders_in_sections() {
        let status = AgentStatus {
            version: "0.1.0".into(),
            pid: 42,
            started_at: "2025-01-02T03:04:05Z".into(),
            agent_addr: "10.0.0.1:8181".into(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup/kubepods.slice"),
            bpffs_dir: PathBuf::from("/sys/fs/bpf/interceptor"),
            ready: true,
            not_ready: Vec::new(),
            sources: vec![SourceStatus {
                kind: "kubernetes".into(),
                from: "node-a".into(),
                synced: true,
                workloads: 2,
            }],
            workloads: vec![
                WorkloadStatus {
                    source: "kubernetes".into(),
                    name: "shop/cart".into(),
                    cgroup: None,
                    pod: Some(PodStatus {
                        namespace: "shop".into(),
                        name: "cart".into(),
                        uid: "u-1".into(),
                    }),
                    role_arn: Some("arn:aws:iam::123456789012:role/cart".into()),
                    no_role: None,
                    node_credentials: None,
                    role_from: Some("annotation iam.amazonaws.com/role of pod shop/cart".into()),
                    rule: None,
                },
                WorkloadStatus {
                    source: "kubernetes".into(),
                    name: "kube-system/aws-node-x".into(),
                    cgroup: None,
                    pod: Some(aws_node()),
                    role_arn: None,
                    no_role: None,
                    node_credentials: Some("host_network".into()),
                    role_from: Some("the node's own credentials (host_network)".into()),
                    rule: None,
                },
            ],
            attributions: vec![
                AttributionStatus {
                    at: "2025-01-02T03:05:06.123Z".into(),
                    cgroup_id: Some(4242),
                    socket_cookie: Some(7),
                    pid: Some(99),
                    workload: Some("shop/cart".into()),
                    pod: None,
                    route: "credentials".into(),
                    status: 200,
                    role_arn: Some("arn:aws:iam::123456789012:role/cart".into()),
                    node_credentials: None,
                    reason: None,
                    error: None,
                },
                AttributionStatus {
                    at: "2025-01-02T03:05:06.5Z".into(),
                    cgroup_id: Some(4243),
                    socket_cookie: Some(8),
                    pid: Some(100),
                    workload: Some("kube-system/aws-node-x".into()),
                    pod: Some(aws_node()),
                    route: "credentials".into(),
                    status: 200,
                    role_arn: None,
                    node_credentials: Some("host_network".into()),
                    reason: None,
                    error: None,
                },
                AttributionStatus {
                    at: "2025-01-02T03:05:07Z".into(),
                    cgroup_id: None,
                    socket_cookie: None,
                    pid: None,
                    workload: None,
                    pod: None,
                    route: "unrouted".into(),
                    status: 403,
                    role_arn: None,
                    node_credentials: None,
                    reason: Some("unattributed".into()),
                    error: Some("connection not attributed".into()),
                },
            ],
            node_credentials: vec![NodeCredentialsStatus {
                pod: aws_node(),
                grant: "host_network".into(),
                answers: 3,
                first_at: "2025-01-02T03:04:30Z".into(),
                last_at: "2025-01-02T03:05:06.5Z".into(),
            }],
        };
        let report = Report {
            kernel: kernel(),
            agent: AgentReport {
                socket: PathBuf::from("/run/interceptor/status.sock"),
                reachable: true,
                error: None,
                status: Some(status),
            },
        };
        let text = render(&report);
        let expected = "\
KERNEL
cgroup root: /sys/fs/cgroup/kubepods.slice (from agent)

Attached programs
ATTACH TYPE  PROGRAM ID  NAME
connect4     812         connect4

Pinned links under /sys/fs/bpf/interceptor
(none)

Pinned maps under /sys/fs/bpf/interceptor
NAME                MAP ID  ENTRIES  PATH
CONNECTS_BY_COOKIE  90      3/65536  /sys/fs/bpf/interceptor/v2/maps/CONNECTS_BY_COOKIE

AGENT (/run/interceptor/status.sock)
version 0.1.0, pid 42, started 2025-01-02T03:04:05Z
listening on 10.0.0.1:8181, cgroup root /sys/fs/cgroup/kubepods.slice, bpffs dir /sys/fs/bpf/interceptor
ready

Sources
KIND        FROM    SYNCED  WORKLOADS
kubernetes  node-a  yes     2

Workloads
NAME                    SOURCE      CGROUP OR POD  ROLE
shop/cart               kubernetes  pod u-1        arn:aws:iam::123456789012:role/cart
kube-system/aws-node-x  kubernetes  pod u-2        node credentials (host_network)

Pods given the node's credentials (most recent first)
POD                     UID  GRANT         ANSWERS  FIRST (UTC)  LAST (UTC)
kube-system/aws-node-x  u-2  host_network  3        03:04:30     03:05:06

Recent requests (newest first)
TIME (UTC)  CGROUP ID  WORKLOAD                ROUTE        STATUS  ROLE OR REFUSAL
03:05:06    4242       shop/cart               credentials  200     arn:aws:iam::123456789012:role/cart
03:05:06    4243       kube-system/aws-node-x  credentials  200     node credentials (host_network)
03:05:07    -          -                       unrouted     403     refused: unattributed
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn an_unreachable_agent_is_said_so_after_the_kernel_part() {
        let report = Report {
            kernel: kernel(),
            agent: AgentReport {
                socket: PathBuf::from("/run/interceptor/status.sock"),
                reachable: false,
                error: Some("cannot connect: Connection refused".into()),
                status: None,
            },
        };
        let text = render(&report);
        assert!(text.starts_with("KERNEL\n"), "{text}");
        assert!(
            text.ends_with(
                "AGENT (/run/interceptor/status.sock)\nnot reachable: cannot connect: Connection refused\n"
            ),
            "{text}"
        );
    }
}
