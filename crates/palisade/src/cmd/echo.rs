//! `palisade echo`: the demo application of `palisade up`. It answers every request with what it
//! saw (method, path, headers) and who called, as its sidecar told it in
//! `x-forwarded-client-cert`; `GET /call?url=URL[&method=M]` makes it call URL through its
//! sidecar's outbound listener and answer with the upstream's status and body.
//!
//! It is a workload like any other: it listens on 127.0.0.1 behind its sidecar and never sees
//! TLS; identities and decisions are the sidecars' business.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

/// The header a sidecar sets with the caller's identity (Envoy's format).
const XFCC: &str = "x-forwarded-client-cert";
/// How long a `/call` may take end to end.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to serve on (the sidecar forwards the workload's ports here).
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Name reported in every answer (e.g. the workload's namespace/name).
    #[arg(long, value_name = "NAME", default_value = "echo")]
    pub name: String,
    /// The sidecar's outbound listener, used by `/call`.
    #[arg(long, value_name = "ADDR", env = "PALISADE_OUTBOUND")]
    pub outbound: Option<SocketAddr>,
}

struct App {
    name: String,
    outbound: Option<SocketAddr>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("palisade echo: {} listening on {addr}", args.name);
    let app = Arc::new(App {
        name: args.name,
        outbound: args.outbound,
    });
    let accept = async {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let app = Arc::clone(&app);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let app = Arc::clone(&app);
                    async move { Ok::<_, Infallible>(app.handle(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    };
    tokio::select! {
        () = super::controlplane::shutdown_signal() => {}
        () = accept => {}
    }
    Ok(ExitCode::SUCCESS)
}

impl App {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() == "/call" {
            return self.call(req.uri().query().unwrap_or("")).await;
        }
        json_response(StatusCode::OK, &self.describe(&req))
    }

    /// What the request looked like from here.
    fn describe(&self, req: &Request<Incoming>) -> Value {
        let headers: serde_json::Map<String, Value> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                )
            })
            .collect();
        let caller = req
            .headers()
            .get(XFCC)
            .and_then(|v| v.to_str().ok())
            .and_then(caller_from_xfcc);
        json!({
            "app": self.name,
            "method": req.method().as_str(),
            "path": req.uri().path(),
            "query": req.uri().query(),
            "headers": headers,
            // `null` when the caller came without a mesh identity (plaintext).
            "caller": caller,
        })
    }

    /// `GET /call?url=http://host:port/path[&method=DELETE]` through the sidecar.
    async fn call(&self, query: &str) -> Response<Full<Bytes>> {
        let mut url = None;
        let mut method = http::Method::GET;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "url" => url = Some(v),
                "method" => match http::Method::from_bytes(v.to_ascii_uppercase().as_bytes()) {
                    Ok(m) => method = m,
                    Err(_) => return text(StatusCode::BAD_REQUEST, format!("bad method {v:?}\n")),
                },
                _ => {}
            }
        }
        let Some(url) = url else {
            return text(
                StatusCode::BAD_REQUEST,
                "usage: /call?url=http://HOST:PORT/PATH[&method=GET]\n".into(),
            );
        };
        let Some(outbound) = self.outbound else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no sidecar outbound listener configured (--outbound)\n".into(),
            );
        };
        match tokio::time::timeout(CALL_TIMEOUT, forward(outbound, method, &url)).await {
            Ok(Ok((status, body))) => {
                let mut r = Response::new(Full::new(body));
                *r.status_mut() = status;
                r
            }
            Ok(Err(e)) => text(
                StatusCode::BAD_GATEWAY,
                format!("call to {url} via the sidecar at {outbound} failed: {e:#}\n"),
            ),
            Err(_) => text(
                StatusCode::GATEWAY_TIMEOUT,
                format!("call to {url} timed out\n"),
            ),
        }
    }
}

/// One HTTP/1.1 request in proxy form (absolute URI) to the sidecar's outbound listener.
async fn forward(
    outbound: SocketAddr,
    method: http::Method,
    url: &str,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let uri: http::Uri = url.parse().with_context(|| format!("bad url {url:?}"))?;
    let authority = uri
        .authority()
        .with_context(|| format!("url {url:?} has no host"))?
        .clone();
    let tcp = tokio::net::TcpStream::connect(outbound)
        .await
        .context("connecting to the sidecar")?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(http::header::HOST, authority.as_str())
        .body(Full::new(Bytes::new()))?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// The caller's SPIFFE URI from the last element of an `x-forwarded-client-cert` value
/// (`By=...;Hash=...;URI=spiffe://...`).
fn caller_from_xfcc(xfcc: &str) -> Option<String> {
    let last = xfcc.rsplit(',').next()?;
    last.split(';').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("uri")
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// `%XX` and `+` decoding of a query value; bad escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |j: usize| {
            bytes
                .get(j)
                .and_then(|c| (*c as char).to_digit(16))
                .and_then(|d| u8::try_from(d).ok())
        };
        match b {
            b'%' => match (hex(i + 1), hex(i + 2)) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b),
            },
            b'+' => out.push(b' '),
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_string_pretty(v).unwrap_or_default();
    body.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// `GET path` on a plain HTTP/1.1 endpoint (a sidecar's admin port); status and body.
pub(crate) async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(http::header::HOST, addr)
            .body(Full::new(Bytes::new()))?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| anyhow::anyhow!("{addr}{path}: timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfcc_caller() {
        let table = [
            (
                "By=spiffe://cluster.local/ns/a/sa/b;Hash=ab;URI=spiffe://cluster.local/ns/c/sa/d",
                Some("spiffe://cluster.local/ns/c/sa/d"),
            ),
            (
                "By=x;URI=spiffe://td/ns/first/sa/x,By=y;Hash=1;URI=spiffe://td/ns/last/sa/y",
                Some("spiffe://td/ns/last/sa/y"),
            ),
            ("By=x;Hash=1", None),
            ("", None),
        ];
        for (input, want) in table {
            assert_eq!(caller_from_xfcc(input).as_deref(), want, "{input}");
        }
    }

    #[test]
    fn query_decoding() {
        let table = [
            (
                "http%3A%2F%2Freviews.backend.svc%3A9080%2Freviews%2F1",
                "http://reviews.backend.svc:9080/reviews/1",
            ),
            ("a+b", "a b"),
            ("100%", "100%"),
            ("%zz", "%zz"),
            ("plain", "plain"),
        ];
        for (input, want) in table {
            assert_eq!(percent_decode(input), want, "{input}");
        }
    }
}
