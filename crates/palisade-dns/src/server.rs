//! The mesh DNS listeners and the relay to the upstream resolvers.
//!
//! UDP and TCP on the same address (127.0.0.1:15053 by default, and [::1]:15053 when the
//! namespace has IPv6): `palisade iptables install --redirect-dns` sends the application's
//! port-53 traffic there, the sidecar's own uid excepted. Each query is decided by
//! [`crate::decide`]; a forwarded one goes to the upstream resolvers in `resolv.conf` order,
//! over the transport it came in on, and the first answer is relayed as received. No upstream
//! answering gives SERVFAIL, so that the client does not wait out its own timeouts.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::answer::{Decision, decide, servfail};
use crate::{DnsError, DnsMetrics, NameTable};

/// Istio's DNS capture port.
pub const DEFAULT_DNS_PORT: u16 = 15053;

/// How long one upstream resolver has to answer before the next is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client may take between queries (RFC 7766 suggests a few seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries in flight at once; beyond that UDP queries are dropped (the client retries).
const IN_FLIGHT: usize = 1024;
/// The largest UDP message read (EDNS payloads beyond this are not used in practice).
const UDP_BUFFER: usize = 4096;

/// The current name table, `None` before the first config.
pub type TableSource = Arc<dyn Fn() -> Option<Arc<NameTable>> + Send + Sync>;

/// Where to listen and whom to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsOptions {
    /// UDP and TCP, required.
    pub listen: SocketAddr,
    /// UDP and TCP too, when the namespace has the address (IPv6 loopback).
    pub listen_optional: Option<SocketAddr>,
    /// The resolvers non-mesh queries are relayed to, in order.
    pub upstreams: Vec<SocketAddr>,
}

impl DnsOptions {
    /// 127.0.0.1 and [::1] on `port`, relaying to `upstreams`.
    pub fn loopback(port: u16, upstreams: Vec<SocketAddr>) -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            listen_optional: Some(SocketAddr::from((Ipv6Addr::LOCALHOST, port))),
            upstreams,
        }
    }
}

/// The bound listeners, before they serve.
#[derive(Debug)]
pub struct DnsServer {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    upstreams: Arc<Vec<SocketAddr>>,
}

impl DnsServer {
    /// Binds UDP and TCP on `options.listen` (an error when it cannot) and on
    /// `options.listen_optional` (logged when it cannot).
    pub async fn bind(options: &DnsOptions) -> Result<Self, DnsError> {
        let mut server = Self {
            udp: Vec::new(),
            tcp: Vec::new(),
            upstreams: Arc::new(options.upstreams.clone()),
        };
        server.bind_one(options.listen).await?;
        if let Some(addr) = options.listen_optional
            && let Err(e) = server.bind_one(addr).await
        {
            tracing::info!(%addr, error = %e, "no DNS listener on this address");
        }
        if options.upstreams.is_empty() {
            tracing::warn!("no upstream resolver: names outside the mesh get SERVFAIL");
        }
        Ok(server)
    }

    async fn bind_one(&mut self, addr: SocketAddr) -> Result<(), DnsError> {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|cause| DnsError::Bind {
                addr,
                protocol: "udp",
                cause,
            })?;
        // The same port over TCP (an ephemeral UDP port is taken over TCP too).
        let tcp_addr = udp.local_addr().unwrap_or(addr);
        let tcp = TcpListener::bind(tcp_addr)
            .await
            .map_err(|cause| DnsError::Bind {
                addr: tcp_addr,
                protocol: "tcp",
                cause,
            })?;
        self.udp.push(udp);
        self.tcp.push(tcp);
        Ok(())
    }

    /// The bound addresses (UDP; TCP is on the same ones).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// Serves until the returned tasks are aborted.
    pub fn serve(self, table: TableSource, metrics: DnsMetrics) -> Vec<JoinHandle<()>> {
        let limit = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut tasks = Vec::new();
        for udp in self.udp {
            if let Ok(addr) = udp.local_addr() {
                tracing::info!(%addr, upstreams = ?self.upstreams, "DNS listening (udp, tcp)");
            }
            tasks.push(tokio::spawn(serve_udp(
                Arc::new(udp),
                Arc::clone(&table),
                Arc::clone(&self.upstreams),
                metrics.clone(),
                Arc::clone(&limit),
            )));
        }
        for tcp in self.tcp {
            tasks.push(tokio::spawn(serve_tcp(
                tcp,
                Arc::clone(&table),
                Arc::clone(&self.upstreams),
                metrics.clone(),
                Arc::clone(&limit),
            )));
        }
        tasks
    }
}

fn local_decision(table: &TableSource, query: &[u8], udp: bool) -> Decision {
    match table() {
        Some(t) => decide(query, &t, udp),
        // Before the first config nothing is a mesh name.
        None => Decision::Forward,
    }
}

async fn serve_udp(
    socket: Arc<UdpSocket>,
    table: TableSource,
    upstreams: Arc<Vec<SocketAddr>>,
    metrics: DnsMetrics,
    limit: Arc<Semaphore>,
) {
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors of earlier sends surface here on some kernels: not fatal.
                tracing::debug!(error = %e, "DNS udp receive failed");
                continue;
            }
        };
        let query = buf.get(..n).unwrap_or_default().to_vec();
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            tracing::warn!(%client, "DNS query dropped: too many in flight");
            continue;
        };
        let socket = Arc::clone(&socket);
        let table = Arc::clone(&table);
        let upstreams = Arc::clone(&upstreams);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let reply = match local_decision(&table, &query, true) {
                Decision::Answer(bytes) => {
                    metrics.count("udp", "mesh");
                    tracing::debug!(%client, "DNS answered from the mesh");
                    Some(bytes)
                }
                Decision::Forward => match forward_udp(&query, &upstreams).await {
                    Ok(bytes) => {
                        metrics.count("udp", "forwarded");
                        Some(bytes)
                    }
                    Err(e) => {
                        metrics.count("udp", "failed");
                        tracing::info!(%client, error = %e, "DNS query not relayed");
                        servfail(&query)
                    }
                },
            };
            if let Some(bytes) = reply
                && let Err(e) = socket.send_to(&bytes, client).await
            {
                tracing::debug!(%client, error = %e, "DNS udp answer not sent");
            }
            drop(permit);
        });
    }
}

/// The query's id, which the answer must carry.
fn id(message: &[u8]) -> Option<[u8; 2]> {
    Some([*message.first()?, *message.get(1)?])
}

async fn forward_udp(query: &[u8], upstreams: &[SocketAddr]) -> Result<Vec<u8>, DnsError> {
    let mut last = DnsError::NoUpstream;
    for &upstream in upstreams {
        match ask_udp(query, upstream).await {
            Ok(answer) => return Ok(answer),
            Err(cause) => last = DnsError::Upstream { upstream, cause },
        }
    }
    Err(last)
}

async fn ask_udp(query: &[u8], upstream: SocketAddr) -> std::io::Result<Vec<u8>> {
    let any: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(any).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let want = id(query);
    let mut buf = vec![0u8; UDP_BUFFER];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
        let answer = buf.get(..n).unwrap_or_default();
        // Anything but the answer to this query (a stray datagram) is ignored.
        if id(answer) == want {
            return Ok(answer.to_vec());
        }
    }
}

async fn serve_tcp(
    listener: TcpListener,
    table: TableSource,
    upstreams: Arc<Vec<SocketAddr>>,
    metrics: DnsMetrics,
    limit: Arc<Semaphore>,
) {
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "DNS tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            tracing::warn!(%client, "DNS tcp connection refused: too many in flight");
            continue;
        };
        let table = Arc::clone(&table);
        let upstreams = Arc::clone(&upstreams);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = tcp_client(stream, &table, &upstreams, &metrics).await {
                tracing::debug!(%client, error = %e, "DNS tcp connection ended");
            }
            drop(permit);
        });
    }
}

/// Reads one length-prefixed message (RFC 1035 4.2.2); `None` at a clean end of stream.
async fn read_message(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

async fn write_message(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "DNS message over 64 KiB")
    })?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// One client connection: queries answered in order until it closes or idles.
async fn tcp_client(
    mut stream: TcpStream,
    table: &TableSource,
    upstreams: &[SocketAddr],
    metrics: &DnsMetrics,
) -> std::io::Result<()> {
    loop {
        let Ok(read) = tokio::time::timeout(TCP_IDLE, read_message(&mut stream)).await else {
            return Ok(());
        };
        let Some(query) = read? else {
            return Ok(());
        };
        let reply = match local_decision(table, &query, false) {
            Decision::Answer(bytes) => {
                metrics.count("tcp", "mesh");
                Some(bytes)
            }
            Decision::Forward => match forward_tcp(&query, upstreams).await {
                Ok(bytes) => {
                    metrics.count("tcp", "forwarded");
                    Some(bytes)
                }
                Err(e) => {
                    metrics.count("tcp", "failed");
                    tracing::info!(error = %e, "DNS query not relayed");
                    servfail(&query)
                }
            },
        };
        match reply {
            Some(bytes) => write_message(&mut stream, &bytes).await?,
            None => return Ok(()),
        }
    }
}

async fn forward_tcp(query: &[u8], upstreams: &[SocketAddr]) -> Result<Vec<u8>, DnsError> {
    let mut last = DnsError::NoUpstream;
    for &upstream in upstreams {
        let asked = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
            let mut s = TcpStream::connect(upstream).await?;
            write_message(&mut s, query).await?;
            read_message(&mut s).await?.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed without answer")
            })
        })
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer",
            ))
        });
        match asked {
            Ok(answer) => return Ok(answer),
            Err(cause) => last = DnsError::Upstream { upstream, cause },
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};

    fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    /// An upstream that answers every query with these exact bytes, after its id: what the
    /// relay must hand back unchanged.
    async fn upstream(tail: &'static [u8]) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        let reply = move |q: &[u8]| {
            let mut out = q.get(..2).unwrap().to_vec();
            out.extend_from_slice(tail);
            out
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&reply(&buf[..n]), from).await;
            }
        });
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                while let Ok(Some(q)) = read_message(&mut s).await {
                    let _ = write_message(&mut s, &reply(&q)).await;
                }
            }
        });
        addr
    }

    async fn server(upstreams: Vec<SocketAddr>) -> (SocketAddr, DnsMetrics, Vec<JoinHandle<()>>) {
        let options = DnsOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            listen_optional: None,
            upstreams,
        };
        let server = DnsServer::bind(&options).await.unwrap();
        let addr = server.addrs()[0];
        let mut b = NameTable::builder("apps");
        b.host("web.apps.svc", ["240.240.0.9".parse().unwrap()]);
        let table = Arc::new(b.build());
        let metrics = DnsMetrics::default();
        let source: TableSource = Arc::new(move || Some(Arc::clone(&table)));
        let tasks = server.serve(source, metrics.clone());
        (addr, metrics, tasks)
    }

    async fn ask_tcp(addr: SocketAddr, q: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        write_message(&mut s, q).await.unwrap();
        read_message(&mut s).await.unwrap().unwrap()
    }

    fn count(m: &DnsMetrics, protocol: &'static str, result: &'static str) -> u64 {
        m.requests
            .get_or_create(&crate::metrics::DnsLabels { protocol, result })
            .get()
    }

    #[tokio::test]
    async fn answers_mesh_names_and_relays_the_rest_unchanged_over_udp_and_tcp() {
        let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        let up = upstream(b"UPSTREAM-BYTES").await;
        // The first upstream never answers: the second one does.
        let (addr, metrics, _tasks) = server(vec![dead_addr, up]).await;

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        let mut buf = [0u8; 512];
        client
            .send(&query(7, "web.apps.svc.", RecordType::A))
            .await
            .unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.metadata.id, 7);
        assert!(matches!(&m.answers[0].data, RData::A(a) if a.0 == Ipv4Addr::new(240, 240, 0, 9)));

        client
            .send(&query(8, "example.org.", RecordType::A))
            .await
            .unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"\x00\x08UPSTREAM-BYTES");

        let tcp = ask_tcp(addr, &query(9, "web.", RecordType::AAAA)).await;
        let m = Message::from_vec(&tcp).unwrap();
        assert_eq!((m.metadata.id, m.answers.len()), (9, 0));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        let tcp = ask_tcp(addr, &query(10, "example.org.", RecordType::A)).await;
        assert_eq!(tcp, b"\x00\x0aUPSTREAM-BYTES");

        for (p, r, n) in [
            ("udp", "mesh", 1),
            ("udp", "forwarded", 1),
            ("tcp", "mesh", 1),
            ("tcp", "forwarded", 1),
        ] {
            assert_eq!(count(&metrics, p, r), n, "{p} {r}");
        }
    }

    #[tokio::test]
    async fn no_upstream_gives_servfail() {
        let (addr, metrics, _tasks) = server(Vec::new()).await;
        let answer = ask_tcp(addr, &query(11, "example.org.", RecordType::A)).await;
        let m = Message::from_vec(&answer).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(count(&metrics, "tcp", "failed"), 1);
    }
}
