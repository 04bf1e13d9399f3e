//! The proxy's TLS material: its SVID (rotated in place through a [`SvidResolver`], so new
//! handshakes use the new certificate without a restart), the mesh roots, and the rustls configs
//! derived from them (rebuilt when the roots, the trust-domain aliases or the minimum TLS version
//! change).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use arc_swap::ArcSwapOption;
use palisade_identity::{
    CertSource, CertificateDer, ClientAuth, MinTlsVersion, ServerIdentity, SpiffeId, Svid,
    SvidResolver, TrustBundle, TrustDomain,
};
use palisade_policy::mesh::MinProtocolVersion;
use rustls::{ClientConfig, ServerConfig};

/// ALPN protocols the inbound TLS listener accepts, in preference order: HTTP first, then the
/// protocols Istio's sidecars announce (the stream is sniffed for those).
pub const INBOUND_ALPN: &[&[u8]] = &[
    b"h2",
    b"http/1.1",
    b"istio-h2",
    b"istio-http/1.1",
    b"istio-http/1.0",
    b"istio-peer-exchange",
    b"istio",
];

/// ALPN a Palisade client sidecar offers for HTTP: the mesh values first (a PERMISSIVE server
/// terminates mTLS only for clients that offer one, as Istio's does), then the plain ones for
/// servers that know only those.
pub const MESH_HTTP_ALPN: &[&[u8]] = &[b"istio-h2", b"istio-http/1.1", b"h2", b"http/1.1"];
/// ALPN a Palisade client sidecar offers for a request that becomes a tunnel (an `Upgrade` or a
/// `CONNECT`): HTTP/1.1 only, since HTTP/1.1's upgrade does not exist in HTTP/2.
pub const MESH_HTTP1_ALPN: &[&[u8]] = &[b"istio-http/1.1", b"http/1.1"];
/// ALPN a Palisade client sidecar offers for opaque TCP.
pub const MESH_TCP_ALPN: &[&[u8]] = &[b"istio"];

/// What an outbound mTLS connection will carry, for its ALPN offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Carries {
    /// HTTP, either version ([`MESH_HTTP_ALPN`]).
    Http,
    /// HTTP/1.1 only ([`MESH_HTTP1_ALPN`]): a request that upgrades the connection.
    Http1,
    /// Opaque TCP ([`MESH_TCP_ALPN`]).
    Tcp,
}

impl Carries {
    fn alpn(self) -> &'static [&'static [u8]] {
        match self {
            Carries::Http => MESH_HTTP_ALPN,
            Carries::Http1 => MESH_HTTP1_ALPN,
            Carries::Tcp => MESH_TCP_ALPN,
        }
    }
}

/// The ALPN values that mark a TLS client as a mesh sidecar (Istio's PERMISSIVE filter chain
/// match): other TLS on a PERMISSIVE port is the application's own and passes through.
pub const MESH_ALPN: &[&[u8]] = &[
    b"istio-peer-exchange",
    b"istio",
    b"istio-http/1.0",
    b"istio-http/1.1",
    b"istio-h2",
];

/// A certificate and the roots it came with, as the agent serves them.
#[derive(Debug, Clone)]
pub struct CertMaterial {
    pub svid: Svid,
    pub roots: Vec<CertificateDer<'static>>,
}

/// Errors building TLS configs.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Tls(#[from] palisade_identity::TlsError),
    #[error(transparent)]
    Bundle(#[from] palisade_identity::BundleError),
}

/// The configs of one (roots, aliases, minimum TLS version) generation.
#[derive(Debug)]
pub struct TlsState {
    pub own_id: SpiffeId,
    pub bundle: TrustBundle,
    /// Inbound: client certificate required, checked against the bundle; TLS from the mesh's
    /// `meshMTLS.minProtocolVersion` up to 1.3.
    pub server: Arc<ServerConfig>,
    /// Outbound client configs by expected server identity and ALPN use (built on first use).
    clients: Mutex<HashMap<(SpiffeId, Carries), Arc<ClientConfig>>>,
    resolver: Arc<SvidResolver>,
}

impl TlsState {
    /// A client config presenting our SVID, accepting only `server`, offering the ALPN for what
    /// the connection `carries`. Called per new upstream connection, never per request.
    pub fn client_for(
        &self,
        server: &SpiffeId,
        carries: Carries,
    ) -> Result<Arc<ClientConfig>, CertError> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = clients.get(&(server.clone(), carries)) {
            return Ok(Arc::clone(c));
        }
        let mut cfg = palisade_identity::client_config(
            Some(CertSource::Rotating(Arc::clone(&self.resolver))),
            &self.bundle,
            ServerIdentity::OneOf(vec![server.clone()]),
        )?;
        cfg.alpn_protocols = carries.alpn().iter().map(|p| p.to_vec()).collect();
        let cfg = Arc::new(cfg);
        clients.insert((server.clone(), carries), Arc::clone(&cfg));
        Ok(cfg)
    }

    /// A client config for the control plane (its SPIFFE path, any of our trust domains).
    pub fn control_plane_client(&self, path: &str) -> Result<ClientConfig, CertError> {
        let mut cfg = palisade_identity::client_config(
            Some(CertSource::Rotating(Arc::clone(&self.resolver))),
            &self.bundle,
            ServerIdentity::Path(path.to_owned()),
        )?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }
}

/// The current certificate and TLS configs, readable without locks.
#[derive(Debug, Default)]
pub struct Certs {
    resolver: OnceLock<Arc<SvidResolver>>,
    state: ArcSwapOption<TlsState>,
    current: ArcSwapOption<CertMaterial>,
    aliases: Mutex<Vec<TrustDomain>>,
    min_tls: Mutex<MinTlsVersion>,
}

impl Certs {
    /// The TLS configs, once a certificate arrived.
    pub fn tls(&self) -> Option<Arc<TlsState>> {
        self.state.load_full()
    }

    /// The certificate being served.
    pub fn material(&self) -> Option<Arc<CertMaterial>> {
        self.current.load_full()
    }

    /// Installs a new certificate (and roots): handshakes from now on use it.
    pub fn update(&self, material: CertMaterial) -> Result<(), CertError> {
        let resolver = self
            .resolver
            .get_or_init(|| SvidResolver::new(&material.svid));
        resolver.update(&material.svid);
        let material = Arc::new(material);
        self.current.store(Some(Arc::clone(&material)));
        self.rebuild(&material)
    }

    /// Sets the trust-domain aliases (from the mesh config); rebuilds when they change.
    pub fn set_aliases(&self, aliases: Vec<TrustDomain>) -> Result<(), CertError> {
        {
            let mut cur = self.aliases.lock().unwrap_or_else(PoisonError::into_inner);
            if *cur == aliases {
                return Ok(());
            }
            *cur = aliases;
        }
        match self.current.load_full() {
            Some(m) => self.rebuild(&m),
            None => Ok(()),
        }
    }

    /// Sets the inbound minimum TLS version (`meshMTLS.minProtocolVersion`); rebuilds when it
    /// changes. Handshakes from then on use it; established connections keep theirs.
    pub fn set_min_protocol_version(&self, min: MinProtocolVersion) -> Result<(), CertError> {
        let min = match min {
            MinProtocolVersion::TlsV1_2 => MinTlsVersion::Tls12,
            MinProtocolVersion::TlsV1_3 => MinTlsVersion::Tls13,
        };
        {
            let mut cur = self.min_tls.lock().unwrap_or_else(PoisonError::into_inner);
            if *cur == min {
                return Ok(());
            }
            *cur = min;
        }
        match self.current.load_full() {
            Some(m) => self.rebuild(&m),
            None => Ok(()),
        }
    }

    fn rebuild(&self, material: &CertMaterial) -> Result<(), CertError> {
        let Some(resolver) = self.resolver.get() else {
            return Ok(());
        };
        let own_id = material.svid.spiffe_id().clone();
        let aliases = self
            .aliases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let bundle = TrustBundle::new(own_id.trust_domain().clone(), material.roots.clone())?
            .with_aliases(aliases);
        let min_tls = *self.min_tls.lock().unwrap_or_else(PoisonError::into_inner);
        let mut server = palisade_identity::server_config_min(
            CertSource::Rotating(Arc::clone(resolver)),
            &bundle,
            ClientAuth::Required,
            min_tls,
        )?;
        server.alpn_protocols = INBOUND_ALPN.iter().map(|p| p.to_vec()).collect();
        self.state.store(Some(Arc::new(TlsState {
            own_id,
            bundle,
            server: Arc::new(server),
            clients: Mutex::new(HashMap::new()),
            resolver: Arc::clone(resolver),
        })));
        Ok(())
    }
}

/// Lowercase hex SHA-256 of a certificate (the `Hash` of `x-forwarded-client-cert`).
pub fn cert_sha256_hex(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut out = String::with_capacity(64);
    for b in digest.as_ref() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";
