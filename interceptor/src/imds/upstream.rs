//! imds::upstream: the node's own metadata service (`--metadata-addr`), for allow-listed instance facts
//! and for the agent's start-up discovery. The agent holds its own IMDSv2 token for it (nodes often
//! require v2) and never forwards a caller's headers, so no X-Forwarded-For reaches it.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    http::{HeaderValue, Method, Request, StatusCode, Uri, header},
};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// A reply from the metadata service, passed on as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamReply {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("bad metadata service address {0:?}: expected http://HOST[:PORT] or HOST[:PORT]")]
    BadAddress(String),
    #[error("the metadata service did not answer {} within {timeout:?}", crate::bounded(.path))]
    Timeout { path: String, timeout: Duration },
    #[error("cannot reach the metadata service for {}: {message}", crate::bounded(.path))]
    Unreachable { path: String, message: String },
}

/// Reads the metadata service, behind a trait so the API's tests need no socket.
#[async_trait::async_trait]
pub trait Upstream: Send + Sync {
    async fn get(&self, path: &str) -> Result<UpstreamReply, UpstreamError>;
}

/// The node's metadata service over HTTP.
pub struct MetadataService {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    token: Mutex<Option<(HeaderValue, Instant)>>,
}

const TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BODY: usize = 1 << 20;
/// The agent's own token lives six hours; it is replaced ten minutes early.
const TOKEN_TTL: Duration = Duration::from_secs(21_600);
const TOKEN_MARGIN: Duration = Duration::from_secs(600);

impl MetadataService {
    /// `base` such as `http://169.254.169.254`, or kube2iam's form without a scheme,
    /// `169.254.169.254[:PORT]`, which means the same over HTTP.
    pub fn new(base: &str) -> Result<Self, UpstreamError> {
        let bad = || UpstreamError::BadAddress(base.to_owned());
        let url = match base.contains("://") {
            true => base.to_owned(),
            false => format!("http://{base}"),
        };
        let uri: Uri = url.parse().map_err(|_| bad())?;
        let authority = uri.authority().ok_or_else(bad)?;
        // The authority is a host and maybe a port, nothing else: no user, no empty or named port.
        let host_and_port = match authority.port_u16() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_owned(),
        };
        if uri.scheme_str() != Some("http")
            || authority.host().is_empty()
            || authority.as_str() != host_and_port
            || uri.path().len() > 1
        {
            return Err(bad());
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(TIMEOUT));
        Ok(Self {
            base: url.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            token: Mutex::new(None),
        })
    }

    /// The cached token, or a new one; `None` when the service does not do v2 (then v1 is used).
    async fn token(&self) -> Result<Option<HeaderValue>, UpstreamError> {
        if let Some((token, expires)) = self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
            && Instant::now() + TOKEN_MARGIN < expires
        {
            return Ok(Some(token));
        }
        let request = Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/latest/api/token", self.base))
            .header("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL.as_secs())
            .body(Empty::new())
            .expect("static request is valid");
        let reply = self.send("/latest/api/token", request).await?;
        if reply.status != StatusCode::OK {
            return Ok(None);
        }
        let token = HeaderValue::from_maybe_shared(reply.body).ok();
        if let Some(token) = &token {
            *self.token.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((token.clone(), Instant::now() + TOKEN_TTL));
        }
        Ok(token)
    }

    async fn get_with(&self, path: &str, token: Option<HeaderValue>) -> Result<UpstreamReply, UpstreamError> {
        let mut request = Request::builder().uri(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header("x-aws-ec2-metadata-token", token);
        }
        let request = request
            .body(Empty::new())
            .map_err(|_| UpstreamError::BadAddress(format!("{}{path}", self.base)))?;
        self.send(path, request).await
    }

    async fn send(&self, path: &str, request: Request<Empty<Bytes>>) -> Result<UpstreamReply, UpstreamError> {
        let unreachable = |message: String| UpstreamError::Unreachable {
            path: path.to_owned(),
            message,
        };
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|err| unreachable(crate::error_chain(&err)))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|err| unreachable(err.to_string()))?
                .to_bytes();
            Ok(UpstreamReply {
                status: parts.status,
                content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
                body,
            })
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout {
                path: path.to_owned(),
                timeout: TIMEOUT,
            })?
    }
}

#[async_trait::async_trait]
impl Upstream for MetadataService {
    async fn get(&self, path: &str) -> Result<UpstreamReply, UpstreamError> {
        let reply = self.get_with(path, self.token().await?).await?;
        if reply.status != StatusCode::UNAUTHORIZED {
            return Ok(reply);
        }
        // The token was refused (the service restarted, say): one more try with a new one.
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.get_with(path, self.token().await?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_plain_http_roots_with_or_without_the_scheme() {
        for (given, base) in [
            ("http://169.254.169.254", "http://169.254.169.254"),
            ("http://[fd00:ec2::254]/", "http://[fd00:ec2::254]"),
            // kube2iam's --metadata-addr: a host and maybe a port, over HTTP.
            ("169.254.169.254", "http://169.254.169.254"),
            ("169.254.169.254:8080", "http://169.254.169.254:8080"),
            ("[fd00:ec2::254]", "http://[fd00:ec2::254]"),
            ("metadata.internal/", "http://metadata.internal"),
        ] {
            let service = MetadataService::new(given).unwrap_or_else(|err| panic!("{given}: {err}"));
            assert_eq!(service.base, base, "{given}");
        }
        for bad in [
            "https://169.254.169.254",
            "ftp://169.254.169.254",
            "http://x/latest",
            "169.254.169.254/latest",
            "http://",
            "",
            ":80",
            "fd00:ec2::254",
            "169.254.169.254:port",
            "169.254.169.254 ",
            "169.254.169.254:",
            "user@169.254.169.254",
        ] {
            let err = MetadataService::new(bad).map(|_| ()).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{bad:?}"))
                    && err.contains("expected http://HOST[:PORT] or HOST[:PORT]"),
                "{bad}: {err}"
            );
        }
    }
}
