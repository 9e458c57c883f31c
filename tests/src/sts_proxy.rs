//! STS in trouble: a TCP proxy in the simulated node that forwards to moto until it is told to hang,
//! and from then on accepts connections, and keeps those already open, without ever answering, as an
//! STS endpoint in trouble does. It listens on the node's address as moto does, on a thread of its own
//! inside the node's network namespace, so it reaches moto the way the agent would.

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
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
};

use crate::{
    netns::{network_namespace_of, runtime_in},
    sim::{NODE_IP, SimNode},
};

pub const STS_PROXY_PORT: u16 = 5001;

/// Serves until dropped.
pub struct StsProxy {
    hang: watch::Sender<bool>,
    held: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl StsProxy {
    /// Listens on the node's address and forwards every connection to `upstream` (moto's address)
    /// until [`Self::hang`].
    pub fn start(node: &SimNode, upstream: SocketAddr) -> Result<Self> {
        let listener = node.bind_tcp(Self::addr())?;
        let netns = network_namespace_of(&listener)?;
        let (hang, hung) = watch::channel(false);
        let held = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = oneshot::channel();
        let (started_tx, started) = mpsc::channel();
        let proxy = Proxy {
            upstream,
            hung,
            held: held.clone(),
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
            hang,
            held,
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

    /// From now on nothing more comes from STS: new connections are accepted and held, open ones are
    /// cut from moto and held.
    pub fn hang(&self) {
        self.hang.send_replace(true);
    }

    /// How many connections the proxy has held without answering so far.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
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

/// What each connection needs: where moto is, whether STS hangs, and the count of held connections.
#[derive(Clone)]
struct Proxy {
    upstream: SocketAddr,
    hung: watch::Receiver<bool>,
    held: Arc<AtomicUsize>,
}

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

    /// Forwards `client` to moto until STS hangs, then holds it: reads and drops whatever the client
    /// sends and never answers, until the client gives up.
    async fn relay(mut self, mut client: TcpStream) {
        if !*self.hung.borrow() {
            let upstream = self.upstream;
            let forwarding = async {
                let mut moto = TcpStream::connect(upstream).await?;
                tokio::io::copy_bidirectional(&mut client, &mut moto).await
            };
            tokio::select! {
                _ = forwarding => return, // one side closed
                _ = self.hung.wait_for(|hung| *hung) => {}
            }
        }
        self.held.fetch_add(1, Ordering::SeqCst);
        let mut discarded = [0u8; 4096];
        while matches!(client.read(&mut discarded).await, Ok(read) if read > 0) {}
    }
}
