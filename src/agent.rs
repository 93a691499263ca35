//! Asking the local Consul agent how it runs, with the standard
//! `CONSUL_HTTP_*` variables the `consul` CLI honours. Liveness and the
//! Raft peers come from `/v1/status/leader` and `/v1/status/peers`, which
//! need no ACL token; `/v1/agent/self` (which needs `agent:read`) adds the
//! agent's own word on its mode when permitted, and a 403 there stops
//! nothing.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;

use crate::error::usage;

/// What the agent says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// `Config.Server`, when `/v1/agent/self` was permitted.
    pub server: Option<bool>,
    /// `Config.NodeName`, when `/v1/agent/self` was permitted.
    pub node_name: Option<String>,
    /// The Raft leader's address (`/v1/status/leader`), when there is one.
    pub leader: Option<String>,
    /// The Raft peers' addresses (`/v1/status/peers`); empty when unknown.
    pub peers: Vec<std::net::SocketAddr>,
}

impl AgentStatus {
    /// Whether the agent runs as a server: its own word when it could be
    /// read; otherwise whether `address` is among the Raft peers, or what
    /// `run` decided (`decided_server`).
    pub fn is_server(&self, address: std::net::IpAddr, decided_server: bool) -> bool {
        self.server
            .unwrap_or_else(|| decided_server || self.peers.iter().any(|p| p.ip() == address))
    }
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

/// The local agent's HTTP API, as the `consul` CLI would reach it.
struct Api {
    client: reqwest::Client,
    base: String,
    shown: String,
    token: Option<String>,
}

impl Api {
    /// [`Api::from_env`] without a token file, with `token` (when given)
    /// instead of the environment's.
    fn with_token(token: Option<&str>) -> Result<Api> {
        let mut api = Api::from_env(None)?;
        if let Some(t) = token {
            api.token = Some(t.to_string());
        }
        Ok(api)
    }

    /// `method path` (with `body` as JSON when given), within `timeout`:
    /// the answer's text on success, else an error naming the agent, the
    /// request and what Consul said.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> Result<String> {
        let what = format!("{method} {path}");
        let mut req = self.request(method, path).timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| {
            anyhow!(e).context(format!("{what} to the Consul agent at {}", self.shown))
        })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!(
                "the Consul agent at {} answered {status} to {what}: {}",
                self.shown,
                text.trim().chars().take(300).collect::<String>()
            );
        }
        Ok(text)
    }

    /// From `CONSUL_HTTP_ADDR`, `CONSUL_HTTP_SSL`, `CONSUL_CACERT`, and the
    /// token from `CONSUL_HTTP_TOKEN`, else `CONSUL_HTTP_TOKEN_FILE`, else
    /// `token_file` (the agent's own ACL token file, `--acl-token-file`).
    fn from_env(token_file: Option<&std::path::Path>) -> Result<Api> {
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
        // A client certificate, for an agent whose HTTPS listener verifies
        // incoming connections.
        match (env("CONSUL_CLIENT_CERT"), env("CONSUL_CLIENT_KEY")) {
            (Some(cert), Some(key)) => {
                let read = |path: &str, what: &str| {
                    std::fs::read(path)
                        .map_err(|e| usage(format!("cannot read {what} {path}: {e}")))
                };
                let mut pem = read(&cert, "CONSUL_CLIENT_CERT")?;
                pem.push(b'\n');
                pem.extend(read(&key, "CONSUL_CLIENT_KEY")?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    usage(format!(
                        "CONSUL_CLIENT_CERT {cert} and CONSUL_CLIENT_KEY {key} are not a PEM certificate and key: {e}"
                    ))
                })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(usage(
                    "CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY go together: set both or neither",
                ));
            }
        }
        // The name the agent's certificate is checked against, when it is
        // not the host of CONSUL_HTTP_ADDR (e.g. 127.0.0.1 and a certificate
        // for server.dc1.consul): the URL names it, and it resolves to the
        // address given.
        let mut base = addr.base.clone();
        if let Some(name) = env("CONSUL_TLS_SERVER_NAME").filter(|_| addr.socket.is_none()) {
            let mut url = url::Url::parse(&addr.base).map_err(|e| usage(e.to_string()))?;
            let port = url.port_or_known_default().unwrap_or(8501);
            let host = url.host_str().unwrap_or("127.0.0.1").to_string();
            // Every address the host has (localhost: ::1 and 127.0.0.1).
            let targets: Vec<std::net::SocketAddr> =
                std::net::ToSocketAddrs::to_socket_addrs(&(host.trim_matches(['[', ']']), port))
                    .map(|a| a.collect())
                    .unwrap_or_default();
            if targets.is_empty() {
                return Err(usage(format!(
                    "CONSUL_HTTP_ADDR host {host} does not resolve: set CONSUL_HTTP_ADDR to the agent's address (e.g. https://127.0.0.1:8501)"
                )));
            }
            url.set_host(Some(&name)).map_err(|e| {
                usage(format!(
                    "CONSUL_TLS_SERVER_NAME `{name}` is not a host name: {e}"
                ))
            })?;
            builder = builder.resolve_to_addrs(&name, &targets);
            base = url.as_str().trim_end_matches('/').to_string();
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
        let shown = addr
            .socket
            .as_ref()
            .map_or_else(|| addr.base.clone(), |s| format!("unix://{s}"));
        Ok(Api {
            client,
            base,
            shown,
            token,
        })
    }

    /// `PUT path` with a JSON body: the status and the body's text.
    async fn put_json(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<(reqwest::StatusCode, String)> {
        let resp = self
            .request(reqwest::Method::PUT, path)
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                anyhow!(e).context(format!("PUT {path} to the Consul agent at {}", self.shown))
            })?;
        let status = resp.status();
        Ok((status, resp.text().await.unwrap_or_default()))
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        req
    }
}

/// Makes the local agent leave the cluster gracefully (`PUT
/// /v1/agent/leave`, what `consul leave` does): its peers see it leave
/// instead of fail, and a server's Raft peer is removed at once.
pub async fn leave(token_file: Option<&std::path::Path>) -> Result<()> {
    leave_with(token_file, None).await
}

/// [`leave`], with `token` (when given) instead of the environment's:
/// Consul lets a token leave that has agent:write on this node
/// (agent/agent_endpoint.go, `AgentLeave`: `AgentWriteAllowed` on the
/// agent's node name), which a management token has.
pub async fn leave_with(token_file: Option<&std::path::Path>, token: Option<&str>) -> Result<()> {
    let mut api = Api::from_env(token_file)?;
    if let Some(t) = token {
        api.token = Some(t.to_string());
    }
    let shown = api.shown.clone();
    let resp = api
        .request(reqwest::Method::PUT, "/v1/agent/leave")
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| anyhow!(e).context(format!("asking the Consul agent at {shown} to leave")))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let hint = if status.as_u16() == 403 {
            ": its token needs agent:write"
        } else {
            ""
        };
        anyhow::bail!(
            "the Consul agent at {shown} answered {status} to /v1/agent/leave{hint}: {}",
            body.trim().chars().take(200).collect::<String>()
        );
    }
    Ok(())
}

/// What a join request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// The agent joined the address.
    Yes,
    /// The token lacks `agent:write`: no address will do.
    Denied,
    /// This address failed (unreachable, refused): try another.
    Failed(String),
}

/// Asks the local agent to join the gossip pool at `address` (`PUT
/// /v1/agent/join/<address>`, what `consul join` does).
pub async fn join(
    token_file: Option<&std::path::Path>,
    token: Option<&str>,
    address: std::net::IpAddr,
) -> Result<Joined> {
    join_pool(token_file, token, address, false).await
}

/// [`join`] of the LAN pool, or with `wan` of the WAN pool (`?wan=1`, what
/// `consul join -wan` sends: servers of another datacenter).
pub async fn join_pool(
    token_file: Option<&std::path::Path>,
    token: Option<&str>,
    address: std::net::IpAddr,
    wan: bool,
) -> Result<Joined> {
    let mut api = Api::from_env(token_file)?;
    if let Some(t) = token {
        api.token = Some(t.to_string());
    }
    let query = if wan { "?wan=1" } else { "" };
    let resp = api
        .request(
            reqwest::Method::PUT,
            &format!("/v1/agent/join/{address}{query}"),
        )
        .timeout(Duration::from_secs(15))
        .send()
        .await;
    Ok(match resp {
        Ok(r) if r.status().is_success() => Joined::Yes,
        Ok(r) if r.status().as_u16() == 403 => Joined::Denied,
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            Joined::Failed(format!(
                "{status}: {}",
                body.trim().chars().take(200).collect::<String>()
            ))
        }
        Err(e) => Joined::Failed(crate::error::messages(&e)),
    })
}

/// Asks the local agent for its status.
pub async fn status(token_file: Option<&std::path::Path>) -> Result<AgentStatus> {
    let api = Api::from_env(token_file)?;
    let shown = api.shown.clone();
    let get = |path: &str| api.request(reqwest::Method::GET, path).send();
    let (leader, peers, me) = tokio::join!(
        get("/v1/status/leader"),
        get("/v1/status/peers"),
        get("/v1/agent/self")
    );
    // Liveness: the leader endpoint needs no token and answers "" when
    // there is no leader yet.
    let leader = leader.map_err(|e| {
        anyhow!(e).context(format!(
            "the local Consul agent at {shown} is not answering: is consul.service running? (set CONSUL_HTTP_ADDR if it listens elsewhere)"
        ))
    })?;
    // Any answer means the agent runs: a client agent that knows no server
    // answers 500 ("No known Consul servers"), and keeps heartbeating.
    let leader: String = if leader.status().is_success() {
        leader.json().await.unwrap_or_default()
    } else {
        tracing::info!(
            "the local Consul agent at {shown} answered {} to /v1/status/leader: it runs, with no leader known",
            leader.status()
        );
        String::new()
    };
    // Peers: a client agent that knows no server answers 500; that is no
    // reason to stop the heartbeat.
    let peers: Vec<std::net::SocketAddr> = match peers {
        Ok(resp) if resp.status().is_success() => resp
            .json::<Vec<String>>()
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect(),
        Ok(resp) => {
            tracing::debug!("/v1/status/peers answered {}", resp.status());
            Vec::new()
        }
        Err(e) => {
            tracing::debug!("/v1/status/peers: {e}");
            Vec::new()
        }
    };
    let (server, node_name) = match me {
        Ok(resp) if resp.status().is_success() => match resp.json::<SelfResponse>().await {
            Ok(parsed) => (Some(parsed.config.server), Some(parsed.config.node_name)),
            Err(e) => {
                tracing::warn!(
                    "the local Consul agent at {shown} answered /v1/agent/self with something unexpected ({e}); \
                     going by /v1/status/peers and the mode `run` decided"
                );
                (None, None)
            }
        },
        Ok(resp) if resp.status().as_u16() == 403 => {
            tracing::info!(
                "/v1/agent/self needs agent:read, which this token lacks: going by /v1/status/peers and the mode `run` decided \
                 (set CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE to a token with agent:read to ask the agent itself)"
            );
            (None, None)
        }
        Ok(resp) => {
            tracing::warn!(
                "the local Consul agent at {shown} answered {} to /v1/agent/self; going by /v1/status/peers and the mode `run` decided",
                resp.status()
            );
            (None, None)
        }
        Err(e) => {
            tracing::warn!(
                "asking {shown} for /v1/agent/self failed ({e}); going by /v1/status/peers"
            );
            (None, None)
        }
    };
    Ok(AgentStatus {
        server,
        node_name,
        leader: Some(leader).filter(|l| !l.is_empty()),
        peers,
    })
}

/// The policy agents' token carries: register any node, read services
/// (what a Consul client agent needs to join and anti-entropy its node).
pub const AGENT_POLICY: &str = "auto-consul-agent";
const AGENT_RULES: &str =
    "node_prefix \"\" {\n  policy = \"write\"\n}\nservice_prefix \"\" {\n  policy = \"read\"\n}\n";

/// The policy of the DNS token (`acl.tokens.default`): read on nodes,
/// services and prepared queries, what Consul's DNS answers need
/// (agent/dns.go looks up catalog nodes, services and prepared queries
/// with it) and what anonymous discovery reads need.
pub const DNS_POLICY: &str = "auto-consul-dns";
const DNS_RULES: &str = "node_prefix \"\" {\n  policy = \"read\"\n}\nservice_prefix \"\" {\n  policy = \"read\"\n}\nquery_prefix \"\" {\n  policy = \"read\"\n}\n";

/// Makes sure the agents' token (SecretID `agent_token`, made at genesis)
/// exists in Consul, creating its policy and the token with the initial
/// management token when it does not. Idempotent across servers: Consul
/// refuses a second token with the same SecretID and a second policy with
/// the same name, and those answers count as done. Returns whether this
/// call created the token.
pub async fn ensure_agent_token(management: &str, agent_token: &str) -> Result<bool> {
    ensure_token(
        management,
        agent_token,
        AGENT_POLICY,
        Some((AGENT_RULES, "auto-consul: what the agents' token may do")),
        "auto-consul: the token agents run with",
        true,
    )
    .await
}

/// [`ensure_agent_token`] for the DNS token.
pub async fn ensure_dns_token(management: &str, dns_token: &str) -> Result<bool> {
    ensure_token(
        management,
        dns_token,
        DNS_POLICY,
        Some((
            DNS_RULES,
            "auto-consul: what DNS and requests without a token may read",
        )),
        "auto-consul: the DNS (default) token",
        // Global: a request this datacenter forwards to another (a DNS
        // query for `<name>.service.<dc>.<domain>`, `?dc=`, a prepared
        // query's failover) carries it, and is resolved there.
        false,
    )
    .await
}

/// Makes sure a management token with SecretID `secret` (a rotation's new
/// generation) exists in Consul: linked to the built-in
/// `global-management` policy, as the initial management token is
/// (agent/consul/leader.go, `initializeACLs`).
pub async fn ensure_management_token(management: &str, secret: &str, local: bool) -> Result<bool> {
    ensure_token(
        management,
        secret,
        "global-management",
        None,
        "auto-consul: the management token (a rotation's new generation)",
        local,
    )
    .await
}

/// A secondary datacenter's management token (SecretID `secret`, made at
/// its genesis), made with the primary's replication token (acl:write):
/// linked to `global-management`, local to the datacenter that makes it
/// (a secondary's Consul makes no initial management token).
pub async fn ensure_local_management_token(replication: &str, secret: &str) -> Result<bool> {
    ensure_management_token(replication, secret, true).await
}

/// The policy of the ACL replication token a primary's servers make.
pub const REPLICATION_POLICY: &str = "auto-consul-replication";
/// What a secondary's servers replicate with, as Consul's federation guide
/// gives it (docs: secure/acl/token/replication): acl:write (tokens and
/// policies), operator:write (proxy-defaults, and the secondary's Connect
/// CA signing), service and intention read (service-defaults, intentions).
pub const REPLICATION_RULES: &str = "acl = \"write\"\noperator = \"write\"\nservice_prefix \"\" {\n  policy = \"read\"\n  intentions = \"read\"\n}\n";

/// Makes sure the ACL replication token (SecretID `secret`) exists in
/// Consul, global (every datacenter resolves it), with its policy.
pub async fn ensure_replication_token(management: &str, secret: &str) -> Result<bool> {
    ensure_token(
        management,
        secret,
        REPLICATION_POLICY,
        Some((
            REPLICATION_RULES,
            "auto-consul: what secondary datacenters' servers replicate ACLs with",
        )),
        "auto-consul: the ACL replication token of secondary datacenters",
        false,
    )
    .await
}

/// The name of node `node`'s own policy.
pub fn node_policy(node: &str) -> String {
    format!("auto-consul-node-{node}")
}

/// What node `node`'s own token may do: what Consul's node identity grants
/// (`node "<node>"` write, `service_prefix ""` read: acl/policy_templates
/// and structs.ACLNodeIdentity's synthetic policy) and `agent "<node>"`
/// write, which its agent's leave and join endpoints check
/// (agent/agent_endpoint.go, `AgentLeave`, `AgentJoin`:
/// `AgentWriteAllowed(NodeName)`). Nothing about any other node.
pub fn node_rules(node: &str) -> String {
    format!(
        "node \"{node}\" {{\n  policy = \"write\"\n}}\nagent \"{node}\" {{\n  policy = \"write\"\n}}\nservice_prefix \"\" {{\n  policy = \"read\"\n}}\n"
    )
}

/// Makes sure node `node`'s own token (SecretID `secret`) exists in Consul,
/// with its own policy ([`node_rules`]); made with the management token.
/// Returns whether this call created the token.
pub async fn ensure_node_token(management: &str, node: &str, secret: &str) -> Result<bool> {
    ensure_token(
        management,
        secret,
        &node_policy(node),
        Some((
            &node_rules(node),
            "auto-consul: what one node's own token may do",
        )),
        &format!("auto-consul: the token of node {node}"),
        true,
    )
    .await
}

/// Deletes node `node`'s own token (SecretID `secret`) and its policy; each
/// already gone counts as deleted.
pub async fn delete_node_token(management: &str, node: &str, secret: &str) -> Result<()> {
    delete_token(management, secret).await?;
    let api = Api::with_token(Some(management))?;
    let name = node_policy(node);
    let resp = api
        .request(reqwest::Method::GET, &format!("/v1/acl/policy/name/{name}"))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| anyhow!(e).context(format!("asking Consul for policy {name}")))?;
    if resp.status().as_u16() == 404 || resp.status().as_u16() == 403 {
        return Ok(());
    }
    let text = resp.text().await.unwrap_or_default();
    let Some(id) = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["ID"].as_str().map(str::to_string))
    else {
        return Ok(());
    };
    api.call(
        reqwest::Method::DELETE,
        &format!("/v1/acl/policy/{id}"),
        None,
        Duration::from_secs(30),
    )
    .await
    .map(|_| ())
}

/// A token with SecretID `secret` linked to policy `policy` (made first
/// from `rules` and its description, when given), made with the management
/// token unless it exists.
async fn ensure_token(
    management: &str,
    secret: &str,
    policy: &str,
    rules: Option<(&str, &str)>,
    token_description: &str,
    local: bool,
) -> Result<bool> {
    let mut api = Api::from_env(None)?;
    let shown = api.shown.clone();
    api.token = Some(secret.to_string());
    let me = api
        .request(reqwest::Method::GET, "/v1/acl/token/self")
        .send()
        .await
        .map_err(|e| {
            anyhow!(e).context(format!(
                "asking the Consul agent at {shown} for the token of policy {policy}"
            ))
        })?;
    if me.status().is_success() {
        return Ok(false);
    }
    api.token = Some(management.to_string());
    if let Some((rules, policy_description)) = rules {
        let (status, text) = api
            .put_json(
                "/v1/acl/policy",
                serde_json::json!({
                    "Name": policy,
                    "Description": policy_description,
                    "Rules": rules,
                }),
            )
            .await?;
        if !status.is_success() && !text.contains("already exists") {
            anyhow::bail!(
                "the Consul agent answered {status} to PUT /v1/acl/policy: {}",
                text.trim().chars().take(200).collect::<String>()
            );
        }
    }
    let (status, text) = api
        .put_json(
            "/v1/acl/token",
            serde_json::json!({
                "SecretID": secret,
                "Description": token_description,
                "Policies": [{ "Name": policy }],
                "Local": local,
            }),
        )
        .await?;
    if status.is_success() {
        return Ok(true);
    }
    if text.contains("already in use") || text.contains("already exists") {
        return Ok(false);
    }
    anyhow::bail!(
        "the Consul agent answered {status} to PUT /v1/acl/token: {}",
        text.trim().chars().take(200).collect::<String>()
    )
}

/// Deletes the ACL token whose SecretID is `secret` (its AccessorID found
/// with the token itself: `GET /v1/acl/token/self`; then `DELETE
/// /v1/acl/token/<accessor>` with the management token). A token already
/// gone counts as deleted.
pub async fn delete_token(management: &str, secret: &str) -> Result<()> {
    let mut api = Api::from_env(None)?;
    let shown = api.shown.clone();
    api.token = Some(secret.to_string());
    let me = api
        .request(reqwest::Method::GET, "/v1/acl/token/self")
        .send()
        .await
        .map_err(|e| {
            anyhow!(e).context(format!("asking the Consul agent at {shown} for a token"))
        })?;
    let status = me.status();
    let text = me.text().await.unwrap_or_default();
    if status.as_u16() == 403 && text.contains("ACL not found") {
        return Ok(());
    }
    if !status.is_success() {
        anyhow::bail!(
            "the Consul agent at {shown} answered {status} to GET /v1/acl/token/self: {}",
            text.trim().chars().take(200).collect::<String>()
        );
    }
    let accessor = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["AccessorID"].as_str().map(str::to_string))
        .context("the token has no AccessorID")?;
    api.token = Some(management.to_string());
    api.call(
        reqwest::Method::DELETE,
        &format!("/v1/acl/token/{accessor}"),
        None,
        Duration::from_secs(30),
    )
    .await
    .map(|_| ())
}

/// The datacenters Consul knows (`GET /v1/catalog/datacenters`: this one
/// and every one its servers reach over the WAN; Consul asks no ACL for
/// it, agent/consul/catalog_endpoint.go `ListDatacenters`).
pub async fn datacenters() -> Result<Vec<String>> {
    let text = Api::from_env(None)?
        .call(
            reqwest::Method::GET,
            "/v1/catalog/datacenters",
            None,
            Duration::from_secs(10),
        )
        .await?;
    serde_json::from_str(&text).context("the datacenter list is not Consul's JSON")
}

/// Whether autopilot reports the whole cluster healthy (`GET
/// /v1/operator/autopilot/health`, `Healthy`: every server healthy and,
/// with Consul's defaults, stable for `server_stabilization_time`; Consul
/// answers 429 with the same body when it is not:
/// agent/operator_endpoint.go). Needs operator:read with ACLs on.
pub async fn autopilot_healthy(token: Option<&str>) -> Result<bool> {
    Ok(autopilot_report(token).await?["Healthy"].as_bool() == Some(true))
}

/// Autopilot's health report, 200 or 429 alike.
async fn autopilot_report(token: Option<&str>) -> Result<serde_json::Value> {
    let api = Api::with_token(token)?;
    let shown = api.shown.clone();
    let resp = api
        .request(reqwest::Method::GET, "/v1/operator/autopilot/health")
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| {
            anyhow!(e).context(format!(
                "asking the Consul agent at {shown} for autopilot's health"
            ))
        })?;
    let status = resp.status();
    if !(status.is_success() || status.as_u16() == 429) {
        let body = resp.text().await.unwrap_or_default();
        let hint = if status.as_u16() == 403 {
            ": its token needs operator:read"
        } else {
            ""
        };
        anyhow::bail!(
            "the Consul agent at {shown} answered {status} to /v1/operator/autopilot/health{hint}: {}",
            body.trim().chars().take(200).collect::<String>()
        );
    }
    resp.json()
        .await
        .context("autopilot's health report is not JSON")
}

/// This server's entry in autopilot's health report (`GET
/// /v1/operator/autopilot/health`; Consul answers 429 with the same body
/// while the cluster is unhealthy): whether it is healthy and a voter.
/// `None` when the report does not list it yet. Needs operator:read with
/// ACLs on.
pub async fn autopilot_self(
    token: Option<&str>,
    node: &str,
    address: std::net::IpAddr,
) -> Result<Option<(bool, bool)>> {
    let report = autopilot_report(token).await?;
    let me = report["Servers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| {
            s["Name"].as_str() == Some(node)
                || s["Address"]
                    .as_str()
                    .and_then(|a| a.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])))
                    .and_then(|h| h.parse::<std::net::IpAddr>().ok())
                    == Some(address)
        });
    Ok(me.map(|s| {
        (
            s["Healthy"].as_bool().unwrap_or(false),
            s["Voter"].as_bool().unwrap_or(false),
        )
    }))
}

/// How long a snapshot may take to stream either way (gigabytes).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Saves a snapshot of the servers' state (`GET /v1/snapshot`, what
/// `consul snapshot save` does; forwarded to the leader) into `dest`,
/// streamed and hashed. `token`: a management token when ACLs are on
/// (else the `CONSUL_HTTP_TOKEN*` one).
pub async fn save_snapshot(
    token: Option<&str>,
    dest: &std::path::Path,
) -> Result<crate::spool::Spooled> {
    let api = Api::with_token(token)?;
    let shown = api.shown.clone();
    let mut resp = api
        .request(reqwest::Method::GET, "/v1/snapshot")
        .timeout(SNAPSHOT_TIMEOUT)
        .send()
        .await
        .map_err(|e| {
            anyhow!(e).context(format!("asking the Consul agent at {shown} for a snapshot"))
        })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(snapshot_refused(resp, &shown, "GET").await);
    }
    let mut spool = crate::spool::Spool::create(dest).await?;
    while let Some(chunk) = resp
        .chunk()
        .await
        .with_context(|| format!("reading the snapshot from {shown}"))?
    {
        spool.write(&chunk).await?;
    }
    let saved = spool.finish().await?;
    if saved.size == 0 {
        anyhow::bail!("the Consul agent at {shown} sent an empty snapshot");
    }
    Ok(saved)
}

/// Restores `file` into the servers (`PUT /v1/snapshot`, what `consul
/// snapshot restore` does): Consul's whole state is replaced by it.
pub async fn restore_snapshot(token: Option<&str>, file: &crate::spool::Spooled) -> Result<()> {
    let api = Api::with_token(token)?;
    let shown = api.shown.clone();
    let body = tokio::fs::File::open(&file.path)
        .await
        .with_context(|| format!("opening {}", file.path.display()))?;
    let resp = api
        .request(reqwest::Method::PUT, "/v1/snapshot")
        .timeout(SNAPSHOT_TIMEOUT)
        .header(reqwest::header::CONTENT_LENGTH, file.size)
        .body(reqwest::Body::from(body))
        .send()
        .await
        .map_err(|e| {
            anyhow!(e).context(format!(
                "sending the snapshot to the Consul agent at {shown}"
            ))
        })?;
    if !resp.status().is_success() {
        return Err(snapshot_refused(resp, &shown, "PUT").await);
    }
    Ok(())
}

/// Consul refused a snapshot sent to it as one it cannot restore (the
/// archive fails its checks, or its state does not decode): another
/// snapshot may do, this one never will. The reasons are Consul's:
/// snapshot/snapshot.go (`failed to decompress snapshot`, `failed to read
/// snapshot file`, `unread uncompressed bytes remain`) and the FSM's
/// restore through raft (`failed to restore snapshot`).
#[derive(Debug)]
pub struct SnapshotRefused(pub String);

impl std::fmt::Display for SnapshotRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Consul refuses this snapshot: {}", self.0)
    }
}

impl std::error::Error for SnapshotRefused {}

/// What Consul answers about the snapshot itself (see [`SnapshotRefused`]).
const REFUSALS: [&str; 4] = [
    "failed to decompress snapshot",
    "failed to read snapshot file",
    "unread uncompressed bytes remain",
    "failed to restore snapshot",
];

/// Raft refuses any restore until the leader's latest configuration entry
/// is applied (hashicorp/raft raft.go, `restoreUserSnapshot`: "cannot
/// restore snapshot now, wait until the configuration entry at %v has been
/// applied"), which is true for a while after a leader is elected.
const NOT_NOW: &str = "cannot restore snapshot now";

async fn snapshot_refused(resp: reqwest::Response, shown: &str, method: &str) -> anyhow::Error {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let said = body.trim().chars().take(300).collect::<String>();
    if method == "PUT" && status.as_u16() == 500 {
        if said.contains(NOT_NOW) {
            return crate::error::soon(format!(
                "the Consul agent at {shown} cannot restore yet (a leader elected moments ago): {said}"
            ));
        }
        if REFUSALS.iter().any(|r| said.contains(r)) {
            return SnapshotRefused(said).into();
        }
    }
    let hint = match status.as_u16() {
        403 => {
            ": it needs a management token (--secrets makes one at genesis, or set CONSUL_HTTP_TOKEN)"
        }
        500 if body.contains("No cluster leader") => {
            ": there is no leader yet; try again once there is"
        }
        _ => "",
    };
    anyhow!("the Consul agent at {shown} answered {status} to {method} /v1/snapshot{hint}: {said}")
}

/// Has the local agent reload its configuration (`PUT /v1/agent/reload`,
/// what `consul reload` sends; agent:write): Consul reads its config and
/// TLS files again (agent/agent_endpoint.go `AgentReload`).
pub async fn reload(token: Option<&str>) -> Result<()> {
    Api::with_token(token)?
        .call(
            reqwest::Method::PUT,
            "/v1/agent/reload",
            None,
            Duration::from_secs(30),
        )
        .await
        .map(|_| ())
}

/// One keyring pool of `GET /v1/operator/keyring` (Consul's
/// `KeyringResponse`: the LAN pool, and the servers' WAN pool): how many
/// of its live members hold each key, and have each as primary.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct KeyringPool {
    /// The WAN pool (servers of every datacenter).
    #[serde(rename = "WAN", default)]
    pub wan: bool,
    /// Key -> members holding it.
    #[serde(rename = "Keys", default)]
    pub keys: std::collections::HashMap<String, u64>,
    /// Key -> members using it as their primary key.
    #[serde(rename = "PrimaryKeys", default)]
    pub primary_keys: std::collections::HashMap<String, u64>,
    /// Live members of the pool.
    #[serde(rename = "NumNodes", default)]
    pub num_nodes: u64,
}

/// The cluster's gossip keyrings (`GET /v1/operator/keyring`, keyring
/// read: operator:read).
pub async fn keyring(token: Option<&str>) -> Result<Vec<KeyringPool>> {
    let text = Api::with_token(token)?
        .call(
            reqwest::Method::GET,
            "/v1/operator/keyring",
            None,
            Duration::from_secs(30),
        )
        .await?;
    serde_json::from_str(&text).context("the keyring list is not Consul's JSON")
}

/// A keyring operation on every member (`POST` install, `PUT` use,
/// `DELETE` remove on `/v1/operator/keyring` with `{"Key": key}`;
/// operator:write). Consul answers 500 when a member refuses it.
pub async fn keyring_op(token: Option<&str>, method: reqwest::Method, key: &str) -> Result<()> {
    let body = serde_json::json!({ "Key": key });
    Api::with_token(token)?
        .call(
            method,
            "/v1/operator/keyring",
            Some(&body),
            Duration::from_secs(60),
        )
        .await
        .map(|_| ())
}

/// Sets autopilot's configuration (`PUT
/// /v1/operator/autopilot/configuration`, operator:write). Consul decodes
/// the body onto a zero value, not onto the current settings
/// (agent/operator_endpoint.go, `OperatorAutopilotConfiguration`): every
/// field is sent.
pub async fn set_autopilot(token: Option<&str>, config: &serde_json::Value) -> Result<()> {
    Api::with_token(token)?
        .call(
            reqwest::Method::PUT,
            "/v1/operator/autopilot/configuration",
            Some(config),
            Duration::from_secs(30),
        )
        .await
        .map(|_| ())
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
