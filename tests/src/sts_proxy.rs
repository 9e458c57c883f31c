//! STS in trouble: a TCP proxy in the simulated node that forwards to moto until it is told otherwise:
//! to hang (accept connections, and keep those already open, without ever answering, as an STS
//! endpoint in trouble does), to be down (every connection reset at once, as a stopped server's
//! host answers), or to throttle (every request answered 400 `Throttling`, as STS does over its
//! rate), and back. It listens on the node's address as moto does, on a thread of its own inside the
//! node's network namespace, so it reaches moto the way the agent would.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
};

use crate::{
    netns::{network_namespace_of, runtime_in},
    sim::{NODE_IP, SimNode},
};

pub const STS_PROXY_PORT: u16 = 5001;

/// What the proxy does with connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StsMode {
    /// Forwards them to moto.
    Forward,
    /// Holds them and never answers.
    Hang,
    /// Resets them.
    Down,
    /// Answers every request 400 `Throttling`.
    Throttle,
}

/// Serves until dropped.
pub struct StsProxy {
    mode: watch::Sender<StsMode>,
    handled: Arc<[AtomicUsize; 4]>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl StsProxy {
    /// Listens on the node's address and forwards every connection to `upstream` (moto's address)
    /// until [`Self::hang`].
    pub fn start(node: &SimNode, upstream: SocketAddr) -> Result<Self> {
        let listener = node.bind_tcp(Self::addr())?;
        let netns = network_namespace_of(&listener)?;
        let (mode, modes) = watch::channel(StsMode::Forward);
        let handled = Arc::new(Default::default());
        let (stop, stopped) = oneshot::channel();
        let (started_tx, started) = mpsc::channel();
        let proxy = Proxy {
            upstream,
            modes,
            handled: Arc::clone(&handled),
        };
        let thread = std::thread::Builder::new()
            .name("sts-proxy".to_owned())
            .spawn(move || match runtime_in(&netns) {
                Ok(runtime) => {
                    let _ = started_tx.send(Ok(()));
                    runtime.block_on(proxy.serve(listener, stopped));
                }
                Err(err) => {
                    let _ = started_tx.send(Err(err));
                }
            })
            .context("cannot start the STS proxy's thread")?;
        started
            .recv()
            .context("the STS proxy's thread ended before it started")?
            .context("cannot run the STS proxy in the node's network namespace")?;
        Ok(Self {
            mode,
            handled,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr() -> SocketAddr {
        SocketAddr::from((NODE_IP, STS_PROXY_PORT))
    }

    /// The agent's `--sts-endpoint` to reach STS through the proxy.
    pub fn url(&self) -> String {
        format!("http://{}", Self::addr())
    }

    /// From now on connections are handled as `mode` says; a change cuts open connections from moto.
    pub fn set_mode(&self, mode: StsMode) {
        self.mode.send_replace(mode);
    }

    /// How many connections the proxy has handled as `mode` says so far: forwarded, held without an
    /// answer, reset, or answered `Throttling` (one call each: the answer closes the connection).
    pub fn handled(&self, mode: StsMode) -> usize {
        self.handled[mode as usize].load(Ordering::SeqCst)
    }
}

impl Drop for StsProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What each connection needs: where moto is, what STS does now, and the counts of connections handled.
#[derive(Clone)]
struct Proxy {
    upstream: SocketAddr,
    modes: watch::Receiver<StsMode>,
    handled: Arc<[AtomicUsize; 4]>,
}

/// STS's answer over its request rate, as the Query API words it.
const THROTTLING: &str = "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
    <Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error>\
    <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ErrorResponse>";

impl Proxy {
    /// Accepts connections until `stopped`; the runtime's end closes every connection still open.
    async fn serve(self, listener: std::net::TcpListener, stopped: oneshot::Receiver<()>) {
        let accepting = async {
            listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(listener)?;
            loop {
                let (client, _) = listener.accept().await?;
                tokio::spawn(self.clone().relay(client));
            }
        };
        tokio::select! {
            result = accepting => {
                let result: io::Result<()> = result;
                if let Err(err) = result {
                    eprintln!("sts proxy: accepting stopped: {err}");
                }
            }
            _ = stopped => {}
        }
    }

    /// Handles `client` as the mode of the moment says. A change of mode cuts a forwarded connection
    /// from moto, and the client is then handled as the new mode says.
    async fn relay(mut self, mut client: TcpStream) {
        loop {
            let mode = *self.modes.borrow_and_update();
            self.handled[mode as usize].fetch_add(1, Ordering::SeqCst);
            match mode {
                StsMode::Forward => {
                    let upstream = self.upstream;
                    let forwarding = async {
                        let mut moto = TcpStream::connect(upstream).await?;
                        tokio::io::copy_bidirectional(&mut client, &mut moto).await
                    };
                    tokio::select! {
                        _ = forwarding => return, // one side closed
                        _ = self.modes.changed() => continue,
                    }
                }
                StsMode::Hang => return self.hold(client).await,
                StsMode::Down => {
                    // A reset, not an orderly close: what a client gets from a port nobody listens on.
                    let _ = client.set_zero_linger();
                    return;
                }
                StsMode::Throttle => {
                    if read_request_head(&mut client).await.is_ok() {
                        let answer = format!(
                            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\
                             Connection: close\r\n\r\n{THROTTLING}",
                            THROTTLING.len()
                        );
                        let _ = client.write_all(answer.as_bytes()).await;
                    }
                    return;
                }
            }
        }
    }

    /// Reads and drops whatever the client sends and never answers, until the client gives up.
    async fn hold(&self, mut client: TcpStream) {
        let mut discarded = [0u8; 4096];
        while matches!(client.read(&mut discarded).await, Ok(read) if read > 0) {}
    }
}

/// Reads until the end of a request's head (the body, if any, is left unread: the answer closes the
/// connection).
async fn read_request_head(client: &mut TcpStream) -> io::Result<()> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = client.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
    }
    Ok(())
}
