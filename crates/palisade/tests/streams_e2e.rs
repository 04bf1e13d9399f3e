//! Upgrades and long-lived streams through a Palisade sidecar pair (issue "holes a user hits
//! first", item 3): a real WebSocket client and server (tungstenite), `CONNECT` to an
//! application that tunnels, server-sent events that arrive one by one, and a full-duplex
//! HTTP/1.1 exchange (the application answers before the request body has ended). Each is
//! authorized once, at the request that opens it; a denied upgrade never reaches the
//! application; and an upgrade the application refuses opens no tunnel, so what the client sends
//! next is read, and authorized, as HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/mesh.rs"]
mod mesh;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use mesh::{Mesh, Transport};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

// Each test its own addresses: the tests of this file run in parallel.
const SERVER: &str = "127.0.66.1";
const CLIENT: &str = "127.0.66.2";
const REFUSED_SERVER: &str = "127.0.66.11";
const REFUSED_CLIENT: &str = "127.0.66.12";
const RECHECK_SERVER: &str = "127.0.66.21";
const RECHECK_CLIENT: &str = "127.0.66.22";
const WAIT: Duration = Duration::from_secs(10);

fn files(server: &str, client: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: server, namespace: demo}}
spec: {{address: {server}, serviceAccount: server, labels: {{app: server}}, ports: {{http: 8080}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: client, namespace: demo}}
spec: {{address: {client}, serviceAccount: client, labels: {{app: client}}, ports: {{http: 8080}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: streams, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/demo/sa/client]}}}}]
    to: [{{operation: {{paths: ["/ws/chat", "/ws/refused", "/events", "/duplex"]}}}}]
  - from: [{{source: {{principals: [cluster.local/ns/demo/sa/client]}}}}]
    to: [{{operation: {{methods: ["CONNECT"], hosts: ["{server}:8080"]}}}}]
"#
    )
}

/// What the application saw: one line per request head, `METHOD target`.
type Seen = Arc<Mutex<Vec<String>>>;

/// The application behind the server's sidecar, by request:
/// - `GET /ws/chat` (WebSocket): echoes every message, upper-cased;
/// - `GET /ws/refused` (WebSocket): answers 400, no upgrade, and stays HTTP;
/// - `CONNECT`: `200`, then echoes raw bytes;
/// - `GET /events`: an event stream; event 1 at once, event 2 only once `release` fires;
/// - `POST /duplex` (chunked): answers at once, then echoes each body line as it arrives.
async fn app(release: oneshot::Receiver<()>) -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let log = Arc::clone(&seen);
    let release = Arc::new(Mutex::new(Some(release)));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let log = Arc::clone(&log);
            let release = Arc::clone(&release);
            tokio::spawn(async move { serve(tcp, log, release).await });
        }
    });
    (port, seen)
}

async fn serve(tcp: TcpStream, log: Seen, release: Arc<Mutex<Option<oneshot::Receiver<()>>>>) {
    let mut peek = [0u8; 2048];
    let n = tcp.peek(&mut peek).await.unwrap_or(0);
    let head = String::from_utf8_lossy(&peek[..n]).into_owned();
    let line = head.lines().next().unwrap_or_default().to_owned();
    let target: Vec<&str> = line.split(' ').take(2).collect();
    log.lock().unwrap().push(target.join(" "));
    match target.as_slice() {
        ["GET", "/ws/chat"] => {
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(t) = msg {
                    let up = t.to_uppercase();
                    ws.send(Message::text(up)).await.unwrap();
                }
            }
        }
        ["GET", "/ws/refused"] => {
            let mut tcp = BufReader::new(tcp);
            // Every request on this connection: the refusal first, then plain answers, each
            // naming the request line it got.
            let mut first = true;
            loop {
                let mut req_line = String::new();
                if tcp.read_line(&mut req_line).await.unwrap_or(0) == 0 {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if tcp.read_line(&mut h).await.unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                if !first {
                    log.lock().unwrap().push(req_line.trim().to_owned());
                }
                let body = if first {
                    "no upgrade here"
                } else {
                    req_line.trim()
                };
                let status = if first { "400 Bad Request" } else { "200 OK" };
                first = false;
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                tcp.get_mut().write_all(resp.as_bytes()).await.unwrap();
            }
        }
        ["CONNECT", _] => {
            let mut tcp = tcp;
            let end = head.find("\r\n\r\n").unwrap() + 4;
            let mut skip = vec![0u8; end];
            tcp.read_exact(&mut skip).await.unwrap();
            tcp.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                .await
                .unwrap();
            let (mut rd, mut wr) = tcp.into_split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
        }
        ["GET", "/events"] => {
            let mut tcp = tcp;
            let end = head.find("\r\n\r\n").unwrap() + 4;
            let mut skip = vec![0u8; end];
            tcp.read_exact(&mut skip).await.unwrap();
            tcp.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
            )
            .await
            .unwrap();
            let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
            tcp.write_all(chunk("data: one\n\n").as_bytes())
                .await
                .unwrap();
            let rx = release.lock().unwrap().take();
            if let Some(rx) = rx {
                let _ = rx.await;
            }
            tcp.write_all(chunk("data: two\n\n").as_bytes())
                .await
                .unwrap();
            tcp.write_all(b"0\r\n\r\n").await.unwrap();
        }
        ["POST", "/duplex"] => {
            let mut tcp = BufReader::new(tcp);
            loop {
                let mut h = String::new();
                if tcp.read_line(&mut h).await.unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
            }
            // The answer's head goes out before any of the body is read.
            tcp.get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            // The body is chunked; each chunk carries one line, echoed as a chunk of its own.
            loop {
                let mut size = String::new();
                tcp.read_line(&mut size).await.unwrap();
                let n = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut data = vec![0u8; n + 2];
                tcp.read_exact(&mut data).await.unwrap();
                if n == 0 {
                    break;
                }
                let echo = format!("echo {}", String::from_utf8_lossy(&data[..n]));
                let out = format!("{:x}\r\n{echo}\r\n", echo.len());
                tcp.get_mut().write_all(out.as_bytes()).await.unwrap();
            }
            tcp.get_mut().write_all(b"0\r\n\r\n").await.unwrap();
        }
        _ => {
            let mut tcp = tcp;
            let _ = tcp
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    }
}

/// The status line and head of a raw HTTP/1.1 response read from `s`, byte by byte (so that
/// nothing after the head is consumed).
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("a response head")
            .unwrap();
        assert!(
            n > 0,
            "closed before a response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

/// The mesh of `server` and `client`, the application and the server's sidecar in front of it;
/// the sender that lets the application's second event go, and what the application saw.
async fn start(server: &str, client: &str) -> (Mesh, mesh::Sidecar, oneshot::Sender<()>, Seen) {
    let files = files(server, client);
    let mesh = Mesh::start(&[("mesh-files.yaml", &files)]).await;
    let (release_tx, release_rx) = oneshot::channel();
    let (app_port, seen) = app(release_rx).await;
    let sidecar = mesh
        .sidecar(
            "demo/server",
            "demo",
            "server",
            &["--app-port".to_owned(), format!("8080={app_port}")],
        )
        .await;
    (mesh, sidecar, release_tx, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_and_streams_through_a_sidecar_pair() {
    let (mesh, server, release_tx, seen) = start(SERVER, CLIENT).await;
    let client = mesh.sidecar("demo/client", "demo", "client", &[]).await;
    let decisions = || server.stat("palisade_rbac_decisions_total", &[]);

    // WebSocket: the client application's handshake goes to its sidecar's outbound listener,
    // `Host` naming the destination; three messages each way on one authorization.
    let before = decisions().await;
    let tcp = TcpStream::connect(&client.outbound).await.unwrap();
    let url = format!("ws://{SERVER}:8080/ws/chat");
    let (mut ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tcp))
        .await
        .expect("the WebSocket handshake completes")
        .expect("the WebSocket handshake is accepted");
    assert_eq!(resp.status(), 101);
    for word in ["alpha", "beta", "gamma"] {
        ws.send(Message::text(word)).await.unwrap();
        let got = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("an echo through the tunnel")
            .unwrap()
            .unwrap();
        assert_eq!(got, Message::text(word.to_uppercase()));
    }
    assert_eq!(
        decisions().await - before,
        1.0,
        "one decision for the upgrade, none per message"
    );
    assert_eq!(
        server
            .stat("palisade_tunnels_total", &["kind=\"upgrade\""])
            .await,
        1.0
    );
    ws.close(None).await.unwrap();

    // A WebSocket path the policy does not allow: refused by the server's sidecar, and the
    // application never sees it.
    let tcp = TcpStream::connect(&client.outbound).await.unwrap();
    let url = format!("ws://{SERVER}:8080/ws/other");
    let err = tokio_tungstenite::client_async(url, tcp).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 403),
        e => panic!("expected a 403 refusal, got {e}"),
    }
    assert!(
        !seen.lock().unwrap().iter().any(|l| l.contains("/ws/other")),
        "{:?}",
        seen.lock().unwrap()
    );

    // CONNECT through the pair: authorized by method and host, then raw bytes both ways.
    let mut tunnel = TcpStream::connect(&client.outbound).await.unwrap();
    tunnel
        .write_all(
            format!("CONNECT {SERVER}:8080 HTTP/1.1\r\nHost: {SERVER}:8080\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let head = read_head(&mut tunnel).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for msg in [
        &b"\x00\x01raw bytes\r\n\r\n"[..],
        b"GET /not-http-anymore HTTP/1.1\r\n\r\n",
    ] {
        tunnel.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, tunnel.read_exact(&mut back))
            .await
            .expect("the tunnel echoes")
            .unwrap();
        assert_eq!(back, msg);
    }
    drop(tunnel);
    assert_eq!(
        server
            .stat("palisade_tunnels_total", &["kind=\"connect\""])
            .await,
        1.0
    );

    // Server-sent events: the first event reaches the client while the application still
    // holds the second, so nothing on the way buffers the stream.
    let tcp = TcpStream::connect(&client.outbound).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/events")
        .header("host", format!("{SERVER}:8080"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("the event stream's head")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    let mut body = resp.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("the first event arrives before the second is sent")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "data: one\n\n");
    release_tx.send(()).unwrap();
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("the stream ends")
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "data: two\n\n");

    // Full duplex: the application answers at once and echoes each line of the body as it
    // comes; the next line is sent only after the previous echo is back.
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let tcp = TcpStream::connect(&client.outbound).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/duplex")
        .header("host", format!("{SERVER}:8080"))
        .header("transfer-encoding", "chunked")
        .body(body)
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"ping 1"))))
        .await
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("the answer's head arrives while the body is open")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    for i in 1..=3 {
        if i > 1 {
            tx.send(Ok(Frame::data(Bytes::from(format!("ping {i}")))))
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        let want = format!("echo ping {i}");
        while got.len() < want.len() {
            let frame = tokio::time::timeout(WAIT, body.frame())
                .await
                .unwrap_or_else(|_| panic!("echo {i} arrives while the body is still open"))
                .unwrap()
                .unwrap();
            got.extend_from_slice(&frame.into_data().unwrap());
        }
        assert_eq!(String::from_utf8(got).unwrap(), want);
    }
    drop(tx);
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("the exchange ends with the body")
        .unwrap()
        .to_bytes();
    assert!(rest.is_empty(), "{rest:?}");
}

/// An upgrade the application refuses opens no tunnel: a request the client pipelines behind it
/// (on the mTLS connection straight to the server's sidecar, as a hostile peer would) is read as
/// HTTP and authorized as such, and a denied one never reaches the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_opens_no_tunnel() {
    let (mesh, server, _release_tx, seen) = start(REFUSED_SERVER, REFUSED_CLIENT).await;
    let t = Transport::mtls(
        mesh.cert("demo", "client"),
        "spiffe://cluster.local/ns/demo/sa/server",
        mesh.bundle(),
    );
    let addr = format!("{REFUSED_SERVER}:8080");
    let mut s = mesh::connect(&addr, &t).await.unwrap();
    let upgrade = format!(
        "GET /ws/refused HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let smuggled = format!("GET /secret HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    s.write_all(format!("{upgrade}{smuggled}").as_bytes())
        .await
        .unwrap();
    let first = read_head(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 400"), "{first}");
    let mut refusal = [0u8; 15];
    s.read_exact(&mut refusal).await.unwrap();
    assert_eq!(&refusal, b"no upgrade here");
    let second = read_head(&mut s).await;
    assert!(
        second.starts_with("HTTP/1.1 403"),
        "the pipelined request is authorized as HTTP: {second}"
    );
    let lines = seen.lock().unwrap().clone();
    assert!(
        !lines.iter().any(|l| l.contains("/secret")),
        "the application received the smuggled request: {lines:?}"
    );
    assert_eq!(
        server.stat("palisade_tunnels_total", &[]).await,
        0.0,
        "no tunnel opened"
    );
}

/// An open WebSocket is decided again on every new config: an edit that no longer allows the
/// request that opened it closes it (as an open TCP connection is closed), and the same
/// handshake is then refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tunnel_closes_when_the_policy_stops_allowing_it() {
    let (mesh, server, _release, _seen) = start(RECHECK_SERVER, RECHECK_CLIENT).await;
    let client = mesh.sidecar("demo/client", "demo", "client", &[]).await;
    let tcp = TcpStream::connect(&client.outbound).await.unwrap();
    let url = format!("ws://{RECHECK_SERVER}:8080/ws/chat");
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url.clone(), tcp))
        .await
        .expect("the WebSocket handshake completes")
        .expect("the WebSocket handshake is accepted");
    ws.send(Message::text("before")).await.unwrap();
    let got = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::text("BEFORE"));

    // The edit: /ws/chat is no longer allowed.
    let edited = files(RECHECK_SERVER, RECHECK_CLIENT).replace("\"/ws/chat\", ", "");
    assert!(!edited.contains("/ws/chat"));
    mesh.write_config("mesh-files.yaml", &edited);
    // The server's sidecar closes the tunnel: the client sees the stream end (or fail), never
    // another echo.
    let ended = tokio::time::timeout(WAIT, ws.next()).await;
    match &ended {
        Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => {}
        Ok(Some(Ok(m))) => panic!("unexpected message after the edit: {m:?}"),
        Err(_) => {}
    }
    assert!(ended.is_ok(), "the tunnel was not closed within {WAIT:?}");
    assert_eq!(
        server
            .stat("palisade_tcp_connections_closed_by_policy_total", &[])
            .await,
        1.0
    );
    assert!(
        server
            .stderr()
            .contains("open tunnel closed: the new policy denies the request that opened it"),
        "{}",
        server.stderr()
    );
    let tcp = TcpStream::connect(&client.outbound).await.unwrap();
    match tokio_tungstenite::client_async(url, tcp).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected a 403 refusal, got {:?}", other.map(|_| ())),
    }
}
