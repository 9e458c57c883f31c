//! interceptor: per-workload AWS IAM credentials through the instance metadata endpoint, with the caller
//! identified by the kernel (cgroup id recorded at connect time) instead of by source IP.
//!
//! Modules follow the data path of DESIGN.md:
//! - [`bpf`]: loads and attaches the BPF programs, owns their links, attributes accepted connections.
//! - [`identity`]: the cgroup v2 filesystem: where it is mounted, which id a cgroup directory has, which
//!   path an id names, and what a kubelet-made path says.
//! - [`workload`]: who a cgroup belongs to and which role it asks for (static file, Kubernetes pods).
//! - [`policy`]: role names and ARNs, external ids, session names: which session a workload gets.
//! - [`creds`]: STS AssumeRole, cached and refreshed per session.
//! - [`heap`]: memory the agent frees goes back to the node (glibc's malloc keeps it otherwise).
//! - [`imds`]: the metadata HTTP API the redirected callers talk to.
//! - [`telemetry`]: logs, Prometheus metrics, `/healthz` and `/readyz`.
//! - [`agent`]: the `interceptor agent` command: flags, start-up order, shutdown.
//! - [`status`]: the `interceptor status` command: what the kernel has in place and what the agent did.

#[cfg(feature = "kubernetes")]
pub mod agent;
pub mod bpf;
pub mod creds;
pub mod heap;
pub mod identity;
pub mod imds;
mod periodic;
pub mod policy;
#[cfg(feature = "kubernetes")]
pub mod status;
pub mod telemetry;
pub mod workload;

/// An error and its sources on one line, for log fields.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How many characters of a value from outside the agent (an annotation, a role name from a request
/// path, a namespace's pattern) a response body, a log line or an Event shows: enough for any role
/// name or common ARN, and a 256 KiB annotation costs a line, not 256 KiB, per request.
pub(crate) const ECHO_MAX_CHARS: usize = 128;

/// Where `text` is cut (a byte offset) and its length in characters, when it is longer than
/// [`ECHO_MAX_CHARS`].
fn echo_cut(text: &str) -> Option<(usize, usize)> {
    let (cut, _) = text.char_indices().nth(ECHO_MAX_CHARS)?;
    Some((cut, text.chars().count()))
}

/// `text` as a log field shows it: whole up to [`ECHO_MAX_CHARS`] characters, else cut there with a
/// note of its full length.
pub(crate) fn bounded(text: &str) -> std::borrow::Cow<'_, str> {
    match echo_cut(text) {
        None => text.into(),
        Some((cut, chars)) => format!("{}… ({chars} characters)", &text[..cut]).into(),
    }
}

/// A value from outside the agent as a message quotes it: escaped (no line breaks or control
/// characters reach a log), and cut as [`bounded`] cuts it.
pub(crate) struct Echo<'a>(pub &'a str);

impl std::fmt::Display for Echo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match echo_cut(self.0) {
            None => write!(f, "{:?}", self.0),
            Some((cut, chars)) => write!(f, "{:?}… ({chars} characters)", &self.0[..cut]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_are_quoted_escaped_and_cut_with_their_length() {
        assert_eq!(Echo("app").to_string(), r#""app""#);
        assert_eq!(Echo("a\nb").to_string(), r#""a\nb""#);
        let long = "é".repeat(300);
        let echoed = Echo(&long).to_string();
        assert_eq!(
            echoed,
            format!("{:?}… (300 characters)", "é".repeat(ECHO_MAX_CHARS))
        );
        assert_eq!(bounded("/latest/meta-data/"), "/latest/meta-data/");
        let path = format!("/latest/{}", "x".repeat(16_000));
        assert_eq!(
            bounded(&path),
            format!("{}… (16008 characters)", &path[..ECHO_MAX_CHARS])
        );
        assert_eq!(
            bounded(&"y".repeat(ECHO_MAX_CHARS)).len(),
            ECHO_MAX_CHARS,
            "at the bound: whole"
        );
    }
}
