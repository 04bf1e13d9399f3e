//! Check request building and response mapping, then real authorizers on loopback (gRPC and
//! HTTP): allow, deny with custom answers, timeout with failOpen both ways, authorizer down, two
//! providers in a row.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::{HeaderValue as PbHeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use palisade_policy::mesh::{BodyInCheck, ExtAuthzGrpcProvider, ExtAuthzHttpProvider};

use super::*;

fn hv(k: &str, v: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(PbHeaderValue {
            key: k.into(),
            value: v.into(),
            ..PbHeaderValue::default()
        }),
        ..HeaderValueOption::default()
    }
}

fn input<'a>(headers: &'a HeaderMap, body: Option<&'a [u8]>) -> CheckInput<'a> {
    CheckInput {
        source: "127.0.0.9:40000".parse().unwrap(),
        destination: "127.0.10.1:8080".parse().unwrap(),
        source_principal: Some("spiffe://cluster.local/ns/shop/sa/client"),
        destination_principal: Some("spiffe://cluster.local/ns/shop/sa/web"),
        method: "POST",
        path: "/api/items?x=1",
        host: "web.shop:8080",
        scheme: "http",
        protocol: "HTTP/1.1",
        headers,
        sni: Some("outbound_.8080_._.web.shop"),
        body,
        body_truncated: false,
    }
}

fn common() -> Common {
    Common {
        name: "p".into(),
        timeout: Duration::from_secs(1),
        fail_open: false,
        status_on_error: StatusCode::FORBIDDEN,
        max_request_bytes: 0,
        allow_partial_message: false,
        pack_as_bytes: false,
    }
}

#[test]
fn grpc_check_request_fields() {
    let mut h = HeaderMap::new();
    h.insert("x-request-id", "rid-1".parse().unwrap());
    h.insert("content-length", "5".parse().unwrap());
    h.append("x-multi", "a".parse().unwrap());
    h.append("x-multi", "b".parse().unwrap());
    let req = grpc::check_request(&common(), &input(&h, Some(b"hello")));
    let a = req.attributes.unwrap();
    let src = a.source.unwrap();
    assert_eq!(src.principal, "spiffe://cluster.local/ns/shop/sa/client");
    let Some(address::Address::SocketAddress(sa)) = src.address.unwrap().address else {
        panic!()
    };
    assert_eq!(
        (sa.address.as_str(), sa.port_specifier),
        (
            "127.0.0.9",
            Some(socket_address::PortSpecifier::PortValue(40000))
        )
    );
    assert_eq!(
        a.destination.unwrap().principal,
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(a.tls_session.unwrap().sni, "outbound_.8080_._.web.shop");
    let r = a.request.unwrap();
    assert!(r.time.unwrap().seconds > 1_600_000_000);
    let http = r.http.unwrap();
    assert_eq!(http.id, "rid-1");
    assert_eq!(http.method, "POST");
    assert_eq!(http.path, "/api/items?x=1");
    assert_eq!(http.host, "web.shop:8080");
    assert_eq!(http.scheme, "http");
    assert_eq!(http.protocol, "HTTP/1.1");
    assert_eq!(http.size, 5);
    assert_eq!(http.headers["x-multi"], "a,b");
    assert_eq!(http.headers[":method"], "POST");
    assert_eq!(http.headers[":path"], "/api/items?x=1");
    assert_eq!(http.headers[":authority"], "web.shop:8080");
    // The body goes only where configured (the caller trims it to maxRequestBytes).
    assert_eq!(http.body, "hello");
    let mut c = common();
    c.pack_as_bytes = true;
    let packed = grpc::check_request(&c, &input(&h, Some(b"hello")))
        .attributes
        .unwrap()
        .request
        .unwrap()
        .http
        .unwrap();
    assert_eq!(
        (packed.body.as_str(), packed.raw_body.as_slice()),
        ("", &b"hello"[..])
    );
}

use envoy_types::pb::envoy::config::core::v3::{address, socket_address};

#[test]
fn grpc_response_mapping() {
    let ok = CheckResponse {
        status: Some(RpcStatus::default()),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![hv("x-user", "alice")],
            headers_to_remove: vec!["x-secret".into()],
            response_headers_to_add: vec![hv("x-checked", "yes")],
            ..OkHttpResponse::default()
        })),
        ..CheckResponse::default()
    };
    let Answer::Allow(e) = grpc::map_response(ok) else {
        panic!()
    };
    assert_eq!(
        e.upstream_set,
        vec![(
            HeaderName::from_static("x-user"),
            HeaderValue::from_static("alice")
        )]
    );
    assert_eq!(e.upstream_remove, vec![HeaderName::from_static("x-secret")]);
    assert_eq!(e.downstream_add.len(), 1);

    let denied = CheckResponse {
        status: Some(RpcStatus {
            code: 7,
            ..RpcStatus::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: 418 }),
            headers: vec![hv("x-why", "teapot")],
            body: "no tea".into(),
        })),
        ..CheckResponse::default()
    };
    let Answer::Deny {
        status,
        headers,
        body,
        ..
    } = grpc::map_response(denied)
    else {
        panic!()
    };
    assert_eq!(
        (status, body.as_ref()),
        (StatusCode::IM_A_TEAPOT, &b"no tea"[..])
    );
    assert_eq!(headers[0].1, "teapot");

    let bare = CheckResponse {
        status: Some(RpcStatus {
            code: 7,
            ..RpcStatus::default()
        }),
        ..CheckResponse::default()
    };
    let Answer::Deny { status, .. } = grpc::map_response(bare) else {
        panic!()
    };
    assert_eq!(status, StatusCode::FORBIDDEN);
    let err = CheckResponse {
        status: Some(RpcStatus {
            code: 13,
            ..RpcStatus::default()
        }),
        http_response: Some(HttpResponse::ErrorResponse(DeniedHttpResponse::default())),
        ..CheckResponse::default()
    };
    assert!(matches!(grpc::map_response(err), Answer::Error(_)));
}

fn http_provider(port: u16) -> ExtAuthzHttpProvider {
    ExtAuthzHttpProvider {
        service: "127.0.0.1".into(),
        port: u32::from(port),
        timeout: Some("300ms".into()),
        path_prefix: Some("/check".into()),
        fail_open: false,
        status_on_error: None,
        include_request_headers_in_check: vec!["x-user".into(), "x-ext-*".into()],
        include_additional_headers_in_check: [("x-added".to_owned(), "1".to_owned())].into(),
        include_request_body_in_check: None,
        headers_to_upstream_on_allow: vec!["x-auth-*".into()],
        headers_to_downstream_on_deny: Vec::new(),
        headers_to_downstream_on_allow: vec!["x-trace".into()],
    }
}

#[test]
fn http_check_request_and_mapping() {
    let c = http::HttpClient::new(&http_provider(9)).unwrap();
    let mut h = HeaderMap::new();
    h.insert("x-user", "alice".parse().unwrap());
    h.insert("x-ext-a", "1".parse().unwrap());
    h.insert("cookie", "secret".parse().unwrap());
    h.insert("authorization", "Bearer t".parse().unwrap());
    let req = c.check_request(&input(&h, None)).unwrap();
    assert_eq!(req.method(), "POST");
    assert_eq!(req.uri(), "http://127.0.0.1:9/check/api/items?x=1");
    let rh = req.headers();
    assert_eq!(rh["host"], "web.shop:8080");
    assert_eq!(rh["content-length"], "0");
    assert_eq!(rh["x-user"], "alice");
    assert_eq!(rh["x-ext-a"], "1");
    assert_eq!(rh["x-added"], "1");
    assert!(rh.get("cookie").is_none() && rh.get("authorization").is_none());

    let mut resp = HeaderMap::new();
    resp.insert("x-auth-user", "alice".parse().unwrap());
    resp.insert("x-trace", "t1".parse().unwrap());
    resp.insert("x-other", "o".parse().unwrap());
    resp.insert("content-length", "2".parse().unwrap());
    let Answer::Allow(e) = c.map_response(StatusCode::OK, &resp, Bytes::new()) else {
        panic!()
    };
    assert_eq!(
        e.upstream_set,
        vec![(
            HeaderName::from_static("x-auth-user"),
            HeaderValue::from_static("alice")
        )]
    );
    assert_eq!(
        e.downstream_add,
        vec![(
            HeaderName::from_static("x-trace"),
            HeaderValue::from_static("t1")
        )]
    );
    let Answer::Deny {
        status,
        headers,
        body,
        ..
    } = c.map_response(StatusCode::UNAUTHORIZED, &resp, Bytes::from_static(b"no"))
    else {
        panic!()
    };
    assert_eq!(
        (status, body.as_ref()),
        (StatusCode::UNAUTHORIZED, &b"no"[..])
    );
    // headersToDownstreamOnDeny unset: every header of the answer but the framing ones.
    assert_eq!(headers.len(), 3, "{headers:?}");
}

// ---- real authorizers on loopback ----

#[derive(Clone, Default)]
pub(super) struct Seen(pub(super) Arc<Mutex<Vec<CheckRequest>>>);

struct GrpcAuthz {
    seen: Seen,
    deny: bool,
}

#[tonic::async_trait]
impl Authorization for GrpcAuthz {
    async fn check(
        &self,
        req: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        self.seen.0.lock().unwrap().push(req.into_inner());
        let resp = if self.deny {
            CheckResponse {
                status: Some(RpcStatus {
                    code: 7,
                    ..RpcStatus::default()
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus { code: 401 }),
                    headers: vec![hv("x-denied-by", "grpc")],
                    body: "go away".into(),
                })),
                ..CheckResponse::default()
            }
        } else {
            CheckResponse {
                status: Some(RpcStatus::default()),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: vec![hv("x-grpc-ok", "1")],
                    ..OkHttpResponse::default()
                })),
                ..CheckResponse::default()
            }
        };
        Ok(tonic::Response::new(resp))
    }
}

pub(super) async fn grpc_server(deny: bool) -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let svc = AuthorizationServer::new(GrpcAuthz {
        seen: seen.clone(),
        deny,
    });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, seen)
}

/// An HTTP authorizer: `/check/slow...` sleeps 2 s; `/check/deny...` answers 403 with a body;
/// anything else 200.
async fn http_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: ::http::Request<hyper::body::Incoming>| async move {
                        let path = req.uri().path().to_owned();
                        if path.starts_with("/check/slow") {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        let mut resp =
                            ::http::Response::new(Full::new(Bytes::from_static(b"denied by http")));
                        if path.starts_with("/check/deny") {
                            *resp.status_mut() = StatusCode::FORBIDDEN;
                            resp.headers_mut()
                                .insert("x-denied-by", HeaderValue::from_static("http"));
                        } else {
                            resp.headers_mut()
                                .insert("x-auth-user", HeaderValue::from_static("alice"));
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

use http_body_util::Full;

fn mesh(providers: Vec<ExtensionProvider>) -> MeshConfig {
    MeshConfig {
        extension_providers: providers,
        ..MeshConfig::default()
    }
}

pub(super) fn grpc_p(name: &str, addr: SocketAddr) -> ExtensionProvider {
    ExtensionProvider {
        name: name.into(),
        envoy_ext_authz_grpc: Some(ExtAuthzGrpcProvider {
            service: addr.ip().to_string(),
            port: u32::from(addr.port()),
            timeout: Some("1s".into()),
            fail_open: false,
            status_on_error: None,
            include_request_body_in_check: Some(BodyInCheck {
                max_request_bytes: 4,
                allow_partial_message: true,
                pack_as_bytes: false,
            }),
        }),
        envoy_ext_authz_http: None,
    }
}

pub(super) fn http_p(
    name: &str,
    port: u16,
    fail_open: bool,
    status_on_error: Option<&str>,
) -> ExtensionProvider {
    let mut p = http_provider(port);
    p.fail_open = fail_open;
    p.status_on_error = status_on_error.map(str::to_owned);
    ExtensionProvider {
        name: name.into(),
        envoy_ext_authz_grpc: None,
        envoy_ext_authz_http: Some(p),
    }
}

#[tokio::test]
async fn real_authorizers() {
    let (grpc_allow, seen) = grpc_server(false).await;
    let (grpc_deny, _) = grpc_server(true).await;
    let http_addr = http_server().await;
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut strict = grpc_p("grpc-strict", grpc_allow);
    if let Some(g) = &mut strict.envoy_ext_authz_grpc {
        g.include_request_body_in_check = Some(BodyInCheck {
            max_request_bytes: 4,
            allow_partial_message: false,
            pack_as_bytes: false,
        });
    }
    let authz = ExtAuthz::build(&mesh(vec![
        strict,
        grpc_p("grpc-allow", grpc_allow),
        grpc_p("grpc-deny", grpc_deny),
        http_p("http", http_addr.port(), false, None),
        http_p("http-open", http_addr.port(), true, None),
        http_p("down", down, false, Some("503")),
    ]));
    let h = HeaderMap::new();
    let base = input(&h, Some(b"hello world"));
    let at = |path: &'static str| CheckInput { path, ..base };

    // Two providers allow: both edits accumulate; the gRPC one saw the body cut at 4 bytes.
    let Decision::Allow(e) = authz.check(&["grpc-allow", "http"], &base).await else {
        panic!()
    };
    let names: Vec<&str> = e.upstream_set.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["x-grpc-ok", "x-auth-user"]);
    let got = seen.0.lock().unwrap().pop().unwrap();
    let http = got.attributes.unwrap().request.unwrap().http.unwrap();
    assert_eq!(http.body, "hell");
    assert_eq!(http.headers["x-envoy-auth-partial-body"], "true");

    // A denial reaches the client as the authorizer wrote it; the first denier wins.
    let Decision::Deny(d) = authz
        .check(&["grpc-allow", "grpc-deny", "http"], &base)
        .await
    else {
        panic!()
    };
    assert_eq!(
        (d.status, d.body.as_ref(), d.provider.as_str()),
        (StatusCode::UNAUTHORIZED, &b"go away"[..], "grpc-deny")
    );
    let Decision::Deny(d) = authz.check(&["http"], &at("/deny/x")).await else {
        panic!()
    };
    assert_eq!(
        (d.status, d.body.as_ref()),
        (StatusCode::FORBIDDEN, &b"denied by http"[..])
    );
    assert!(
        d.headers
            .iter()
            .any(|(k, v)| k == "x-denied-by" && v == "http")
    );

    // Timeout (300 ms < 2 s): closed answers 403 with no body, open allows.
    let started = std::time::Instant::now();
    let Decision::Deny(d) = authz.check(&["http"], &at("/slow")).await else {
        panic!()
    };
    assert_eq!((d.status, d.body.len()), (StatusCode::FORBIDDEN, 0));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(matches!(
        authz.check(&["http-open"], &at("/slow")).await,
        Decision::Allow(_)
    ));

    // Authorizer down: statusOnError.
    let Decision::Deny(d) = authz.check(&["down"], &base).await else {
        panic!()
    };
    assert_eq!(d.status, StatusCode::SERVICE_UNAVAILABLE);
    // Unknown provider: fail closed.
    assert!(matches!(
        authz.check(&["nope"], &base).await,
        Decision::Deny(_)
    ));
    assert_eq!(authz.body_bytes_wanted(&["http", "grpc-allow"]), 4);

    // Over maxRequestBytes without allowPartialMessage: 413 before asking; a body that fits, or
    // a provider that wants no body, is asked as usual.
    let small = input(&h, Some(b"hey"));
    let more_to_come = CheckInput {
        body_truncated: true,
        ..small
    };
    let cases: [(&[&str], &CheckInput<'_>, Option<StatusCode>); 4] = [
        (&["grpc-strict"], &base, Some(StatusCode::PAYLOAD_TOO_LARGE)),
        (
            &["grpc-strict"],
            &more_to_come,
            Some(StatusCode::PAYLOAD_TOO_LARGE),
        ),
        (&["grpc-strict"], &small, None),
        (&["http"], &more_to_come, None),
    ];
    for (names, input, want) in cases {
        let got = match authz.check(names, input).await {
            Decision::Allow(_) => None,
            Decision::Deny(d) => Some(d.status),
        };
        assert_eq!(got, want, "{names:?} body {:?}", input.body);
    }
    let got = seen.0.lock().unwrap().pop().unwrap();
    let http = got.attributes.unwrap().request.unwrap().http.unwrap();
    assert_eq!(http.body, "hey");
    assert!(!http.headers.contains_key("x-envoy-auth-partial-body"));
}

#[test]
fn name_patterns() {
    let cases = [
        ("x-a", "x-a", true),
        ("x-a", "x-ab", false),
        ("x-*", "x-ab", true),
        ("*-id", "req-id", true),
        ("X-A", "x-a", true),
    ];
    for (p, n, want) in cases {
        assert_eq!(NamePattern::parse(p).matches(n), want, "{p} {n}");
    }
}
