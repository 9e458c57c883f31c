//! policy: which role a workload gets. Turns what a workload asks for (a role name joined to the base
//! ARN, or a full ARN; else the default role) into a validated [`RoleArn`], and holds the other STS
//! inputs a workload may set: [`ExternalId`] (validated) and [`SessionName`] (sanitised to STS's rules).
//! A value over AWS's own [`Limit`] is refused before anything else looks at it. [`AllowedRoles`] are a
//! namespace's restrictions on the roles its pods may name. [`tags`] checks the session tags a
//! workload's session carries.

pub mod tags;

use std::{fmt, sync::Arc};

use globset::{GlobBuilder, GlobMatcher};

use self::tags::{SessionTags, TagError};
use crate::Echo;

/// Why a workload gets no role.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("the workload names no role and there is no default role")]
    NoRole,
    #[error("{} is not a valid IAM role ARN: {problem}", Echo(.arn))]
    BadRoleArn { arn: String, problem: ArnProblem },
    #[error("role name {} is not valid: {problem}", Echo(.name))]
    BadRoleName { name: String, problem: ArnProblem },
    #[error(
        "role {} is a name, but no base role ARN is set (--base-role-arn or --auto-discover-base-arn)",
        Echo(.0)
    )]
    NoBaseArn(String),
    #[error("{} is not a valid base role ARN: {problem}", Echo(.arn))]
    BadBaseArn { arn: String, problem: ArnProblem },
    #[error("{} is not a valid external id (2-1224 characters of [A-Za-z0-9+=,.@:/_-])", Echo(.0))]
    BadExternalId(String),
    /// A value over AWS's limit; it is not quoted, as the workload source may have cut it (only so
    /// much of an annotation is kept).
    #[error("{}", .0.refusal())]
    TooLong(Limit),
    /// What the workload's source says is not valid; `origin` names where it was read, so the person
    /// who wrote it can find it.
    #[error("{origin}: {problem}")]
    BadRequest {
        origin: Arc<str>,
        problem: Box<PolicyError>,
    },
    #[error("role {} is not allowed in namespace {namespace:?} (its {key} annotation)", Echo(.role))]
    NotAllowed {
        role: String,
        namespace: String,
        key: Arc<str>,
    },
    /// The session tags the workload is to carry cannot be sent (`--session-tags`): it gets no
    /// session rather than one without them.
    #[error("the workload's session tags cannot be sent: {0}")]
    BadTags(TagError),
    #[error("namespace {namespace:?} restricts roles, but its {key} annotation is not valid: {problem}")]
    BadRestriction {
        namespace: String,
        key: Arc<str>,
        problem: String,
    },
}

/// The values of a role request that AWS bounds, each with its bound in characters. A workload
/// source may keep only so much of a value: it keeps at least one character more than the limit, so a
/// value it cut is still over it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// IAM's limit on a role ARN, whether the request names a full ARN or a name joined to the base.
    RoleArn,
    /// STS's limit on an external id.
    ExternalId,
    /// STS's limit on a role session name.
    SessionName,
}

impl Limit {
    pub const fn max_chars(self) -> usize {
        match self {
            Limit::RoleArn => 2048,
            Limit::ExternalId => 1224,
            Limit::SessionName => 64,
        }
    }

    /// Whether `text` is longer than the limit (counted without walking past it).
    pub fn exceeded_by(self, text: &str) -> bool {
        text.chars().nth(self.max_chars()).is_some()
    }

    fn refusal(self) -> String {
        let what = match self {
            Limit::RoleArn => "the role is longer than a role ARN may be",
            Limit::ExternalId => "the external id is longer than STS takes",
            Limit::SessionName => "the session name is longer than STS takes",
        };
        format!("{what} ({} characters)", self.max_chars())
    }
}

/// What is wrong with a role ARN, a base ARN or a role name (the `[path/]name` after `role/`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArnProblem {
    #[error("the role ARN is longer than 2048 characters")]
    LongArn,
    #[error("it does not start with arn:<partition>:iam::<12-digit account>:role/")]
    Prefix,
    #[error("the role name (after the last `/`) is empty")]
    EmptyName,
    #[error("the role name is longer than 64 characters")]
    LongName,
    #[error("the role name may only hold letters, digits and +=,.@_-")]
    NameCharacter,
    #[error("the path has an empty segment (a leading, trailing or doubled `/`)")]
    EmptySegment,
    #[error("`.` and `..` are not allowed as path segments or names")]
    DotSegment,
    #[error("the path may only hold printable ASCII")]
    PathCharacter,
    #[error("the path is longer than 512 characters")]
    LongPath,
}

/// A validated IAM role ARN: `arn:<partition>:iam::<account>:role/[path/]<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RoleArn {
    arn: String,
    /// Byte offset of the role name (after the last `/`).
    name_start: usize,
}

impl RoleArn {
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        Self::parse_checked(text).map_err(|problem| PolicyError::BadRoleArn {
            arn: text.to_owned(),
            problem,
        })
    }

    fn parse_checked(text: &str) -> Result<Self, ArnProblem> {
        if Limit::RoleArn.exceeded_by(text) {
            return Err(ArnProblem::LongArn);
        }
        let prefix = ArnPrefix::parse(text).ok_or(ArnProblem::Prefix)?;
        let name_len = check_path_and_name(&text[prefix.len..])?;
        Ok(Self {
            arn: text.to_owned(),
            name_start: text.len() - name_len,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.arn
    }

    /// The role's name without its path: what the metadata service lists under
    /// `iam/security-credentials/`.
    pub fn name(&self) -> &str {
        &self.arn[self.name_start..]
    }

    /// The 12-digit account the role belongs to.
    pub fn account_id(&self) -> &str {
        self.arn
            .split(':')
            .nth(4)
            .expect("validated ARN has an account field")
    }

    /// The partition (`aws`, `aws-cn`, `aws-us-gov`, ...).
    pub fn partition(&self) -> &str {
        self.arn
            .split(':')
            .nth(1)
            .expect("validated ARN has a partition field")
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

/// `arn:<partition>:iam::<account>:role/`, the part every role ARN and base ARN starts with.
struct ArnPrefix {
    len: usize,
}

impl ArnPrefix {
    fn parse(text: &str) -> Option<Self> {
        let mut fields = text.splitn(6, ':');
        let ok = fields.next()? == "arn"
            && is_partition(fields.next()?)
            && fields.next()? == "iam"
            && fields.next()?.is_empty()
            && is_account(fields.next()?);
        let resource = fields.next()?;
        (ok && resource.starts_with("role/")).then(|| Self {
            len: text.len() - resource.len() + "role/".len(),
        })
    }
}

fn is_partition(field: &str) -> bool {
    field == "aws"
        || field.starts_with("aws-") && field[4..].bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
}

fn is_account(field: &str) -> bool {
    field.len() == 12 && field.bytes().all(|b| b.is_ascii_digit())
}

/// The longest IAM path, counting its leading and trailing `/`.
const MAX_PATH_LEN: usize = 512;
/// The longest IAM role name.
const MAX_NAME_LEN: usize = 64;

/// Checks the `[path/]name` that follows `role/` in a role ARN and returns the name's length. IAM's
/// rules: a name is 1-64 of `[A-Za-z0-9+=,.@_-]`, a path is printable ASCII, at most 512 characters with
/// its slashes. On top of them, no segment may be empty, `.` or `..`: IAM's path pattern would take
/// `/a//b/` or `/teams/../`, but a role name like `../admin` or `/admin` joined to a base ARN reads as a
/// different role than the one it names (to a person and to the globs that restrict roles), and the SDKs
/// cannot ask for a role named `.` or `..` (such a segment makes the metadata path malformed).
fn check_path_and_name(path_and_name: &str) -> Result<usize, ArnProblem> {
    let name = match path_and_name.rsplit_once('/') {
        Some((path, name)) => {
            check_path(path)?;
            name
        }
        None => path_and_name,
    };
    check_name(name)?;
    Ok(name.len())
}

/// The path between `role/` and the name, as an ARN holds it: without its outer `/` (`teams/web`). A
/// role at the root path `/` has none in its ARN, so an empty one here is an empty segment.
fn check_path(path: &str) -> Result<(), ArnProblem> {
    if path.len() + 2 > MAX_PATH_LEN {
        return Err(ArnProblem::LongPath);
    }
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ArnProblem::PathCharacter);
    }
    path.split('/').try_for_each(|segment| match segment {
        "" => Err(ArnProblem::EmptySegment),
        "." | ".." => Err(ArnProblem::DotSegment),
        _ => Ok(()),
    })
}

fn check_name(name: &str) -> Result<(), ArnProblem> {
    match name {
        "" => Err(ArnProblem::EmptyName),
        "." | ".." => Err(ArnProblem::DotSegment),
        _ if name.len() > MAX_NAME_LEN => Err(ArnProblem::LongName),
        _ if !name.bytes().all(is_role_name_byte) => Err(ArnProblem::NameCharacter),
        _ => Ok(()),
    }
}

/// IAM role names: alphanumerics and `+=,.@_-`.
fn is_role_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b)
}

/// The ARN prefix role names are joined to: `arn:aws:iam::123456789012:role/` (a path may follow).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseArn(String);

impl BaseArn {
    /// Accepts the prefix with or without its trailing slash.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let with_slash = if text.ends_with('/') {
            text.to_owned()
        } else {
            format!("{text}/")
        };
        Self::check(&with_slash)
            .map(|()| Self(with_slash))
            .map_err(|problem| PolicyError::BadBaseArn {
                arn: text.to_owned(),
                problem,
            })
    }

    /// `with_slash` is the prefix, then nothing or a path that ends with `/`.
    fn check(with_slash: &str) -> Result<(), ArnProblem> {
        let prefix = ArnPrefix::parse(with_slash).ok_or(ArnProblem::Prefix)?;
        match with_slash[prefix.len..].strip_suffix('/') {
            Some(path) => check_path(path),
            None => Ok(()),
        }
    }

    /// The base ARN of roles in the account and partition of an instance profile ARN
    /// (`arn:aws:iam::123456789012:instance-profile/node` -> `arn:aws:iam::123456789012:role/`).
    pub fn from_instance_profile(profile_arn: &str) -> Result<Self, PolicyError> {
        let fields: Vec<&str> = profile_arn.splitn(6, ':').collect();
        match fields.as_slice() {
            ["arn", partition, "iam", "", account, resource] if resource.starts_with("instance-profile/") => {
                Self::parse(&format!("arn:{partition}:iam::{account}:role/"))
            }
            _ => Err(PolicyError::BadBaseArn {
                arn: profile_arn.to_owned(),
                problem: ArnProblem::Prefix,
            }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An STS external id: 2-1224 characters of `[\w+=,.@:/-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ExternalId(String);

impl ExternalId {
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        if Limit::ExternalId.exceeded_by(text) {
            return Err(PolicyError::TooLong(Limit::ExternalId));
        }
        let ok = (2..=Limit::ExternalId.max_chars()).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+=,.@:/_-".contains(&b));
        ok.then(|| Self(text.to_owned()))
            .ok_or_else(|| PolicyError::BadExternalId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An STS role session name: 2-64 characters of `[\w+=,.@-]`. Built by sanitising, so any workload
/// name or annotation value gives a name STS accepts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionName(String);

impl SessionName {
    const MAX: usize = Limit::SessionName.max_chars();

    /// The session name a workload asks for: refused over 64 characters (cut, it would name a session
    /// the workload did not ask for), else sanitised.
    pub fn requested(text: &str) -> Result<Self, PolicyError> {
        if Limit::SessionName.exceeded_by(text) {
            return Err(PolicyError::TooLong(Limit::SessionName));
        }
        Ok(Self::sanitize(text))
    }

    /// Replaces every character STS refuses with `-`, truncates to 64 characters and pads names
    /// shorter than 2.
    pub fn sanitize(text: &str) -> Self {
        let mut name: String = text
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .take(Self::MAX)
            .collect();
        while name.len() < 2 {
            name.push('_');
        }
        Self(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a workload asks for, as its source (static file, pod annotations) states it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleRequest {
    /// A role name (joined to the base ARN) or a full role ARN; `None` asks for the default role.
    pub role: Option<String>,
    pub external_id: Option<String>,
    pub session_name: Option<String>,
    /// Where the values above were read (`pod annotation iam.amazonaws.com/role`), named in refusals.
    pub origin: Option<Arc<str>>,
    /// The roles the workload may name; `None` allows any. The default role is never checked against
    /// it (as in kube2iam): the node's operator chose it, not the workload.
    pub allowed: Option<Arc<AllowedRoles>>,
    /// The session tags; the error when the workload's tags cannot be sent.
    pub tags: RequestedTags,
}

/// A workload's session tags as its source read them: checked where they are read, refused when the
/// session is asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestedTags(pub Result<SessionTags, TagError>);

impl Default for RequestedTags {
    fn default() -> Self {
        Self(Ok(SessionTags::default()))
    }
}

/// The session a workload is given: what AssumeRole is called with, and what the credential cache is
/// keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub role: RoleArn,
    pub external_id: Option<ExternalId>,
    pub session_name: SessionName,
    /// Part of the key: two workloads that share a session name but not their tags never share
    /// credentials.
    pub tags: SessionTags,
}

/// The node's rules for turning role requests into sessions.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub base_arn: Option<BaseArn>,
    /// Role (name or ARN) for workloads that name none.
    pub default_role: Option<String>,
}

impl Policy {
    /// The role ARN for a role name or ARN: ARNs are taken as they are (validated), names (which may
    /// carry a path, `team/app`) are joined to the base ARN as they are: `/app` is refused, not
    /// trimmed, like every name that would put an empty segment into the ARN.
    pub fn role_arn(&self, role: &str) -> Result<RoleArn, PolicyError> {
        if Limit::RoleArn.exceeded_by(role) {
            return Err(PolicyError::TooLong(Limit::RoleArn));
        }
        if role.starts_with("arn:") {
            return RoleArn::parse(role);
        }
        let base = self
            .base_arn
            .as_ref()
            .ok_or_else(|| PolicyError::NoBaseArn(role.to_owned()))?;
        RoleArn::parse_checked(&format!("{}{role}", base.as_str())).map_err(|problem| {
            PolicyError::BadRoleName {
                name: role.to_owned(),
                problem,
            }
        })
    }

    /// The session for `request`; `default_session_name` names it when the request does not. A role
    /// the request names but that is not valid (blank included) is refused, never replaced by the
    /// default role.
    pub fn session(
        &self,
        request: &RoleRequest,
        default_session_name: &str,
    ) -> Result<SessionKey, PolicyError> {
        let tags = request.tags.0.clone().map_err(PolicyError::BadTags)?;
        let in_request = |problem: PolicyError| match &request.origin {
            Some(origin) => PolicyError::BadRequest {
                origin: origin.clone(),
                problem: Box::new(problem),
            },
            None => problem,
        };
        let role = match request.role.as_deref() {
            Some(role) => {
                let arn = self.role_arn(role.trim()).map_err(in_request)?;
                if let Some(allowed) = &request.allowed {
                    allowed.check(&arn)?;
                }
                arn
            }
            None => self.role_arn(self.default_role.as_deref().ok_or(PolicyError::NoRole)?)?,
        };
        Ok(SessionKey {
            role,
            external_id: request
                .external_id
                .as_deref()
                .map(ExternalId::parse)
                .transpose()
                .map_err(in_request)?,
            session_name: match request.session_name.as_deref() {
                Some(name) => SessionName::requested(name).map_err(in_request)?,
                None => SessionName::sanitize(default_session_name),
            },
            tags,
        })
    }
}

/// How a namespace writes the patterns of the roles its pods may take (`--namespace-restriction-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PatternFormat {
    /// `*` matches any run of characters, `/` included (kube2iam's globs).
    #[default]
    Glob,
    /// Regular expressions, anchored at both ends (kube2iam's are not: `app` would match `my-app-admin`).
    Regexp,
}

/// The longest namespace restriction annotation taken: room for some 50 role ARNs, and a node's agent,
/// which keeps every namespace's, keeps at most this much of each. A longer one allows no role.
pub const MAX_RESTRICTION_CHARS: usize = 4096;

/// A namespace's restriction: the role ARNs its pods may name. Patterns that are not ARNs are joined to
/// the base ARN first, as role names are.
#[derive(Clone, Debug)]
pub struct AllowedRoles {
    namespace: String,
    /// The annotation the patterns come from, named in refusals.
    key: Arc<str>,
    /// The annotation's text, which identifies the restriction.
    text: String,
    patterns: Vec<RolePattern>,
    /// Why the annotation cannot be used: then no role is allowed, and refusals say why.
    problem: Option<String>,
}

#[derive(Clone, Debug)]
enum RolePattern {
    Glob(GlobMatcher),
    Regexp(regex::Regex),
}

impl AllowedRoles {
    /// Parses a namespace's annotation: a JSON array of patterns (kube2iam's `allowed-roles`) or one
    /// bare pattern (kiam's `permitted`). A namespace without the annotation allows no role; one whose
    /// annotation is not valid allows none either, and says why ([`Self::problem`]).
    pub fn parse(
        namespace: &str,
        key: Arc<str>,
        annotation: Option<&str>,
        format: PatternFormat,
        base_arn: Option<&BaseArn>,
    ) -> Self {
        let text = annotation.unwrap_or_default().trim();
        let parsed = if text.chars().nth(MAX_RESTRICTION_CHARS).is_some() {
            Err(format!(
                "the annotation is longer than {MAX_RESTRICTION_CHARS} characters"
            ))
        } else {
            Self::patterns(text, format, base_arn)
        };
        let (patterns, problem) = match parsed {
            Ok(patterns) => (patterns, None),
            Err(problem) => (Vec::new(), Some(problem)),
        };
        Self {
            namespace: namespace.to_owned(),
            key,
            text: text.to_owned(),
            patterns,
            problem,
        }
    }

    fn patterns(
        text: &str,
        format: PatternFormat,
        base_arn: Option<&BaseArn>,
    ) -> Result<Vec<RolePattern>, String> {
        let sources: Vec<String> = match text {
            "" => Vec::new(),
            _ if text.starts_with('[') => {
                serde_json::from_str(text).map_err(|err| format!("not a JSON array of strings: {err}"))?
            }
            _ => vec![text.to_owned()],
        };
        sources
            .iter()
            .map(|source| RolePattern::compile(source, format, base_arn))
            .collect()
    }

    /// Why the annotation cannot be used, when it cannot.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    pub fn permits(&self, role: &RoleArn) -> bool {
        self.patterns.iter().any(|pattern| pattern.matches(role.as_str()))
    }

    fn check(&self, role: &RoleArn) -> Result<(), PolicyError> {
        if let Some(problem) = &self.problem {
            return Err(PolicyError::BadRestriction {
                namespace: self.namespace.clone(),
                key: self.key.clone(),
                problem: problem.clone(),
            });
        }
        if self.permits(role) {
            return Ok(());
        }
        Err(PolicyError::NotAllowed {
            role: role.to_string(),
            namespace: self.namespace.clone(),
            key: self.key.clone(),
        })
    }

    /// The annotation's text these were parsed from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The rule as `interceptor status --pod` names it: the namespace, its annotation and what it
    /// allows.
    pub fn describe(&self) -> String {
        let allows = match &self.problem {
            Some(problem) => format!("nothing: {problem}"),
            None if self.text.is_empty() => "no role (it has no such annotation)".to_owned(),
            None => Echo(&self.text).to_string(),
        };
        format!(
            "namespace {:?} ({} annotation) allows {allows}",
            self.namespace, self.key
        )
    }
}

impl PartialEq for AllowedRoles {
    fn eq(&self, other: &Self) -> bool {
        (&self.namespace, &self.key, &self.text) == (&other.namespace, &other.key, &other.text)
    }
}

impl Eq for AllowedRoles {}

impl RolePattern {
    fn compile(source: &str, format: PatternFormat, base_arn: Option<&BaseArn>) -> Result<Self, String> {
        let source = source.trim();
        if source.is_empty() {
            return Err("an empty pattern".to_owned());
        }
        // A pattern that is not an ARN reads as role names do: relative to the base ARN.
        let base = match base_arn {
            Some(base) if !source.starts_with("arn:") => base.as_str(),
            _ => "",
        };
        match format {
            // The errors' own texts quote the whole pattern: only what went wrong is kept.
            PatternFormat::Glob => GlobBuilder::new(&format!("{base}{source}"))
                .literal_separator(false)
                .build()
                .map(|glob| Self::Glob(glob.compile_matcher()))
                .map_err(|err| format!("bad glob {}: {}", Echo(source), err.kind())),
            PatternFormat::Regexp => regex::Regex::new(&format!("^(?:{}{source})$", regex::escape(base)))
                .map(Self::Regexp)
                .map_err(|err| {
                    let text = err.to_string();
                    let what = text
                        .lines()
                        .last()
                        .unwrap_or_default()
                        .trim_start_matches("error: ");
                    format!("bad regexp {}: {what}", Echo(source))
                }),
        }
    }

    fn matches(&self, arn: &str) -> bool {
        match self {
            Self::Glob(glob) => glob.is_match(arn),
            Self::Regexp(regexp) => regexp.is_match(arn),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            base_arn: Some(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()),
            default_role: None,
        }
    }

    fn request(role: &str) -> RoleRequest {
        RoleRequest {
            role: Some(role.to_owned()),
            ..RoleRequest::default()
        }
    }

    #[test]
    fn role_arns_are_validated() {
        for good in [
            "arn:aws:iam::123456789012:role/app",
            "arn:aws:iam::123456789012:role/team/sub/app",
            "arn:aws-cn:iam::123456789012:role/a+=,.@_-b",
            "arn:aws-us-gov:iam::123456789012:role/x",
        ] {
            assert!(RoleArn::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "app",
            "arn:aws:iam::12345678901:role/app",
            "arn:aws:iam::123456789012:user/app",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/team/",
            "arn:aws:s3::123456789012:role/app",
            "arn:aws:iam:us-east-1:123456789012:role/app",
            "arn:gcp:iam::123456789012:role/app",
            "arn:aws:iam::123456789012:role/sp ace",
            &format!("arn:aws:iam::123456789012:role/{}", "a".repeat(65)),
        ] {
            assert!(RoleArn::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn role_names_whose_path_has_empty_or_dot_segments_are_refused() {
        let policy = policy();
        for (name, problem) in [
            ("a//b", ArnProblem::EmptySegment),
            ("/x", ArnProblem::EmptySegment),
            ("x/", ArnProblem::EmptyName),
            ("./x", ArnProblem::DotSegment),
            ("../admin", ArnProblem::DotSegment),
            ("team/../admin", ArnProblem::DotSegment),
            ("team/.", ArnProblem::DotSegment),
            ("..", ArnProblem::DotSegment),
        ] {
            assert_eq!(
                policy.role_arn(name),
                Err(PolicyError::BadRoleName {
                    name: name.to_owned(),
                    problem
                }),
                "{name}"
            );
        }
        let message = policy.role_arn("../admin").unwrap_err().to_string();
        assert_eq!(
            message,
            r#"role name "../admin" is not valid: `.` and `..` are not allowed as path segments or names"#
        );
    }

    #[test]
    fn role_arns_whose_path_has_empty_or_dot_segments_are_refused() {
        for (arn, problem) in [
            ("arn:aws:iam::123456789012:role//x", ArnProblem::EmptySegment),
            ("arn:aws:iam::123456789012:role/a//x", ArnProblem::EmptySegment),
            ("arn:aws:iam::123456789012:role/./x", ArnProblem::DotSegment),
            ("arn:aws:iam::123456789012:role/../admin", ArnProblem::DotSegment),
            ("arn:aws:iam::123456789012:role/team/..", ArnProblem::DotSegment),
        ] {
            assert_eq!(
                RoleArn::parse(arn),
                Err(PolicyError::BadRoleArn {
                    arn: arn.to_owned(),
                    problem
                }),
                "{arn}"
            );
        }
        for (base, problem) in [
            ("arn:aws:iam::123456789012:role/./", ArnProblem::DotSegment),
            ("arn:aws:iam::123456789012:role/../", ArnProblem::DotSegment),
            ("arn:aws:iam::123456789012:role/a//", ArnProblem::EmptySegment),
        ] {
            assert_eq!(
                BaseArn::parse(base),
                Err(PolicyError::BadBaseArn {
                    arn: base.to_owned(),
                    problem
                }),
                "{base}"
            );
        }
    }

    #[test]
    fn dots_inside_names_and_path_segments_are_fine() {
        let policy = policy();
        for name in ["my.role", "..role", "role..", "...", "v1.2/app.x"] {
            assert_eq!(
                policy.role_arn(name).unwrap().as_str(),
                format!("arn:aws:iam::123456789012:role/{name}")
            );
        }
        assert_eq!(policy.role_arn("v1.2/app.x").unwrap().name(), "app.x");
    }

    #[test]
    fn paths_are_at_most_512_characters_with_their_slashes() {
        let arn = |path_len: usize| format!("arn:aws:iam::123456789012:role/{}/app", "p".repeat(path_len));
        assert!(RoleArn::parse(&arn(510)).is_ok());
        assert!(matches!(
            RoleArn::parse(&arn(511)),
            Err(PolicyError::BadRoleArn {
                problem: ArnProblem::LongPath,
                ..
            })
        ));
    }

    #[test]
    fn role_arn_parts() {
        let arn = RoleArn::parse("arn:aws-cn:iam::123456789012:role/team/app").unwrap();
        assert_eq!(arn.name(), "app");
        assert_eq!(arn.account_id(), "123456789012");
        assert_eq!(arn.partition(), "aws-cn");
    }

    #[test]
    fn names_join_the_base_and_arns_stand_alone() {
        let policy = policy();
        assert_eq!(
            policy.role_arn("app").unwrap().as_str(),
            "arn:aws:iam::123456789012:role/app"
        );
        assert_eq!(
            policy.role_arn("team/app").unwrap().as_str(),
            "arn:aws:iam::123456789012:role/team/app"
        );
        assert_eq!(
            policy
                .role_arn("arn:aws:iam::210987654321:role/other")
                .unwrap()
                .as_str(),
            "arn:aws:iam::210987654321:role/other"
        );
        assert!(matches!(
            policy.role_arn("arn:aws:iam::1:role/x"),
            Err(PolicyError::BadRoleArn {
                problem: ArnProblem::Prefix,
                ..
            })
        ));
        assert!(matches!(
            Policy::default().role_arn("app"),
            Err(PolicyError::NoBaseArn(_))
        ));
    }

    #[test]
    fn base_arns_take_an_optional_slash_and_a_path() {
        assert_eq!(
            BaseArn::parse("arn:aws:iam::123456789012:role").unwrap().as_str(),
            "arn:aws:iam::123456789012:role/"
        );
        assert_eq!(
            BaseArn::parse("arn:aws:iam::123456789012:role/teams/")
                .unwrap()
                .as_str(),
            "arn:aws:iam::123456789012:role/teams/"
        );
        assert!(BaseArn::parse("arn:aws:iam::123456789012:user/").is_err());
        assert!(BaseArn::parse("arn:aws:iam::123456789012:role//").is_err());
    }

    #[test]
    fn base_arn_from_the_instance_profile() {
        assert_eq!(
            BaseArn::from_instance_profile("arn:aws:iam::123456789012:instance-profile/nodes")
                .unwrap()
                .as_str(),
            "arn:aws:iam::123456789012:role/"
        );
        assert!(BaseArn::from_instance_profile("arn:aws:iam::123456789012:role/nodes").is_err());
    }

    #[test]
    fn no_role_and_no_default_is_refused() {
        assert_eq!(
            policy().session(&RoleRequest::default(), "w"),
            Err(PolicyError::NoRole)
        );
        let with_default = Policy {
            default_role: Some("fallback".to_owned()),
            ..policy()
        };
        let session = with_default.session(&RoleRequest::default(), "w").unwrap();
        assert_eq!(session.role.name(), "fallback");
    }

    #[test]
    fn a_named_role_that_is_not_valid_is_refused_with_its_origin_never_defaulted() {
        let with_default = Policy {
            default_role: Some("fallback".to_owned()),
            ..policy()
        };
        let blank = RoleRequest {
            origin: Some("pod annotation iam.amazonaws.com/role".into()),
            ..request("  ")
        };
        let err = with_default.session(&blank, "w").unwrap_err();
        assert!(
            matches!(&err, PolicyError::BadRequest { problem, .. } if **problem == PolicyError::BadRoleName {
            name: String::new(), problem: ArnProblem::EmptyName }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("pod annotation iam.amazonaws.com/role: role name"),
            "{err}"
        );
        let escaping = RoleRequest {
            origin: blank.origin.clone(),
            ..request("../admin")
        };
        assert!(matches!(
            with_default.session(&escaping, "w"),
            Err(PolicyError::BadRequest { .. })
        ));
    }

    fn allowed(text: &str, format: PatternFormat) -> Arc<AllowedRoles> {
        let base = BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap();
        Arc::new(AllowedRoles::parse(
            "team",
            "iam.amazonaws.com/allowed-roles".into(),
            Some(text),
            format,
            Some(&base),
        ))
    }

    fn allows(allowed: &Arc<AllowedRoles>, role: &str) -> bool {
        let request = RoleRequest {
            allowed: Some(allowed.clone()),
            ..request(role)
        };
        match policy().session(&request, "w") {
            Ok(_) => true,
            Err(PolicyError::NotAllowed { .. }) => false,
            Err(other) => panic!("{role}: {other}"),
        }
    }

    #[test]
    fn namespace_globs_match_names_and_arns_across_paths() {
        let globs = allowed(
            r#"["app-*", "arn:aws:iam::123456789012:role/team/*"]"#,
            PatternFormat::Glob,
        );
        assert!(allows(&globs, "app-web"));
        assert!(allows(&globs, "arn:aws:iam::123456789012:role/app-web"));
        assert!(allows(&globs, "team/x"));
        assert!(allows(&globs, "team/deep/x"));
        assert!(!allows(&globs, "admin"));
        assert!(
            !allows(&globs, "arn:aws:iam::999999999999:role/app-web"),
            "another account"
        );
        let kiam = allowed("app-*", PatternFormat::Glob);
        assert!(allows(&kiam, "app-1") && !allows(&kiam, "other"));
    }

    #[test]
    fn namespace_regexps_are_anchored() {
        let regexps = allowed(r#"["app-[0-9]+"]"#, PatternFormat::Regexp);
        assert!(allows(&regexps, "app-42"));
        assert!(!allows(&regexps, "app-42-admin"));
        assert!(!allows(&regexps, "my-app-42"));
        let kiam = allowed("arn:aws:iam::123456789012:role/(web|db)", PatternFormat::Regexp);
        assert!(allows(&kiam, "web") && !allows(&kiam, "webx"));
    }

    #[test]
    fn no_annotation_allows_nothing_and_the_default_role_skips_the_check() {
        let base = BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap();
        let none = Arc::new(AllowedRoles::parse(
            "team",
            "k".into(),
            None,
            PatternFormat::Glob,
            Some(&base),
        ));
        assert!(!allows(&none, "app"));
        let with_default = Policy {
            default_role: Some("fallback".to_owned()),
            ..policy()
        };
        let request = RoleRequest {
            allowed: Some(none),
            ..RoleRequest::default()
        };
        assert_eq!(
            with_default.session(&request, "w").unwrap().role.name(),
            "fallback"
        );
    }

    #[test]
    fn bad_restrictions_say_why() {
        for (text, format) in [
            ("[1, 2]", PatternFormat::Glob),
            ("[\"a[\"]", PatternFormat::Glob),
            ("(", PatternFormat::Regexp),
            ("[\"\"]", PatternFormat::Glob),
            ("[", PatternFormat::Glob),
        ] {
            let allowed = Arc::new(AllowedRoles::parse("team", "k".into(), Some(text), format, None));
            assert!(allowed.problem().is_some(), "{text}");
            let request = RoleRequest {
                allowed: Some(allowed),
                ..request("arn:aws:iam::123456789012:role/a")
            };
            let err = policy().session(&request, "w").unwrap_err();
            assert!(
                matches!(err, PolicyError::BadRestriction { .. }),
                "{text}: {err:?}"
            );
        }
    }

    #[test]
    fn session_names_follow_sts_rules() {
        assert_eq!(
            SessionName::sanitize("default/web-7d9f").as_str(),
            "default-web-7d9f"
        );
        assert_eq!(SessionName::sanitize("a").as_str(), "a_");
        assert_eq!(SessionName::sanitize("").as_str(), "__");
        assert_eq!(SessionName::sanitize("bé ok").as_str(), "b--ok");
        assert_eq!(SessionName::sanitize(&"x".repeat(100)).as_str().len(), 64);
        let session = policy().session(&request("app"), "static/billing").unwrap();
        assert_eq!(session.session_name.as_str(), "static-billing");
        let named = RoleRequest {
            session_name: Some("mine".to_owned()),
            ..request("app")
        };
        assert_eq!(
            policy().session(&named, "w").unwrap().session_name.as_str(),
            "mine"
        );
    }

    /// A request whose `field` is `value`, as a pod annotation would make it.
    fn annotated(field: Limit, value: &str) -> RoleRequest {
        let value = Some(value.to_owned());
        let request = RoleRequest {
            origin: Some("annotation iam.amazonaws.com/role of pod team/web".into()),
            ..request("app")
        };
        match field {
            Limit::RoleArn => RoleRequest {
                role: value,
                ..request
            },
            Limit::ExternalId => RoleRequest {
                external_id: value,
                ..request
            },
            Limit::SessionName => RoleRequest {
                session_name: value,
                ..request
            },
        }
    }

    #[test]
    fn values_over_aws_limits_are_refused_unquoted_and_those_at_them_pass() {
        let arn_of = |len: usize| {
            let prefix = "arn:aws:iam::123456789012:role/";
            let path = "p/".repeat((len - prefix.len() - 1) / 2);
            let arn = format!("{prefix}{path}{}", "n".repeat(len - prefix.len() - path.len()));
            assert_eq!(arn.len(), len);
            arn
        };
        // No role ARN reaches 2048 characters within IAM's path and name limits: the values at their
        // limits that pass are the external id's and the session name's.
        let at_limits = [
            (Limit::ExternalId, "x".repeat(1224)),
            (Limit::SessionName, "s".repeat(64)),
        ];
        for (field, value) in at_limits {
            assert!(
                policy().session(&annotated(field, &value), "w").is_ok(),
                "{field:?}"
            );
        }
        let over_limits = [
            (Limit::RoleArn, arn_of(2049)),
            (Limit::RoleArn, "n".repeat(2049)),
            (Limit::RoleArn, "é".repeat(2049)),
            (Limit::ExternalId, "x".repeat(1225)),
            (Limit::SessionName, "s".repeat(65)),
            (Limit::SessionName, "s".repeat(256 * 1024)),
        ];
        for (field, value) in over_limits {
            let err = policy().session(&annotated(field, &value), "w").unwrap_err();
            let PolicyError::BadRequest { problem, .. } = &err else {
                panic!("{field:?}: {err:?}")
            };
            assert_eq!(**problem, PolicyError::TooLong(field));
            let message = err.to_string();
            assert!(message.len() < 200, "{message}");
            assert!(
                !message.contains(&value[..20]),
                "the value is not quoted: {message}"
            );
        }
        assert_eq!(
            PolicyError::TooLong(Limit::RoleArn).to_string(),
            "the role is longer than a role ARN may be (2048 characters)"
        );
    }

    #[test]
    fn a_name_within_the_limit_whose_arn_is_over_it_is_quoted_cut_with_its_length() {
        let name = "n".repeat(2040);
        let err = policy().role_arn(&name).unwrap_err();
        assert_eq!(
            err,
            PolicyError::BadRoleName {
                name: name.clone(),
                problem: ArnProblem::LongArn
            }
        );
        assert_eq!(
            err.to_string(),
            format!(
                "role name {:?}… (2040 characters) is not valid: the role ARN is longer than 2048 characters",
                "n".repeat(crate::ECHO_MAX_CHARS)
            )
        );
    }

    #[test]
    fn values_in_refusals_are_quoted_cut() {
        let long_bad = format!("{}!", "a".repeat(1000));
        let refusals = [
            policy().role_arn(&format!("arn:aws:iam::123456789012:role/{long_bad}")),
            Policy::default().role_arn(&long_bad),
            policy().role_arn(&format!("arn:aws:iam::1:role/{long_bad}")),
        ];
        for refused in refusals {
            let message = refused.unwrap_err().to_string();
            assert!(
                message.len() < 300 && message.contains("characters)"),
                "{message}"
            );
        }
        let message = ExternalId::parse(&long_bad).unwrap_err().to_string();
        assert!(
            message.contains("… (1001 characters) is not a valid external id"),
            "{message}"
        );
    }

    #[test]
    fn restrictions_are_bounded_and_their_problems_quote_patterns_cut() {
        let base = BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap();
        let parse =
            |text: &str, format| AllowedRoles::parse("team", "k".into(), Some(text), format, Some(&base));
        let many = format!("[{}]", vec![r#""app-*""#; MAX_RESTRICTION_CHARS / 9].join(","));
        assert!(many.len() <= MAX_RESTRICTION_CHARS && parse(&many, PatternFormat::Glob).problem().is_none());
        let too_many = format!("[{}]", vec![r#""app-*""#; MAX_RESTRICTION_CHARS / 7].join(","));
        assert_eq!(
            parse(&too_many, PatternFormat::Glob).problem(),
            Some("the annotation is longer than 4096 characters")
        );
        let bad_glob = format!(r#"["{}[a"]"#, "x".repeat(3000));
        let bad_regexp = format!("({}", "x".repeat(3000));
        for (text, format) in [
            (bad_glob, PatternFormat::Glob),
            (bad_regexp, PatternFormat::Regexp),
        ] {
            let allowed = parse(&text, format);
            let problem = allowed.problem().unwrap();
            assert!(
                problem.len() < 300 && problem.contains("characters)"),
                "{problem}"
            );
        }
        let problem = parse("(", PatternFormat::Regexp).problem().unwrap().to_owned();
        assert_eq!(problem, r#"bad regexp "(": unclosed group"#);
        let problem = parse(r#"["a["]"#, PatternFormat::Glob)
            .problem()
            .unwrap()
            .to_owned();
        assert_eq!(problem, r#"bad glob "a[": unclosed character class; missing ']'"#);
    }

    #[test]
    fn external_ids_are_validated() {
        assert!(ExternalId::parse("tenant:42/a").is_ok());
        assert!(ExternalId::parse("x").is_err());
        assert!(ExternalId::parse("has space").is_err());
        let bad = RoleRequest {
            external_id: Some("x".to_owned()),
            ..request("app")
        };
        assert!(matches!(
            policy().session(&bad, "w"),
            Err(PolicyError::BadExternalId(_))
        ));
    }
}
