use super::*;

#[test]
fn session_names_keep_the_pod_whole() {
    assert_eq!(session_name("team", "web-7d9f-x2"), "team.web-7d9f-x2");
    let long_namespace = "n".repeat(63);
    let pod = "web-7d9f8c-abcde";
    let name = session_name(&long_namespace, pod);
    assert_eq!(name.len(), 64);
    assert!(name.ends_with(".web-7d9f8c-abcde"), "{name}");
    let long_pod = "p".repeat(70);
    assert_eq!(session_name("team", &long_pod), "p".repeat(64));
    assert_eq!(session_name("", "web"), "web");
}

#[test]
fn a_failing_watch_is_retried_within_three_seconds_however_long_it_fails() {
    let waits: Vec<Duration> = watch_backoff().take(50).collect();
    assert_eq!(waits.len(), 50, "the backoff never gives up");
    assert!(
        waits[0] <= Duration::from_millis(500),
        "first wait {:?}",
        waits[0]
    );
    let longest = waits.iter().max().copied().unwrap_or_default();
    assert!(longest <= Duration::from_secs(3), "longest wait {longest:?}");
    assert!(
        longest >= Duration::from_millis(1500),
        "it never backed off: {longest:?}"
    );
}

#[test]
fn a_pods_ref_says_whether_it_is_host_network_and_its_service_account() {
    let mut pod = Pod {
        metadata: ObjectMeta {
            name: Some("aws-node-x".to_owned()),
            namespace: Some("kube-system".to_owned()),
            uid: Some("u-1".to_owned()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            host_network: Some(true),
            service_account_name: Some("aws-node".to_owned()),
            ..Default::default()
        }),
        status: None,
    };
    slim_pod(&mut pod, &[]);
    let kept = pod_ref(&pod);
    assert_eq!(
        (kept.namespace.as_str(), kept.name.as_str(), kept.uid.as_str()),
        ("kube-system", "aws-node-x", "u-1")
    );
    assert_eq!(
        (kept.host_network, kept.service_account.as_str()),
        (true, "aws-node")
    );
    pod.spec = Some(PodSpec::default());
    let plain = pod_ref(&pod);
    assert_eq!(
        (plain.host_network, plain.service_account.as_str()),
        (false, "default")
    );
}
