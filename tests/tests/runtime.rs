//! The agent as a real container: its image under the tests' containerd (CRI, runc, bridge CNI), with
//! the chart's DaemonSet translated as the kubelet translates it, serving workload containers made
//! through CRI under the kubelet's cgroup parents.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use interceptor_tests::{
    cri_node::{self, CriNode},
    sim::SimNode,
};
use serde_json::Value;

const SHOP_ROLE: &str = "shop-reader";
const BILLING_ROLE: &str = "billing-writer";
const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
const ROLE_LIST: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_container_serves_pods_made_through_cri_by_the_cgroups_containerd_gave_them() -> Result<()>
{
    let Some(image) = cri_node::agent_image("the agent container serves CRI pods") else {
        return Ok(());
    };
    let mut node = CriNode::start(SimNode::new()?, &image).await?;
    let mut withheld = Vec::new();
    node.start_agent(&[], |config| {
        withheld = cri_node::withhold_ungrantable_capabilities(config)
    })
    .await?;
    println!("capabilities this machine cannot grant, withheld: {withheld:?}");

    let shop = node
        .run_workload("shop", "cart", &[(ROLE_ANNOTATION, SHOP_ROLE)], false)
        .await?;
    let billing = node
        .run_workload("billing", "ledger", &[(ROLE_ANNOTATION, BILLING_ROLE)], false)
        .await?;
    for (index, role) in [(shop, SHOP_ROLE), (billing, BILLING_ROLE)] {
        let listed = node.metadata_get(index, ROLE_LIST).await?;
        ensure!(
            listed.as_deref() == Ok(role),
            "{} listed {listed:?}, expected {role}",
            node.workloads[index].name()
        );
        let credentials = node
            .metadata_get(index, &format!("{ROLE_LIST}{role}"))
            .await?
            .map_err(anyhow::Error::msg)?;
        let credentials: Value = serde_json::from_str(&credentials)?;
        ensure!(credentials["Code"] == "Success", "{credentials}");
        ensure!(
            !credentials
                .to_string()
                .contains(interceptor_tests::lab::StandIn::NODE_SECRET),
            "the node's secret reached a pod"
        );
    }

    // The documented troubleshooting command, through the runtime's exec as `kubectl exec` runs it.
    let status = node.exec_in_agent(&["interceptor", "status"]).await?;
    ensure!(
        status.exit_code == 0,
        "`interceptor status` in the agent container exited {}: {}{}",
        status.exit_code,
        status.stdout_text(),
        status.stderr_text()
    );
    println!("interceptor status:\n{}", status.stdout_text());
    let report = node
        .exec_in_agent(&["interceptor", "status", "--output", "json"])
        .await?;
    let report: Value = serde_json::from_slice(&report.stdout).context("status --output json")?;
    let attributions = report["agent"]["attributions"]
        .as_array()
        .context("no attributions in the status")?;
    for (index, role) in [(shop, SHOP_ROLE), (billing, BILLING_ROLE)] {
        let workload = &node.workloads[index];
        let cgroup_id = interceptor::identity::cgroup_id(&workload.cgroup)?.0;
        println!(
            "{}: cgroup {} (id {cgroup_id})",
            workload.name(),
            workload.cgroup.display()
        );
        let served: Vec<&Value> = attributions
            .iter()
            .filter(|attribution| attribution["cgroup_id"] == cgroup_id)
            .collect();
        ensure!(
            !served.is_empty(),
            "no request of cgroup {cgroup_id} in {attributions:?}"
        );
        for attribution in served {
            ensure!(
                attribution["workload"] == workload.name()
                    && attribution["role_arn"]
                        .as_str()
                        .is_some_and(|arn| arn.ends_with(&format!(":role/{role}"))),
                "{}'s request was attributed as {attribution}",
                workload.name()
            );
        }
    }

    let agent_pid = agent_pid(&node)?;
    let proc_status = std::fs::read_to_string(format!("/proc/{agent_pid}/status"))?;
    let fields: BTreeMap<&str, &str> = proc_status
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key, value.trim()))
        .collect();
    println!(
        "the agent's CapEff {}, CapBnd {}, Seccomp {}, NoNewPrivs {}",
        fields["CapEff"], fields["CapBnd"], fields["Seccomp"], fields["NoNewPrivs"]
    );
    ensure!(
        fields["Seccomp"] == "2",
        "the agent runs without a seccomp filter"
    );
    ensure!(fields["NoNewPrivs"] == "1", "the agent can gain privileges");
    let expected = cri_node::capability_mask(&node.agent()?.granted_capabilities())?;
    ensure!(
        u64::from_str_radix(fields["CapEff"], 16)? == expected,
        "CapEff {} is not the chart's list ({expected:016x})",
        fields["CapEff"]
    );
    println!(
        "the agent's mounts:\n{}",
        std::fs::read_to_string(format!("/proc/{agent_pid}/mountinfo"))?
    );
    node.shutdown().await
}

/// The agent's pid, from its container cgroup.
fn agent_pid(node: &CriNode) -> Result<u32> {
    node.agent()?.pid()
}
