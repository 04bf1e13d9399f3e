//! MeshConfig: the mesh-wide settings in `mesh.yaml` (Istio's MeshConfig subset that security
//! depends on, plus Palisade's `caTokenIssuers` extension).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Istio's default root namespace: policies here without a selector apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// `mesh.yaml`. Unknown fields are errors so that a typo never silently changes security.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfig {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub trust_domain_aliases: Vec<String>,
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    #[serde(default = "default_true")]
    pub enable_auto_mtls: bool,
    #[serde(default, rename = "meshMTLS", skip_serializing_if = "Option::is_none")]
    pub mesh_mtls: Option<MeshMtls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_normalization: Option<PathNormalizationConfig>,
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProvider>,
    /// Palisade extension: service-account token issuers the CA trusts besides its own.
    #[serde(default)]
    pub ca_token_issuers: Vec<TokenIssuer>,
    /// Istio's `defaultConfig` (ProxyConfig): only what security depends on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_config: Option<ProxyDefaults>,
    /// Palisade extension: timings of the control plane's JWKS fetches for RequestAuthentication
    /// rules (Istio sets these with istiod's environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_resolver: Option<JwksResolverConfig>,
    /// What a sidecar in capture mode does with connections to destinations outside the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
}

/// `outboundTrafficPolicy` (Istio's MeshConfig field of that name).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTrafficPolicy {
    /// `ALLOW_ANY` (the default) or `REGISTRY_ONLY` (see [`OutboundTrafficMode`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// `outboundTrafficPolicy.mode`: where a captured outbound connection may go when its original
/// destination is neither a workload of the mesh nor a ServiceEntry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutboundTrafficMode {
    /// Passed through to its original destination as plain TCP, without policy (Istio's
    /// default, its `PassthroughCluster`).
    #[default]
    AllowAny,
    /// Refused (Istio's `BlackHoleCluster`): only destinations the mesh knows are reachable.
    RegistryOnly,
}

impl OutboundTrafficMode {
    /// Parses the MeshConfig value (Istio's enum names, exactly).
    pub fn from_config(v: &str) -> Option<OutboundTrafficMode> {
        match v {
            "ALLOW_ANY" => Some(OutboundTrafficMode::AllowAny),
            "REGISTRY_ONLY" => Some(OutboundTrafficMode::RegistryOnly),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OutboundTrafficMode::AllowAny => "ALLOW_ANY",
            OutboundTrafficMode::RegistryOnly => "REGISTRY_ONLY",
        }
    }
}

/// Default of `jwksResolver.refreshInterval` (istiod's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(20 * 60);
/// Default of `jwksResolver.retryInitialInterval`.
pub const DEFAULT_JWKS_RETRY_INITIAL: Duration = Duration::from_secs(60);
/// Default of `jwksResolver.retryMaxInterval`.
pub const DEFAULT_JWKS_RETRY_MAX: Duration = Duration::from_secs(60 * 60);
/// Default of `jwksResolver.evictUnusedAfter`: istiod's eviction of keys no config used for a
/// week.
pub const DEFAULT_JWKS_EVICT_UNUSED_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// `jwksResolver` (Palisade extension). Durations as Istio writes them (`90s`, `20m`, `168h`);
/// each must be greater than zero.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwksResolverConfig {
    /// How often fetched keys are fetched again (default 20m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_interval: Option<String>,
    /// The delay after a failed fetch; it doubles on each failure (default 1m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_initial_interval: Option<String>,
    /// The longest delay between retries (default 60m); not shorter than the initial one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_max_interval: Option<String>,
    /// Keys of a source that no rule names any more are kept (and refreshed) this long, so a
    /// rule that comes back has them at once, then dropped (default 168h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evict_unused_after: Option<String>,
}

/// The JWKS fetch timings of a mesh config, defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwksTimings {
    pub refresh: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub evict_unused_after: Duration,
}

impl Default for JwksTimings {
    fn default() -> Self {
        Self {
            refresh: DEFAULT_JWKS_REFRESH,
            retry_initial: DEFAULT_JWKS_RETRY_INITIAL,
            retry_max: DEFAULT_JWKS_RETRY_MAX,
            evict_unused_after: DEFAULT_JWKS_EVICT_UNUSED_AFTER,
        }
    }
}

/// `defaultConfig`: the proxies' defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_topology: Option<GatewayTopology>,
}

/// `defaultConfig.gatewayTopology`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayTopology {
    /// How many trusted proxies stand in front of the workload: the client address for
    /// `remoteIpBlocks` / `remote.ip` is read that many entries from the right of
    /// `X-Forwarded-For`. 0 (the default): `X-Forwarded-For` is never trusted.
    #[serde(default)]
    pub num_trusted_proxies: u32,
}

impl MeshConfig {
    /// `outboundTrafficPolicy.mode`. Validation rejects other values, so an unknown one (only
    /// from unvalidated input) falls back to Istio's default.
    pub fn outbound_traffic_mode(&self) -> OutboundTrafficMode {
        self.outbound_traffic_policy
            .as_ref()
            .and_then(|p| p.mode.as_deref())
            .and_then(OutboundTrafficMode::from_config)
            .unwrap_or_default()
    }

    /// The configured minimum TLS version. Validation rejects other values, so an unknown one
    /// (only from unvalidated input) falls back to Istio's default.
    pub fn min_protocol_version(&self) -> MinProtocolVersion {
        self.mesh_mtls
            .as_ref()
            .and_then(|m| m.min_protocol_version.as_deref())
            .and_then(MinProtocolVersion::from_config)
            .unwrap_or_default()
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            trust_domain_aliases: Vec::new(),
            root_namespace: default_root_namespace(),
            enable_auto_mtls: true,
            mesh_mtls: None,
            path_normalization: None,
            extension_providers: Vec::new(),
            ca_token_issuers: Vec::new(),
            default_config: None,
            jwks_resolver: None,
            outbound_traffic_policy: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshMtls {
    /// `TLS_AUTO`, `TLSV1_2` or `TLSV1_3` (see [`MinProtocolVersion`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_protocol_version: Option<String>,
}

/// `meshMTLS.minProtocolVersion`: the lowest TLS version the sidecars' inbound mTLS accepts. The
/// highest is always TLS 1.3.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MinProtocolVersion {
    /// `TLSV1_2`, and `TLS_AUTO` or unset (Istio's default).
    #[default]
    TlsV1_2,
    TlsV1_3,
}

impl MinProtocolVersion {
    /// Parses the MeshConfig value (Istio's `TLSProtocol` enum names).
    pub fn from_config(v: &str) -> Option<MinProtocolVersion> {
        match v {
            "TLS_AUTO" | "TLSV1_2" => Some(MinProtocolVersion::TlsV1_2),
            "TLSV1_3" => Some(MinProtocolVersion::TlsV1_3),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathNormalizationConfig {
    /// `DEFAULT`, `NONE`, `BASE`, `MERGE_SLASHES`, `DECODE_AND_MERGE_SLASHES`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalization: Option<String>,
}

/// A CA token issuer: tokens whose `iss` equals `issuer` are checked against these keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenIssuer {
    pub issuer: String,
    /// A JWKS document on disk (relative paths are relative to `mesh.yaml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    /// A JWKS document over http(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// Inline JWKS JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
}

/// `extensionProviders[]`: exactly one of the provider kinds is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_ext_authz_grpc: Option<ExtAuthzGrpcProvider>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_ext_authz_http: Option<ExtAuthzHttpProvider>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtAuthzGrpcProvider {
    pub service: String,
    pub port: u32,
    /// Duration string such as `0.5s` or `600s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_on_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_request_body_in_check: Option<BodyInCheck>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtAuthzHttpProvider {
    pub service: String,
    pub port: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_on_error: Option<String>,
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_additional_headers_in_check: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_request_body_in_check: Option<BodyInCheck>,
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BodyInCheck {
    #[serde(default)]
    pub max_request_bytes: u32,
    #[serde(default)]
    pub allow_partial_message: bool,
    #[serde(default)]
    pub pack_as_bytes: bool,
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}
fn default_root_namespace() -> String {
    DEFAULT_ROOT_NAMESPACE.to_owned()
}
fn default_true() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum MeshConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: MeshConfig: {reason}")]
    Parse { path: String, reason: String },
    /// Parsed, but breaks a validation rule; one `field: reason` per line.
    #[error("{path}: MeshConfig: {reasons}")]
    Invalid { path: String, reasons: String },
}

/// Parses `mesh.yaml` text and validates it; warnings and errors are returned as issues.
pub(crate) fn parse_mesh_config(
    text: &str,
) -> Result<(MeshConfig, Vec<crate::validate::FieldIssue>), crate::snapshot::ParseFailure> {
    let only_comments = text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---"
    });
    let cfg: MeshConfig = if only_comments {
        MeshConfig::default()
    } else {
        crate::snapshot::parse_yaml(text)?
    };
    let issues = crate::validate::mesh_config_issues(&cfg);
    Ok((cfg, issues))
}

impl MeshConfig {
    /// Parses and validates `mesh.yaml` text; `origin` names the file in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, MeshConfigError> {
        let (cfg, issues) = parse_mesh_config(text).map_err(|f| MeshConfigError::Parse {
            path: origin.to_owned(),
            reason: match (f.path, f.line) {
                (Some(p), Some(l)) => format!("line {l}: {p}: {}", f.reason),
                (Some(p), None) => format!("{p}: {}", f.reason),
                (None, Some(l)) => format!("line {l}: {}", f.reason),
                (None, None) => f.reason,
            },
        })?;
        let errors: Vec<String> = issues
            .iter()
            .filter(|i| i.severity == crate::validate::Severity::Error)
            .map(|i| format!("{}: {}", i.path, i.reason))
            .collect();
        if !errors.is_empty() {
            return Err(MeshConfigError::Invalid {
                path: origin.to_owned(),
                reasons: errors.join("; "),
            });
        }
        Ok(cfg)
    }

    /// Reads and parses a `mesh.yaml` file.
    pub fn load(path: &std::path::Path) -> Result<Self, MeshConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| MeshConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// The trust-domain bundle: the trust domain first, then its aliases.
    pub fn trust_domain_bundle(&self) -> Vec<String> {
        let mut all = vec![self.trust_domain.clone()];
        for alias in &self.trust_domain_aliases {
            if !all.contains(alias) {
                all.push(alias.clone());
            }
        }
        all
    }

    /// The path normalization requests get before path matching (BASE when unset).
    /// `defaultConfig.gatewayTopology.numTrustedProxies` (0 when unset).
    pub fn num_trusted_proxies(&self) -> u32 {
        self.default_config
            .as_ref()
            .and_then(|d| d.gateway_topology.as_ref())
            .map_or(0, |g| g.num_trusted_proxies)
    }

    pub fn path_normalization_mode(&self) -> crate::normalize::PathNormalization {
        self.path_normalization
            .as_ref()
            .and_then(|p| p.normalization.as_deref())
            .and_then(crate::normalize::PathNormalization::from_config)
            .unwrap_or_default()
    }

    /// `jwksResolver` with defaults for what it leaves out. Validation rejects values that do
    /// not parse, so one that does not (only from unvalidated input) is left at its default.
    pub fn jwks_timings(&self) -> JwksTimings {
        let mut t = JwksTimings::default();
        let Some(c) = &self.jwks_resolver else {
            return t;
        };
        let parse = |v: &Option<String>| {
            v.as_deref()
                .and_then(|v| crate::validate::parse_duration(v).ok())
                .filter(|d| !d.is_zero())
        };
        if let Some(d) = parse(&c.refresh_interval) {
            t.refresh = d;
        }
        if let Some(d) = parse(&c.retry_initial_interval) {
            t.retry_initial = d;
        }
        if let Some(d) = parse(&c.retry_max_interval) {
            t.retry_max = d;
        }
        if let Some(d) = parse(&c.evict_unused_after) {
            t.evict_unused_after = d;
        }
        t
    }

    /// True when `trust_domain` is the trust domain or one of its aliases.
    pub fn is_local_trust_domain(&self, trust_domain: &str) -> bool {
        self.trust_domain == trust_domain
            || self.trust_domain_aliases.iter().any(|a| a == trust_domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_yaml_defaults_and_validation() {
        let empty = MeshConfig::from_yaml("# nothing\n", "mesh.yaml").unwrap();
        assert_eq!(empty, MeshConfig::default());
        let cfg = MeshConfig::from_yaml(
            "trustDomain: td1\ntrustDomainAliases: [old, td1]\n",
            "mesh.yaml",
        )
        .unwrap();
        assert_eq!(cfg.trust_domain_bundle(), ["td1", "old"]);
        let err = MeshConfig::from_yaml("trustDomain: a/b\n", "mesh.yaml").unwrap_err();
        assert!(
            err.to_string()
                .contains("mesh.yaml: MeshConfig: trustDomain:"),
            "{err}"
        );
        let err = MeshConfig::from_yaml("trustDomian: x\n", "mesh.yaml").unwrap_err();
        assert!(
            err.to_string()
                .contains("line 1: trustDomian: unknown field"),
            "{err}"
        );
    }

    #[test]
    fn jwks_resolver_timings_and_their_errors() {
        let t = |y: &str| MeshConfig::from_yaml(y, "mesh.yaml").map(|m| m.jwks_timings());
        assert_eq!(t("{}").unwrap(), JwksTimings::default());
        assert_eq!(
            t("jwksResolver: {refreshInterval: 5m, retryInitialInterval: 10s, retryMaxInterval: 2m, evictUnusedAfter: 48h}")
                .unwrap(),
            JwksTimings {
                refresh: Duration::from_secs(300),
                retry_initial: Duration::from_secs(10),
                retry_max: Duration::from_secs(120),
                evict_unused_after: Duration::from_secs(48 * 3600),
            }
        );
        // What is left out keeps its default.
        let only = t("jwksResolver: {refreshInterval: 90s}").unwrap();
        assert_eq!(
            (only.refresh, only.retry_max),
            (Duration::from_secs(90), DEFAULT_JWKS_RETRY_MAX)
        );
        // Every error names the file, the field and the reason.
        for (yaml, want) in [
            (
                "jwksResolver: {refreshInterval: soon}",
                "mesh.yaml: MeshConfig: jwksResolver.refreshInterval: invalid duration \"soon\"",
            ),
            (
                "jwksResolver: {evictUnusedAfter: 0s}",
                "mesh.yaml: MeshConfig: jwksResolver.evictUnusedAfter: must be greater than 0",
            ),
            (
                "jwksResolver: {retryInitialInterval: 2h}",
                "mesh.yaml: MeshConfig: jwksResolver.retryInitialInterval: 2h is longer than retryMaxInterval (1h by default)",
            ),
            (
                "jwksResolver: {retryInitialInterval: 5m, retryMaxInterval: 1m}",
                "mesh.yaml: MeshConfig: jwksResolver.retryInitialInterval: 5m is longer than retryMaxInterval (1m)",
            ),
            (
                "jwksResolver: {refresh: 5m}",
                "line 1: jwksResolver.refresh: unknown field",
            ),
        ] {
            let err = t(yaml).unwrap_err().to_string();
            assert!(err.contains(want), "{yaml}: {err}");
        }
    }

    #[test]
    fn min_protocol_version() {
        let v = |y: &str| MeshConfig::from_yaml(y, "mesh.yaml").map(|m| m.min_protocol_version());
        assert_eq!(v("{}").unwrap(), MinProtocolVersion::TlsV1_2);
        assert_eq!(
            v("meshMTLS: {minProtocolVersion: TLS_AUTO}").unwrap(),
            MinProtocolVersion::TlsV1_2
        );
        assert_eq!(
            v("meshMTLS: {minProtocolVersion: TLSV1_3}").unwrap(),
            MinProtocolVersion::TlsV1_3
        );
        let err = v("meshMTLS: {minProtocolVersion: TLSV1_1}").unwrap_err();
        assert!(
            err.to_string().contains(
                "mesh.yaml: MeshConfig: meshMTLS.minProtocolVersion: \"TLSV1_1\" is not a TLS version"
            ),
            "{err}"
        );
    }

    #[test]
    fn outbound_traffic_mode_and_its_errors() {
        let m = |y: &str| MeshConfig::from_yaml(y, "mesh.yaml").map(|m| m.outbound_traffic_mode());
        #[rustfmt::skip]
        let cases: [(&str, Result<OutboundTrafficMode, &str>); 6] = [
            ("{}", Ok(OutboundTrafficMode::AllowAny)),
            ("outboundTrafficPolicy: {}", Ok(OutboundTrafficMode::AllowAny)),
            ("outboundTrafficPolicy: {mode: ALLOW_ANY}", Ok(OutboundTrafficMode::AllowAny)),
            ("outboundTrafficPolicy: {mode: REGISTRY_ONLY}", Ok(OutboundTrafficMode::RegistryOnly)),
            (
                "outboundTrafficPolicy: {mode: registry_only}",
                Err("mesh.yaml: MeshConfig: outboundTrafficPolicy.mode: \"registry_only\" is not an outbound traffic policy: expected ALLOW_ANY or REGISTRY_ONLY"),
            ),
            ("outboundTrafficPolicy: {mod: ALLOW_ANY}", Err("outboundTrafficPolicy.mod: unknown field")),
        ];
        for (yaml, want) in cases {
            match (m(yaml), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{yaml}"),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{yaml}: {e}"),
                (got, want) => panic!("{yaml}: got {got:?}, want {want:?}"),
            }
        }
    }
}
