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
    use crate::agent::AgentArgs;

    fn parse(args: &[&str]) -> AgentArgs {
        crate::agent::tests::parse(args).unwrap_or_else(|err| panic!("{args:?}: {err}"))
    }

    /// What kube2iam's chart renders from the values of the blog post (`host.iptables: true`,
    /// `host.interface: eni+`, the two `extraArgs`).
    const CHART_ARGS: [&str; 8] = [
        "--host-interface=eni+",
        "--node=$(NODE_NAME)",
        "--host-ip=10.0.0.7",
        "--iptables=true",
        "--auto-discover-base-arn=true",
        "--auto-discover-default-role=true",
        "--app-port=8181",
        "--metrics-port=8181",
    ];

    #[test]
    fn the_kube2iam_charts_args_parse_with_their_meaning() {
        let args = parse(&CHART_ARGS);
        assert!(args.auto_discover_base_arn && args.auto_discover_default_role);
        assert!(args.kube2iam.iptables);
        assert_eq!(args.kube2iam.host_interface.as_deref(), Some("eni+"));
        assert_eq!(args.kube2iam.app_port, Some(8181));
        assert_eq!(args.kube2iam.metrics_port, Some(8181));
        assert_eq!(args.kube2iam.host_ip, Some("10.0.0.7".parse().unwrap()));
        assert_eq!(args.node.as_deref(), Some("$(NODE_NAME)"));
    }

    #[test]
    fn booleans_take_kube2iams_spellings() {
        for (flag, expected) in [
            ("--namespace-restrictions", true),
            ("--namespace-restrictions=true", true),
            ("--namespace-restrictions=false", false),
            ("--namespace-restrictions=1", true),
        ] {
            assert_eq!(parse(&[flag]).namespace_restrictions, expected, "{flag}");
        }
        assert!(!parse(&[]).namespace_restrictions);
        let spaced = parse(&["--auto-discover-base-arn", "--iptables", "--verbose"]);
        assert!(spaced.auto_discover_base_arn && spaced.kube2iam.iptables && spaced.kube2iam.wants_debug());
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
        assert_eq!(
            args.namespace_restriction_format,
            crate::policy::PatternFormat::Regexp
        );
        assert_eq!(args.log_filter(), "warn");
        assert_eq!(args.iam_role_error_ttl, std::time::Duration::from_secs(30));
        assert!(args.insecure && args.kube2iam.resolve_duplicate_cache_ips);
        assert!(crate::agent::tests::parse(&["--kubeconfig=k", "--api-server=https://a"]).is_err());
    }
}
