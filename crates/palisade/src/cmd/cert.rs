//! `palisade cert`: request a workload certificate from the CA, and inspect certificate files.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use palisade_ca::{CaClient, CaClientError, CaClientOptions};
use palisade_identity::pem::{self as pemio, FileMode};
use palisade_identity::{CertInfo, KeyType, SpiffeId, TrustDomain};

use super::token::parse_duration;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Generate a key and CSR for the token's identity, have the CA sign it, and write
    /// key.pem, cert-chain.pem and root-cert.pem.
    Request(RequestArgs),
    /// Print identity, serial, validity and chain of a PEM certificate file.
    Inspect(InspectArgs),
}

#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    /// The CA's address.
    #[arg(long, value_name = "ADDR", default_value = palisade_ca::DEFAULT_LISTEN)]
    pub ca_addr: String,
    /// The mesh root certificate(s) to verify the CA with.
    #[arg(long, value_name = "FILE")]
    pub ca_root: PathBuf,
    /// File holding the service-account token.
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Workload key type: ecdsa-p256, ecdsa-p384 or rsa-2048.
    #[arg(long, value_name = "TYPE", default_value = "ecdsa-p256", value_parser = parse_key_type)]
    pub key_type: KeyType,
    /// Requested lifetime (e.g. 24h, 90d); the CA's default when absent.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Trust domain of the identity; by default the CA's own (from its certificate).
    #[arg(long, value_name = "TD")]
    pub trust_domain: Option<String>,
    /// ClusterID metadata to send.
    #[arg(long, value_name = "NAME")]
    pub cluster_id: Option<String>,
    /// Send this CSR file instead of generating a key (testing the CA's checks; no key.pem).
    #[arg(long, value_name = "FILE", hide = true)]
    pub csr: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// PEM file with one or more certificates (leaf first).
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_key_type(s: &str) -> Result<KeyType, String> {
    s.parse()
        .map_err(|e: palisade_identity::KeyError| e.to_string())
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Request(args) => request(args).await,
        Command::Inspect(args) => inspect(&args),
    }
}

async fn request(args: RequestArgs) -> anyhow::Result<ExitCode> {
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading {}", args.token_file.display()))?;
    let token = token.trim();
    let root_pem = pemio::read_file(&args.ca_root)?;
    // The token is read without verification only to know which identity to ask for: the CA
    // verifies it and refuses a CSR for anyone else.
    let (namespace, service_account) = palisade_ca::token::peek_service_account(token)
        .context("reading the token's service account")?;
    let trust_domain = match &args.trust_domain {
        Some(td) => Some(TrustDomain::new(td).with_context(|| format!("--trust-domain {td:?}"))?),
        None => None,
    };
    let options = CaClientOptions {
        trust_domain: trust_domain.clone(),
        ..CaClientOptions::default()
    };
    let client = CaClient::connect(&args.ca_addr, &root_pem, options).await?;
    let trust_domain = match trust_domain {
        Some(td) => td,
        None => client
            .server_identity()
            .map(|id| id.trust_domain().clone())
            .context("the CA presented no SPIFFE identity")?,
    };
    let identity = SpiffeId::for_service_account(trust_domain, &namespace, &service_account)
        .context("the token's service account is not a valid identity")?;

    let (csr_pem, key) = match &args.csr {
        Some(path) => {
            let bytes = pemio::read_file(path)?;
            // Sent as-is, even when it is not text: the CA must cope.
            (String::from_utf8_lossy(&bytes).into_owned(), None)
        }
        None => {
            let generated = palisade_identity::generate_key_and_csr(&identity, args.key_type)?;
            (generated.csr_pem, Some(generated.key))
        }
    };

    let chain = match client
        .create_certificate(&csr_pem, Some(token), args.ttl, args.cluster_id.as_deref())
        .await
    {
        Ok(chain) => chain,
        Err(e @ CaClientError::Refused { .. }) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e.into()),
    };

    // Split the response: the self-signed CA certificates are the roots, the rest the chain.
    let mut leaf_chain = Vec::new();
    let mut roots = Vec::new();
    for pem in &chain {
        let certs = pemio::parse_certs(pem.as_bytes()).context("CA response")?;
        for cert in certs {
            let info = CertInfo::parse(&cert).context("CA response")?;
            if info.is_ca && info.self_issued && !leaf_chain.is_empty() {
                roots.push(cert);
            } else {
                leaf_chain.push(cert);
            }
        }
    }
    let leaf = leaf_chain.first().context("CA response has no leaf")?;
    let info = CertInfo::parse(leaf)?;
    let got = info.spiffe_id()?;
    anyhow::ensure!(
        got == identity,
        "the CA issued {got}, not the requested {identity}"
    );

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    if let Some(key) = &key {
        pemio::write_file_atomic(
            &args.out.join("key.pem"),
            key.pem.as_bytes(),
            FileMode::Secret,
        )?;
    }
    pemio::write_file_atomic(
        &args.out.join("cert-chain.pem"),
        pemio::certs_to_pem(&leaf_chain).as_bytes(),
        FileMode::Public,
    )?;
    pemio::write_file_atomic(
        &args.out.join("root-cert.pem"),
        pemio::certs_to_pem(&roots).as_bytes(),
        FileMode::Public,
    )?;
    println!("identity:   {got}");
    println!("serial:     {}", info.serial);
    println!("not after:  {}", info.not_after);
    println!("written:    {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

fn inspect(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let certs = pemio::read_certs(&args.file)?;
    let infos = palisade_identity::inspect_chain(&certs)?;
    if args.json {
        let out: Vec<_> = infos
            .iter()
            .map(|i| {
                serde_json::json!({
                    "identity": i.spiffe_id().ok().map(|id| id.to_string()),
                    "uriSans": i.uri_sans,
                    "dnsSans": i.dns_sans,
                    "ipSans": i.ip_sans.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                    "serial": i.serial,
                    "subject": i.subject,
                    "issuer": i.issuer,
                    "notBefore": rfc3339(i.not_before),
                    "notAfter": rfc3339(i.not_after),
                    "isCa": i.is_ca,
                    "key": i.key_algorithm.to_string(),
                    "serverAuth": i.server_auth,
                    "clientAuth": i.client_auth,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    for (n, i) in infos.iter().enumerate() {
        let role = match (n, i.is_ca, i.self_issued) {
            (0, false, _) => "leaf",
            (_, true, true) => "root",
            (_, true, false) => "intermediate",
            _ => "certificate",
        };
        println!("[{n}] {role}");
        match i.spiffe_id() {
            Ok(id) => println!("  identity:   {id}"),
            Err(_) if !i.uri_sans.is_empty() => println!("  uri sans:   {}", i.uri_sans.join(", ")),
            Err(_) => {}
        }
        if !i.dns_sans.is_empty() {
            println!("  dns sans:   {}", i.dns_sans.join(", "));
        }
        println!("  serial:     {}", i.serial);
        println!("  subject:    {}", i.subject);
        println!("  issuer:     {}", i.issuer);
        println!("  not before: {}", rfc3339(i.not_before));
        println!("  not after:  {}", rfc3339(i.not_after));
        println!("  key:        {}", i.key_algorithm);
        let mut usages = Vec::new();
        if i.server_auth {
            usages.push("serverAuth");
        }
        if i.client_auth {
            usages.push("clientAuth");
        }
        if !usages.is_empty() {
            println!("  ext usage:  {}", usages.join(", "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}
