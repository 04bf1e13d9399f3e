//! The protocol a port declares, as Istio selects it: a ServiceEntry port's `protocol` (or a
//! Kubernetes `appProtocol`), else the port name's prefix (`<protocol>[-<suffix>]`, e.g.
//! `http-admin`, `grpc`, `tcp-db`). A declared protocol is never sniffed: the proxy parses the
//! traffic as declared and refuses what does not parse, so a client cannot choose how its bytes
//! are read. Only an undeclared port is sniffed.

/// A port's declared protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortProtocol {
    /// HTTP/1.1 (and HTTP/2 with prior knowledge): `http`.
    Http,
    /// HTTP/2: `http2`, `h2c`.
    Http2,
    /// gRPC (HTTP/2): `grpc`.
    Grpc,
    /// gRPC-Web (HTTP/1.1 or HTTP/2): `grpc-web`.
    GrpcWeb,
    /// Opaque TCP: `tcp`, and the TCP-based protocols Istio proxies as TCP (`mongo`, `mysql`,
    /// `redis`).
    Tcp,
    /// TLS the application terminates itself: `https`, `tls`. Proxied as TCP.
    Tls,
    /// Nothing declared (or a name Istio does not recognise): detect HTTP or TCP.
    Unknown,
}

impl PortProtocol {
    /// Parses a protocol name (case-insensitive), as in ServiceEntry `ports[].protocol` or
    /// `appProtocol`. `None` when the name is not one Istio knows.
    pub fn parse(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        Some(match lower.as_str() {
            "http" | "http1" | "http/1.1" => PortProtocol::Http,
            "http2" | "h2c" | "kubernetes.io/h2c" => PortProtocol::Http2,
            "grpc" => PortProtocol::Grpc,
            "grpc-web" => PortProtocol::GrpcWeb,
            "tcp" | "mongo" | "mysql" | "redis" => PortProtocol::Tcp,
            "https" | "tls" => PortProtocol::Tls,
            _ => return None,
        })
    }

    /// The protocol a port name declares: the whole name or its part before the first `-`
    /// (`grpc-web` is the one protocol with a dash in it).
    pub fn from_port_name(name: &str) -> Self {
        if let Some(p) = Self::parse(name) {
            return p;
        }
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("grpc-web-") {
            return PortProtocol::GrpcWeb;
        }
        lower
            .split_once('-')
            .and_then(|(prefix, _)| Self::parse(prefix))
            .unwrap_or(PortProtocol::Unknown)
    }

    /// Whether the port carries HTTP (HTTP/1.1 or HTTP/2, parsed by the proxy).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            PortProtocol::Http | PortProtocol::Http2 | PortProtocol::Grpc | PortProtocol::GrpcWeb
        )
    }

    /// Whether the port carries opaque bytes (never parsed as HTTP).
    pub fn is_opaque(self) -> bool {
        matches!(self, PortProtocol::Tcp | PortProtocol::Tls)
    }
}

#[cfg(test)]
mod tests {
    use super::PortProtocol::{self, *};

    #[test]
    fn port_names_declare_protocols_as_istio_reads_them() {
        let table: &[(&str, PortProtocol)] = &[
            ("http", Http),
            ("HTTP", Http),
            ("http-admin", Http),
            ("http-legacy-v1", Http),
            ("http2", Http2),
            ("http2-api", Http2),
            ("h2c", Http2),
            ("grpc", Grpc),
            ("grpc-api", Grpc),
            ("grpc-web", GrpcWeb),
            ("grpc-web-ui", GrpcWeb),
            ("tcp", Tcp),
            ("tcp-postgres", Tcp),
            ("mongo", Tcp),
            ("mysql-main", Tcp),
            ("redis", Tcp),
            ("https", Tls),
            ("tls-db", Tls),
            ("admin", Unknown),
            ("web", Unknown),
            ("httpx", Unknown),
            ("", Unknown),
            ("-http", Unknown),
        ];
        for (name, want) in table {
            assert_eq!(PortProtocol::from_port_name(name), *want, "{name:?}");
        }
    }

    #[test]
    fn protocol_field_values() {
        assert_eq!(PortProtocol::parse("GRPC"), Some(Grpc));
        assert_eq!(PortProtocol::parse("TCP"), Some(Tcp));
        assert_eq!(PortProtocol::parse("HTTPS"), Some(Tls));
        assert_eq!(PortProtocol::parse("UDP"), None);
        assert!(Http.is_http() && Grpc.is_http() && !Tcp.is_http() && !Unknown.is_http());
        assert!(Tcp.is_opaque() && Tls.is_opaque() && !Unknown.is_opaque());
    }
}
