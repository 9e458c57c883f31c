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

fn settings() -> KubeSettings {
    KubeSettings {
        node: "node-a".to_owned(),
        role_key: "iam.amazonaws.com/role".into(),
        external_id_key: "iam.amazonaws.com/external-id".into(),
        serviceaccount_roles: true,
        namespace_restrictions: None,
        pod_wait: Duration::from_millis(500),
        base_arn: Some(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()),
        session_tags: None,
    }
}

/// An object's metadata with annotations at the API server's limit: 256 KiB in all.
fn hostile_meta(annotations: &[(&str, String)]) -> ObjectMeta {
    ObjectMeta {
        name: Some("hostile".to_owned()),
        namespace: Some("team".to_owned()),
        annotations: Some(
            annotations
                .iter()
                .map(|(key, value)| (key.to_string(), value.clone()))
                .collect(),
        ),
        ..Default::default()
    }
}

#[test]
fn annotations_over_their_limits_are_kept_one_character_over_and_still_refused() {
    let huge = "a".repeat(85 * 1024);
    let mut meta = hostile_meta(&[
        ("iam.amazonaws.com/role", huge.clone()),
        ("iam.amazonaws.com/external-id", huge.clone()),
        (SESSION_NAME_KEY, huge.clone()),
        ("unrelated.example/blob", huge),
    ]);
    slim_meta(&mut meta, &request_annotations(&settings()));
    let kept = meta.annotations.clone().unwrap();
    let sizes: Vec<(&str, usize, usize)> = kept
        .iter()
        .map(|(key, value)| (key.as_str(), value.len(), value.capacity()))
        .collect();
    assert_eq!(
        sizes,
        [
            ("iam.amazonaws.com/external-id", 1225, 1225),
            ("iam.amazonaws.com/role", 2049, 2049),
            (SESSION_NAME_KEY, 65, 65),
        ],
        "each cut one over its limit, the memory given back, the unrelated one gone"
    );

    // What the store keeps is refused, for each field, as too long.
    let policy = crate::policy::Policy {
        base_arn: settings().base_arn,
        default_role: None,
    };
    let valid = [
        ("iam.amazonaws.com/role", "app"),
        ("iam.amazonaws.com/external-id", "tenant-42"),
        (SESSION_NAME_KEY, "web"),
    ];
    for (cut_key, limit) in [
        ("iam.amazonaws.com/role", Limit::RoleArn),
        ("iam.amazonaws.com/external-id", Limit::ExternalId),
        (SESSION_NAME_KEY, Limit::SessionName),
    ] {
        let value = |key: &str| {
            if key == cut_key {
                kept[key].clone()
            } else {
                valid
                    .iter()
                    .find(|(valid_key, _)| *valid_key == key)
                    .unwrap()
                    .1
                    .to_owned()
            }
        };
        let request = RoleRequest {
            role: Some(value("iam.amazonaws.com/role")),
            external_id: Some(value("iam.amazonaws.com/external-id")),
            session_name: Some(value(SESSION_NAME_KEY)),
            origin: Some("annotation iam.amazonaws.com/role of pod team/hostile".into()),
            allowed: None,
            tags: Default::default(),
        };
        match policy.session(&request, "team.hostile") {
            Err(crate::policy::PolicyError::BadRequest { problem, .. }) => {
                assert_eq!(*problem, crate::policy::PolicyError::TooLong(limit))
            }
            other => panic!("{cut_key}: {other:?}"),
        }
    }
}

#[test]
fn values_within_their_limits_are_kept_whole() {
    let mut meta = hostile_meta(&[
        ("iam.amazonaws.com/role", "r".repeat(2048)),
        ("iam.amazonaws.com/external-id", "é".repeat(1224)),
        (SESSION_NAME_KEY, "s".repeat(64)),
    ]);
    let before = meta.annotations.clone();
    slim_meta(&mut meta, &request_annotations(&settings()));
    assert_eq!(meta.annotations, before);
}

#[test]
fn a_namespace_restriction_and_a_mirror_annotation_are_cut_past_any_valid_value() {
    let mut namespace = hostile_meta(&[("iam.amazonaws.com/allowed-roles", "x".repeat(200_000))]);
    slim_meta(
        &mut namespace,
        &[Kept::new(
            "iam.amazonaws.com/allowed-roles".into(),
            MAX_RESTRICTION_CHARS,
        )],
    );
    assert_eq!(
        namespace.annotations.unwrap()["iam.amazonaws.com/allowed-roles"].len(),
        MAX_RESTRICTION_CHARS + 1
    );
    let mut pod = Pod {
        metadata: hostile_meta(&[(MIRROR_KEY, "6".repeat(200_000))]),
        ..Default::default()
    };
    slim_pod(&mut pod, &[Kept::new(MIRROR_KEY.into(), MIRROR_MAX_CHARS)]);
    let hash = &pod.metadata.annotations.unwrap()[MIRROR_KEY];
    assert_eq!(hash.len(), MIRROR_MAX_CHARS + 1);
    assert_eq!(
        crate::identity::PodUid::parse(hash),
        None,
        "no UID or hash is that long"
    );
}

#[test]
fn reflectors_list_in_small_pages_and_namespaces_and_accounts_at_the_latest_version() {
    let config = list_config();
    assert_eq!(config.page_size, Some(LIST_PAGE_SIZE));
    // The latest version, which the API server pages; at "0" its watch cache sends everything at once.
    assert_eq!(config.list_semantic, watcher::ListSemantic::MostRecent);
}
