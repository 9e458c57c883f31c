//! A client the tests run inside simulated pods, for what curl cannot show: many connections in one
//! process, many at once, held open or timed, the peer address a socket reports, UDP, a hand-made TCP
//! segment from a raw socket, a connection made before the programs attach, aws-sdk-rust's default
//! credential chain, credentials asked for without pause while the agent restarts, a burst of
//! first requests from many callers at once, a flood of requests over keep-alive connections, and a
//! process trying to listen where the agent does.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd},
    process::ExitCode,
    time::{Duration, Instant},
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
    /// Times `count` connects to `to`, each closed at once; prints `median_ns=<n> mean_ns=<n>`.
    ConnectLoop {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Opens `count` connections and sends nothing; prints `opened=<n> failed=<n>`, then holds them until
    /// standard input closes.
    Hold {
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// `count` sequential GETs of `path`, each on a new connection; prints
    /// `ok=<n> failed=<n> p50_us=<n> p99_us=<n>` (a failure: an error or a status other than 200).
    Timed {
        addr: SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long)]
        count: usize,
    },
    /// Sends one hand-made TCP SYN from a raw socket, source port `src_port`, to `dst`.
    RawSyn {
        src: std::net::Ipv4Addr,
        dst: std::net::SocketAddrV4,
        #[arg(long)]
        src_port: u16,
    },
    /// Connects and prints `connected`; after a line on standard input, sends a GET of `path` and prints
    /// `response=<status line>`, or `no response` when none comes within 3 s.
    ConnectThenGet {
        addr: SocketAddr,
        #[arg(long)]
        path: String,
    },
    /// Asks for credentials without pause until standard input closes, as an SDK does: the role list,
    /// then the listed role's credentials. Each request on a new connection, or with `--keep-alive`
    /// all on one (a new one after an error), `--pause-ms` apart. With `--imds-v2`, every request carries a session token,
    /// fetched with a PUT first and again after any error, as the SDKs do. Prints one line per attempt, with the time it ended:
    /// `<unix µs> ok <listed role> <AccessKeyId>` or `<unix µs> err <what went wrong>`, and before the
    /// first `ok` with an AccessKeyId, `<unix µs> creds <AccessKeyId> <SecretAccessKey> <Token>`, so
    /// the test can ask STS whose credentials they are.
    Load {
        addr: SocketAddr,
        #[arg(long)]
        keep_alive: bool,
        #[arg(long)]
        imds_v2: bool,
        /// Pause between attempts, in milliseconds.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
    },
    /// `count` GETs of `path` over `connections` keep-alive connections at once, a share each (a new
    /// connection after one closes), as a pod flooding the agent sends them; prints what came back:
    /// `200=<n> 429=<n> closed=<n> other=<n> keys=<the distinct AccessKeyIds of the 200s, comma-separated,
    /// or ->`, where `closed` counts requests whose connection closed (or could not open) before a
    /// response.
    Flood {
        addr: SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        count: usize,
    },
    /// GETs `path` on a new connection every `--pause-ms` until standard input closes, as a pod that
    /// keeps asking; prints one line per attempt, with the time it ended: `<unix µs> <status> <body's
    /// first line>`, or `<unix µs> err <what went wrong>`.
    Probe {
        addr: SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long, default_value_t = 10)]
        pause_ms: u64,
        /// How long each connect, and then the answer, may take.
        #[arg(long)]
        timeout_ms: u64,
    },
    /// Tries to listen on each of `addrs` (TCP), as a process taking the agent's port would, and prints
    /// `bound <addr>` or `refused <addr> <error>` for each, then `ready`. Every connection to a bound
    /// address gets a 200 with the body `squatter`. With `--retry-ms`, tries the refused addresses again
    /// that often until standard input closes (printing only what changes); without it, waits for
    /// standard input to close. Then prints `attempts=<n> bound=<n> answered=<n>`.
    Squat {
        #[arg(required = true)]
        addrs: Vec<SocketAddr>,
        #[arg(long)]
        retry_ms: Option<u64>,
    },
    /// Opens `--per-caller` connections as each caller (moving itself into the caller's cgroup before
    /// its connects, so the kernel records that cgroup), then sends a GET of `<path-prefix><role>` on
    /// all of them at once; prints `ok=<n> failed=<n> p50_us=<n> p99_us=<n> max_us=<n>`, each latency
    /// from the moment the requests are released to the end of that response.
    FanIn {
        addr: SocketAddr,
        #[arg(long)]
        path_prefix: String,
        #[arg(long)]
        per_caller: usize,
        /// `<cgroup directory>=<role>`, one per caller.
        #[arg(required = true)]
        callers: Vec<String>,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Http { addr, path, count } => http(addr, &path, count),
        Command::Peer { addr } => peer(addr),
        Command::Udp { addr, payload } => udp(addr, &payload),
        Command::ConcurrentGet { addr, path, count } => concurrent_get(addr, &path, count),
        Command::CallerIdentity { endpoint } => caller_identity(&endpoint),
        Command::ConnectLoop { to, count } => connect_loop(to, count),
        Command::Hold { addr, count } => hold(addr, count),
        Command::Timed { addr, path, count } => timed(addr, &path, count),
        Command::RawSyn { src, dst, src_port } => raw_syn(src, dst, src_port),
        Command::ConnectThenGet { addr, path } => connect_then_get(addr, &path),
        Command::Load {
            addr,
            keep_alive,
            imds_v2,
            pause_ms,
        } => load(addr, keep_alive, imds_v2, Duration::from_millis(pause_ms)),
        Command::Flood {
            addr,
            path,
            connections,
            count,
        } => flood(addr, &path, connections, count),
        Command::FanIn {
            addr,
            path_prefix,
            per_caller,
            callers,
        } => fan_in(addr, &path_prefix, per_caller, &callers),
        Command::Probe {
            addr,
            path,
            pause_ms,
            timeout_ms,
        } => probe(
            addr,
            &path,
            Duration::from_millis(pause_ms),
            Duration::from_millis(timeout_ms),
        ),
        Command::Squat { addrs, retry_ms } => squat(&addrs, retry_ms.map(Duration::from_millis)),
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
    let (status, body) = get_any(stream, path)?;
    ensure!(status == 200, "unexpected response: {status} {body}");
    Ok(body)
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

/// `to` is a listener elsewhere, outside the pod's cgroup: one of this process's own would run the
/// agent's programs on the accepting end too, and the figure would be that of two ends, not one.
fn connect_loop(to: SocketAddr, count: usize) -> Result<()> {
    ensure!(count > 0, "--count must be positive");
    let mut nanos: Vec<u128> = (0..count)
        .map(|_| {
            let start = Instant::now();
            TcpStream::connect(to).map(|_| start.elapsed().as_nanos())
        })
        .collect::<Result<_, _>>()
        .with_context(|| format!("connect {to}"))?;
    nanos.sort_unstable();
    let mean = nanos.iter().sum::<u128>() / nanos.len() as u128;
    println!("median_ns={} mean_ns={mean}", nanos[nanos.len() / 2]);
    Ok(())
}

fn hold(addr: SocketAddr, count: usize) -> Result<()> {
    let results: Vec<_> = (0..count)
        .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .collect();
    let opened = results.iter().filter(|result| result.is_ok()).count();
    println!("opened={opened} failed={}", count - opened);
    std::io::stdout().flush()?;
    // Held until the test closes our standard input.
    std::io::stdin().read_to_end(&mut Vec::new())?;
    drop(results);
    Ok(())
}

/// A flag set once standard input closes: how the tests tell a long-running client to stop.
fn stop_when_input_closes() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::spawn({
        let stop = stop.clone();
        move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    stop
}

fn probe(addr: SocketAddr, path: &str, pause: Duration, timeout: Duration) -> Result<()> {
    let stop = stop_when_input_closes();
    let mut out = std::io::LineWriter::new(std::io::stdout().lock());
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let outcome = TcpStream::connect_timeout(&addr, timeout)
            .map_err(anyhow::Error::from)
            .and_then(|mut stream| {
                stream.set_read_timeout(Some(timeout))?;
                get_any(&mut stream, path)
            });
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros();
        match outcome {
            Ok((status, body)) => writeln!(out, "{micros} {status} {}", body.lines().next().unwrap_or(""))?,
            Err(err) => writeln!(out, "{micros} err {}", format!("{err:#}").replace('\n', " "))?,
        }
        std::thread::sleep(pause);
    }
    Ok(())
}

/// A GET of `path` on `stream` (HTTP/1.0): the status and the body, whatever the status.
fn get_any(stream: &mut TcpStream, path: &str) -> Result<(u16, String)> {
    write!(stream, "GET {path} HTTP/1.0\r\nHost: sim\r\n\r\n").context("send request")?;
    let mut response = String::new();
    stream.read_to_string(&mut response).context("read response")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("response without a head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

fn squat(addrs: &[SocketAddr], retry: Option<Duration>) -> Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    let answered = Arc::new(AtomicUsize::new(0));
    let stdin_closed = stop_when_input_closes();
    let mut pending: Vec<SocketAddr> = addrs.to_vec();
    let (mut attempts, mut bound) = (0usize, 0usize);
    let mut first_round = true;
    loop {
        let mut still_refused = Vec::new();
        for addr in pending {
            attempts += 1;
            match std::net::TcpListener::bind(addr) {
                Ok(listener) => {
                    bound += 1;
                    println!("bound {addr}");
                    let answered = answered.clone();
                    std::thread::spawn(move || serve_squatter(&listener, &answered));
                }
                Err(err) => {
                    if first_round {
                        println!("refused {addr} {err}");
                    }
                    still_refused.push(addr);
                }
            }
        }
        pending = still_refused;
        if first_round {
            println!("ready");
            std::io::stdout().flush()?;
            first_round = false;
        }
        if stdin_closed.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(retry.unwrap_or(Duration::from_millis(20)));
        if retry.is_none() {
            pending.clear();
        }
    }
    println!(
        "attempts={attempts} bound={bound} answered={}",
        answered.load(std::sync::atomic::Ordering::SeqCst)
    );
    Ok(())
}

/// Answers every connection on `listener` as if it were the metadata service, counting them.
fn serve_squatter(listener: &std::net::TcpListener, answered: &std::sync::atomic::AtomicUsize) {
    for mut stream in listener.incoming().flatten() {
        let mut request = [0u8; 4096];
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.read(&mut request);
        let body = "squatter";
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).is_ok() {
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

fn timed(addr: SocketAddr, path: &str, count: usize) -> Result<()> {
    ensure!(count > 0, "--count must be positive");
    let mut micros = Vec::with_capacity(count);
    let mut failed = 0;
    for _ in 0..count {
        let start = Instant::now();
        let ok = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(anyhow::Error::from)
            .and_then(|mut stream| {
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                get(&mut stream, path)
            })
            .is_ok();
        micros.push(start.elapsed().as_micros());
        failed += usize::from(!ok);
    }
    micros.sort_unstable();
    let percentile = |p: usize| micros[(micros.len() * p / 100).min(micros.len() - 1)];
    println!(
        "ok={} failed={failed} p50_us={} p99_us={}",
        count - failed,
        percentile(50),
        percentile(99)
    );
    Ok(())
}

fn fan_in(addr: SocketAddr, path_prefix: &str, per_caller: usize, callers: &[String]) -> Result<()> {
    ensure!(per_caller > 0, "--per-caller must be positive");
    // Connected first, one caller after the other, while this process is single-threaded (moving a
    // process moves all its threads); the requests then all leave at once.
    let mut connections = Vec::with_capacity(callers.len() * per_caller);
    for caller in callers {
        let (cgroup, role) = caller
            .split_once('=')
            .with_context(|| format!("caller {caller:?} is not <cgroup>=<role>"))?;
        let procs = std::path::Path::new(cgroup).join("cgroup.procs");
        std::fs::write(&procs, "0").with_context(|| format!("cannot join {}", procs.display()))?;
        for _ in 0..per_caller {
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .with_context(|| format!("connect {addr} as {cgroup}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(15)))?;
            connections.push((stream, format!("{path_prefix}{role}")));
        }
    }
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(connections.len()));
    let threads: Vec<_> = connections
        .into_iter()
        .map(|(mut stream, path)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                let ok = get(&mut stream, &path).is_ok();
                (ok, start.elapsed().as_micros())
            })
        })
        .collect();
    let mut micros = Vec::with_capacity(threads.len());
    let mut failed = 0;
    for thread in threads {
        let (ok, elapsed) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("request thread panicked"))?;
        failed += usize::from(!ok);
        micros.push(elapsed);
    }
    micros.sort_unstable();
    let percentile = |p: usize| micros[(micros.len() * p / 100).min(micros.len() - 1)];
    println!(
        "ok={} failed={failed} p50_us={} p99_us={} max_us={}",
        micros.len() - failed,
        percentile(50),
        percentile(99),
        micros[micros.len() - 1]
    );
    Ok(())
}

fn raw_syn(src: std::net::Ipv4Addr, dst: std::net::SocketAddrV4, src_port: u16) -> Result<()> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a new socket nobody else owns.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let segment = syn_segment(src, dst, src_port);
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the buffer and address outlive the call, with their true lengths.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            segment.as_ptr().cast(),
            segment.len(),
            0,
            std::ptr::from_ref(&to).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    // A packet dropped on its way out may fail the send (EPERM); the test checks who received it.
    println!("sent={}", sent == segment.len() as isize);
    Ok(())
}

/// A 20-byte TCP header with SYN set and a correct checksum over the IPv4 pseudo-header.
fn syn_segment(src: std::net::Ipv4Addr, dst: std::net::SocketAddrV4, src_port: u16) -> [u8; 20] {
    let mut segment = [0u8; 20];
    segment[0..2].copy_from_slice(&src_port.to_be_bytes());
    segment[2..4].copy_from_slice(&dst.port().to_be_bytes());
    segment[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    segment[12] = 5 << 4; // data offset: 5 words
    segment[13] = 0x02; // SYN
    segment[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&segment);
    let sum = pseudo
        .chunks_exact(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());
    segment
}

fn connect_then_get(addr: SocketAddr, path: &str) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect {addr}"))?;
    println!("connected");
    std::io::stdout().flush()?;
    std::io::stdin().read_line(&mut String::new())?;
    // The request may be dropped on its way out; a failed send is the same as no response.
    let _ = write!(stream, "GET {path} HTTP/1.0\r\nHost: sim\r\n\r\n");
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut response = String::new();
    match stream.read_to_string(&mut response) {
        Ok(_) if !response.is_empty() => println!("response={}", response.lines().next().unwrap_or_default()),
        _ => println!("no response"),
    }
    Ok(())
}

/// The role list below the metadata service's root.
const ROLE_LIST: &str = "/latest/meta-data/iam/security-credentials/";

fn load(addr: SocketAddr, keep_alive: bool, imds_v2: bool, pause: Duration) -> Result<()> {
    let stop = stop_when_input_closes();
    let mut out = std::io::LineWriter::new(std::io::stdout().lock());
    let mut session = MetadataSession {
        addr,
        keep_alive,
        imds_v2,
        connection: None,
        token: None,
    };
    let mut seen = std::collections::HashSet::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let outcome = session.credentials();
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros();
        match outcome {
            Ok(Credentials {
                role,
                key,
                secret,
                token,
            }) => {
                if seen.insert(key.clone()) {
                    writeln!(out, "{micros} creds {key} {secret} {token}")?;
                }
                writeln!(out, "{micros} ok {role} {key}")?;
            }
            Err(err) => {
                session.reset();
                writeln!(out, "{micros} err {}", format!("{err:#}").replace('\n', " "))?;
            }
        }
        std::thread::sleep(pause);
    }
    out.flush()?;
    Ok(())
}

/// What one role list and one credentials request got.
struct Credentials {
    role: String,
    key: String,
    secret: String,
    token: String,
}

/// A client of the metadata service as an SDK is one: its kept connection and IMDSv2 token, if any.
struct MetadataSession {
    addr: SocketAddr,
    keep_alive: bool,
    imds_v2: bool,
    connection: Option<std::io::BufReader<TcpStream>>,
    token: Option<String>,
}

impl MetadataSession {
    /// After an error an SDK starts over: a new connection, and a new token.
    fn reset(&mut self) {
        self.connection = None;
        self.token = None;
    }

    /// The role list, then the listed role's credentials.
    fn credentials(&mut self) -> Result<Credentials> {
        let role = self.get(ROLE_LIST)?;
        let role = role.trim().to_owned();
        ensure!(
            !role.is_empty() && !role.contains(char::is_whitespace),
            "role list {role:?}"
        );
        let document = self.get(&format!("{ROLE_LIST}{role}"))?;
        let credentials: serde_json::Value =
            serde_json::from_str(&document).context("credentials are not JSON")?;
        let field = |name: &str| {
            credentials[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("credentials without {name}"))
        };
        Ok(Credentials {
            role,
            key: field("AccessKeyId")?,
            secret: field("SecretAccessKey")?,
            token: field("Token")?,
        })
    }

    /// A GET of `path`, with the session's token when it uses IMDSv2 (fetched first if it has none).
    fn get(&mut self, path: &str) -> Result<String> {
        let token_header = if self.imds_v2 {
            let token = match self.token.take() {
                Some(token) => token,
                None => self
                    .request(
                        "PUT",
                        "/latest/api/token",
                        "X-aws-ec2-metadata-token-ttl-seconds: 21600\r\n",
                    )
                    .context("token")?,
            };
            let header = format!("X-aws-ec2-metadata-token: {token}\r\n");
            self.token = Some(token);
            header
        } else {
            String::new()
        };
        self.request("GET", path, &token_header)
    }

    /// One request whose answer must be a 200: its body.
    fn request(&mut self, method: &str, path: &str, headers: &str) -> Result<String> {
        let (status, body) = self.exchange(method, path, headers)?;
        ensure!(status == "200", "status {status}");
        Ok(body)
    }

    /// One request over HTTP/1.1 on the kept connection (opened when there is none), or on a new one
    /// that closes after it: the response's status code and body.
    fn exchange(&mut self, method: &str, path: &str, headers: &str) -> Result<(String, String)> {
        use std::io::BufRead;
        if self.connection.is_none() || !self.keep_alive {
            let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).context("connect")?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            self.connection = Some(std::io::BufReader::new(stream));
        }
        let reader = self.connection.as_mut().expect("a connection was just made");
        let close = if self.keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        };
        // One write of the whole head: written piecemeal on a kept connection, it waits on the
        // peer's delayed ACK (Nagle) for 40 ms a request.
        let head = format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}{close}\r\n");
        reader.get_mut().write_all(head.as_bytes()).context("send")?;
        let mut status_line = String::new();
        ensure!(
            reader.read_line(&mut status_line).context("read")? > 0,
            "closed before a response"
        );
        let mut length = 0;
        loop {
            let mut line = String::new();
            ensure!(
                reader.read_line(&mut line).context("read")? > 0,
                "closed in the head"
            );
            if line.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().context("content-length")?;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).context("read body")?;
        let status = status_line.split_whitespace().nth(1).unwrap_or("?").to_owned();
        Ok((status, String::from_utf8(body)?))
    }
}

/// What one connection of a flood got: status codes and AccessKeyIds by count, and closes.
#[derive(Default)]
struct FloodTally {
    statuses: std::collections::BTreeMap<String, usize>,
    closed: usize,
    keys: std::collections::BTreeSet<String>,
}

fn flood(addr: SocketAddr, path: &str, connections: usize, count: usize) -> Result<()> {
    ensure!(
        (1..=count).contains(&connections),
        "--connections must be from 1 to --count"
    );
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(connections));
    let threads: Vec<_> = (0..connections)
        .map(|index| {
            // Shares differ by one at most: the first `count % connections` take one more.
            let share = count / connections + usize::from(index < count % connections);
            let (barrier, path) = (barrier.clone(), path.to_owned());
            std::thread::spawn(move || {
                barrier.wait();
                let mut tally = FloodTally::default();
                let mut session = MetadataSession {
                    addr,
                    keep_alive: true,
                    imds_v2: false,
                    connection: None,
                    token: None,
                };
                for _ in 0..share {
                    match session.exchange("GET", &path, "") {
                        Ok((status, body)) => {
                            if status == "200"
                                && let Ok(document) = serde_json::from_str::<serde_json::Value>(&body)
                                && let Some(key) = document["AccessKeyId"].as_str()
                            {
                                tally.keys.insert(key.to_owned());
                            }
                            *tally.statuses.entry(status).or_default() += 1;
                        }
                        Err(_) => {
                            tally.closed += 1;
                            session.reset();
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = FloodTally::default();
    for thread in threads {
        let tally = thread
            .join()
            .map_err(|_| anyhow::anyhow!("request thread panicked"))?;
        for (status, n) in tally.statuses {
            *total.statuses.entry(status).or_default() += n;
        }
        total.closed += tally.closed;
        total.keys.extend(tally.keys);
    }
    let count_of = |status: &str| total.statuses.get(status).copied().unwrap_or(0);
    let other: usize = total
        .statuses
        .iter()
        .filter(|(status, _)| !["200", "429"].contains(&status.as_str()))
        .map(|(_, n)| n)
        .sum();
    let keys: Vec<&str> = total.keys.iter().map(String::as_str).collect();
    println!(
        "200={} 429={} closed={} other={other} keys={}",
        count_of("200"),
        count_of("429"),
        total.closed,
        if keys.is_empty() {
            "-".to_owned()
        } else {
            keys.join(",")
        }
    );
    Ok(())
}
