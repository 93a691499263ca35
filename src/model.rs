//! The registry's data: key names, heartbeat, slot and cluster bodies, and
//! the validation every value from outside passes before it is used.

use std::net::IpAddr;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// Bodies larger than this are junk, whatever they hold.
pub const MAX_BODY_BYTES: usize = 4096;

/// The timestamp format of heartbeat keys, as the original tool wrote it.
const KEY_TIME_FORMAT: &str = "%Y%m%d%H%M%S";

/// The three modes a node can run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The server that creates the cluster (`bootstrap: true` on first start).
    Bootstrap,
    /// A server that joins the others.
    Server,
    /// A client agent.
    Agent,
}

impl Mode {
    /// The name used in output, state and heartbeats.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Bootstrap => "bootstrap",
            Mode::Server => "server",
            Mode::Agent => "agent",
        }
    }

    /// Whether Consul runs with `server: true`.
    pub fn is_server(self) -> bool {
        self != Mode::Agent
    }
}

/// Checks an address given on the command line or read from the registry.
pub fn validate_address(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| format!("`{}` is not an IP address", s.escape_debug()))?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!(
            "{ip} cannot be advertised: give this node's own unicast address"
        ));
    }
    if let IpAddr::V4(v4) = ip
        && v4.is_broadcast()
    {
        return Err(format!(
            "{ip} cannot be advertised: give this node's own unicast address"
        ));
    }
    Ok(ip)
}

/// Checks this node's own name: what Consul accepts without warning and DNS
/// can serve (letters, digits and `-`, at most 63, not starting with `-`).
pub fn validate_node_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a valid Consul node name: use 1 to 63 letters, digits and `-`, not starting with `-`",
            s.escape_debug()
        ))
    }
}

/// Checks a node name read from a registry key. Looser than our own names
/// (the original tool wrote whatever it was given) but never a path or
/// anything that needs quoting: letters, digits, `-`, `_` and `.`.
pub fn registry_node_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Checks a Consul datacenter name.
pub fn validate_datacenter(s: &str) -> Result<(), String> {
    // Consul lower-cases the datacenter it is given (builder.go), so a
    // name in capitals would differ from the one in the registry and in
    // the TLS server name (`server.<dc>.<domain>`): refused, with the fix.
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "`{}` has capital letters, and Consul lower-cases datacenter names: use `{}`",
            s.escape_debug(),
            s.to_ascii_lowercase().escape_debug()
        ));
    }
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a valid datacenter name: use letters, digits, `-` and `_`",
            s.escape_debug()
        ))
    }
}

/// Checks an EC2 instance id (`i-` then letters and digits).
pub fn instance_id_ok(s: &str) -> bool {
    s.len() <= 32
        && s.strip_prefix("i-")
            .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// The two heartbeat directories of the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `servers/`: written by servers only.
    Servers,
    /// `agents/`: written by every node.
    Agents,
}

impl Role {
    /// The directory under the registry prefix, with its trailing `/`.
    pub fn dir(self) -> &'static str {
        match self {
            Role::Servers => "servers/",
            Role::Agents => "agents/",
        }
    }
}

/// A heartbeat key, `<YYYYmmddHHMMSS>-<node>` (UTC, 1-second resolution).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatKey {
    /// When the heartbeat was written.
    pub time: DateTime<Utc>,
    /// The node it is for; may contain `-`.
    pub node: String,
}

impl HeartbeatKey {
    /// Parses the name after the directory. `None` for anything else.
    pub fn parse(name: &str) -> Option<HeartbeatKey> {
        let (stamp, node) = name.split_once('-')?;
        if stamp.len() != 14 || !stamp.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if !registry_node_name_ok(node) {
            return None;
        }
        let naive = NaiveDateTime::parse_from_str(stamp, KEY_TIME_FORMAT).ok()?;
        Some(HeartbeatKey {
            time: Utc.from_utc_datetime(&naive),
            node: node.to_string(),
        })
    }

    /// The name under the directory.
    pub fn name(&self) -> String {
        format!("{}-{}", self.time.format(KEY_TIME_FORMAT), self.node)
    }
}

/// Whole seconds from `then` to `now`, 0 when `then` is in the future.
pub fn age_seconds(then: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    u64::try_from((now - then).num_seconds()).unwrap_or(0)
}

/// The body of a heartbeat this tool writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatBody {
    /// Consul node name; must match the key's.
    pub node: String,
    /// Address to join.
    pub address: IpAddr,
    /// EC2 instance id, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// `server` or `agent`, as the local agent reported it.
    pub mode: String,
    /// The auto-consul version that wrote it.
    pub version: String,
    /// A server's Consul node id (its data dir's `node-id`), for the
    /// `peers.json` of a quorum-loss recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The generation of the agents' token this node's Consul runs with
    /// (clusters with secrets made at genesis), for a rotation's leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_token_generation: Option<u32>,
    /// The CA generations this node's CA file trusts (clusters with
    /// secrets made at genesis), for a CA rotation's leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_trusted: Option<Vec<u32>>,
    /// A server's: the CA generation that signed its certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_signed_by: Option<u32>,
    /// A server's: the generation of the management token its Consul
    /// holds as `initial_management` (loaded at its last start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_token_generation: Option<u32>,
    /// Whether this node's Consul runs with its own token (`--instance-tag`),
    /// for the leader, which deletes the shared one once every live node
    /// does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_token: Option<bool>,
}

/// What a heartbeat body tells, whichever tool wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatInfo {
    /// Address to join.
    pub address: IpAddr,
    /// EC2 instance id, when the writer knew it.
    pub instance_id: Option<String>,
    /// A server's Consul node id (a UUID), when the writer gave one.
    pub node_id: Option<String>,
}

/// Parses a heartbeat body for `node`: our JSON, or a bare IP address as the
/// original tool wrote. The reason it is junk otherwise.
pub fn parse_heartbeat_body(node: &str, body: &[u8]) -> Result<HeartbeatInfo, String> {
    if body.len() > MAX_BODY_BYTES {
        return Err(format!(
            "body of {} bytes is larger than {MAX_BODY_BYTES}",
            body.len()
        ));
    }
    let text = std::str::from_utf8(body).map_err(|_| "body is not UTF-8".to_string())?;
    let text = text.trim();
    if text.starts_with('{') {
        let hb: HeartbeatBody =
            serde_json::from_str(text).map_err(|e| format!("body is not a heartbeat: {e}"))?;
        if hb.node != node {
            return Err(format!(
                "body names node `{}`, not `{node}`",
                hb.node.escape_debug()
            ));
        }
        validate_address(&hb.address.to_string())?;
        let instance_id = hb.instance_id.filter(|id| instance_id_ok(id));
        let node_id = hb.node_id.filter(|id| uuid::Uuid::parse_str(id).is_ok());
        Ok(HeartbeatInfo {
            address: hb.address,
            instance_id,
            node_id,
        })
    } else {
        let address = validate_address(text)?;
        Ok(HeartbeatInfo {
            address,
            instance_id: None,
            node_id: None,
        })
    }
}

/// The body of `slots/server-<i>`: who holds a server slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// Holder's node name.
    pub node: String,
    /// Holder's address.
    pub address: IpAddr,
    /// Holder's EC2 instance id, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Random id of the claim, to recognise our own write after a lost response.
    pub claim_id: String,
    /// Counts the writes of this claim (1 at claim, +1 per renewal).
    pub sequence: u64,
    /// Set when the holder left: the slot is free at once.
    #[serde(default)]
    pub released: bool,
    /// The cluster the holder serves, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
}

impl SlotRecord {
    /// Whether this record names the node `node` with instance `instance`:
    /// the same name, and not another instance id when both are known (a
    /// node started from an image with a fixed name is not the holder).
    pub fn held_by(&self, node: &str, instance: Option<&str>) -> bool {
        self.node == node
            && match (self.instance_id.as_deref(), instance) {
                (Some(theirs), Some(mine)) => theirs == mine,
                _ => true,
            }
    }

    /// Parses and checks a slot body.
    pub fn parse(body: &[u8]) -> Result<SlotRecord, String> {
        if body.len() > MAX_BODY_BYTES {
            return Err(format!(
                "body of {} bytes is larger than {MAX_BODY_BYTES}",
                body.len()
            ));
        }
        let rec: SlotRecord =
            serde_json::from_slice(body).map_err(|e| format!("body is not a slot record: {e}"))?;
        if !registry_node_name_ok(&rec.node) {
            return Err(format!(
                "slot names an invalid node `{}`",
                rec.node.escape_debug()
            ));
        }
        validate_address(&rec.address.to_string())?;
        Ok(rec)
    }
}

/// The most servers a cluster can want (`--servers`).
pub const MAX_SERVERS: u32 = 9;
/// The range of `--expiry`, in seconds.
pub const EXPIRY_RANGE: std::ops::RangeInclusive<u64> = 2..=86_400;

/// The settings every node of a cluster must agree on. The cluster record
/// holds them; a node's own flags only seed a new cluster's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Settings {
    /// Desired number of servers (slots `0..servers`).
    pub servers: u32,
    /// Seconds after which a server's heartbeat or slot expires.
    pub expiry: u64,
    /// Seconds after which an agent's heartbeat expires (agents' timers
    /// fire every third of it: their heartbeats are the bulk of a fleet's
    /// requests, and nothing fails over on them).
    pub agent_expiry: u64,
}

impl Settings {
    /// Agents' keys never expire before servers': servers write `agents/`
    /// keys too, at the servers' pace, and they must stay live between
    /// two of them.
    pub fn consistent(self) -> Settings {
        Settings {
            agent_expiry: self.agent_expiry.max(self.expiry),
            ..self
        }
    }
}

/// The highest generation of a secret a record may name.
pub const MAX_GENERATION: u32 = 100_000;

/// The `cluster` record, created by the bootstrap node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Random id of this cluster.
    pub cluster_id: String,
    /// The bootstrap node's name.
    pub bootstrap_node: String,
    /// The bootstrap node's address.
    pub bootstrap_address: IpAddr,
    /// Desired number of servers; rules every node of the cluster.
    pub servers: u32,
    /// Heartbeat and slot expiry, seconds; rules every node of the
    /// cluster. Absent in records written before it was kept here: the
    /// node's own `--expiry` then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<u64>,
    /// Agents' heartbeat expiry, seconds; absent in older records (the
    /// node's own `--agent-expiry` then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_expiry: Option<u64>,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Set by `auto-consul cluster retire`: an operator has confirmed that
    /// every server of this cluster is gone, so once none is live a new
    /// cluster may replace it (the witness rule's way out).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
    /// Set at the genesis of a cluster that replaced a gone one: the old
    /// cluster's newest valid snapshot is restored into this one, once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestorePlan>,
    /// The gossip key's generation in use, and a rotation under way
    /// (`secrets rotate gossip-key`); absent: generation 1, the one made
    /// at genesis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip_key: Option<Generation>,
    /// The agents' token's generation in use, and a rotation under way
    /// (`secrets rotate agent-token`); absent: generation 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_token: Option<TokenGeneration>,
    /// The CA's generation in use, and a rotation under way (`secrets
    /// rotate ca`); absent: generation 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaGeneration>,
    /// The management token's generation in use, and a rotation under way
    /// (`secrets rotate management-token`); absent: generation 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_token: Option<ManagementGeneration>,
    /// This cluster's Consul datacenter, recorded at genesis (a server's
    /// heartbeat writes it into an older record): what a secondary checks
    /// its own name against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    /// A secondary datacenter's primary (`--primary-registry`), recorded at
    /// genesis; every node follows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<Primary>,
    /// Where this cluster's secrets live (`--secrets`), recorded by its
    /// servers: what a secondary's servers read the shared ones from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<SecretsAt>,
}

/// A cluster's secrets store and its AWS region (SSM is regional).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretsAt {
    /// `ssm:///PATH` or `file:///DIR`.
    pub url: String,
    /// The store's region (SSM); absent for a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// The primary datacenter a secondary federates with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Primary {
    /// The primary cluster's registry (s3://BUCKET/PREFIX or file:///DIR).
    pub registry: String,
    /// The primary's datacenter: `primary_datacenter` everywhere.
    pub datacenter: String,
    /// The region of the primary registry's bucket (found at genesis), in
    /// which it is read; absent for a directory, or in this node's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Which generation of the management token a cluster uses, and the
/// rotation to the next one. Consul makes the configured
/// `initial_management` token again at every leadership it establishes
/// (agent/consul/leader.go, `initializeACLs`) and reads that setting only
/// when it starts; so the servers move to a new one by a restart each, one
/// at a time, the one named in `restart`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagementGeneration {
    /// The generation in use before the rotation (from `delete` on: the
    /// new one).
    pub generation: u32,
    /// A rotation under way: where it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<TokenStep>,
    /// During `switch`: the one server the leader lets restart now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
}

impl Default for ManagementGeneration {
    fn default() -> Self {
        ManagementGeneration {
            generation: 1,
            rotation: None,
            restart: None,
        }
    }
}

impl ManagementGeneration {
    /// The generation a server starting now writes: the new one once it
    /// exists in Consul (from `switch` on), else the one in use.
    pub fn for_boot(&self) -> u32 {
        match self.rotation {
            Some(TokenStep::Switch) => self.generation + 1,
            _ => self.generation,
        }
    }
}

/// Which generation of the CA a cluster uses, and the rotation to the next
/// one, when one is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaGeneration {
    /// The generation in use (from `drop` on: the new one).
    pub generation: u32,
    /// A rotation under way: where it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<CaStep>,
}

impl Default for CaGeneration {
    fn default() -> Self {
        CaGeneration {
            generation: 1,
            rotation: None,
        }
    }
}

impl CaGeneration {
    /// The CA generations every node's CA file trusts now.
    pub fn trusted(&self) -> Vec<u32> {
        let g = self.generation;
        match self.rotation {
            Some(CaStep::Trust | CaStep::Reissue) => vec![g, g + 1],
            _ => vec![g],
        }
    }

    /// The CA generation servers' certificates are signed with now.
    pub fn signing(&self) -> u32 {
        match self.rotation {
            Some(CaStep::Reissue) => self.generation + 1,
            _ => self.generation,
        }
    }
}

/// What a secondary datacenter's leader reports to its primary, in the
/// primary's registry at `secondaries/<datacenter>`: the CA step its
/// cluster record is at, and how many of its live nodes (servers, for
/// `reissue`) have not done it. A federated primary's CA rotation goes on
/// from a step once every secondary Consul's WAN lists reports that step
/// done, so no node anywhere loses the CA another side still presents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondaryReport {
    pub datacenter: String,
    pub cluster_id: String,
    pub ca_generation: u32,
    pub ca_step: Option<CaStep>,
    pub behind: u32,
}

/// The steps of a CA's rotation, each finished by the leader's heartbeat
/// once every live node (or server) has done it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaStep {
    /// Every node's CA file is to trust the old and the new CA.
    Trust,
    /// Every node trusts both: servers are to be signed by the new one.
    Reissue,
    /// Every server is signed by the new CA (the generation in use moved
    /// on): every node's CA file is to trust the new one alone.
    Drop,
}

impl CaStep {
    /// The name the record uses.
    pub fn as_str(self) -> &'static str {
        match self {
            CaStep::Trust => "trust",
            CaStep::Reissue => "reissue",
            CaStep::Drop => "drop",
        }
    }
}

/// Which generation of a token a cluster uses, and the rotation to the
/// next one, when one is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGeneration {
    /// The generation every node used before the rotation (after it: the
    /// new one).
    pub generation: u32,
    /// A rotation under way: where it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<TokenStep>,
    /// Every node runs with a token of its own (`--instance-tag`), and the
    /// shared agents' token is deleted from Consul: nodes never fall back
    /// to it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_node: bool,
}

impl Default for TokenGeneration {
    fn default() -> Self {
        TokenGeneration {
            generation: 1,
            rotation: None,
            per_node: false,
        }
    }
}

impl TokenGeneration {
    /// The generation a node runs with now: the new one once the token
    /// exists in Consul (from `switch` on), else the one in use.
    pub fn for_nodes(&self) -> u32 {
        match self.rotation {
            Some(TokenStep::Switch) => self.generation + 1,
            _ => self.generation,
        }
    }
}

/// The steps of a token's rotation, each finished by the leader's
/// heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenStep {
    /// The new token is being made in Consul (no node uses it yet).
    Create,
    /// It exists; every node moves to it by its own heartbeat.
    Switch,
    /// Every live node uses it (the generation in use moved on); the old
    /// token is being deleted from Consul.
    Delete,
}

impl TokenStep {
    /// The name the record uses.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStep::Create => "create",
            TokenStep::Switch => "switch",
            TokenStep::Delete => "delete",
        }
    }
}

/// Which generation of a secret a cluster uses (1: the one made at
/// genesis; n: the one a rotation made, named `<secret>.<n>`), and the
/// rotation to the next one, when one is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// The generation in use.
    pub generation: u32,
    /// A rotation under way: where it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationStep>,
}

impl Default for Generation {
    fn default() -> Self {
        Generation {
            generation: 1,
            rotation: None,
        }
    }
}

impl Generation {
    /// The generation a rotation under way moves to.
    pub fn next(&self) -> Option<u32> {
        self.rotation.map(|_| self.generation + 1)
    }
}

/// The steps of a gossip key's rotation, each finished by the leader's
/// heartbeat once every live member has done it (Consul's keyring
/// operations reach every member: agent/keyring.go).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RotationStep {
    /// The new key is being installed in every member's keyring.
    Install,
    /// Every member has it; it is being made every member's primary key.
    Use,
    /// The new key is everyone's primary (and the generation in use); the
    /// old one is being removed from every keyring.
    Remove,
}

impl RotationStep {
    /// The name the record uses.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationStep::Install => "install",
            RotationStep::Use => "use",
            RotationStep::Remove => "remove",
        }
    }
}

/// Where a replacing cluster's restore stands (`ClusterRecord::restore`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePlan {
    /// The cluster replaced: its snapshots are under `snapshots/<from>/`.
    pub from: String,
    /// What has happened so far.
    pub state: RestoreState,
    /// The snapshot chosen, once one is (registry key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Its SHA-256, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The node that restored it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When the state last changed, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// Snapshots Consul refused (or that fail its checks), never tried
    /// again: the next older one is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

/// The steps of a restore at genesis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreState {
    /// To do, once a leader is up.
    Pending,
    /// A snapshot was chosen and sent to Consul; not known to be done (a
    /// node stopped mid-way sends it again).
    Restoring,
    /// Consul took the snapshot; this cluster's ACL tokens are still to be
    /// made again in the restored state.
    Restored,
    /// Restored.
    Done,
    /// The old cluster left no valid snapshot.
    Nothing,
    /// An operator chose otherwise (`restore KEY` or `restore --cancel`).
    Cancelled,
    /// Consul refused every snapshot the old cluster left (`refused`
    /// names them): this cluster runs on its own state until an operator
    /// restores one by hand or cancels.
    Refused,
}

impl RestoreState {
    /// The name the record uses.
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreState::Pending => "pending",
            RestoreState::Restoring => "restoring",
            RestoreState::Restored => "restored",
            RestoreState::Done => "done",
            RestoreState::Nothing => "nothing",
            RestoreState::Cancelled => "cancelled",
            RestoreState::Refused => "refused",
        }
    }

    /// Whether a restore is still to be done.
    pub fn open(self) -> bool {
        matches!(
            self,
            RestoreState::Pending | RestoreState::Restoring | RestoreState::Restored
        )
    }
}

impl ClusterRecord {
    /// Parses and checks a cluster record.
    pub fn parse(body: &[u8]) -> Result<ClusterRecord, String> {
        if body.len() > MAX_BODY_BYTES {
            return Err(format!(
                "body of {} bytes is larger than {MAX_BODY_BYTES}",
                body.len()
            ));
        }
        let rec: ClusterRecord = serde_json::from_slice(body)
            .map_err(|e| format!("body is not a cluster record: {e}"))?;
        if !registry_node_name_ok(&rec.bootstrap_node) {
            return Err("cluster record names an invalid node".to_string());
        }
        if !registry_node_name_ok(&rec.cluster_id) {
            return Err("cluster record has an invalid cluster id".to_string());
        }
        if let Some(plan) = &rec.restore {
            if !registry_node_name_ok(&plan.from) {
                return Err("cluster record restores from an invalid cluster id".to_string());
            }
            if plan
                .key
                .iter()
                .chain(&plan.refused)
                .any(|k| SnapshotKey::parse(&plan.from, k).is_none())
            {
                return Err("cluster record restores a key outside its snapshots".to_string());
            }
        }
        for (what, g) in [
            ("gossip key", rec.gossip_key.map(|g| g.generation)),
            ("agents' token", rec.agent_token.map(|g| g.generation)),
            ("CA", rec.ca.map(|g| g.generation)),
            (
                "management token",
                rec.management_token.as_ref().map(|g| g.generation),
            ),
        ] {
            if let Some(g) = g.filter(|g| !(1..=MAX_GENERATION).contains(g)) {
                return Err(format!(
                    "cluster record uses {what} generation {g}, outside 1..={MAX_GENERATION}"
                ));
            }
        }
        // A rotation's step names the generation next to the one in use:
        // the next one (forward steps) must stay within the bound, the
        // previous one (the last step, which deletes it) must exist
        // (generation 0 would name the genesis one: the one in use).
        for (what, g, back) in [
            (
                "gossip key",
                rec.gossip_key.map(|g| g.generation),
                rec.gossip_key
                    .and_then(|g| g.rotation)
                    .map(|r| r == RotationStep::Remove),
            ),
            (
                "agents' token",
                rec.agent_token.map(|g| g.generation),
                rec.agent_token
                    .and_then(|g| g.rotation)
                    .map(|r| r == TokenStep::Delete),
            ),
            (
                "CA",
                rec.ca.map(|g| g.generation),
                rec.ca.and_then(|g| g.rotation).map(|r| r == CaStep::Drop),
            ),
            (
                "management token",
                rec.management_token.as_ref().map(|g| g.generation),
                rec.management_token
                    .as_ref()
                    .and_then(|g| g.rotation)
                    .map(|r| r == TokenStep::Delete),
            ),
        ] {
            match (g, back) {
                (Some(g), Some(true)) if g < 2 => {
                    return Err(format!(
                        "cluster record ends a {what} rotation at generation {g}: there is no older one"
                    ));
                }
                (Some(g), Some(false)) if g >= MAX_GENERATION => {
                    return Err(format!(
                        "cluster record rotates the {what} past generation {MAX_GENERATION}"
                    ));
                }
                _ => {}
            }
        }
        if let Some(dc) = &rec.datacenter {
            validate_datacenter(dc).map_err(|e| format!("cluster record datacenter: {e}"))?;
        }
        if let Some(p) = &rec.primary {
            validate_datacenter(&p.datacenter)
                .map_err(|e| format!("cluster record's primary datacenter: {e}"))?;
            crate::registry::RegistryUrl::parse(&p.registry)
                .map_err(|e| format!("cluster record's primary registry: {e:#}"))?;
            if rec.datacenter.as_deref() == Some(p.datacenter.as_str()) {
                return Err(format!(
                    "cluster record names its own datacenter {} as its primary's",
                    p.datacenter
                ));
            }
        }
        if let Some(n) = rec
            .management_token
            .as_ref()
            .and_then(|m| m.restart.as_deref())
            && !registry_node_name_ok(n)
        {
            return Err("cluster record names an invalid server to restart".to_string());
        }
        validate_address(&rec.bootstrap_address.to_string())?;
        if !(1..=MAX_SERVERS).contains(&rec.servers) {
            return Err(format!(
                "cluster record wants {} servers, outside 1..={MAX_SERVERS}",
                rec.servers
            ));
        }
        if let Some(e) = rec.agent_expiry.filter(|e| !EXPIRY_RANGE.contains(e)) {
            return Err(format!(
                "cluster record has an agent expiry of {e}s, outside {}..={}",
                EXPIRY_RANGE.start(),
                EXPIRY_RANGE.end()
            ));
        }
        if let Some(e) = rec.expiry.filter(|e| !EXPIRY_RANGE.contains(e)) {
            return Err(format!(
                "cluster record has an expiry of {e}s, outside {}..={}",
                EXPIRY_RANGE.start(),
                EXPIRY_RANGE.end()
            ));
        }
        Ok(rec)
    }

    /// The settings this record rules, `seed` filling what it lacks. A
    /// record from before the record ruled (no `expiry`) kept `servers`
    /// only as the count at creation: the larger of it and the node's
    /// flag then, so an upgrade never shrinks a fleet grown since.
    pub fn settings(&self, seed: Settings) -> Settings {
        let agent_expiry = self.agent_expiry.unwrap_or(seed.agent_expiry);
        match self.expiry {
            Some(expiry) => Settings {
                servers: self.servers,
                expiry,
                agent_expiry,
            },
            None => Settings {
                servers: self.servers.max(seed.servers),
                expiry: seed.expiry,
                agent_expiry,
            },
        }
        .consistent()
    }
}

/// The key of server slot `i`.
pub fn slot_key(i: u32) -> String {
    format!("slots/server-{i}")
}

/// The key of the cluster record.
pub const CLUSTER_KEY: &str = "cluster";

/// The directory of cluster `id`'s snapshots.
pub fn snapshots_dir(id: &str) -> String {
    format!("snapshots/{id}/")
}

/// A snapshot's key, `snapshots/<cluster id>/<YYYYmmddHHMMSS>-<node>.snap`:
/// names sort by time (the store's clock), the newest last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotKey {
    /// The cluster whose state it holds.
    pub cluster: String,
    /// When it was saved and by whom.
    pub stamp: HeartbeatKey,
}

impl SnapshotKey {
    /// Parses a registry key under `snapshots/<cluster>/`; `None` for
    /// anything else (junk is never restored or deleted).
    pub fn parse(cluster: &str, key: &str) -> Option<SnapshotKey> {
        let name = key.strip_prefix(&snapshots_dir(cluster))?;
        let stamp = HeartbeatKey::parse(name.strip_suffix(".snap")?)?;
        Some(SnapshotKey {
            cluster: cluster.to_string(),
            stamp,
        })
    }

    /// The registry key.
    pub fn key(&self) -> String {
        format!("{}{}.snap", snapshots_dir(&self.cluster), self.stamp.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_states_are_named_as_the_record_names_them() {
        for st in [
            RestoreState::Pending,
            RestoreState::Restoring,
            RestoreState::Restored,
            RestoreState::Done,
            RestoreState::Nothing,
            RestoreState::Cancelled,
            RestoreState::Refused,
        ] {
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
        }
    }

    #[test]
    fn a_record_naming_junk_for_a_rotation_is_refused() {
        let base = serde_json::json!({
            "cluster_id": "c-1", "bootstrap_node": "n1", "bootstrap_address": "10.0.0.1",
            "servers": 3, "created": "",
        });
        let with = |field: &str, v: serde_json::Value| {
            let mut r = base.clone();
            r[field] = v;
            ClusterRecord::parse(r.to_string().as_bytes())
        };
        let ok = with(
            "management_token",
            serde_json::json!({"generation": 2, "rotation": "switch", "restart": "i-0abc"}),
        )
        .unwrap();
        assert_eq!(ok.management_token.as_ref().unwrap().for_boot(), 3);
        for (field, v, why) in [
            (
                "management_token",
                serde_json::json!({"generation": 0}),
                "management token generation 0",
            ),
            (
                "agent_token",
                serde_json::json!({"generation": 100_001}),
                "agents' token generation",
            ),
            (
                "ca",
                serde_json::json!({"generation": 0}),
                "CA generation 0",
            ),
            (
                "management_token",
                serde_json::json!({"generation": 1, "rotation": "switch", "restart": "../etc"}),
                "invalid server to restart",
            ),
            (
                "management_token",
                serde_json::json!({"generation": 1, "rotation": "delete"}),
                "there is no older one",
            ),
            (
                "agent_token",
                serde_json::json!({"generation": 1, "rotation": "delete"}),
                "there is no older one",
            ),
            (
                "gossip_key",
                serde_json::json!({"generation": 1, "rotation": "remove"}),
                "there is no older one",
            ),
            (
                "management_token",
                serde_json::json!({"generation": 100_000, "rotation": "create"}),
                "past generation",
            ),
        ] {
            let e = with(field, v).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn snapshot_keys_parse_only_inside_their_cluster() {
        let k = SnapshotKey::parse("c-1", "snapshots/c-1/20261201120000-node-a.snap").unwrap();
        assert_eq!(k.stamp.node, "node-a");
        assert_eq!(k.key(), "snapshots/c-1/20261201120000-node-a.snap");
        for junk in [
            "snapshots/c-2/20261201120000-node-a.snap",
            "snapshots/c-1/20261201120000-node-a.snap.tmp",
            "snapshots/c-1/2026120112000-node-a.snap",
            "snapshots/c-1/20261201120000-../x.snap",
            "snapshots/c-1/sub/20261201120000-node-a.snap",
            "cluster",
        ] {
            assert!(SnapshotKey::parse("c-1", junk).is_none(), "{junk}");
        }
    }

    #[test]
    fn heartbeat_keys_round_trip_and_keep_dashes_in_names() {
        let key = HeartbeatKey::parse("20140516092731-web-server-1").unwrap();
        assert_eq!(key.node, "web-server-1");
        assert_eq!(key.time.to_rfc3339(), "2014-05-16T09:27:31+00:00");
        assert_eq!(key.name(), "20140516092731-web-server-1");
    }

    #[test]
    fn junk_keys_are_refused() {
        for name in [
            "",
            "server1",
            "2014051609273-server1",
            "20140516092731",
            "20140516092731-",
            "20141316092731-server1",
            "2014051609273x-server1",
            "20140516092731-../etc",
            "20140516092731-a/b",
            "20140516092731-a b",
            "20140516092731-$(reboot)",
            "20140516092731-.hidden",
        ] {
            assert!(HeartbeatKey::parse(name).is_none(), "{name:?} parsed");
        }
    }

    #[test]
    fn bodies_from_both_tools_parse() {
        let bare = parse_heartbeat_body("server1", b"192.168.50.100\n").unwrap();
        assert_eq!(bare.address.to_string(), "192.168.50.100");
        let json = br#"{"node":"n1","address":"10.0.0.5","instance_id":"i-0abc","mode":"server","version":"0.1.0"}"#;
        let ours = parse_heartbeat_body("n1", json).unwrap();
        assert_eq!(ours.address.to_string(), "10.0.0.5");
        assert_eq!(ours.instance_id.as_deref(), Some("i-0abc"));
    }

    #[test]
    fn junk_bodies_are_refused() {
        let long = vec![b'1'; MAX_BODY_BYTES + 1];
        for body in [
            &b""[..],
            b"not an ip",
            b"10.0.0.1 extra",
            b"10.0.0.1\nretry_join = evil",
            b"0.0.0.0",
            b"224.0.0.1",
            b"{\"node\":\"other\",\"address\":\"10.0.0.1\",\"mode\":\"agent\",\"version\":\"1\"}",
            b"{\"node\":\"n1\"}",
            b"\xff\xfe",
            &long,
        ] {
            assert!(
                parse_heartbeat_body("n1", body).is_err(),
                "{:?} parsed",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn node_names() {
        assert!(validate_node_name("i-0123456789abcdef0").is_ok());
        assert!(validate_node_name("web-1").is_ok());
        for bad in ["", "-x", "a/b", "a b", "a.b", &"x".repeat(64), "ü"] {
            assert!(validate_node_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn addresses() {
        assert!(validate_address("10.1.2.3").is_ok());
        assert!(validate_address("fd00::1").is_ok());
        for bad in [
            "",
            "10.0.0.256",
            "0.0.0.0",
            "::",
            "255.255.255.255",
            "239.1.1.1",
            "10.0.0.1 ",
            "host",
        ] {
            assert!(validate_address(bad).is_err(), "{bad:?}");
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Characters that would let a value escape a JSON string, a unit
        /// file line or a shell word.
        fn dangerous(s: &str) -> bool {
            s.chars()
                .any(|c| c.is_whitespace() || c.is_control() || "\"'`$;&|<>()/\\{}".contains(c))
        }

        proptest! {
            #[test]
            fn any_key_parses_to_a_safe_node_or_to_nothing(name in ".{0,80}") {
                if let Some(key) = HeartbeatKey::parse(&name) {
                    prop_assert!(!dangerous(&key.node), "{:?}", key.node);
                    prop_assert!(!key.node.starts_with('.'));
                    prop_assert_eq!(key.name(), name);
                }
            }

            #[test]
            fn key_shaped_names_parse_to_a_safe_node_or_to_nothing(name in "20[0-9]{12}-.{0,40}") {
                if let Some(key) = HeartbeatKey::parse(&name) {
                    prop_assert!(!dangerous(&key.node), "{:?}", key.node);
                }
            }

            #[test]
            fn keys_we_write_parse_back(node in "[A-Za-z0-9][A-Za-z0-9-]{0,62}", secs in 0i64..4_000_000_000) {
                let time = DateTime::from_timestamp(secs, 0).unwrap();
                let key = HeartbeatKey { time, node: node.clone() };
                prop_assert_eq!(HeartbeatKey::parse(&key.name()), Some(key));
            }

            #[test]
            fn any_body_parses_to_a_plain_address_or_to_nothing(body in proptest::collection::vec(any::<u8>(), 0..200)) {
                if let Ok(info) = parse_heartbeat_body("n1", &body) {
                    prop_assert!(!dangerous(&info.address.to_string()));
                    prop_assert!(info.instance_id.as_deref().is_none_or(|id| !dangerous(id)));
                }
            }

            #[test]
            fn json_bodies_with_hostile_strings_never_yield_them(addr in ".{0,40}", id in ".{0,40}") {
                let body = serde_json::json!({"node": "n1", "address": addr, "instance_id": id, "mode": "agent", "version": "0"});
                if let Ok(info) = parse_heartbeat_body("n1", body.to_string().as_bytes()) {
                    prop_assert!(!dangerous(&info.address.to_string()));
                    prop_assert!(info.instance_id.as_deref().is_none_or(|id| !dangerous(id)));
                }
            }

            #[test]
            fn slot_and_cluster_bodies_never_crash(body in proptest::collection::vec(any::<u8>(), 0..300)) {
                let _ = SlotRecord::parse(&body);
                let _ = ClusterRecord::parse(&body);
            }
        }
    }
}
