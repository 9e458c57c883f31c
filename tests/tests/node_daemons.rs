//! Node daemons that run as hostNetwork pods keep what they read of the node's metadata through the
//! agent: the termination handler its spot, maintenance and lifecycle notices, the VPC CNI its network
//! interfaces and the node's own credentials, through the agent's install and restarts. An app pod reads
//! the spot notice and gets its own role; the node's secrets are refused to every pod; and the
//! node-credentials setting (`--host-network-credentials`, `--node-credentials-for`) gives the node's
//! credentials where it says and nowhere else, counted, logged once per pod and listed by
//! `interceptor status`.
//!
//! A hostNetwork pod is what it is on a real node: a pod and container cgroup as the kubelet names
//! them, its processes in the node's own network namespace, and a Pod object with `hostNetwork: true`.
//! Every figure is counted from the clients' side: curl for paths, the AWS CLI and boto3 for
//! credentials, each answer told apart by who gave it (the agent says `Server: EC2ws`; the stand-in
//! playing the node's metadata service says nothing).

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use interceptor_tests::{
    agent::{ACCOUNT_ID, Agent, BASE_ROLE_ARN},
    deployed::{
        IMDS, ROLE_LIST, Sts, aws_cli_caller_arn, aws_client_env, body_of, eventually, header_of, health,
        status_of,
    },
    exposition::Samples,
    kube_node::{KubeNode, host_network_pod_object, pod_object},
    lab::{StandIn, run},
    privileged, python,
    sim::{Pod, SimNode},
};

const ROLE_KEY: &str = "iam.amazonaws.com/role";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
/// As the SDKs ask the metadata service: an answer within a second or two, else again. A connection
/// opened just before the programs attach gets no byte through after (its packets to the node's
/// metadata service are dropped from then on), and only a timeout ends it.
const CURL: [&str; 6] = ["-sS", "-i", "--noproxy", "*", "--max-time", "2"];

/// What aws-node-termination-handler reads in metadata mode, with IMDSv2 tokens (below `/latest/`).
const TERMINATION_HANDLER_READS: &[&str] = &[
    "meta-data/spot/instance-action",
    "meta-data/events/maintenance/scheduled",
    "meta-data/autoscaling/target-lifecycle-state",
];

/// What the VPC CNI (aws-node) reads of the node's network interfaces.
const CNI_READS: &[&str] = &[
    "meta-data/mac",
    "meta-data/instance-type",
    "meta-data/network/interfaces/macs/",
    "meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/",
    "meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/interface-id",
    "meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/local-ipv4s",
    "meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/subnet-ipv4-cidr-block",
    "meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/security-group-ids",
];

/// The node's secrets, at `latest` and at a dated version: refused to every pod, whatever the flags.
const REFUSED: &[&str] = &[
    "/latest/user-data",
    "/latest/user-data/",
    "/2021-03-23/user-data",
    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    "/latest/meta-data/identity-credentials/ec2/info",
    "/latest/dynamic/instance-identity/pkcs7",
    "/latest/dynamic/instance-identity/signature",
    "/latest/dynamic/instance-identity/rsa2048",
    "/2021-03-23/dynamic/instance-identity/signature",
];

/// The paths of the node's own credentials that a granted pod's SDK reads.
const NODE_CREDENTIAL_PATHS: [&str; 2] = [
    "/latest/meta-data/iam/security-credentials/",
    "/latest/meta-data/iam/security-credentials/node-role",
];

fn can_run(test: &str) -> bool {
    privileged::can_run(test)
}

fn can_run_with_python(test: &str) -> bool {
    privileged::can_run(test) && privileged::has_python_tools(test)
}

/// A container of a pod on the node: its cgroup, and the network its processes run in.
struct Container<'n> {
    cgroup: PathBuf,
    network: Network<'n>,
}

enum Network<'n> {
    /// A hostNetwork pod's: the node's own.
    Node(&'n SimNode),
    Pod(&'n Pod),
}

impl<'n> Container<'n> {
    fn host_network(node: &'n SimNode, cgroup: PathBuf) -> Self {
        Self {
            cgroup,
            network: Network::Node(node),
        }
    }

    fn in_pod(pod: &'n Pod, cgroup: PathBuf) -> Self {
        Self {
            cgroup,
            network: Network::Pod(pod),
        }
    }

    fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        match self.network {
            Network::Node(node) => node.command(&self.cgroup, program),
            Network::Pod(pod) => pod.command(&self.cgroup, program),
        }
    }

    /// `curl -i` with `args`: the response, or `None` when the connection failed (refused, or reset by
    /// an agent killed mid-answer), which an SDK retries.
    async fn try_curl(&self, args: &[&str]) -> Result<Option<Connected>> {
        let mut command = self.command("curl")?;
        command.args(CURL).args(args);
        let out = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .output()
            .await
            .context("cannot run curl")?;
        match out.status.code() {
            Some(0) => Ok(Some(Connected(String::from_utf8_lossy(&out.stdout).into_owned()))),
            // 7: could not connect (refused); 18, 52, 56: a cut, empty or reset answer (an agent
            // killed as it answered); 28: no answer in time (a connection the programs' attach cut
            // off, see CURL).
            Some(7 | 18 | 28 | 52 | 56) => Ok(None),
            _ => bail!(
                "curl {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    }

    /// `curl -i` with `args`, which must connect.
    async fn curl(&self, args: &[&str]) -> Result<Answer> {
        let connected = self
            .try_curl(args)
            .await?
            .with_context(|| format!("curl {args:?} could not connect"))?;
        Ok(connected.answer())
    }

    /// The access key of the credentials boto3 finds through its default chain (which ends at the
    /// metadata service).
    async fn boto3_access_key(&self) -> Result<String> {
        let home = tempfile::tempdir()?;
        let mut command = self.command(python::tool("python3")?)?;
        aws_client_env(&mut command, home.path());
        command.args([
            "-c",
            "import botocore.session\n\
             print(botocore.session.get_session().get_credentials().access_key)",
        ]);
        run(command).await
    }
}

/// A `curl -i` output.
struct Connected(String);

/// What one metadata request got, as its client saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
    /// Answered by the agent (`Server: EC2ws`), not by the stand-in.
    by_agent: bool,
}

impl Connected {
    fn answer(&self) -> Answer {
        Answer {
            status: status_of(&self.0),
            body: body_of(&self.0).to_owned(),
            by_agent: header_of(&self.0, "server") == Some("EC2ws"),
        }
    }
}

/// What a daemon's client counted.
#[derive(Default)]
struct Counts {
    by_agent: AtomicU64,
    direct: AtomicU64,
    /// Connections that failed while the agent was down (the pinned programs refusing them), each
    /// retried.
    failed_connects: AtomicU64,
    /// Tokens asked for again after a GET was refused with 401 (a restarted agent's key is new).
    new_tokens: AtomicU64,
    /// An answer that came from elsewhere than the agent after one that came from the agent.
    direct_after_agent: AtomicU64,
}

impl Counts {
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

/// A daemon's metadata client, as the SDKs behave: an IMDSv2 token, asked for again when a GET is
/// refused with 401; a failed connection retried 50 ms later, for at most a minute.
struct MetadataClient<'n> {
    container: Container<'n>,
    token: Option<String>,
    counts: Arc<Counts>,
}

impl<'n> MetadataClient<'n> {
    fn new(container: Container<'n>) -> Self {
        Self {
            container,
            token: None,
            counts: Arc::default(),
        }
    }

    /// `args` for curl until it connects; each answer is counted by who gave it.
    async fn until_connected(&self, args: &[&str]) -> Result<Answer> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(connected) = self.container.try_curl(args).await? {
                let answer = connected.answer();
                let counts = &self.counts;
                if answer.by_agent {
                    counts.by_agent.fetch_add(1, Ordering::SeqCst);
                } else {
                    if Counts::get(&counts.by_agent) > 0 {
                        counts.direct_after_agent.fetch_add(1, Ordering::SeqCst);
                    }
                    counts.direct.fetch_add(1, Ordering::SeqCst);
                }
                return Ok(answer);
            }
            self.counts.failed_connects.fetch_add(1, Ordering::SeqCst);
            ensure!(
                tokio::time::Instant::now() < deadline,
                "no connection for a minute"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GETs `path` with a token.
    async fn get(&mut self, path: &str) -> Result<Answer> {
        loop {
            let token = match &self.token {
                Some(token) => token.clone(),
                None => {
                    let put = self
                        .until_connected(&[
                            "-X",
                            "PUT",
                            "-H",
                            "X-aws-ec2-metadata-token-ttl-seconds: 21600",
                            &format!("{IMDS}/latest/api/token"),
                        ])
                        .await?;
                    ensure!(put.status == 200, "token refused: {put:?}");
                    self.token.insert(put.body).clone()
                }
            };
            let header = format!("{TOKEN_HEADER}: {token}");
            let answer = self
                .until_connected(&["-H", &header, &format!("{IMDS}{path}")])
                .await?;
            if answer.status != 401 {
                return Ok(answer);
            }
            self.token = None;
            self.counts.new_tokens.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Reads `reads` (below `/latest/`) in rounds until `stop`, 50 ms apart; each must be answered
    /// with the stand-in's own answer, whoever passes it on. Returns the rounds made.
    async fn poll(&mut self, reads: &[&str], stop: &AtomicBool) -> Result<u64> {
        let mut rounds = 0;
        while !stop.load(Ordering::SeqCst) {
            for read in reads {
                let answer = self.get(&format!("/latest/{read}")).await?;
                ensure!(
                    (answer.status, answer.body.as_str()) == (200, fact(read)),
                    "{read}: {answer:?}"
                );
            }
            rounds += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(rounds)
    }
}

/// The stand-in's answer to `read` (below the version).
fn fact(read: &str) -> &'static str {
    StandIn::NODE_FACTS
        .iter()
        .find(|(path, _)| *path == read)
        .map(|(_, body)| *body)
        .unwrap_or_else(|| panic!("the stand-in has no answer for {read}"))
}

/// Every path the stand-in was asked for that names the node's credentials or another secret.
fn secret_paths_asked(stand_in: &StandIn) -> (Vec<String>, Vec<String>) {
    let asked = stand_in.metadata_paths();
    let refused = asked
        .iter()
        .filter(|path| {
            let lower = path.to_ascii_lowercase();
            lower.contains("user-data")
                || lower.contains("identity-credentials")
                || ["pkcs7", "signature", "rsa2048"]
                    .iter()
                    .any(|name| lower.contains(&format!("instance-identity/{name}")))
        })
        .cloned()
        .collect();
    let credentials = asked.into_iter().filter(|path| path.contains("/iam")).collect();
    (refused, credentials)
}

/// Every refused path, asked by `client` with its token: 403 from the agent, and no secret.
async fn assert_secrets_refused(client: &mut MetadataClient<'_>, who: &str) -> Result<()> {
    for path in REFUSED {
        let answer = client.get(path).await?;
        ensure!(
            answer.status == 403 && answer.by_agent && !answer.body.contains(StandIn::NODE_SECRET),
            "{who} {path}: {answer:?}"
        );
    }
    Ok(())
}

/// `interceptor uninstall` on the node: the programs and pins go, as before the agent was installed.
async fn uninstall(node: &SimNode) -> Result<()> {
    let cgroup = node.cgroup("system.slice/uninstall.service")?;
    let mut command = node.command(&cgroup, Agent::binary()?)?;
    command.arg("uninstall").arg("--bpffs-dir").arg(node.bpffs_dir());
    run(command).await.map(drop)
}

/// Starts the agent with `command` off the async runtime (the start blocks until it logs ready).
async fn start_agent(command: Command) -> Result<Agent> {
    tokio::task::spawn_blocking(move || Agent::start(command)).await?
}

/// What every start of the agent must give: the CNI the node's credentials (boto3), the app pod its own
/// role (the AWS CLI, through moto) and the spot notice, and every pod a refusal of each of the node's
/// secrets. `askers` ask the refused paths, one client per pod. Returns how many requests for the
/// node's credentials the node's metadata service heard while the CNI fetched them: only then may it
/// hear any.
async fn check_start(
    start: usize,
    cni: &Container<'_>,
    (app_pod, app): (&Pod, &Container<'_>),
    askers: &mut [(&str, MetadataClient<'_>)],
    stand_in: &StandIn,
    moto: &str,
) -> Result<usize> {
    let (_, credentials_before) = secret_paths_asked(stand_in);
    ensure!(
        cni.boto3_access_key().await? == StandIn::NODE_ACCESS_KEY,
        "start {start}: the CNI did not get the node's credentials"
    );
    let (_, credentials_after) = secret_paths_asked(stand_in);
    ensure!(
        credentials_after.len() >= credentials_before.len() + NODE_CREDENTIAL_PATHS.len(),
        "start {start}: the node's credentials were not read from its metadata service: {credentials_after:?}"
    );

    let arn = aws_cli_caller_arn(app_pod, &app.cgroup, moto).await?;
    ensure!(
        arn == format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/app-reader/shop.app-1"),
        "start {start}: the app pod got {arn}"
    );
    let spot = app
        .curl(&[&format!("{IMDS}/latest/meta-data/spot/instance-action")])
        .await?;
    ensure!(
        spot.by_agent && (spot.status, spot.body.as_str()) == (200, fact("meta-data/spot/instance-action")),
        "start {start}: the app pod's spot notice: {spot:?}"
    );
    let (_, credentials_then) = secret_paths_asked(stand_in);
    ensure!(
        credentials_then == credentials_after,
        "start {start}: the app pod's credential requests reached the node's metadata service"
    );
    for (who, client) in askers {
        assert_secrets_refused(client, who).await?;
    }
    Ok(credentials_after.len() - credentials_before.len())
}

#[tokio::test(flavor = "multi_thread")]
async fn node_daemons_keep_their_paths_and_credentials_through_install_and_restarts_and_no_pod_gets_a_secret()
-> Result<()> {
    if !can_run_with_python("node daemons through install and restarts") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (termination_handler, cni_pod, app_pod) =
        (node.host_network_pod()?, node.host_network_pod()?, node.pod()?);
    let (handler_cgroup, cni_cgroup, app_cgroup) = (
        termination_handler.container()?,
        cni_pod.container()?,
        app_pod.container()?,
    );
    let mut cluster = KubeNode::start_with(node, Sts::Moto, &[], |api| {
        api.apply_pod(host_network_pod_object(
            &termination_handler,
            "kube-system",
            "aws-node-termination-handler-x",
            "aws-node-termination-handler",
            &[],
        ));
        api.apply_pod(host_network_pod_object(
            &cni_pod,
            "kube-system",
            "aws-node-x",
            "aws-node",
            &[],
        ));
        api.apply_pod(pod_object(&app_pod, "shop", "app-1", &[(ROLE_KEY, "app-reader")]));
    })?;
    // Back to the node as it was before the agent: nothing attached, the daemons reading the node's
    // metadata service directly. Then the install and two restarts, the daemons reading all along.
    cluster.agent.kill()?;
    uninstall(&cluster.node).await?;
    let starts = [
        cluster.agent_command()?,
        cluster.agent_command()?,
        cluster.agent_command()?,
    ];
    let moto = cluster.moto().url();
    let (node, stand_in, agent) = (&cluster.node, &cluster.stand_in, &mut cluster.agent);
    let host = |cgroup: &PathBuf| Container::host_network(node, cgroup.clone());
    let mut handler = MetadataClient::new(host(&handler_cgroup));
    let mut cni_reads = MetadataClient::new(host(&cni_cgroup));
    let cni = host(&cni_cgroup);
    let app = Container::in_pod(&app_pod, app_cgroup.clone());
    let mut askers = [
        ("termination handler", MetadataClient::new(host(&handler_cgroup))),
        ("cni", MetadataClient::new(host(&cni_cgroup))),
        (
            "app",
            MetadataClient::new(Container::in_pod(&app_pod, app_cgroup)),
        ),
    ];
    let (handler_counts, cni_counts) = (handler.counts.clone(), cni_reads.counts.clone());
    let stop = AtomicBool::new(false);

    let starts_and_restarts = async {
        let result = async {
            // Before the install the daemons' reads and the node's credentials come from the node.
            let read_directly = |counts: &Counts| Counts::get(&counts.direct) >= 6;
            ensure!(
                eventually(|| async { read_directly(&handler_counts) && read_directly(&cni_counts) }).await,
                "the daemons never read the node's metadata before the install"
            );
            ensure!(cni.boto3_access_key().await? == StandIn::NODE_ACCESS_KEY);
            let (_, before_install) = secret_paths_asked(stand_in);
            let mut credentials_heard = before_install.len();
            let refused =
                || Counts::get(&handler_counts.failed_connects) + Counts::get(&cni_counts.failed_connects);
            for (start, command) in starts.into_iter().enumerate() {
                if start > 0 {
                    let refused_before = refused();
                    agent.kill()?;
                    // While no agent listens, the pinned programs refuse the daemons' connects.
                    ensure!(
                        eventually(|| async { refused() > refused_before }).await,
                        "no connect was refused while the agent was down"
                    );
                }
                *agent = start_agent(command).await?;
                let served = |counts: &Counts| Counts::get(&counts.by_agent);
                let (handler_then, cni_then) = (served(&handler_counts), served(&cni_counts));
                ensure!(
                    eventually(|| async {
                        served(&handler_counts) > handler_then + 6 && served(&cni_counts) > cni_then + 16
                    })
                    .await,
                    "the daemons were not served after start {start}"
                );
                credentials_heard +=
                    check_start(start, &cni, (&app_pod, &app), &mut askers, stand_in, &moto).await?;
            }
            // Every request for the node's credentials it heard after the install was the CNI's,
            // passed on by the agent.
            let (_, credentials) = secret_paths_asked(stand_in);
            ensure!(
                credentials.len() == credentials_heard,
                "{} requests for the node's credentials, {credentials_heard} from the CNI: {credentials:?}",
                credentials.len()
            );
            Ok(())
        }
        .await;
        stop.store(true, Ordering::SeqCst);
        result
    };
    let (started, handler_rounds, cni_rounds) = tokio::join!(
        starts_and_restarts,
        handler.poll(TERMINATION_HANDLER_READS, &stop),
        cni_reads.poll(CNI_READS, &stop),
    );
    started?;
    let (handler_rounds, cni_rounds) = (handler_rounds?, cni_rounds?);

    for (who, rounds, counts) in [
        ("termination handler", handler_rounds, &handler_counts),
        ("cni", cni_rounds, &cni_counts),
    ] {
        eprintln!(
            "{who}: {rounds} rounds; {} answers from the node's metadata service before the install, \
             {} from the agent; {} connects refused while the agent was down (each retried); {} tokens \
             asked again after a 401",
            Counts::get(&counts.direct),
            Counts::get(&counts.by_agent),
            Counts::get(&counts.failed_connects),
            Counts::get(&counts.new_tokens),
        );
        assert_eq!(
            Counts::get(&counts.direct_after_agent),
            0,
            "{who} got an answer from elsewhere than the agent once the agent was installed"
        );
        assert_eq!(
            Counts::get(&counts.new_tokens),
            3,
            "{who}: each new agent refuses the tokens of the service before it, once"
        );
    }
    let (refused_asked, credentials_asked) = secret_paths_asked(stand_in);
    assert_eq!(
        refused_asked,
        Vec::<String>::new(),
        "the node's secrets were asked of its metadata service"
    );
    assert!(
        credentials_asked
            .iter()
            .all(|path| NODE_CREDENTIAL_PATHS.contains(&path.as_str())),
        "{credentials_asked:?}"
    );
    Ok(())
}

/// What a pod's `meta-data/iam` paths give it.
#[derive(Debug, PartialEq, Eq)]
enum Gets {
    /// The node's own credentials, from its metadata service.
    NodeCredentials,
    /// This role (and never the node's document).
    Role(&'static str),
    /// No role, and never the node's document.
    Nothing,
}

/// What `container` gets, as curl sees it: its role list, then the node's credentials document or a
/// refusal of it.
async fn what_it_gets(container: &Container<'_>) -> Result<Gets> {
    let list = container.curl(&[ROLE_LIST]).await?;
    let node_document = container
        .curl(&[&format!("{ROLE_LIST}{}", StandIn::NODE_ROLE)])
        .await?;
    ensure!(
        list.by_agent && node_document.by_agent,
        "{list:?} {node_document:?}"
    );
    if node_document.status == 200 {
        let document: serde_json::Value = serde_json::from_str(&node_document.body)?;
        ensure!(
            list.body == StandIn::NODE_ROLE && document["AccessKeyId"] == StandIn::NODE_ACCESS_KEY,
            "{list:?} {node_document:?}"
        );
        return Ok(Gets::NodeCredentials);
    }
    ensure!(
        node_document.status == 404 && !node_document.body.contains(StandIn::NODE_SECRET),
        "{node_document:?}"
    );
    Ok(match list.status {
        200 => Gets::Role(
            ROLES
                .iter()
                .find(|role| **role == list.body)
                .copied()
                .unwrap_or("?"),
        ),
        404 => Gets::Nothing,
        _ => bail!("role list: {list:?}"),
    })
}

/// The role names the pods of the setting test can get.
const ROLES: &[&str] = &["fallback", "host-app", "csi-own"];

#[tokio::test(flavor = "multi_thread")]
async fn the_node_credentials_setting_gives_the_nodes_credentials_where_it_says_and_nowhere_else()
-> Result<()> {
    if !can_run("node credentials setting") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (cni, host_app) = (node.host_network_pod()?, node.host_network_pod()?);
    let (plain, csi, csi_with_role, elsewhere) = (node.pod()?, node.pod()?, node.pod()?, node.pod()?);
    let containers = (
        cni.container()?,
        host_app.container()?,
        [
            plain.container()?,
            csi.container()?,
            csi_with_role.container()?,
            elsewhere.container()?,
        ],
    );
    let mut cluster = KubeNode::start_with(node, Sts::Down, &[], |api| {
        api.apply_pod(host_network_pod_object(
            &cni,
            "kube-system",
            "aws-node-x",
            "aws-node",
            &[],
        ));
        api.apply_pod(host_network_pod_object(
            &host_app,
            "kube-system",
            "host-app",
            "default",
            &[(ROLE_KEY, "host-app")],
        ));
        api.apply_pod(pod_object(&plain, "shop", "plain", &[]));
        let with_account = |pod: &Pod, namespace: &str, name: &str, annotations: &[(&str, &str)]| {
            let mut object = pod_object(pod, namespace, name, annotations);
            object.spec.as_mut().unwrap().service_account_name = Some("ebs-csi-node".to_owned());
            object
        };
        api.apply_pod(with_account(&csi, "kube-system", "ebs-csi-node-x", &[]));
        api.apply_pod(with_account(
            &csi_with_role,
            "kube-system",
            "ebs-csi-node-y",
            &[(ROLE_KEY, "csi-own")],
        ));
        api.apply_pod(with_account(&elsewhere, "shop", "ebs-csi-node-z", &[]));
    })?;
    let node = &cluster.node;
    let (cni_cgroup, host_app_cgroup, [plain_cgroup, csi_cgroup, csi_role_cgroup, elsewhere_cgroup]) =
        containers;
    let pods = [
        ("hostNetwork, no role", Container::host_network(node, cni_cgroup)),
        (
            "hostNetwork, a role",
            Container::host_network(node, host_app_cgroup),
        ),
        ("no role", Container::in_pod(&plain, plain_cgroup)),
        ("kube-system/ebs-csi-node", Container::in_pod(&csi, csi_cgroup)),
        (
            "kube-system/ebs-csi-node, a role",
            Container::in_pod(&csi_with_role, csi_role_cgroup),
        ),
        (
            "shop/ebs-csi-node",
            Container::in_pod(&elsewhere, elsewhere_cgroup),
        ),
    ];
    use Gets::{NodeCredentials as Node, Nothing, Role};
    let default_role = ["--default-role", "fallback"];
    let grant_csi = ["--node-credentials-for", "kube-system/ebs-csi-node"];
    // Each setting, and what each pod above gets under it.
    let settings: [(Vec<&str>, [Gets; 6]); 5] = [
        (
            vec![],
            [Node, Role("host-app"), Nothing, Nothing, Role("csi-own"), Nothing],
        ),
        (
            [&default_role[..], &grant_csi[..]].concat(),
            [
                Node,
                Role("host-app"),
                Role("fallback"),
                Node,
                Role("csi-own"),
                Role("fallback"),
            ],
        ),
        (
            [
                &default_role[..],
                &grant_csi[..],
                &["--host-network-credentials", "default-role"],
            ]
            .concat(),
            [
                Role("fallback"),
                Role("host-app"),
                Role("fallback"),
                Node,
                Role("csi-own"),
                Role("fallback"),
            ],
        ),
        (
            vec!["--host-network-credentials", "default-role"],
            [
                Nothing,
                Role("host-app"),
                Nothing,
                Nothing,
                Role("csi-own"),
                Nothing,
            ],
        ),
        (
            [
                &default_role[..],
                &grant_csi[..],
                &["--host-network-credentials", "none"],
            ]
            .concat(),
            [
                Nothing,
                Role("host-app"),
                Role("fallback"),
                Node,
                Role("csi-own"),
                Role("fallback"),
            ],
        ),
    ];
    for (index, (flags, expected)) in settings.into_iter().enumerate() {
        if index > 0 {
            let mut command = cluster.agent_command()?;
            command.args(&flags);
            cluster.agent.kill()?;
            cluster.agent = start_agent(command).await?;
        }
        for ((who, container), expected) in pods.iter().zip(expected) {
            assert_eq!(what_it_gets(container).await?, expected, "{who} under {flags:?}");
        }
    }
    let (refused, credentials) = secret_paths_asked(&cluster.stand_in);
    assert_eq!(refused, Vec::<String>::new());
    assert!(
        credentials
            .iter()
            .all(|path| NODE_CREDENTIAL_PATHS.contains(&path.as_str())),
        "only the granted pods' requests reached the node's credentials: {credentials:?}"
    );
    Ok(())
}

/// `interceptor status --status-socket SOCKET` on the node, as root, with `args`: its output.
async fn status(node: &SimNode, socket: &Path, args: &[&str]) -> Result<String> {
    let mut command = Agent::status_command(node)?;
    command.arg("--status-socket").arg(socket).args(args);
    run(command).await
}

/// The agent's log lines whose message is `message`, parsed.
fn log_entries(agent: &Agent, message: &str) -> Vec<serde_json::Value> {
    agent
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| entry["message"] == message)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pods_given_the_nodes_credentials_are_counted_logged_once_and_listed_by_status() -> Result<()> {
    if !can_run_with_python("node credentials observed") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (cni, csi, app) = (node.host_network_pod()?, node.pod()?, node.pod()?);
    let (cni_cgroup, csi_cgroup, app_cgroup) = (cni.container()?, csi.container()?, app.container()?);
    let socket_dir = tempfile::tempdir()?;
    let socket = socket_dir.path().join("run/status.sock");
    let flags = [
        "--node-credentials-for",
        "kube-system/ebs-csi-node",
        "--status-socket",
        socket.to_str().context("a UTF-8 path")?,
    ];
    let cluster = KubeNode::start_with(node, Sts::Down, &flags, |api| {
        api.apply_pod(host_network_pod_object(
            &cni,
            "kube-system",
            "aws-node-x",
            "aws-node",
            &[],
        ));
        let mut csi_object = pod_object(&csi, "kube-system", "ebs-csi-node-x", &[]);
        csi_object.spec.as_mut().unwrap().service_account_name = Some("ebs-csi-node".to_owned());
        api.apply_pod(csi_object);
        api.apply_pod(pod_object(&app, "shop", "app-1", &[(ROLE_KEY, "app-reader")]));
    })?;
    let node = &cluster.node;
    let document = format!("{ROLE_LIST}{}", StandIn::NODE_ROLE);
    let cni_container = Container::host_network(node, cni_cgroup);
    let csi_container = Container::in_pod(&csi, csi_cgroup);
    // Role lists carry no credentials and are not counted; each document is.
    for (container, documents) in [(&cni_container, 3), (&csi_container, 2)] {
        assert_eq!(container.curl(&[ROLE_LIST]).await?.body, StandIn::NODE_ROLE);
        for _ in 0..documents {
            let answer = container.curl(&[&document]).await?;
            assert!(answer.body.contains(StandIn::NODE_ACCESS_KEY), "{answer:?}");
        }
    }
    let app_container = Container::in_pod(&app, app_cgroup);
    assert_eq!(app_container.curl(&[ROLE_LIST]).await?.body, "app-reader");
    assert_eq!(app_container.curl(&[&document]).await?.status, 404);

    let (status_code, exposition) = health(node, "/metrics").await?;
    assert_eq!(status_code, 200);
    let served =
        Samples::parse(&exposition)?.sum_by_label("interceptor_node_credentials_served_total", "grant");
    assert_eq!(
        served.into_iter().collect::<Vec<_>>(),
        [
            ("host_network".to_owned(), 3.0),
            ("service_account".to_owned(), 2.0)
        ]
    );

    // One info line per pod, however many documents it was given.
    let message = "node credentials served to a pod";
    cluster
        .agent
        .wait_for_line(message, |line| line.contains(&csi.uid))?;
    let lines = log_entries(&cluster.agent, message);
    let logged: Vec<_> = lines
        .iter()
        .map(|entry| {
            (
                entry["level"].as_str().unwrap_or_default(),
                entry["namespace"].as_str().unwrap_or_default(),
                entry["pod"].as_str().unwrap_or_default(),
                entry["uid"].as_str().unwrap_or_default(),
                entry["grant"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        logged,
        [
            (
                "INFO",
                "kube-system",
                "aws-node-x",
                cni.uid.as_str(),
                "host_network"
            ),
            (
                "INFO",
                "kube-system",
                "ebs-csi-node-x",
                csi.uid.as_str(),
                "service_account"
            ),
        ]
    );

    let report: serde_json::Value =
        serde_json::from_str(&status(node, &socket, &["--output", "json"]).await?)?;
    let agent = &report["agent"];
    let listed: Vec<_> = agent["node_credentials"]
        .as_array()
        .context("node_credentials")?
        .iter()
        .map(|served| {
            (
                served["pod"]["name"].as_str().unwrap_or_default(),
                served["pod"]["uid"].as_str().unwrap_or_default(),
                served["grant"].as_str().unwrap_or_default(),
                served["answers"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("ebs-csi-node-x", csi.uid.as_str(), "service_account", 2),
            ("aws-node-x", cni.uid.as_str(), "host_network", 3),
        ],
        "the most recent first: {agent:#}"
    );
    let workload = |name: &str| -> serde_json::Value {
        agent["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|workload| workload["name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        workload("kube-system/aws-node-x")["node_credentials"],
        "host_network"
    );
    assert_eq!(
        workload("kube-system/ebs-csi-node-x")["node_credentials"],
        "service_account"
    );
    assert!(workload("shop/app-1")["node_credentials"].is_null());
    assert_eq!(
        workload("shop/app-1")["role_arn"],
        format!("{BASE_ROLE_ARN}app-reader")
    );
    let newest = &agent["attributions"][0];
    assert_eq!(
        (
            &newest["workload"],
            &newest["status"],
            &newest["node_credentials"]
        ),
        (&"shop/app-1".into(), &404.into(), &serde_json::Value::Null)
    );
    assert!(
        agent["attributions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|request| request["workload"] == "kube-system/aws-node-x"
                && request["node_credentials"] == "host_network"
                && request["status"] == 200),
        "{agent:#}"
    );

    let table = status(node, &socket, &[]).await?;
    let section = table
        .split("Pods given the node's credentials (most recent first)\n")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .with_context(|| format!("no section of the pods given the node's credentials:\n{table}"))?;
    let rows: Vec<Vec<&str>> = section
        .lines()
        .skip(1)
        .map(|row| row.split_whitespace().take(4).collect())
        .collect();
    assert_eq!(
        rows,
        [
            [
                "kube-system/ebs-csi-node-x",
                csi.uid.as_str(),
                "service_account",
                "2"
            ],
            ["kube-system/aws-node-x", cni.uid.as_str(), "host_network", "3"],
        ],
        "{table}"
    );
    Ok(())
}
