//! The certificate a Consul server presents on its RPC port, read as
//! another server reads it: the byte that asks for TLS (`RPCTLS`, 3:
//! hashicorp/consul agent/pool/conn.go), then a TLS handshake that checks
//! the name `server.<datacenter>.<domain>` against the CA (what
//! `verify_server_hostname` checks) and presents this server's own
//! certificate (internal RPC has `verify_incoming`).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Consul's first byte of an RPC connection that wants TLS.
const RPC_TLS: u8 = 0x03;

/// What a node's Consul presents at `addr` to a client that trusts
/// `ca_pem` and authenticates with `cert_pem`/`key_pem`: the DER of its
/// certificate. Fails when the handshake does (an expired certificate,
/// another CA, a name that is not `server_name`). Blocking: call it off
/// the async threads.
pub fn served_certificate(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("the CA certificate")?)
            .context("the CA certificate")?;
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("this server's certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("this server's key")?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("this server's certificate and key")?;
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| anyhow!("`{server_name}` is not a server name"))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).context("starting TLS")?;
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to Consul's RPC port at {addr}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    sock.set_write_timeout(Some(Duration::from_secs(5)))?;
    sock.write_all(&[RPC_TLS])
        .with_context(|| format!("writing to {addr}"))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .with_context(|| format!("the TLS handshake with Consul at {addr}"))?;
    }
    let served = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow!("Consul at {addr} presented no certificate"))?;
    Ok(served.to_vec())
}

/// The DER of the first certificate in `pem`.
pub fn der_of(pem: &str) -> Option<Vec<u8>> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}
