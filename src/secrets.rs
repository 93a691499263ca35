//! Secure at genesis (DESIGN.md, "The cluster it builds is secure"): the
//! gossip key, a CA and the ACL tokens, made once by the cluster itself in a
//! secrets store, never in the S3 registry, argv, logs or `--json`.
//!
//! Each secret is written create-only (SSM `PutParameter` without
//! overwrite; a hard link for a directory) by the first server that needs
//! it, and everyone reads the winner's value: an interrupted genesis is
//! finished by whoever comes next. Names live under `<path>/<cluster id>/`,
//! split by who may read them, so one IAM statement per role says so:
//!
//! | name | made by | read by |
//! |---|---|---|
//! | `agent/gossip-key` | servers | servers, agents |
//! | `agent/ca-cert` | servers (the certificate of `server/ca`) | servers, agents |
//! | `agent/agent-token` | servers | servers, agents |
//! | `server/ca` | servers | servers |
//! | `server/management-token` | servers | servers |

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::error::usage;
use crate::model::{CaGeneration, Generation, RotationStep};

/// `--secrets`: where the cluster's secrets live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretsUrl {
    /// No store: secrets only from the files an operator names.
    None,
    /// SSM Parameter Store, SecureString parameters under this path
    /// (`/auto-consul`, no trailing `/`).
    Ssm { path: String },
    /// A directory on this host (files 0600): the local quick start, tests.
    Dir { dir: PathBuf },
}

impl SecretsUrl {
    /// Parses `none`, `ssm:///PATH` or `file:///DIR`.
    pub fn parse(s: &str) -> Result<SecretsUrl> {
        let hint = "use ssm:///PATH (SSM Parameter Store), file:///ABSOLUTE/DIR or none";
        if s == "none" {
            return Ok(SecretsUrl::None);
        }
        if let Some(rest) = s.strip_prefix("ssm://") {
            let path = rest.trim_end_matches('/');
            let ok = path.starts_with('/')
                && path.len() > 1
                && path[1..].split('/').all(|p| {
                    !p.is_empty()
                        && p.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                });
            if !ok {
                bail!(
                    "--secrets {s}: the SSM path must be /NAME[/NAME...] of letters, digits, `_`, `.` and `-`; {hint}"
                );
            }
            return Ok(SecretsUrl::Ssm {
                path: path.to_string(),
            });
        }
        if let Some(rest) = s.strip_prefix("file://") {
            if !rest.starts_with('/') || rest.len() < 2 {
                bail!("--secrets {s}: the directory must be absolute; {hint}");
            }
            return Ok(SecretsUrl::Dir {
                dir: PathBuf::from(rest),
            });
        }
        bail!("--secrets {s}: unknown scheme; {hint}")
    }
}

impl std::fmt::Display for SecretsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretsUrl::None => f.write_str("none"),
            SecretsUrl::Ssm { path } => write!(f, "ssm://{path}"),
            SecretsUrl::Dir { dir } => write!(f, "file://{}", dir.display()),
        }
    }
}

/// One secret of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Secret {
    /// Consul's gossip key: 32 random bytes, base64.
    GossipKey,
    /// The CA's certificate (PEM), without its key.
    CaCert,
    /// The SecretID of the token agents run with (node write, service read).
    AgentToken,
    /// The CA: certificate and key (PEM) in one value.
    Ca,
    /// `acl.tokens.initial_management`.
    ManagementToken,
    /// The SecretID of the token DNS and anonymous discovery run with
    /// (`acl.tokens.default`: read on nodes, services, prepared queries).
    DnsToken,
}

impl Secret {
    /// Every secret, in the order a server makes them (the CA before its
    /// certificate).
    pub const ALL: [Secret; 6] = [
        Secret::GossipKey,
        Secret::Ca,
        Secret::CaCert,
        Secret::ManagementToken,
        Secret::AgentToken,
        Secret::DnsToken,
    ];

    /// The name under the cluster's path.
    pub fn rel(self) -> &'static str {
        match self {
            Secret::GossipKey => "agent/gossip-key",
            Secret::CaCert => "agent/ca-cert",
            Secret::AgentToken => "agent/agent-token",
            Secret::Ca => "server/ca",
            Secret::ManagementToken => "server/management-token",
            Secret::DnsToken => "agent/dns-token",
        }
    }

    /// The short name `auto-consul secrets get` takes.
    pub fn short(self) -> &'static str {
        self.rel().rsplit('/').next().unwrap_or_default()
    }

    /// Whether agents read it (the rest is for servers only).
    pub fn for_agents(self) -> bool {
        self.rel().starts_with("agent/")
    }

    /// Checks a value read from the store; says why it is not one.
    fn check(self, value: &str) -> Result<(), String> {
        match self {
            Secret::GossipKey => check_gossip_key(value),
            Secret::AgentToken | Secret::ManagementToken | Secret::DnsToken => {
                uuid::Uuid::parse_str(value)
                    .map(|_| ())
                    .map_err(|_| "is not a token (a UUID)".to_string())
            }
            Secret::CaCert => split_ca(value)
                .filter(|(_, key)| key.is_none())
                .map(|_| ())
                .ok_or_else(|| "is not one PEM certificate".to_string()),
            Secret::Ca => {
                let (cert, key) = split_ca(value)
                    .ok_or_else(|| "is not a PEM certificate and key".to_string())?;
                let key = key.ok_or_else(|| "has no PEM private key".to_string())?;
                let key = KeyPair::from_pem(&key).map_err(|e| format!("has a bad key: {e}"))?;
                Issuer::from_ca_cert_pem(&cert, key)
                    .map(|_| ())
                    .map_err(|e| format!("has a bad certificate: {e}"))
            }
        }
    }
}

/// Consul's own check of `encrypt` (agent/config/builder.go decodes it
/// with Go's standard base64; memberlist's keyring takes 16, 24 or 32
/// bytes: AES-128, -192 or -256). Says why a key fails, never the key.
pub fn check_gossip_key(key: &str) -> Result<(), String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| "is not base64 (standard alphabet, with padding)".to_string())?;
    match bytes.len() {
        16 | 24 | 32 => Ok(()),
        n => Err(format!("decodes to {n} bytes, not 16, 24 or 32")),
    }
}

/// The certificate (PEM) of a CA value (certificate and key).
pub fn ca_certificate_of(ca: &str) -> Option<String> {
    split_ca(ca)
        .filter(|(_, key)| key.is_some())
        .map(|(cert, _)| cert)
}

/// A value's PEM certificate and, if any, its PEM private key.
fn split_ca(value: &str) -> Option<(String, Option<String>)> {
    let block = |begin: &str, end: &str| -> Option<String> {
        let start = value.find(begin)?;
        let stop = value[start..].find(end)? + start + end.len();
        Some(format!("{}\n", &value[start..stop]))
    };
    let cert = block("-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----")?;
    if value.matches("-----BEGIN CERTIFICATE-----").count() != 1 {
        return None;
    }
    let key = block("-----BEGIN PRIVATE KEY-----", "-----END PRIVATE KEY-----");
    Some((cert, key))
}

/// A secrets store: create-only writes, reads of the winner.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// The value of `name` (relative: `<cluster>/agent/gossip-key`), if any.
    async fn get(&self, name: &str) -> Result<Option<String>>;
    /// Writes `name` only if it does not exist; whether this call wrote it.
    async fn create(&self, name: &str, value: &str) -> Result<bool>;
    /// [`SecretStore::create`], for one EC2 instance only: in SSM the
    /// parameter is tagged `auto-consul:instance` = `owner` (the instance's
    /// ARN), which the module's agent policy matches against the caller's
    /// `ec2:SourceInstanceARN`; a directory has no such rule.
    async fn create_owned(&self, name: &str, value: &str, owner: &str) -> Result<bool> {
        let _ = owner;
        self.create(name, value).await
    }
    /// Deletes `name`; whether it existed.
    async fn delete(&self, name: &str) -> Result<bool>;
    /// What an operator looks for: the full parameter name or file path.
    fn shown(&self, name: &str) -> String;
}

/// A store `plan` reads: every write is refused, naming what `run` would
/// make (plan makes nothing).
pub struct ReadOnly(pub Box<dyn SecretStore>);

#[async_trait]
impl SecretStore for ReadOnly {
    async fn get(&self, name: &str) -> Result<Option<String>> {
        self.0.get(name).await
    }
    async fn create(&self, name: &str, _value: &str) -> Result<bool> {
        bail!(
            "secret {} is not made yet: `run` makes it (plan makes nothing)",
            self.0.shown(name)
        )
    }
    async fn delete(&self, name: &str) -> Result<bool> {
        bail!("plan deletes nothing (secret {})", self.0.shown(name))
    }
    fn shown(&self, name: &str) -> String {
        self.0.shown(name)
    }
}

/// Opens the store `url` names (`None` for `none`).
pub async fn open(url: &SecretsUrl) -> Result<Option<Box<dyn SecretStore>>> {
    open_in(url, None).await
}

/// [`open`], an SSM store in `region` when given (another cluster's: a
/// federated primary's).
pub async fn open_in(
    url: &SecretsUrl,
    region: Option<&str>,
) -> Result<Option<Box<dyn SecretStore>>> {
    Ok(match url {
        SecretsUrl::None => None,
        SecretsUrl::Dir { dir } => Some(Box::new(DirStore { dir: dir.clone() })),
        SecretsUrl::Ssm { path } => {
            let config = crate::aws::load_in(region).await?;
            Some(Box::new(SsmStore {
                client: aws_sdk_ssm::Client::new(&config),
                path: path.clone(),
            }))
        }
    })
}

struct SsmStore {
    client: aws_sdk_ssm::Client,
    path: String,
}

/// The store refused access (IAM). Where a policy grants a read under a
/// condition on the parameter's tags, AWS refuses a parameter that does not
/// exist too (it has no tag to match), so for a node's own token this is
/// also what "not made yet" looks like.
#[derive(Debug)]
pub struct Denied(String);

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Denied {}

/// An SSM error as one line: the parameter, the action, and for a denial
/// the IAM permission it needs.
fn ssm_error<E>(err: aws_sdk_ssm::error::SdkError<E>, action: &str, name: &str) -> anyhow::Error
where
    E: aws_sdk_ssm::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    use aws_sdk_ssm::error::ProvideErrorMetadata;
    let code = err.code().unwrap_or_default().to_string();
    if code.contains("AccessDenied") {
        return anyhow::Error::new(Denied(format!(
            "access to SSM parameter {name} denied: this instance's role needs ssm:{action} on it \
             (and kms:Decrypt with the key that encrypts it); see docs/deploy.md"
        )));
    }
    anyhow!(
        "SSM {action} of parameter {name} failed: {}",
        crate::error::messages(&err)
    )
}

#[async_trait]
impl SecretStore for SsmStore {
    async fn get(&self, name: &str) -> Result<Option<String>> {
        let full = self.shown(name);
        match self
            .client
            .get_parameter()
            .name(&full)
            .with_decryption(true)
            .send()
            .await
        {
            Ok(out) => Ok(out.parameter().and_then(|p| p.value()).map(str::to_string)),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_parameter_not_found()) =>
            {
                Ok(None)
            }
            Err(e) => Err(ssm_error(e, "GetParameter", &full)),
        }
    }

    async fn create(&self, name: &str, value: &str) -> Result<bool> {
        self.put(name, value, None).await
    }

    async fn create_owned(&self, name: &str, value: &str, owner: &str) -> Result<bool> {
        self.put(name, value, Some(owner)).await
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        let full = self.shown(name);
        match self.client.delete_parameter().name(&full).send().await {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_parameter_not_found()) =>
            {
                Ok(false)
            }
            Err(e) => Err(ssm_error(e, "DeleteParameter", &full)),
        }
    }

    fn shown(&self, name: &str) -> String {
        format!("{}/{name}", self.path)
    }
}

impl SsmStore {
    /// PutParameter without overwrite (create-only), tagged with `owner`.
    async fn put(&self, name: &str, value: &str, owner: Option<&str>) -> Result<bool> {
        let full = self.shown(name);
        let tags = owner
            .map(|o| {
                aws_sdk_ssm::types::Tag::builder()
                    .key(OWNER_TAG)
                    .value(o)
                    .build()
            })
            .transpose()?;
        match self
            .client
            .put_parameter()
            .name(&full)
            .value(value)
            .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
            .overwrite(false)
            .description("Made by auto-consul; do not edit")
            .set_tags(tags.map(|t| vec![t]))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_parameter_already_exists()) =>
            {
                Ok(false)
            }
            Err(e) => Err(ssm_error(e, "PutParameter", &full)),
        }
    }
}

/// The tag naming the one EC2 instance (its ARN) that may read a node's
/// token parameter.
pub const OWNER_TAG: &str = "auto-consul:instance";

struct DirStore {
    dir: PathBuf,
}

#[async_trait]
impl SecretStore for DirStore {
    async fn get(&self, name: &str) -> Result<Option<String>> {
        let path = self.dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("reading secret {}", path.display()))),
        }
    }

    async fn create(&self, name: &str, value: &str) -> Result<bool> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let path = self.dir.join(name);
        let parent = path.parent().context("a secret's path has a parent")?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        // Written whole under a temporary name, then linked to its name:
        // a link fails if the name exists, so the first writer wins and
        // nobody reads a half-written value.
        let tmp = parent.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(value.as_bytes())?;
        f.sync_all()?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(anyhow!(e).context(format!("creating secret {}", path.display()))),
        }
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        let path = self.dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(anyhow!(e).context(format!("deleting secret {}", path.display()))),
        }
    }

    fn shown(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// The name of node `instance_id`'s own token (a UUID: its Consul runs with
/// it as `acl.tokens.agent`), which only that instance may read.
pub fn node_token_name(cluster: &str, instance_id: &str) -> String {
    format!("{cluster}/node/{instance_id}")
}

/// The secrets a node runs with; agents get no CA key and no management
/// token.
#[derive(Clone)]
pub struct Material {
    /// The primary gossip key (`encrypt`).
    pub gossip_key: String,
    /// During a rotation, the other gossip key the node's keyring holds.
    pub gossip_other: Option<String>,
    /// The CA certificates this node trusts (PEM, one or, during a
    /// rotation of the CA, two): its CA file.
    pub ca_cert: String,
    /// The certificate of the CA servers are signed with now (`ca_key`'s).
    pub signing_ca_cert: String,
    pub agent_token: String,
    /// The DNS (default) token's SecretID.
    pub dns_token: String,
    /// Servers only: the CA's key, to sign their certificates.
    pub ca_key: Option<String>,
    /// Servers only.
    pub management_token: Option<String>,
    /// This node's own token (`--instance-tag`), once the leader made it:
    /// its Consul runs with it instead of `agent_token`.
    pub node_token: Option<String>,
}

impl Material {
    /// The token this node's Consul runs with as `acl.tokens.agent`.
    pub fn agent_token_in_use(&self) -> &str {
        self.node_token.as_deref().unwrap_or(&self.agent_token)
    }
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Material { .. }")
    }
}

/// Generation `generation` of cluster `cluster`'s management token (1:
/// the one made at genesis), if it exists; nothing is made (the cluster
/// may be gone).
pub async fn management_token(
    store: &dyn SecretStore,
    cluster: &str,
    generation: u32,
) -> Result<Option<String>> {
    let name = generation_name(cluster, Secret::ManagementToken, generation);
    Ok(store.get(&name).await?.map(|v| v.trim().to_string()))
}

/// Reads (agents) or makes-then-reads (servers) cluster `cluster`'s
/// secrets. Servers finish whatever an interrupted genesis left undone; an
/// agent whose secrets the servers have not made yet fails (exit 1: the
/// boot unit tries again).
pub async fn genesis(store: &dyn SecretStore, cluster: &str, server: bool) -> Result<Material> {
    genesis_with(store, cluster, server, Generations::default()).await
}

/// [`genesis`] by a server at the genesis of cluster `cluster`; with
/// `fresh` (a cluster id this node has just drawn, which no secret can
/// name yet) nothing is read first: every secret is made at once
/// (create-only, a loser reading the winner's value all the same).
pub async fn genesis_fresh(
    store: &dyn SecretStore,
    cluster: &str,
    fresh: bool,
) -> Result<Material> {
    if fresh {
        genesis_inner(store, cluster, true, Generations::default(), false).await
    } else {
        genesis(store, cluster, true).await
    }
}

/// The name of generation `generation` of `secret`: 1 is the one made at
/// genesis, `<name>.<n>` the one the n-th rotation made.
pub fn generation_name(cluster: &str, secret: Secret, generation: u32) -> String {
    if generation <= 1 {
        format!("{cluster}/{}", secret.rel())
    } else {
        format!("{cluster}/{}.{generation}", secret.rel())
    }
}

/// The generations of the gossip key a node writes under `gossip` (the
/// cluster record's): the primary one (`encrypt`), and during a rotation
/// the other, which its keyring holds too: the new one while it is being
/// installed, the old one once the new one is in use.
pub fn gossip_generations(gossip: Generation) -> (u32, Option<u32>) {
    let g = gossip.generation;
    match gossip.rotation {
        None => (g, None),
        Some(RotationStep::Install) => (g, Some(g + 1)),
        Some(RotationStep::Use) => (g + 1, Some(g)),
        Some(RotationStep::Remove) => (g, Some(g.saturating_sub(1).max(1))),
    }
}

/// The generations of a cluster's secrets a node runs with, by the
/// cluster record (rotations move them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Generations {
    /// The gossip key's.
    pub gossip: Generation,
    /// The agents' token's generation nodes run with.
    pub agent_token: u32,
    /// The CA's.
    pub ca: CaGeneration,
    /// The management token's a server runs with (0 or 1: generation 1).
    pub management_token: u32,
    /// Every node runs with its own token; the shared one is deleted.
    pub per_node: bool,
}

impl Generations {
    /// What `record` says (the defaults for another cluster's record or
    /// none).
    pub fn of(record: Option<&crate::model::ClusterRecord>) -> Generations {
        let Some(r) = record else {
            return Generations::default();
        };
        Generations {
            gossip: r.gossip_key.unwrap_or_default(),
            agent_token: r.agent_token.unwrap_or_default().for_nodes(),
            ca: r.ca.unwrap_or_default(),
            management_token: r.management_token.clone().unwrap_or_default().for_boot(),
            per_node: r.agent_token.is_some_and(|t| t.per_node),
        }
    }
}

/// [`genesis`], reading the generations `gens` says (the gossip key's two
/// during its rotation, the CA certificates a node trusts during the CA's),
/// in the same round of reads.
pub async fn genesis_with(
    store: &dyn SecretStore,
    cluster: &str,
    server: bool,
    gens: Generations,
) -> Result<Material> {
    genesis_inner(store, cluster, server, gens, true).await
}

async fn genesis_inner(
    store: &dyn SecretStore,
    cluster: &str,
    server: bool,
    gens: Generations,
    read_first: bool,
) -> Result<Material> {
    let (primary, other) = gossip_generations(gens.gossip);
    let agent_token = gens.agent_token.max(1);
    let signing = gens.ca.signing();
    let trusted = gens.ca.trusted();
    let name = |s: Secret| match s {
        Secret::GossipKey => generation_name(cluster, s, primary),
        Secret::AgentToken => generation_name(cluster, s, agent_token),
        Secret::Ca | Secret::CaCert => generation_name(cluster, s, signing),
        Secret::ManagementToken => generation_name(cluster, s, gens.management_token),
        _ => format!("{cluster}/{}", s.rel()),
    };
    // The other CA a node trusts during a rotation of the CA.
    let extra_ca = trusted.iter().copied().find(|t| *t != signing);
    let extra_ca_name = extra_ca.map(|g| generation_name(cluster, Secret::CaCert, g));
    let extra_ca_read = async {
        match &extra_ca_name {
            Some(n) => store.get(n).await,
            None => Ok(None),
        }
    };
    let other_name = other.map(|g| generation_name(cluster, Secret::GossipKey, g));
    let other_read = async {
        match &other_name {
            Some(n) => store.get(n).await,
            None => Ok(None),
        }
    };
    let wanted: Vec<Secret> = Secret::ALL
        .into_iter()
        .filter(|s| server || s.for_agents())
        .collect();
    // Every read at once: one round trip when the secrets exist (every
    // boot but the first).
    let (read, other_value, extra_ca_value) = futures::future::try_join3(
        futures::future::try_join_all(wanted.iter().map(|s| {
            let n = name(*s);
            async move {
                if read_first {
                    store.get(&n).await
                } else {
                    Ok(None)
                }
            }
        })),
        other_read,
        extra_ca_read,
    )
    .await?;
    let extra_ca_cert = match (&extra_ca_name, extra_ca_value) {
        (None, _) => None,
        (Some(n), Some(v)) => {
            let v = v.trim().to_string() + "\n";
            Secret::CaCert.check(&v).map_err(|why| {
                usage(format!(
                    "secret {} {why}: a rotation made it",
                    store.shown(n)
                ))
            })?;
            Some(v)
        }
        (Some(n), None) => bail!(
            "secret {} is missing, and the cluster record says a rotation of the CA uses it",
            store.shown(n)
        ),
    };
    let gossip_other = match (&other_name, other_value) {
        (None, _) => None,
        (Some(n), Some(v)) => {
            let v = v.trim().to_string();
            check_gossip_key(&v).map_err(|why| {
                usage(format!(
                    "secret {} {why}: a rotation made it; write a valid one",
                    store.shown(n)
                ))
            })?;
            Some(v)
        }
        (Some(n), None) => bail!(
            "secret {} is missing, and the cluster record says a rotation uses it: \
             `auto-consul secrets rotate gossip-key` makes it again",
            store.shown(n)
        ),
    };
    // Only genesis makes generation 1; a later one is a rotation's.
    for (secret, generation) in [
        (Secret::GossipKey, primary),
        (Secret::AgentToken, agent_token),
        (Secret::CaCert, signing),
        (Secret::Ca, signing),
        (Secret::ManagementToken, gens.management_token),
    ] {
        if generation > 1
            && wanted.contains(&secret)
            && !read
                .iter()
                .zip(&wanted)
                .any(|(v, s)| *s == secret && v.is_some())
        {
            bail!(
                "secret {} is missing, and the cluster record says the cluster uses it",
                store.shown(&name(secret))
            );
        }
    }
    let mut values: std::collections::HashMap<Secret, String> = wanted
        .iter()
        .zip(read)
        .filter_map(|(s, v)| v.map(|v| (*s, v)))
        .collect();
    if let Some(missing) = wanted.iter().find(|s| !values.contains_key(s))
        && !server
    {
        bail!(
            "secret {} of cluster {cluster} is not made yet: the cluster's servers make it at genesis; \
             an agent waits for them (the boot unit tries again)",
            store.shown(&name(*missing))
        );
    }
    // A server makes what is missing: the CA's certificate after the CA
    // (it is the CA's own), the rest at once. Each create is create-only:
    // a loser reads the winner's value.
    let make = |secret: Secret, fresh: String| {
        let n = name(secret);
        async move {
            if store.create(&n, &fresh).await? {
                tracing::info!("made {} for cluster {cluster}", store.shown(&n));
                return Ok::<_, anyhow::Error>((secret, fresh));
            }
            let theirs = store.get(&n).await?.ok_or_else(|| {
                anyhow!(
                    "{} exists (it could not be created) but cannot be read",
                    store.shown(&n)
                )
            })?;
            Ok((secret, theirs))
        }
    };
    if server {
        let mut first = Vec::new();
        for secret in [
            Secret::GossipKey,
            Secret::Ca,
            Secret::ManagementToken,
            Secret::AgentToken,
            Secret::DnsToken,
        ] {
            if !values.contains_key(&secret) {
                let fresh = match secret {
                    Secret::GossipKey => new_gossip_key(),
                    Secret::Ca => new_ca(cluster)?,
                    _ => uuid::Uuid::new_v4().to_string(),
                };
                // A cluster id no one else knows: the CA this node makes is
                // the one, and its certificate is made in the same round.
                if secret == Secret::Ca && !read_first {
                    let cert = split_ca(&fresh)
                        .map(|c| c.0)
                        .expect("a CA made here parses");
                    first.push(make(Secret::CaCert, cert));
                }
                first.push(make(secret, fresh));
            }
        }
        values.extend(futures::future::try_join_all(first).await?);
        if !values.contains_key(&Secret::CaCert) {
            let ca = &values[&Secret::Ca];
            let cert = split_ca(ca).map(|c| c.0).ok_or_else(|| {
                usage(format!(
                    "secret {} is not a PEM certificate and key: delete it so the cluster's servers make it again",
                    store.shown(&name(Secret::Ca))
                ))
            })?;
            let (s, v) = make(Secret::CaCert, cert).await?;
            values.insert(s, v);
        }
    }
    for secret in &wanted {
        let value = values.get_mut(secret).expect("read or made");
        *value = value.trim().to_string()
            + if matches!(secret, Secret::Ca | Secret::CaCert) {
                "\n"
            } else {
                ""
            };
        secret.check(value).map_err(|why| {
            usage(format!(
                "secret {} {why}: delete it so the cluster's servers make it again, or write a valid one",
                store.shown(&name(*secret))
            ))
        })?;
    }
    if server {
        // The certificate agents read must be the CA's own.
        let ca = &values[&Secret::Ca];
        let cert = &values[&Secret::CaCert];
        if split_ca(ca).map(|c| c.0).as_deref() != Some(cert.as_str()) {
            return Err(usage(format!(
                "secret {} is not the certificate of {}: delete it so the servers make it again",
                store.shown(&name(Secret::CaCert)),
                store.shown(&name(Secret::Ca))
            )));
        }
    }
    let mut take = |s: Secret| values.remove(&s);
    let ca_key = take(Secret::Ca).and_then(|ca: String| split_ca(&ca).and_then(|c| c.1));
    let signing_ca_cert = take(Secret::CaCert).expect("read");
    // The CA file: every CA trusted now, in generation order.
    let ca_cert = trusted
        .iter()
        .map(|g| {
            if *g == signing {
                signing_ca_cert.clone()
            } else {
                extra_ca_cert.clone().unwrap_or_default()
            }
        })
        .collect::<String>();
    Ok(Material {
        gossip_other,
        gossip_key: take(Secret::GossipKey).expect("read"),
        ca_cert,
        signing_ca_cert,
        agent_token: take(Secret::AgentToken).expect("read"),
        dns_token: take(Secret::DnsToken).expect("read"),
        ca_key,
        management_token: take(Secret::ManagementToken),
        node_token: None,
    })
}

/// A new gossip key: 32 random bytes, base64.
pub fn new_gossip_key() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand_bytes();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// 32 bytes from the operating system's random source (two v4 UUIDs are
/// 244 random bits; the OS source directly is simpler to reason about).
fn rand_bytes() -> [u8; 32] {
    let mut out = [0u8; 32];
    getrandom::fill(&mut out).expect("the OS random source");
    out
}

/// A new CA for cluster `cluster`: ECDSA P-256, ten years, PEM certificate
/// then PEM key.
fn new_ca(cluster: &str) -> Result<String> {
    new_ca_generation(cluster, 1)
}

/// A new CA of generation `generation` (a rotation's: its name says it, so
/// that two CAs trusted together are told apart).
pub fn new_ca_generation(cluster: &str, generation: u32) -> Result<String> {
    let key = KeyPair::generate().context("making the CA key")?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name.push(
        DnType::CommonName,
        if generation > 1 {
            format!("auto-consul CA {cluster} generation {generation}")
        } else {
            format!("auto-consul CA {cluster}")
        },
    );
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params.self_signed(&key).context("signing the CA")?;
    Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
}

/// A server's certificate and key (PEM), signed by the CA: valid for
/// `server.<datacenter>.<domain>` (what `verify_server_hostname` checks),
/// localhost, 127.0.0.1 and `address`, for [`SERVER_CERT_DAYS`].
pub fn server_certificate(
    material: &Material,
    server_name: &str,
    address: std::net::IpAddr,
) -> Result<(String, String)> {
    let ca_key = material
        .ca_key
        .as_deref()
        .context("only servers sign certificates")?;
    let issuer = Issuer::from_ca_cert_pem(
        &material.signing_ca_cert,
        KeyPair::from_pem(ca_key).context("the CA key")?,
    )
    .context("the CA certificate")?;
    let key = KeyPair::generate().context("making the server key")?;
    let mut params = CertificateParams::new(vec![server_name.to_string(), "localhost".to_string()])
        .context("the server certificate's names")?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    params.subject_alt_names.push(SanType::IpAddress(address));
    params
        .distinguished_name
        .push(DnType::CommonName, server_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(SERVER_CERT_DAYS);
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the server certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// How long a server certificate is valid.
pub const SERVER_CERT_DAYS: i64 = 365;

/// What `run`, `heartbeat` and `status` read of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Valid from, Unix seconds.
    pub not_before: i64,
    /// Valid until, Unix seconds.
    pub not_after: i64,
    /// Its DNS names.
    pub names: Vec<String>,
}

/// The validity and DNS names of the first certificate in `pem`.
pub fn cert_info(pem: &str) -> Option<CertInfo> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(CertInfo {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        names,
    })
}

/// When a server certificate is renewed (Unix seconds): once two thirds of
/// its life have passed, less up to a twelfth of it chosen by the node's
/// name, so that servers whose certificates were made together (at
/// genesis) renew days apart. A 365-day certificate: between day 213 and
/// day 243.
pub fn renew_at(info: &CertInfo, node: &str) -> i64 {
    use sha2::Digest;
    let life = (info.not_after - info.not_before).max(1);
    let spread = (life / 12).max(1);
    let h = sha2::Sha256::digest(node.as_bytes());
    let jitter = u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) % spread as u64;
    info.not_before + life * 2 / 3 - jitter as i64
}

/// Whether the server certificate `cert_pem` can be kept by `node`: the CA
/// file on disk is `made`'s, the certificate was issued by the CA servers
/// are signed with now, it is named `server_name`, and it is not yet due
/// for renewal by this node's clock ([`renew_at`]).
pub fn certificate_still_good(
    cert_pem: &str,
    made: &Material,
    ca_pem_on_disk: &str,
    server_name: &str,
    node: &str,
) -> bool {
    if made.ca_cert != ca_pem_on_disk || !issued_by(cert_pem, &made.signing_ca_cert) {
        return false;
    }
    let Some(info) = cert_info(cert_pem) else {
        return false;
    };
    info.names.iter().any(|n| n == server_name)
        && chrono::Utc::now().timestamp() < renew_at(&info, node)
}

/// Whether the certificate `cert_pem` names the CA `ca_pem` as its issuer
/// (each CA generation has its own name).
pub fn issued_by(cert_pem: &str, ca_pem: &str) -> bool {
    let parse = |pem: &str| -> Option<(Vec<u8>, Vec<u8>)> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
        let cert = pem.parse_x509().ok()?;
        Some((
            cert.issuer().as_raw().to_vec(),
            cert.subject().as_raw().to_vec(),
        ))
    };
    match (parse(cert_pem), parse(ca_pem)) {
        (Some((issuer, _)), Some((_, subject))) => issuer == subject,
        _ => false,
    }
}

/// The files of `dir` for a name: where `run` writes a node's TLS material.
pub fn tls_path(config_dir: &Path, file: &str) -> PathBuf {
    config_dir.join("auto-consul-tls").join(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_urls_parse_or_say_what_is_allowed() {
        assert_eq!(SecretsUrl::parse("none").unwrap(), SecretsUrl::None);
        assert_eq!(
            SecretsUrl::parse("ssm:///auto-consul/prod/").unwrap(),
            SecretsUrl::Ssm {
                path: "/auto-consul/prod".into()
            }
        );
        assert_eq!(
            SecretsUrl::parse("file:///var/lib/x").unwrap(),
            SecretsUrl::Dir {
                dir: "/var/lib/x".into()
            }
        );
        for bad in [
            "ssm://",
            "ssm:///",
            "ssm:///a//b",
            "ssm:///a b",
            "file://rel",
            "s3://x",
        ] {
            let err = SecretsUrl::parse(bad).unwrap_err().to_string();
            assert!(err.contains("ssm:///PATH"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_new_ca_signs_server_certificates_and_every_value_checks() {
        let ca = new_ca("c1").unwrap();
        Secret::Ca.check(&ca).unwrap();
        let (cert, key) = split_ca(&ca).unwrap();
        Secret::CaCert.check(&cert).unwrap();
        assert!(key.is_some());
        assert!(
            Secret::CaCert.check(&ca).is_err(),
            "a CA with its key is not a certificate alone"
        );
        Secret::GossipKey.check(&new_gossip_key()).unwrap();
        assert!(Secret::AgentToken.check("garbage").is_err());
        assert!(Secret::Ca.check("garbage").is_err());
        let material = Material {
            gossip_key: new_gossip_key(),
            gossip_other: None,
            ca_cert: cert.clone(),
            signing_ca_cert: cert.clone(),
            agent_token: String::new(),
            dns_token: String::new(),
            ca_key: key,
            management_token: None,
            node_token: None,
        };
        let (server, _) =
            server_certificate(&material, "server.dc1.consul", "10.0.0.5".parse().unwrap())
                .unwrap();
        let name = "server.dc1.consul";
        assert!(certificate_still_good(&server, &material, &cert, name, "n"));
        assert!(!certificate_still_good(
            &server,
            &material,
            "another CA",
            name,
            "n"
        ));
        assert!(!certificate_still_good("junk", &material, &cert, name, "n"));
        // Another domain, another name: made again.
        assert!(!certificate_still_good(
            &server,
            &material,
            &cert,
            "server.dc1.example",
            "n"
        ));
        // Signed by another CA (a rotation's next): made again.
        let next = new_ca_generation("c", 2).unwrap();
        let (next_cert, _) = split_ca(&next).unwrap();
        assert!(issued_by(&server, &cert));
        assert!(!issued_by(&server, &next_cert));
        let rotated = Material {
            signing_ca_cert: next_cert,
            ..material.clone()
        };
        assert!(!certificate_still_good(&server, &rotated, &cert, name, "n"));
        let info = cert_info(&server).unwrap();
        assert!(info.names.iter().any(|n| n == name), "{info:?}");
        assert_eq!(
            info.not_after - info.not_before,
            SERVER_CERT_DAYS * 86_400 + 3600
        );
    }

    /// Renewal falls between two thirds of the life less a twelfth and two
    /// thirds, spread by node name.
    #[test]
    fn renewal_is_due_at_two_thirds_of_the_life_spread_by_node() {
        let info = CertInfo {
            not_before: 0,
            not_after: 360 * 86_400,
            names: Vec::new(),
        };
        let days: Vec<i64> = (0..50)
            .map(|i| renew_at(&info, &format!("server-{i}")) / 86_400)
            .collect();
        assert!(days.iter().all(|d| (210..=240).contains(d)), "{days:?}");
        let mut distinct = days.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 10, "{days:?}");
    }

    #[tokio::test]
    async fn a_directory_store_is_create_only() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore {
            dir: tmp.path().to_path_buf(),
        };
        assert_eq!(store.get("c/agent/x").await.unwrap(), None);
        assert!(store.create("c/agent/x", "one").await.unwrap());
        assert!(!store.create("c/agent/x", "two").await.unwrap());
        assert_eq!(
            store.get("c/agent/x").await.unwrap().as_deref(),
            Some("one")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join("c/agent/x"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn gossip_keys_are_checked_as_consul_checks_them() {
        // 32, 24 and 16 bytes, as `consul keygen` and older tools make them.
        for key in [
            "pUqJrVyVRj5jsiYEkM/tFQYfWyJIv4s3XkvDwy7Cu5s=",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYX",
            "AAECAwQFBgcICQoLDA0ODw==",
        ] {
            assert_eq!(check_gossip_key(key), Ok(()), "{key}");
        }
        let err = |k: &str| check_gossip_key(k).unwrap_err();
        assert!(err("not a key!").contains("not base64"));
        // Unpadded base64 of 16 bytes: Go's StdEncoding refuses it too.
        assert!(err("AAECAwQFBgcICQoLDA0ODw").contains("not base64"));
        assert!(err("AAECAwQFBgcICQoLDA0O").contains("15 bytes"));
        assert!(err("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g").contains("33 bytes"));
    }
}
