//! Role ARNs, base ARNs, role names, external ids, session names, session tags and namespace
//! restrictions (`policy`):
//! any text is accepted or refused without a panic, what is accepted keeps the rules (and the length
//! limits) STS and IAM set, and a refusal quotes the text cut.
//! Input: the text, tried as each of them.

#![no_main]

use std::sync::LazyLock;

use interceptor::policy::{
    AllowedRoles, BaseArn, ExternalId, Limit, PatternFormat, Policy, RequestedTags, RoleArn, RoleRequest,
    SessionName, tags::SessionTags,
};
use libfuzzer_sys::fuzz_target;

static POLICY: LazyLock<Policy> = LazyLock::new(|| Policy {
    base_arn: Some(BaseArn::parse("arn:aws:iam::123456789012:role/teams").expect("a valid base ARN")),
    default_role: Some("fallback".to_owned()),
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(arn) = RoleArn::parse(text) {
        check_role_arn(&arn);
    }
    if let Ok(arn) = POLICY.role_arn(text) {
        check_role_arn(&arn);
        assert_eq!(
            RoleArn::parse(arn.as_str()).as_ref(),
            Ok(&arn),
            "a joined ARN parses again"
        );
    }
    if let Ok(base) = BaseArn::parse(text) {
        check_base_arn(&base);
    }
    if let Ok(base) = BaseArn::from_instance_profile(text) {
        check_base_arn(&base);
    }
    let _ = ExternalId::parse(text);
    check_session_name(&SessionName::sanitize(text));
    // The same text as a namespace's allowed-roles annotation, in both formats.
    for format in [PatternFormat::Glob, PatternFormat::Regexp] {
        let allowed = AllowedRoles::parse("ns", "key".into(), Some(text), format, POLICY.base_arn.as_ref());
        let request = RoleRequest {
            role: Some(text.to_owned()),
            external_id: Some(text.to_owned()),
            session_name: Some(text.to_owned()),
            origin: Some("annotation".into()),
            allowed: Some(std::sync::Arc::new(allowed)),
            // The same text as a session tag's value, checked as STS checks it.
            tags: RequestedTags(SessionTags::new([("k".to_owned(), text.to_owned())], false)),
        };
        match POLICY.session(&request, text) {
            Ok(session) => {
                assert!(
                    !Limit::SessionName.exceeded_by(text),
                    "a session name over 64 is refused"
                );
                assert!(!Limit::RoleArn.exceeded_by(session.role.as_str()));
            }
            // However long the text, a refusal quotes at most 128 characters of it.
            Err(err) => assert!(err.to_string().len() < 4096, "{:.200}", err.to_string()),
        }
    }
});

/// What a valid role ARN promises its users: a 12-digit account, an `aws` partition, a name of 1-64
/// allowed characters and a path without empty or dot segments.
fn check_role_arn(arn: &RoleArn) {
    assert!(arn.account_id().len() == 12 && arn.account_id().bytes().all(|b| b.is_ascii_digit()));
    assert!(arn.partition().starts_with("aws"), "{arn}");
    let name = arn.name();
    assert!((1..=64).contains(&name.len()) && !name.contains('/'), "{arn}");
    let (_, path_and_name) = arn
        .as_str()
        .split_once(":role/")
        .expect("a role ARN has `:role/`");
    for segment in path_and_name.split('/') {
        assert!(!matches!(segment, "" | "." | ".."), "{arn}");
    }
}

fn check_base_arn(base: &BaseArn) {
    assert!(base.as_str().ends_with('/'), "{base:?}");
    assert_eq!(
        BaseArn::parse(base.as_str()).as_ref(),
        Ok(base),
        "parsing is idempotent"
    );
    let policy = Policy {
        base_arn: Some(base.clone()),
        default_role: None,
    };
    assert!(
        policy.role_arn("app").is_ok(),
        "every base ARN takes a plain name: {base:?}"
    );
}

fn check_session_name(name: &SessionName) {
    let text = name.as_str();
    assert!((2..=64).contains(&text.len()), "{text:?}");
    assert!(
        text.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b)),
        "{text:?}"
    );
}
