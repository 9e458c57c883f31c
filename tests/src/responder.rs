//! Minimal HTTP/1.x responders for the simulated node: the test's stand-in for the agent's listener and
//! for the node's metadata service. Each request gets a `200` whose body the test's closure chooses.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// One accepted connection and the path its request asked for.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub path: String,
}

type Respond = dyn Fn(&Exchange) -> String + Send + Sync;

/// Serves a listener until dropped.
pub struct Responder {
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Responder {
    pub fn spawn(
        listener: std::net::TcpListener,
        respond: impl Fn(&Exchange) -> String + Send + Sync + 'static,
    ) -> Self {
        listener.set_nonblocking(true).expect("set listener non-blocking");
        let listener = TcpListener::from_std(listener).expect("register listener with tokio");
        let accepted = Arc::new(AtomicUsize::new(0));
        let respond: Arc<Respond> = Arc::new(respond);
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let respond = respond.clone();
                tokio::spawn(async move {
                    if let Err(err) = serve(stream, peer, &*respond).await {
                        eprintln!("responder: {peer}: {err}");
                    }
                });
            }
        });
        Self { accepted, task }
    }

    /// How many connections reached this listener so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, peer: SocketAddr, respond: &Respond) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    let path = read_request_path(&mut stream).await?;
    let body = respond(&Exchange { peer, local, path });
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads the request head (bounded) and returns the path of its request line.
async fn read_request_path(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 16 * 1024 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    Ok(head.split_whitespace().nth(1).unwrap_or_default().to_owned())
}
