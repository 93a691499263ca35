//! Asking the local Consul agent how it runs: `GET /v1/agent/self`, with
//! the standard `CONSUL_HTTP_*` variables the `consul` CLI honours.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;

use crate::error::usage;

/// What the agent says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// `Config.Server`.
    pub server: bool,
    /// `Config.NodeName`.
    pub node_name: String,
}

#[derive(Deserialize)]
struct SelfResponse {
    #[serde(rename = "Config")]
    config: SelfConfig,
}

#[derive(Deserialize)]
struct SelfConfig {
    #[serde(rename = "Server")]
    server: bool,
    #[serde(rename = "NodeName")]
    node_name: String,
}

/// Where and how to reach the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAddr {
    /// Base URL (`http://localhost` for a unix socket).
    pub base: String,
    /// Unix socket path, for `unix://`.
    pub socket: Option<String>,
}

/// Parses `CONSUL_HTTP_ADDR` as the consul CLI does: `host:port`,
/// `http://`, `https://` or `unix://`; a bare address uses https when
/// `CONSUL_HTTP_SSL` is true.
pub fn parse_addr(raw: &str, ssl: bool) -> Result<AgentAddr> {
    let raw = raw.trim();
    if let Some(path) = raw.strip_prefix("unix://") {
        if path.is_empty() {
            return Err(usage("CONSUL_HTTP_ADDR unix:// needs a socket path"));
        }
        return Ok(AgentAddr {
            base: "http://localhost".into(),
            socket: Some(path.to_string()),
        });
    }
    let raw = raw.trim_end_matches('/');
    let base = if raw.starts_with("http://") || raw.starts_with("https://") {
        raw.to_string()
    } else if raw.contains("://") {
        return Err(usage(format!(
            "CONSUL_HTTP_ADDR `{raw}` has an unsupported scheme: use http://, https:// or unix://"
        )));
    } else {
        format!("{}://{raw}", if ssl { "https" } else { "http" })
    };
    url::Url::parse(&base).map_err(|e| {
        usage(format!(
            "CONSUL_HTTP_ADDR `{raw}` is not a valid address: {e}"
        ))
    })?;
    Ok(AgentAddr { base, socket: None })
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// Asks the local agent for its status. The token comes from
/// `CONSUL_HTTP_TOKEN`, else `CONSUL_HTTP_TOKEN_FILE`, else `token_file`
/// (the agent's own ACL token file, `--acl-token-file`).
pub async fn status(token_file: Option<&std::path::Path>) -> Result<AgentStatus> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let addr = parse_addr(
        &env("CONSUL_HTTP_ADDR").unwrap_or_else(|| "127.0.0.1:8500".into()),
        env("CONSUL_HTTP_SSL").is_some_and(|v| truthy(&v)),
    )?;
    let token_file = env("CONSUL_HTTP_TOKEN_FILE")
        .or_else(|| token_file.map(|p| p.to_string_lossy().into_owned()));
    let token = match (env("CONSUL_HTTP_TOKEN"), token_file) {
        (Some(t), _) => Some(t),
        (None, Some(path)) => Some(
            std::fs::read_to_string(&path)
                .map_err(|e| usage(format!("cannot read the Consul token file {path}: {e}")))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    if let Some(socket) = &addr.socket {
        builder = builder.unix_socket(socket.as_str());
    }
    if let Some(path) = env("CONSUL_CACERT") {
        let pem = std::fs::read(&path)
            .map_err(|e| usage(format!("cannot read CONSUL_CACERT {path}: {e}")))?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
            usage(format!(
                "CONSUL_CACERT {path} is not a PEM certificate: {e}"
            ))
        })?;
        builder = builder.add_root_certificate(cert);
    }
    let client = builder
        .build()
        .context("building the HTTP client for the Consul agent")?;
    let url = format!("{}/v1/agent/self", addr.base);
    let shown = addr
        .socket
        .as_ref()
        .map_or_else(|| addr.base.clone(), |s| format!("unix://{s}"));
    let mut req = client.get(&url);
    if let Some(token) = token {
        req = req.header("X-Consul-Token", token);
    }
    let resp = req.send().await.map_err(|e| {
        anyhow!(e).context(format!(
            "the local Consul agent at {shown} is not answering: is consul.service running? (set CONSUL_HTTP_ADDR if it listens elsewhere)"
        ))
    })?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let hint = if status.as_u16() == 403 {
            "set CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE to a token with agent:read"
        } else {
            "check the agent's log"
        };
        return Err(
            anyhow!("{}", body.trim().chars().take(200).collect::<String>()).context(format!(
                "the local Consul agent at {shown} answered {status}: {hint}"
            )),
        );
    }
    let parsed: SelfResponse = resp.json().await.with_context(|| {
        format!(
            "the local Consul agent at {shown} answered /v1/agent/self with something unexpected"
        )
    })?;
    Ok(AgentStatus {
        server: parsed.config.server,
        node_name: parsed.config.node_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_like_the_consul_cli() {
        assert_eq!(
            parse_addr("127.0.0.1:8500", false).unwrap().base,
            "http://127.0.0.1:8500"
        );
        assert_eq!(
            parse_addr("127.0.0.1:8501", true).unwrap().base,
            "https://127.0.0.1:8501"
        );
        assert_eq!(
            parse_addr("https://consul.local:8501/", false)
                .unwrap()
                .base,
            "https://consul.local:8501"
        );
        let unix = parse_addr("unix:///run/consul/http.sock", false).unwrap();
        assert_eq!(unix.socket.as_deref(), Some("/run/consul/http.sock"));
        assert!(parse_addr("ftp://x", false).is_err());
        assert!(parse_addr("unix://", false).is_err());
    }
}
