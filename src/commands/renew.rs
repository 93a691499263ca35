//! A server's certificate renewed while it runs: each heartbeat of a
//! server whose TLS auto-consul made (`--secrets`, no `--ca-file`) looks at
//! the certificate on disk (no request), and once it is due
//! ([`crate::secrets::renew_at`]), or names another server name than
//! `server.<datacenter>.<domain>`, signs a new one with the cluster's CA,
//! writes it atomically, has Consul reload (Consul re-reads its TLS files
//! on reload: agent/agent.go `reloadConfigInternal` updates the TLS
//! configurator), and checks that Consul's RPC port presents it.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::run::TlsPaths;
use crate::cli::{ConsulOpts, SecretOpts};
use crate::identity::Identity;
use crate::install::{self, FileSpec, Root};
use crate::secrets::{self, CertInfo};
use crate::state::State;

/// What the heartbeat did about this server's certificate, for its
/// output; `None` when auto-consul does not manage it.
pub async fn renew_if_due(
    consul_opts: &ConsulOpts,
    tls: &SecretOpts,
    root: &Root,
    me: &Identity,
    saved: &State,
    gens: secrets::Generations,
) -> Result<Option<Value>> {
    let (Some(url), None, true) = (&tls.secrets, &tls.ca_file, saved.mode.is_server()) else {
        return Ok(None);
    };
    let paths = TlsPaths::new(&consul_opts.config_dir);
    let read = |p: &Path| std::fs::read_to_string(root.path(p)).ok();
    let Some(cert) = read(&paths.cert) else {
        return Ok(None);
    };
    let name = server_name(consul_opts);
    let now = chrono::Utc::now().timestamp();
    let info = secrets::cert_info(&cert);
    // A CA rotation's `reissue`: signed by the new CA now.
    let signed_by = crate::state::recorded_number(root, super::rotate::CA_SIGNED_BY).unwrap_or(1);
    let due = match &info {
        Some(i) => {
            now >= secrets::renew_at(i, &me.node)
                || !i.names.contains(&name)
                || signed_by != gens.ca.signing()
        }
        None => true,
    };
    if !due {
        let i = info.expect("parsed");
        return Ok(Some(json!({
            "renewed": false,
            "not_after": stamp(i.not_after),
            "renew_at": stamp(secrets::renew_at(&i, &me.node)),
        })));
    }
    let Some(cluster) = saved.cluster_id.as_deref() else {
        return Ok(None);
    };
    let Some(store) = secrets::open(url).await? else {
        return Ok(None);
    };
    let made = secrets::genesis_with(store.as_ref(), cluster, true, gens).await?;
    let (new_cert, new_key) = secrets::server_certificate(&made, &name, me.address)?;
    let consul = root.user("consul");
    let files = [
        (paths.ca.clone(), made.ca_cert.clone(), 0o644),
        (paths.cert.clone(), new_cert.clone(), 0o644),
        (paths.key.clone(), new_key.clone(), 0o600),
    ];
    {
        let _lock = install::lock(root, "consul-config")?;
        for (path, contents, mode) in files {
            install::write_atomic(
                root,
                &FileSpec {
                    path,
                    contents,
                    mode,
                    owner: consul,
                },
            )?;
        }
    }
    crate::state::record_number(root, super::rotate::CA_SIGNED_BY, gens.ca.signing());
    super::rotate::record_list(root, super::rotate::CA_TRUSTED, &gens.ca.trusted());
    let was = info.map(|i| stamp(i.not_after));
    let new = secrets::cert_info(&new_cert).context("the new certificate")?;
    tracing::warn!(
        "renewed this server's certificate {name} (it ran until {}; the new one until {}); Consul reloads it",
        was.as_deref().unwrap_or("unreadable"),
        stamp(new.not_after)
    );
    let served = match crate::agent::reload(made.management_token.as_deref()).await {
        Ok(()) => {
            served(
                consul_opts,
                root,
                me,
                &name,
                &made.ca_cert,
                &new_cert,
                &new_key,
            )
            .await
        }
        Err(e) => {
            tracing::warn!("{e:#}: Consul serves the new certificate once it reloads or restarts");
            format!("not reloaded: {e:#}")
        }
    };
    Ok(Some(json!({
        "renewed": true,
        "was_until": was,
        "not_after": stamp(new.not_after),
        "renew_at": stamp(secrets::renew_at(&new, &me.node)),
        "served": served,
    })))
}

/// `server.<datacenter>.<domain>`: the name servers' certificates carry.
pub fn server_name(consul: &ConsulOpts) -> String {
    format!("server.{}.{}", consul.datacenter, consul.domain)
}

/// Whether Consul's RPC port presents `cert`: `new`, `old` (another), or
/// why it could not be seen (a warning too).
async fn served(
    consul: &ConsulOpts,
    root: &Root,
    me: &Identity,
    name: &str,
    ca: &str,
    cert: &str,
    key: &str,
) -> String {
    let addr = SocketAddr::new(me.address, super::recover::rpc_port(root, consul));
    let (name, ca, cert, key) = (
        name.to_string(),
        ca.to_string(),
        cert.to_string(),
        key.to_string(),
    );
    let want = crate::served::der_of(&cert);
    let seen = tokio::task::spawn_blocking(move || {
        crate::served::served_certificate(addr, &name, &ca, &cert, &key)
    })
    .await;
    match seen {
        Ok(Ok(der)) if Some(&der) == want.as_ref() => "new".into(),
        Ok(Ok(_)) => {
            tracing::warn!(
                "Consul at {addr} still presents its old certificate after the reload: it serves the new one once it restarts"
            );
            "old".into()
        }
        Ok(Err(e)) => {
            tracing::warn!("could not see the certificate Consul presents at {addr}: {e:#}");
            format!("unchecked: {e:#}")
        }
        Err(e) => format!("unchecked: {e}"),
    }
}

/// Unix seconds as RFC 3339.
pub fn stamp(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339())
        .unwrap_or_else(|| t.to_string())
}

/// The expiry of this node's TLS files auto-consul made (the CA; a
/// server's certificate too), for `status` and the metrics file.
pub fn expiries(
    consul: &ConsulOpts,
    tls: &SecretOpts,
    root: &Root,
) -> Vec<(&'static str, CertInfo)> {
    if tls.ca_file.is_some() {
        return Vec::new();
    }
    let paths = TlsPaths::new(&consul.config_dir);
    [("ca", &paths.ca), ("certificate", &paths.cert)]
        .into_iter()
        .filter_map(|(what, p)| {
            let pem = std::fs::read_to_string(root.path(p)).ok()?;
            Some((what, secrets::cert_info(&pem)?))
        })
        .collect()
}
