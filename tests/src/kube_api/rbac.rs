//! kube_api::rbac: the fake server's authorizer, when a test gives it one
//! ([`super::FakeApiServer::enforce_rbac`]): every resource request is checked against the rules of the
//! ClusterRoles bound to the client, as the real server's RBAC authorizer checks them (a rule allows a
//! request when its verbs, API groups, resources and, if it names any, resource names each match, `*`
//! matching anything), and one no rule allows is answered 403 Forbidden with the real server's Status.
//! Requests for non-resource paths (discovery, `/version`, `/openapi`, health) are allowed, as the
//! default `system:discovery` and `system:public-info-viewer` ClusterRoles allow them to every client.

use axum::http::Method;
use k8s_openapi::{api::rbac::v1::PolicyRule, apimachinery::pkg::apis::meta::v1::StatusDetails};

use super::{ApiError, KINDS, Params, Target, qualified};

/// The user a client is and the rules it is granted.
pub(super) struct Rbac {
    /// As the server names the user in a 403, e.g. `system:serviceaccount:kube-system:interceptor`.
    pub user: String,
    pub rules: Vec<PolicyRule>,
}

/// A resource request as the authorizer sees it.
struct Attributes<'a> {
    verb: &'static str,
    kind: usize,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
}

impl Rbac {
    /// `Ok` when some rule allows the request, a 403 Forbidden naming what was refused otherwise.
    pub(super) fn authorize(
        &self,
        method: &Method,
        target: &Target,
        params: &Params,
    ) -> Result<(), ApiError> {
        let Some(request) = attributes(method, target, params) else {
            return Ok(());
        };
        match self.rules.iter().any(|rule| allows(rule, &request)) {
            true => Ok(()),
            false => Err(self.forbidden(&request)),
        }
    }

    /// The real server's refusal (`responsewriters.Forbidden`): `<resource> ["<name>"] is forbidden:
    /// User "<user>" cannot <verb> resource "<resource>" in API group "<group>" <scope>`.
    fn forbidden(&self, request: &Attributes) -> ApiError {
        let kind = &KINDS[request.kind];
        let scope = match request.namespace {
            Some(namespace) => format!("in the namespace {namespace:?}"),
            None => "at the cluster scope".to_owned(),
        };
        let reason = format!(
            "User {:?} cannot {} resource {:?} in API group {:?} {scope}",
            self.user, request.verb, kind.plural, kind.group
        );
        let message = match request.name {
            Some(name) => format!("{} {name:?} is forbidden: {reason}", qualified(request.kind)),
            None => format!("{} is forbidden: {reason}", qualified(request.kind)),
        };
        let mut error = ApiError::new(403, "Forbidden", message);
        error.details = Some(Box::new(StatusDetails {
            name: request.name.map(str::to_owned),
            group: Some(kind.group.to_owned()).filter(|group| !group.is_empty()),
            kind: Some(kind.plural.to_owned()),
            ..Default::default()
        }));
        error
    }
}

/// `(API group, resource, verb)` of a resource request, as [`Rbac::authorize`] checks it.
pub(super) fn group_resource_verb(
    method: &Method,
    target: &Target,
    params: &Params,
) -> Option<(String, String, String)> {
    let request = attributes(method, target, params)?;
    let kind = &KINDS[request.kind];
    Some((
        kind.group.to_owned(),
        kind.plural.to_owned(),
        request.verb.to_owned(),
    ))
}

/// The verb and object of a resource request (`None` for a non-resource path, or a method the server
/// answers 405 whatever the rules).
fn attributes<'a>(method: &Method, target: &'a Target, params: &Params) -> Option<Attributes<'a>> {
    let (kind, namespace, name) = match target {
        Target::Collection { kind, namespace } => (*kind, namespace.as_deref(), None),
        Target::Object {
            kind,
            namespace,
            name,
        } => (*kind, namespace.as_deref(), Some(name.as_str())),
        _ => return None,
    };
    let verb = match (method, name.is_some()) {
        // A malformed watch flag is the handler's 400; authorized as the list it then is not.
        (&Method::GET, false) if params.flag("watch").unwrap_or(false) => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, false) => "create",
        (&Method::DELETE, false) => "deletecollection",
        (&Method::GET, true) => "get",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        _ => return None,
    };
    Some(Attributes {
        verb,
        kind,
        namespace,
        name,
    })
}

/// RBAC's `RuleAllows` for a request without a subresource.
fn allows(rule: &PolicyRule, request: &Attributes) -> bool {
    let kind = &KINDS[request.kind];
    let names = rule.resource_names.as_deref().unwrap_or_default();
    matches(&rule.verbs, request.verb)
        && matches(rule.api_groups.as_deref().unwrap_or_default(), kind.group)
        && matches(rule.resources.as_deref().unwrap_or_default(), kind.plural)
        && (names.is_empty()
            || request
                .name
                .is_some_and(|name| names.iter().any(|allowed| allowed == name)))
}

fn matches(listed: &[String], wanted: &str) -> bool {
    listed.iter().any(|item| item == "*" || item == wanted)
}
