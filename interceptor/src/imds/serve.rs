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

/// After shutdown, how long the listen queue must stay empty before the listener closes: connects
/// that passed the kernel's programs before they switched to refusing are still arriving.
const DRAIN_SETTLE: Duration = Duration::from_millis(100);
/// How long requests in progress may take to finish after shutdown, well inside the pod's grace
/// period (30 s by default).
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// What one connection's task needs besides its stream.
struct Handler {
    router: Router,
    attribute: Arc<dyn Attribute>,
    bounds: ConnectionBounds,
    metrics: ImdsMetrics,
    /// Turns `true` when the agent shuts down: each connection then ends after its request.
    draining: tokio::sync::watch::Receiver<bool>,
}

/// Serves `router` on `listener` until `shutdown` completes, then drains: answers the connections
/// already made (those in the listen queue, and those that arrive within [`DRAIN_SETTLE`] of each
/// other), lets each connection finish its request, and returns once all have ended or after
/// [`DRAIN_DEADLINE`]. `shutdown` is where the caller stops new connections from coming (the
/// kernel's programs switched to refusing), so that closing the listener resets none.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    attribute: Arc<dyn Attribute>,
    bounds: ConnectionBounds,
    metrics: ImdsMetrics,
    shutdown: impl Future<Output = ()>,
) {
    let (drain, draining) = tokio::sync::watch::channel(false);
    let handler = Handler {
        router,
        attribute,
        bounds,
        metrics,
        draining,
    };
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => handler.accepted(accepted, &mut connections).await,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    while let Ok(accepted) = tokio::time::timeout(DRAIN_SETTLE, listener.accept()).await {
        handler.accepted(accepted, &mut connections).await;
    }
    drop(listener);
    let _ = drain.send(true);
    let in_progress = connections.len();
    let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => tracing::info!(in_progress, "metadata connections drained"),
        Err(_) => tracing::warn!(left = connections.len(), deadline = ?DRAIN_DEADLINE,
            "metadata connections still open after the drain deadline, closed"),
    }
}

impl Handler {
    async fn accepted(
        &self,
        accepted: std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
        connections: &mut tokio::task::JoinSet<()>,
    ) {
        match accepted {
            Ok((stream, peer)) => self.serve_connection(stream, peer, connections),
            Err(err) => {
                // Out of fds and the like: log, back off a little, keep serving.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn serve_connection(
        &self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        connections: &mut tokio::task::JoinSet<()>,
    ) {
        let attribution = stream
            .local_addr()
            .ok()
            .and_then(|local| self.attribute.attribute(peer, local));
        self.metrics.connection(attribution.is_some());
        let limit_key = attribution.map(|found| self.bounds.keys.key_of(found.cgroup_id));
        let open = match self
            .bounds
            .limits
            .admit(limit_key.clone(), attribution.map(|found| found.cgroup_id))
        {
            Ok(open) => open,
            Err(over) => {
                // Closed unread. Debug level: a flood must not flood the log too; the metric counts it.
                tracing::debug!(%peer, cgroup_id = attribution.map(|found| found.cgroup_id.0),
                    caller = limit_key.as_ref().map(tracing::field::display), limit = over.label(),
                    "metadata connection over its limit, closed");
                self.metrics.connection_refused(over.label());
                return;
            }
        };
        let caller = Caller::new(peer, attribution, limit_key);
        let service_caller = caller.clone();
        let service = self
            .router
            .clone()
            .map_request(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(service_caller.clone());
                request
            });
        let mut draining = self.draining.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                // EC2 sends `X-Aws-Ec2-Metadata-Token-Ttl-Seconds`; some clients compare names exactly.
                .title_case_headers(true)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                // It only ever turns true (or goes, with the loop): either way, the agent stops.
                _ = draining.changed() => {
                    // The request in progress is answered; the connection then closes.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = ended {
                tracing::debug!(peer = %caller.peer, error = %err, "metadata connection ended with an error");
            }
            drop(open);
        });
    }
}
