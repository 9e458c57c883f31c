//! A client the tests run inside simulated pods, for what curl cannot show: many connections in one
//! process, many at once, the peer address a socket reports, UDP, and aws-sdk-rust's default
//! credential chain.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::Instant,
};

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// `count` sequential HTTP GETs of `path`, each on a new connection; prints the last body.
    Http {
        addr: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Connects, prints `peer=<getpeername()>`, then `body=<response body>` of a GET of `/`.
    Peer { addr: SocketAddr },
    /// Sends one datagram from a connected UDP socket.
    Udp { addr: SocketAddr, payload: String },
    /// `count` GETs of `path` at once, each on its own connection; prints one line per response:
    /// `<status> <AccessKeyId in the body, or ->`.
    ConcurrentGet {
        addr: SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long)]
        count: usize,
    },
    /// STS GetCallerIdentity with aws-sdk-rust's default credential chain; prints the caller's ARN.
    CallerIdentity {
        #[arg(long)]
        endpoint: String,
    },
    /// Times `count` connects to a listener of its own on 127.0.0.1; prints `median_ns=<n> mean_ns=<n>`.
    ConnectLoop {
        #[arg(long)]
        count: usize,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Http { addr, path, count } => http(addr, &path, count),
        Command::Peer { addr } => peer(addr),
        Command::Udp { addr, payload } => udp(addr, &payload),
        Command::ConcurrentGet { addr, path, count } => concurrent_get(addr, &path, count),
        Command::CallerIdentity { endpoint } => caller_identity(&endpoint),
        Command::ConnectLoop { count } => connect_loop(count),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sim-client: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn http(addr: SocketAddr, path: &str, count: usize) -> Result<()> {
    let mut body = String::new();
    for attempt in 1..=count {
        let mut stream = TcpStream::connect(addr).with_context(|| format!("connect {addr} (#{attempt})"))?;
        body = get(&mut stream, path).with_context(|| format!("GET {path} (#{attempt})"))?;
    }
    println!("{body}");
    Ok(())
}

fn get(stream: &mut TcpStream, path: &str) -> Result<String> {
    write!(stream, "GET {path} HTTP/1.0\r\nHost: sim\r\n\r\n").context("send request")?;
    let mut response = String::new();
    stream.read_to_string(&mut response).context("read response")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("response without a head")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "unexpected response: {head}");
    Ok(body.to_owned())
}

fn concurrent_get(addr: SocketAddr, path: &str, count: usize) -> Result<()> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(count));
    let threads: Vec<_> = (0..count)
        .map(|_| {
            let (barrier, path) = (barrier.clone(), path.to_owned());
            std::thread::spawn(move || -> Result<String> {
                let mut stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
                barrier.wait();
                write!(stream, "GET {path} HTTP/1.0\r\nHost: sim\r\n\r\n").context("send request")?;
                let mut response = String::new();
                stream.read_to_string(&mut response).context("read response")?;
                let status = response.split_whitespace().nth(1).unwrap_or("?").to_owned();
                let key = response
                    .split('"')
                    .skip_while(|field| *field != "AccessKeyId")
                    .nth(2)
                    .unwrap_or("-")
                    .to_owned();
                Ok(format!("{status} {key}"))
            })
        })
        .collect();
    for thread in threads {
        let line = thread
            .join()
            .map_err(|_| anyhow::anyhow!("request thread panicked"))??;
        println!("{line}");
    }
    Ok(())
}

fn caller_identity(endpoint: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .load()
            .await;
        let identity = aws_sdk_sts::Client::new(&config)
            .get_caller_identity()
            .send()
            .await
            .map_err(|err| anyhow::anyhow!("{}", aws_sdk_sts::error::DisplayErrorContext(err)))?;
        println!("{}", identity.arn().unwrap_or_default());
        Ok(())
    })
}

fn peer(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    println!("peer={}", stream.peer_addr()?);
    println!("body={}", get(&mut stream, "/")?);
    Ok(())
}

fn udp(addr: SocketAddr, payload: &str) -> Result<()> {
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let socket = UdpSocket::bind(bind)?;
    socket
        .connect(addr)
        .with_context(|| format!("connect udp {addr}"))?;
    socket.send(payload.as_bytes())?;
    Ok(())
}

fn connect_loop(count: usize) -> Result<()> {
    ensure!(count > 0, "--count must be positive");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || listener.incoming().for_each(drop));
    let mut nanos: Vec<u128> = (0..count)
        .map(|_| {
            let start = Instant::now();
            TcpStream::connect(addr).map(|_| start.elapsed().as_nanos())
        })
        .collect::<Result<_, _>>()
        .with_context(|| format!("connect {addr}"))?;
    nanos.sort_unstable();
    let mean = nanos.iter().sum::<u128>() / nanos.len() as u128;
    println!("median_ns={} mean_ns={mean}", nanos[nanos.len() / 2]);
    Ok(())
}
