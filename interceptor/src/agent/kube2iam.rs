//! agent::kube2iam: kube2iam's flags that have no counterpart of their own here, so a kube2iam
//! DaemonSet's container args start the agent unchanged. Each either maps onto the agent's own
//! configuration (ports, host IP, log verbosity) or, where the kernel hook makes it pointless, is
//! accepted with one warning saying why.

use std::net::IpAddr;

/// kube2iam's spelling: `--name=value`, booleans as `--name` or `--name=true`.
#[derive(Debug, Default, clap::Args)]
pub struct Kube2iamArgs {
    /// kube2iam: the agent's port (the port of --agent-addr; the host part comes from --host-ip or HOST_IP)
    #[arg(long, value_name = "PORT")]
    pub app_port: Option<u16>,
    /// kube2iam: the port of /metrics (the port of --metrics-addr). When it equals the app port, the
    /// health routes are answered on the agent's port to callers outside the pods, as kube2iam does.
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// kube2iam: the node's IP, where pods are sent (the host part of --agent-addr) [default: $HOST_IP]
    #[arg(long, value_name = "IP")]
    pub host_ip: Option<IpAddr>,
    /// kube2iam: log at debug level.
    #[arg(long, num_args = 0..=1, value_name = "BOOL", default_missing_value = "true", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub verbose: bool,
    /// kube2iam: log at debug level.
    #[arg(long, num_args = 0..=1, value_name = "BOOL", default_missing_value = "true", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub debug: bool,
    /// kube2iam: STS's regional endpoint. Always used here (the SDK's default, with --region).
    #[arg(long, num_args = 0..=1, value_name = "BOOL", default_missing_value = "true", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub use_regional_sts_endpoint: bool,
    /// kube2iam: the informer's resync period. Accepted; the reflectors re-list after watch errors.
    #[arg(long, value_name = "DURATION")]
    pub cache_resync_period: Option<String>,
    /// Ignored (kube2iam's DNAT rule): the kernel hook redirects pods on every interface.
    #[arg(long, num_args = 0..=1, value_name = "BOOL", default_missing_value = "true", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub iptables: bool,
    /// Ignored (kube2iam's DNAT rule's interface): the kernel hook needs no interface name.
    #[arg(long, value_name = "NAME")]
    pub host_interface: Option<String>,
    /// Ignored (kube2iam's pod-by-IP lookup): callers are found by cgroup, never by IP.
    #[arg(long, num_args = 0..=1, value_name = "BOOL", default_missing_value = "true", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub resolve_duplicate_cache_ips: bool,
    /// Ignored (kube2iam's retries of the pod-by-IP lookup): --pod-wait bounds the wait for a pod.
    #[arg(long, value_name = "DURATION")]
    pub backoff_max_interval: Option<String>,
    /// Ignored (kube2iam's retries of the pod-by-IP lookup): --pod-wait bounds the wait for a pod.
    #[arg(long, value_name = "DURATION")]
    pub backoff_max_elapsed_time: Option<String>,
}

impl Kube2iamArgs {
    /// Whether the log should be at debug level whatever --log-level says.
    pub fn wants_debug(&self) -> bool {
        self.verbose || self.debug
    }

    /// One warning for each flag given that does nothing here, saying what replaced it.
    pub fn warn_ignored(&self) {
        let given = [
            (
                self.iptables,
                "--iptables",
                "no DNAT rule is needed: a cgroup/connect program redirects pods' metadata connections on every interface",
            ),
            (
                self.host_interface.is_some(),
                "--host-interface",
                "no interface name is needed: the kernel hook works on any CNI",
            ),
            (
                self.resolve_duplicate_cache_ips,
                "--resolve-duplicate-cache-ips",
                "callers are identified by cgroup, never by IP",
            ),
            (
                self.backoff_max_interval.is_some(),
                "--backoff-max-interval",
                "callers are identified by cgroup; --pod-wait bounds the wait for a pod",
            ),
            (
                self.backoff_max_elapsed_time.is_some(),
                "--backoff-max-elapsed-time",
                "callers are identified by cgroup; --pod-wait bounds the wait for a pod",
            ),
        ];
        for (_, flag, why) in given.iter().filter(|(given, _, _)| *given) {
            tracing::warn!(flag, "kube2iam flag ignored: {why}");
        }
        if self.cache_resync_period.is_some() {
            tracing::info!(
                flag = "--cache-resync-period",
                "kube2iam flag accepted: the reflectors re-list after every watch error instead"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex, time::Duration};

    use axum::{body::Bytes, http::StatusCode};

    use crate::{
        agent::{AgentArgs, agent_addr, kube_settings, metrics_addr, policy},
        imds::upstream::{MetadataService, Upstream, UpstreamError, UpstreamReply},
        policy::{PatternFormat, Policy},
    };

    fn parse(args: &[&str]) -> AgentArgs {
        crate::agent::tests::parse(args).unwrap_or_else(|err| panic!("{args:?}: {err}"))
    }

    /// What kube2iam's own chart (jtblin/kube2iam `charts/kube2iam`, chart 0.15.0,
    /// `templates/daemonset.yaml`) renders from the values of the blog post (`host.iptables: true`,
    /// `host.interface: eni+`, the two `extraArgs`), with `$(HOST_IP)` and `$(NODE_NAME)` as the kubelet
    /// expands them.
    const CHART_ARGS: [&str; 8] = [
        "--host-interface=eni+",
        "--node=node-a",
        "--host-ip=10.0.0.7",
        "--iptables=true",
        "--auto-discover-base-arn=true",
        "--auto-discover-default-role=true",
        "--app-port=8181",
        "--metrics-port=8181",
    ];

    /// The node's metadata service as discovery reads it: an instance profile in account
    /// 210987654321 and its role `node-role`. Remembers every path asked.
    #[derive(Default)]
    struct InstanceMetadata {
        asked: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl Upstream for InstanceMetadata {
        async fn get(&self, path: &str) -> Result<UpstreamReply, UpstreamError> {
            self.asked.lock().unwrap().push(path.to_owned());
            let (status, body) = match path {
                "/latest/meta-data/iam/info" => (
                    StatusCode::OK,
                    r#"{"Code":"Success","InstanceProfileArn":"arn:aws:iam::210987654321:instance-profile/nodes"}"#,
                ),
                "/latest/meta-data/iam/security-credentials/" => (StatusCode::OK, "node-role\n"),
                _ => (StatusCode::NOT_FOUND, ""),
            };
            Ok(UpstreamReply {
                status,
                content_type: None,
                body: Bytes::from_static(body.as_bytes()),
            })
        }
    }

    /// The policy the agent starts with, given `args`, and the metadata paths it read for it.
    fn start_up_policy(args: &[&str]) -> (anyhow::Result<Policy>, Vec<String>) {
        let metadata = InstanceMetadata::default();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let policy = runtime.block_on(policy(&parse(args), &metadata));
        (policy, metadata.asked.into_inner().unwrap())
    }

    /// The base ARN and the default role's full ARN of a policy.
    fn base_and_default(policy: &Policy) -> (Option<&str>, Option<String>) {
        let default = policy.default_role.as_ref().map(|role| {
            policy
                .role_arn(role)
                .unwrap_or_else(|err| panic!("{role}: {err}"))
                .as_str()
                .to_owned()
        });
        (policy.base_arn.as_ref().map(|base| base.as_str()), default)
    }

    const INSTANCE_BASE: &str = "arn:aws:iam::210987654321:role/";
    const INSTANCE_ROLE: &str = "arn:aws:iam::210987654321:role/node-role";
    const IAM_INFO: &str = "/latest/meta-data/iam/info";
    const ROLE_LIST: &str = "/latest/meta-data/iam/security-credentials/";

    #[test]
    fn auto_discover_default_role_alone_also_discovers_the_base_arn_as_kube2iam_does() {
        // The chart's usual values: every node used to exit with "role "node-role" is a name, but no
        // base role ARN is set".
        for spelling in [
            "--auto-discover-default-role",
            "--auto-discover-default-role=true",
        ] {
            let (policy, asked) = start_up_policy(&[spelling]);
            let policy = policy.unwrap_or_else(|err| panic!("{spelling}: {err:#}"));
            assert_eq!(
                base_and_default(&policy),
                (Some(INSTANCE_BASE), Some(INSTANCE_ROLE.to_owned())),
                "{spelling}"
            );
            // Annotations' role names are joined to the discovered base.
            assert_eq!(
                policy.role_arn("app").unwrap().as_str(),
                "arn:aws:iam::210987654321:role/app"
            );
            assert_eq!(asked, [IAM_INFO, ROLE_LIST], "{spelling}");
        }
    }

    #[test]
    fn the_blog_posts_two_discovery_flags_read_the_instance_profile_once() {
        for args in [
            &["--auto-discover-base-arn", "--auto-discover-default-role"][..],
            &[
                "--auto-discover-base-arn=true",
                "--auto-discover-default-role=true",
            ],
            &CHART_ARGS,
        ] {
            let (policy, asked) = start_up_policy(args);
            let policy = policy.unwrap_or_else(|err| panic!("{args:?}: {err:#}"));
            assert_eq!(
                base_and_default(&policy),
                (Some(INSTANCE_BASE), Some(INSTANCE_ROLE.to_owned())),
                "{args:?}"
            );
            assert_eq!(asked, [IAM_INFO, ROLE_LIST], "{args:?}");
        }
        let (policy, asked) = start_up_policy(&["--auto-discover-base-arn"]);
        assert_eq!(base_and_default(&policy.unwrap()), (Some(INSTANCE_BASE), None));
        assert_eq!(asked, [IAM_INFO]);
    }

    #[test]
    fn an_explicit_base_role_arn_wins_and_the_discovered_default_stays_the_instances_own_role() {
        let (policy, asked) = start_up_policy(&[
            "--base-role-arn=arn:aws:iam::123456789012:role/",
            "--auto-discover-default-role",
        ]);
        let policy = policy.unwrap();
        assert_eq!(
            base_and_default(&policy),
            (
                Some("arn:aws:iam::123456789012:role/"),
                Some(INSTANCE_ROLE.to_owned())
            )
        );
        assert_eq!(
            policy.role_arn("app").unwrap().as_str(),
            "arn:aws:iam::123456789012:role/app"
        );
        assert_eq!(asked, [IAM_INFO, ROLE_LIST]);
    }

    #[test]
    fn a_base_role_arn_and_a_default_role_read_nothing_from_the_node() {
        for args in [
            &[
                "--base-role-arn=arn:aws:iam::123456789012:role/",
                "--default-role=fallback",
            ][..],
            // kube2iam's README writes the base ARN without its trailing slash too.
            &[
                "--base-role-arn",
                "arn:aws:iam::123456789012:role",
                "--default-role",
                "fallback",
            ],
            // A discovery flag written =false is no flag, and conflicts with nothing.
            &[
                "--base-role-arn=arn:aws:iam::123456789012:role/",
                "--default-role=fallback",
                "--auto-discover-base-arn=false",
                "--auto-discover-default-role=false",
            ],
        ] {
            let (policy, asked) = start_up_policy(args);
            let policy = policy.unwrap_or_else(|err| panic!("{args:?}: {err:#}"));
            assert_eq!(
                base_and_default(&policy),
                (
                    Some("arn:aws:iam::123456789012:role/"),
                    Some("arn:aws:iam::123456789012:role/fallback".to_owned())
                ),
                "{args:?}"
            );
            assert!(asked.is_empty(), "{args:?}: {asked:?}");
        }
        let (policy, asked) = start_up_policy(&[]);
        assert_eq!(base_and_default(&policy.unwrap()), (None, None));
        assert!(asked.is_empty());
    }

    #[test]
    fn the_same_thing_named_twice_is_refused_before_the_node_is_asked() {
        for (args, said) in [
            (
                &[
                    "--auto-discover-base-arn",
                    "--base-role-arn=arn:aws:iam::123456789012:role/",
                ][..],
                "--auto-discover-base-arn and --base-role-arn both name the base ARN",
            ),
            (
                &["--auto-discover-default-role=true", "--default-role=fallback"],
                "--auto-discover-default-role and --default-role both name the default role",
            ),
        ] {
            let (policy, asked) = start_up_policy(args);
            let err = format!("{:#}", policy.unwrap_err());
            assert!(err.contains(said), "{args:?}: {err}");
            assert!(asked.is_empty(), "{args:?}: {asked:?}");
        }
    }

    #[test]
    fn discovery_without_an_instance_profile_fails_with_what_was_missing() {
        struct NoProfile;
        #[async_trait::async_trait]
        impl Upstream for NoProfile {
            async fn get(&self, path: &str) -> Result<UpstreamReply, UpstreamError> {
                Ok(UpstreamReply {
                    status: StatusCode::NOT_FOUND,
                    content_type: None,
                    body: Bytes::new(),
                })
                .inspect(|_| assert_eq!(path, IAM_INFO))
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let err = runtime
            .block_on(policy(&parse(&["--auto-discover-default-role"]), &NoProfile))
            .unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "cannot discover the base ARN from the node's instance profile: the metadata service \
             answered /latest/meta-data/iam/info with 404 Not Found"
        );
    }

    #[test]
    fn the_kube2iam_charts_args_parse_and_configure_the_agent_with_their_meaning() {
        let args = parse(&CHART_ARGS);
        assert!(args.auto_discover_base_arn && args.auto_discover_default_role);
        assert!(args.kube2iam.iptables);
        assert_eq!(args.kube2iam.host_interface.as_deref(), Some("eni+"));
        assert_eq!(args.node.as_deref(), Some("node-a"));
        let agent = agent_addr(&args).unwrap();
        assert_eq!(agent.to_string(), "10.0.0.7:8181");
        // --metrics-port equal to --app-port: the health routes are on the agent's port.
        assert_eq!(metrics_addr(&args, agent), None);
        assert_eq!(args.log_filter(), "info");
    }

    #[test]
    fn calicos_interface_and_the_downward_api_host_ip_name_the_agents_address() {
        // kube2iam's README and chart with Calico: the DNAT rule's interface, and the node's IP.
        let args = parse(&[
            "--iptables=true",
            "--host-interface=cali+",
            "--host-ip=10.0.1.23",
            "--node=ip-10-0-1-23.ec2.internal",
        ]);
        assert!(args.kube2iam.iptables);
        assert_eq!(args.kube2iam.host_interface.as_deref(), Some("cali+"));
        assert_eq!(agent_addr(&args).unwrap().to_string(), "10.0.1.23:8181");
        assert_eq!(args.node.as_deref(), Some("ip-10-0-1-23.ec2.internal"));
    }

    #[test]
    fn app_and_metrics_ports_place_the_agent_and_its_health_server() {
        for (args, agent, metrics) in [
            (
                &["--host-ip=10.0.1.23", "--app-port=8181", "--metrics-port=8181"][..],
                "10.0.1.23:8181",
                None,
            ),
            (
                &["--host-ip=10.0.1.23", "--app-port=8282", "--metrics-port=9543"],
                "10.0.1.23:8282",
                Some("0.0.0.0:9543"),
            ),
            (
                &["--host-ip=10.0.1.23", "--app-port", "8282"],
                "10.0.1.23:8282",
                Some("0.0.0.0:9181"),
            ),
            // Our own flags win over kube2iam's.
            (
                &[
                    "--host-ip=10.0.1.23",
                    "--app-port=8282",
                    "--agent-addr=10.0.1.23:8383",
                    "--metrics-addr=0.0.0.0:9999",
                ],
                "10.0.1.23:8383",
                Some("0.0.0.0:9999"),
            ),
        ] {
            let parsed = parse(args);
            let agent_at = agent_addr(&parsed).unwrap();
            assert_eq!(agent_at.to_string(), agent, "{args:?}");
            assert_eq!(
                metrics_addr(&parsed, agent_at)
                    .map(|addr| addr.to_string())
                    .as_deref(),
                metrics,
                "{args:?}"
            );
        }
    }

    #[test]
    fn namespace_restrictions_with_regexps_reach_the_pod_source() {
        let policy = Policy::default();
        for args in [
            &[
                "--node=node-a",
                "--namespace-restrictions",
                "--namespace-restriction-format=regexp",
            ][..],
            &[
                "--node=node-a",
                "--namespace-restrictions=true",
                "--namespace-restriction-format",
                "regexp",
            ],
        ] {
            let settings = kube_settings(&parse(args), &policy, None).unwrap();
            let (key, format) = settings.namespace_restrictions.expect("restrictions on");
            assert_eq!(
                (&*key, format),
                ("iam.amazonaws.com/allowed-roles", PatternFormat::Regexp),
                "{args:?}"
            );
        }
        let off = kube_settings(
            &parse(&["--node=node-a", "--namespace-restrictions=false"]),
            &policy,
            None,
        )
        .unwrap();
        assert!(off.namespace_restrictions.is_none());
        let glob = kube_settings(
            &parse(&["--node=node-a", "--namespace-restrictions"]),
            &policy,
            None,
        )
        .unwrap();
        assert_eq!(
            glob.namespace_restrictions.map(|(_, format)| format),
            Some(PatternFormat::Glob)
        );
    }

    #[test]
    fn verbose_debug_and_kube2iams_level_names_set_the_log_filter() {
        for (args, filter) in [
            (&["--verbose"][..], "debug"),
            (&["--verbose=true", "--log-level=warning"], "debug"),
            (&["--debug"], "debug"),
            (&["--verbose=false"], "info"),
            (
                &["--verbose=false", "--debug=false", "--log-level=warning"],
                "warn",
            ),
            (&["--log-level=warning"], "warn"),
            (&["--log-level", "fatal"], "error"),
            (&["--log-level=panic"], "error"),
            (&["--log-level=error"], "error"),
            (&[], "info"),
        ] {
            assert_eq!(parse(args).log_filter(), filter, "{args:?}");
        }
    }

    #[test]
    fn a_session_ttl_of_kube2iams_default_parses() {
        assert_eq!(
            parse(&["--iam-role-session-ttl=15m"]).iam_role_session_ttl,
            Duration::from_secs(900)
        );
        assert_eq!(
            parse(&["--iam-role-session-ttl", "1h30m"]).iam_role_session_ttl,
            Duration::from_secs(5400)
        );
    }

    #[test]
    fn metadata_addr_takes_kube2iams_bare_host() {
        for spelling in [
            &["--metadata-addr=169.254.169.254"][..],
            &["--metadata-addr", "169.254.169.254"],
            &["--metadata-addr=http://169.254.169.254"],
            &[],
        ] {
            let args = parse(spelling);
            MetadataService::new(&args.metadata_addr).unwrap_or_else(|err| panic!("{spelling:?}: {err}"));
        }
        let args = parse(&["--metadata-addr=https://169.254.169.254"]);
        assert!(MetadataService::new(&args.metadata_addr).is_err());
    }

    /// Reads one boolean flag of parsed arguments.
    type ReadFlag = fn(&AgentArgs) -> bool;

    /// kube2iam's boolean flags, each as kube2iam's chart and docs write it (`--flag`, `--flag=true`,
    /// `--flag=false`) and in Go's other spellings (`strconv.ParseBool`), read back from the parsed
    /// arguments.
    #[test]
    fn booleans_take_kube2iams_spellings() {
        let flags: [(&str, ReadFlag); 9] = [
            ("--auto-discover-base-arn", |args| args.auto_discover_base_arn),
            ("--auto-discover-default-role", |args| {
                args.auto_discover_default_role
            }),
            ("--namespace-restrictions", |args| args.namespace_restrictions),
            ("--insecure", |args| args.insecure),
            ("--iptables", |args| args.kube2iam.iptables),
            ("--verbose", |args| args.kube2iam.verbose),
            ("--debug", |args| args.kube2iam.debug),
            ("--use-regional-sts-endpoint", |args| {
                args.kube2iam.use_regional_sts_endpoint
            }),
            ("--resolve-duplicate-cache-ips", |args| {
                args.kube2iam.resolve_duplicate_cache_ips
            }),
        ];
        let spellings = [
            ("", true),
            ("=true", true),
            ("=false", false),
            ("=1", true),
            ("=0", false),
            ("=t", true),
            ("=F", false),
            ("=TRUE", true),
            ("=False", false),
        ];
        for (flag, read) in flags {
            assert!(!read(&parse(&[])), "{flag} is off by default");
            for (spelling, expected) in spellings {
                let arg = format!("{flag}{spelling}");
                assert_eq!(read(&parse(&[&arg])), expected, "{arg}");
            }
            // Followed by another flag, a bare boolean takes no value from it.
            let args = parse(&[flag, "--node=node-a"]);
            assert!(read(&args) && args.node.as_deref() == Some("node-a"), "{flag}");
            let err = crate::agent::tests::parse(&[&format!("{flag}=maybe")])
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(err.contains("maybe") && err.contains(flag), "{flag}: {err}");
        }
    }

    #[test]
    fn kube2iam_names_for_keys_and_levels() {
        let args = parse(&[
            "--iam-role-key=example.com/role",
            "--iam-external-id=example.com/external-id",
            "--namespace-key=iam.amazonaws.com/permitted",
            "--namespace-restriction-format=regexp",
            "--log-level=warning",
            "--cache-resync-period=30m",
            "--backoff-max-interval=4s",
            "--backoff-max-elapsed-time=2s",
            "--resolve-duplicate-cache-ips",
            "--use-regional-sts-endpoint",
            "--iam-role-session-ttl=15m",
            "--iam-role-error-ttl=30s",
            "--api-server=https://10.0.0.1:6443",
            "--api-token=t",
            "--insecure",
        ]);
        assert_eq!(args.iam_role_key, "example.com/role");
        assert_eq!(args.iam_external_id_key, "example.com/external-id");
        assert_eq!(args.namespace_restriction_format, PatternFormat::Regexp);
        assert_eq!(args.log_filter(), "warn");
        assert_eq!(args.iam_role_error_ttl, Duration::from_secs(30));
        assert!(args.insecure && args.kube2iam.resolve_duplicate_cache_ips);
        assert!(crate::agent::tests::parse(&["--kubeconfig=k", "--api-server=https://a"]).is_err());
    }
}
