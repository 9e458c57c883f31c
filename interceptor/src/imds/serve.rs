//! imds::serve: the accept loop. Each accepted connection is looked up in the kernel's record of
//! redirected connections once, at accept, and every request on it carries the answer as a [`Caller`],
//! with the [`LimitKey`] whose limits it counts against. A connection over the [`ConnectionLimits`]
//! is closed at once.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{Router, http::Request};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use interceptor_common::CgroupId;
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::{
    ImdsMetrics,
    limits::{ConnectGate, ConnectionLimits, LimitKey, LimitKeys},
};
use crate::{
    bpf::{Attribution, Interceptor},
    identity::CgroupPath,
};

/// Who is on the other end of a connection, as far as the agent knows.
#[derive(Clone, Debug)]
pub struct Caller {
    pub peer: SocketAddr,
    /// `None`: the kernel did not redirect this connection, so nobody knows who made it.
    pub attribution: Option<Attribution>,
    /// Whose limits the connection counts against: its pod's, or its cgroup's outside pods. `None`
    /// with no attribution.
    pub limit_key: Option<LimitKey>,
    /// The attributed cgroup's path, once a request of this connection has resolved it. Shared by the
    /// connection's requests: the cgroup is the one the kernel recorded at connect, so its path cannot
    /// change for the connection, and a keep-alive request does not check it again (a `stat` of the
    /// path, an eighth of the agent's time per cached-credentials request).
    pub cgroup_path: Arc<OnceLock<CgroupPath>>,
}

impl Caller {
    pub fn new(peer: SocketAddr, attribution: Option<Attribution>, limit_key: Option<LimitKey>) -> Self {
        Self {
            peer,
            attribution,
            limit_key,
            cgroup_path: Arc::default(),
        }
    }
}

/// The kernel's record of redirected connections (the BPF maps), or a stand-in.
pub trait Attribute: Send + Sync + 'static {
    fn attribute(&self, peer: SocketAddr, local: SocketAddr) -> Option<Attribution>;
}

impl Attribute for Interceptor {
    fn attribute(&self, peer: SocketAddr, local: SocketAddr) -> Option<Attribution> {
        Interceptor::attribute(self, peer, local)
    }
}

impl ConnectGate for Interceptor {
    fn set_over_limit(&self, cgroup_id: CgroupId, over: bool) {
        match Interceptor::set_over_limit(self, cgroup_id, over) {
            Ok(()) => tracing::debug!(
                cgroup_id = cgroup_id.0,
                over,
                "kernel gate of an over-limit caller"
            ),
            // The map full, say: the caller's connections are still closed at accept.
            Err(err) => tracing::warn!(cgroup_id = cgroup_id.0, over, error = %err,
                "cannot set the kernel gate of an over-limit caller"),
        }
    }
}

/// A client must send its request head within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a request head (request line and headers).
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// What the accept loop bounds connections with.
pub struct ConnectionBounds {
    pub keys: LimitKeys,
    pub limits: Arc<ConnectionLimits>,
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    attribute: Arc<dyn Attribute>,
    bounds: ConnectionBounds,
    metrics: ImdsMetrics,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of fds and the like: log, back off a little, keep serving.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let attribution = stream
            .local_addr()
            .ok()
            .and_then(|local| attribute.attribute(peer, local));
        metrics.connection(attribution.is_some());
        let limit_key = attribution.map(|found| bounds.keys.key_of(found.cgroup_id));
        let open = match bounds
            .limits
            .admit(limit_key.clone(), attribution.map(|found| found.cgroup_id))
        {
            Ok(open) => open,
            Err(over) => {
                // Closed unread. Debug level: a flood must not flood the log too; the metric counts it.
                tracing::debug!(%peer, cgroup_id = attribution.map(|found| found.cgroup_id.0),
                    caller = limit_key.as_ref().map(tracing::field::display), limit = over.label(),
                    "metadata connection over its limit, closed");
                metrics.connection_refused(over.label());
                continue;
            }
        };
        let caller = Caller::new(peer, attribution, limit_key);
        let service_caller = caller.clone();
        let service = router.clone().map_request(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(service_caller.clone());
            request
        });
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                // EC2 sends `X-Aws-Ec2-Metadata-Token-Ttl-Seconds`; some clients compare names exactly.
                .title_case_headers(true)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            if let Err(err) = connection.await {
                tracing::debug!(peer = %caller.peer, error = %err, "metadata connection ended with an error");
            }
            drop(open);
        });
    }
}
