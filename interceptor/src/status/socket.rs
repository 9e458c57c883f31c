//! status::socket: the agent's status socket, a Unix socket (never a TCP port: pod names and roles are
//! not for the cluster network) where the agent answers `GET /status` with its [`AgentStatus`], and the
//! `interceptor status` end that asks it.

use std::{
    fs,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use axum::{
    Router,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};

use super::report::AgentStatus;

/// Where the agent listens and `interceptor status` asks, unless `--status-socket` says otherwise.
pub const DEFAULT_STATUS_SOCKET: &str = "/run/interceptor/status.sock";
/// How long `interceptor status` waits for the agent's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The bound socket; dropping it removes the socket file, unless another agent has replaced it since.
#[derive(Debug)]
pub struct StatusSocket {
    path: PathBuf,
    /// Device and inode of the socket this agent bound.
    bound: (u64, u64),
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        let still_ours =
            fs::symlink_metadata(&self.path).is_ok_and(|meta| (meta.dev(), meta.ino()) == self.bound);
        if still_ours && let Err(err) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %err, "cannot remove the status socket");
        }
    }
}

/// Binds the status socket at `path` (mode 0600; its directory is created 0700 when missing) and
/// answers `GET /status` with `status()` until the runtime ends. A socket a previous agent left there
/// is replaced atomically; any other kind of file there is an error.
pub fn serve(path: &Path, status: impl Fn() -> AgentStatus + Send + Sync + 'static) -> Result<StatusSocket> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .with_context(|| format!("status socket {} has no directory", path.display()))?;
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if let Ok(existing) = fs::symlink_metadata(path)
        && !existing.file_type().is_socket()
    {
        bail!("{} exists and is not a socket: not replacing it", path.display());
    }
    // Bound under a name of its own and made 0600 before it is renamed into place: no moment has a
    // socket at `path` that others may connect to, or no socket at all when a stale one was there.
    let file_name = path
        .file_name()
        .context("the status socket path has no file name")?;
    let staging = dir.join(format!(".{}.{}", file_name.to_string_lossy(), std::process::id()));
    let _ = fs::remove_file(&staging);
    let listener =
        UnixListener::bind(&staging).with_context(|| format!("cannot bind {}", staging.display()))?;
    let placed = fs::set_permissions(&staging, fs::Permissions::from_mode(0o600))
        .and_then(|()| fs::rename(&staging, path));
    if let Err(err) = placed {
        let _ = fs::remove_file(&staging);
        return Err(err).with_context(|| format!("cannot put the status socket at {}", path.display()));
    }
    let meta = fs::symlink_metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    let status = Arc::new(status);
    let router = Router::new().route(
        "/status",
        get(move || {
            let status = status.clone();
            async move { answer(&status()) }
        }),
    );
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            tracing::error!(error = %err, "the status socket stopped");
        }
    });
    Ok(StatusSocket {
        path: path.to_owned(),
        bound: (meta.dev(), meta.ino()),
    })
}

fn answer(status: &AgentStatus) -> axum::response::Response {
    match serde_json::to_vec(status) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

/// Asks the agent listening at `path` for its status.
pub async fn fetch(path: &Path) -> Result<AgentStatus> {
    tokio::time::timeout(ANSWER_TIMEOUT, ask(path))
        .await
        .with_context(|| format!("no answer within {ANSWER_TIMEOUT:?}"))?
}

async fn ask(path: &Path) -> Result<AgentStatus> {
    let stream = UnixStream::connect(path)
        .await
        .with_context(|| format!("cannot connect to {}", path.display()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake failed")?;
    tokio::spawn(connection);
    let request = hyper::Request::get("/status")
        .header(header::HOST, "interceptor")
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let response = sender.send_request(request).await.context("no answer")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("the answer broke off")?
        .to_bytes();
    ensure!(
        status.is_success(),
        "the agent answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).context("the agent's answer is not a status document")
}
