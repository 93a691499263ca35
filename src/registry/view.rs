//! One consistent-enough read of the registry: live members, slots and the
//! cluster record, with junk skipped (and named in a warning).

use std::collections::HashMap;

use anyhow::Result;
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt, TryStreamExt};

use super::{Listed, Store};
use crate::model::{
    self, CLUSTER_KEY, ClusterRecord, HeartbeatKey, Role, Settings, SlotRecord, age_seconds,
    parse_heartbeat_body,
};

/// How many body reads run at once.
const READ_CONCURRENCY: usize = 32;

/// A live member, from its newest heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Node name (from the key).
    pub node: String,
    /// Address to join (from the body, validated).
    pub address: std::net::IpAddr,
    /// EC2 instance id, when the body has one.
    pub instance_id: Option<String>,
    /// Seconds since the heartbeat.
    pub age_seconds: u64,
}

/// A server slot as read.
#[derive(Debug, Clone)]
pub struct SlotView {
    /// Slot number.
    pub index: u32,
    /// Version tag, `None` when the slot key does not exist.
    pub etag: Option<String>,
    /// The record, `None` when absent or junk.
    pub record: Option<SlotRecord>,
    /// Seconds since the last write.
    pub age_seconds: u64,
}

/// The cluster record as read.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// Version tag of the record.
    pub etag: String,
    /// The record, `None` when junk.
    pub record: Option<ClusterRecord>,
    /// Seconds since it was written.
    pub age_seconds: u64,
}

/// A heartbeat key as listed, parsed.
#[derive(Debug, Clone)]
pub struct HeartbeatEntry {
    /// Key relative to the prefix.
    pub key: String,
    /// Parsed name. Its time is the writer's clock: it orders keys and
    /// decides nothing.
    pub parsed: HeartbeatKey,
    /// When the store wrote it, on the store's clock.
    pub last_modified: DateTime<Utc>,
}

impl HeartbeatEntry {
    /// Whole seconds since the store wrote it, against the store's `now`.
    pub fn age_seconds(&self, now: DateTime<Utc>) -> u64 {
        age_seconds(self.last_modified, now)
    }
}

/// What the registry says, read once.
#[derive(Debug, Clone)]
pub struct RegistryView {
    /// When it was read, on the store's clock.
    pub now: DateTime<Utc>,
    /// The settings that rule: the cluster record's, or the seed's when
    /// there is no (readable) record.
    pub settings: Settings,
    /// Live servers, newest heartbeat per node, freshest first.
    pub servers: Vec<Member>,
    /// Live agents, newest heartbeat per node, freshest first (at most the
    /// limit asked for).
    pub agents: Vec<Member>,
    /// Slots `0..settings.servers`.
    pub slots: Vec<SlotView>,
    /// The cluster record, when there is one.
    pub cluster: Option<ClusterView>,
}

impl RegistryView {
    /// The cluster record, when there is one and it parses.
    pub fn record(&self) -> Option<&ClusterRecord> {
        self.cluster.as_ref().and_then(|c| c.record.as_ref())
    }
}

/// How far behind the reader a heartbeat key's time may be and the key
/// still be listed: listings start at a key time (keys sort by time, so
/// expired ones cost nothing), and a writer whose clock is hours behind
/// must still count.
pub const KEY_TIME_MARGIN: chrono::Duration = chrono::Duration::hours(24);

/// The key a listing of `dir` starts after: `expiry` and the margin before
/// `now`.
fn listing_start(dir: Role, now: DateTime<Utc>, expiry: u64) -> String {
    let cutoff = HeartbeatKey {
        time: now - chrono::Duration::seconds(expiry as i64) - KEY_TIME_MARGIN,
        node: String::new(),
    };
    format!("{}{}", dir.dir(), cutoff.name())
}

/// Which agents a view reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agents {
    /// Every live agent (`members`): the whole `agents/` listing.
    All,
    /// Join candidates only: up to this many of the agents that wrote in
    /// the last [`AGENT_JOIN_WINDOW`] (by their key stamps). A boot then
    /// reads O(servers + join list), not O(fleet).
    Recent(usize),
}

/// How far back (by key stamp) a boot looks for agents to join: agents are
/// only fallbacks in a join list, behind the servers; a writer whose clock
/// is off by more is just not offered.
pub const AGENT_JOIN_WINDOW: chrono::Duration = chrono::Duration::seconds(300);

/// Reads the registry: both heartbeat listings, the cluster record and the
/// slots at once, then the bodies of the newest live heartbeat of each
/// server and of the agents asked for, freshest first. Settings come from
/// the cluster record; `seed`'s only where there is none.
pub async fn read_view(store: &dyn Store, seed: Settings, agents: Agents) -> Result<RegistryView> {
    // This host's clock picks where the listings start; it is checked
    // against the store's below, and the servers' listing redone when it
    // was too far ahead for the margin.
    let local = Utc::now();
    let which = agents;
    let agent_limit = match agents {
        Agents::All => usize::MAX,
        Agents::Recent(n) => n,
    };
    let agents_start = |now: DateTime<Utc>, expiry: u64| match agents {
        Agents::All => listing_start(Role::Agents, now, expiry),
        Agents::Recent(_) => format!(
            "{}{}",
            Role::Agents.dir(),
            HeartbeatKey {
                time: now - AGENT_JOIN_WINDOW,
                node: String::new(),
            }
            .name()
        ),
    };
    let (servers_from, agents_from) = (
        listing_start(Role::Servers, local, seed.expiry),
        agents_start(local, seed.agent_expiry),
    );
    let list_agents = async {
        if agent_limit == 0 {
            Ok(Vec::new())
        } else {
            list_agents_from(store, &agents_from, which).await
        }
    };
    let (servers, agents, cluster, slots) = tokio::try_join!(
        store.list(Role::Servers.dir(), Some(&servers_from)),
        list_agents,
        store.get(CLUSTER_KEY),
        read_slot_objects(store, seed.servers),
    )?;
    let now = store.now().await;
    let cluster = cluster.map(|obj| ClusterView {
        record: ClusterRecord::parse(&obj.body)
            .map_err(|why| tracing::warn!("skipping registry key {CLUSTER_KEY}: {why}"))
            .ok(),
        etag: obj.etag,
        age_seconds: age_seconds(obj.last_modified, now),
    });
    let settings = cluster
        .as_ref()
        .and_then(|c| c.record.as_ref())
        .map_or(seed, |r| r.settings(seed));

    let skew = (local - now).num_seconds();
    static SKEW_SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if skew.abs() > 60 && !SKEW_SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "this host's clock is {}s {} the registry's: ages are measured on the registry's clock; fix NTP",
            skew.abs(),
            if skew > 0 { "ahead of" } else { "behind" }
        );
    }
    let servers_needed = listing_start(Role::Servers, now, settings.expiry);
    let servers = if servers_needed < servers_from {
        store
            .list(Role::Servers.dir(), Some(&servers_needed))
            .await?
    } else {
        servers
    };
    let agents_needed = agents_start(now, settings.agent_expiry);
    let agents = if agent_limit > 0 && agents_needed < agents_from {
        list_agents_from(store, &agents_needed, which).await?
    } else {
        agents
    };
    let mut slots = slots;
    if settings.servers > seed.servers {
        slots.extend(read_slot_objects_at(store, seed.servers..settings.servers).await?);
    }
    slots.truncate(settings.servers as usize);
    let slots = slot_views(slots, now);

    let (servers, agents) = tokio::try_join!(
        live_members(
            store,
            parse_listing(servers),
            now,
            settings.expiry,
            usize::MAX
        ),
        live_members(
            store,
            parse_listing(agents),
            now,
            settings.agent_expiry,
            agent_limit
        ),
    )?;
    Ok(RegistryView {
        now,
        settings,
        servers,
        agents,
        slots,
        cluster,
    })
}

/// Lists `agents/` from `start`: all of it for [`Agents::All`]; for
/// [`Agents::Recent`], page by page only until the listing names enough
/// distinct nodes for the join list. In a boot storm (thousands of agents
/// in the window) a boot then costs one page, not the whole window.
async fn list_agents_from(store: &dyn Store, start: &str, agents: Agents) -> Result<Vec<Listed>> {
    let wanted = match agents {
        Agents::All => usize::MAX,
        Agents::Recent(n) => n,
    };
    // Distinct nodes by key name, without copying the listing (junk keys
    // are warned about once, when the listing is parsed).
    let enough = move |listed: &[Listed]| {
        wanted != usize::MAX
            && listed
                .iter()
                .filter_map(|l| HeartbeatKey::parse(l.key.rsplit('/').next()?))
                .map(|k| k.node)
                .collect::<std::collections::HashSet<_>>()
                .len()
                >= wanted
    };
    store
        .list_until(Role::Agents.dir(), Some(start), &enough)
        .await
}

/// Reads the cluster record alone: `None` when absent or junk.
pub async fn read_cluster(store: &dyn Store) -> Result<Option<(ClusterRecord, String)>> {
    let Some(obj) = store.get(CLUSTER_KEY).await? else {
        return Ok(None);
    };
    Ok(ClusterRecord::parse(&obj.body)
        .map_err(|why| tracing::warn!("skipping registry key {CLUSTER_KEY}: {why}"))
        .ok()
        .map(|r| (r, obj.etag)))
}

/// Lists both heartbeat directories at once: every well-formed key, junk
/// skipped with a warning. No bodies are read.
pub async fn list_heartbeats(store: &dyn Store) -> Result<Vec<HeartbeatEntry>> {
    let (servers, agents) = tokio::try_join!(
        store.list(Role::Servers.dir(), None),
        store.list(Role::Agents.dir(), None)
    )?;
    let mut all = parse_listing(servers);
    all.extend(parse_listing(agents));
    Ok(all)
}

type SlotObject = (u32, Option<super::Object>);

async fn read_slot_objects(store: &dyn Store, slots: u32) -> Result<Vec<SlotObject>> {
    read_slot_objects_at(store, 0..slots).await
}

/// Reads the slots at `indices`, READ_CONCURRENCY at once, in order.
async fn read_slot_objects_at(
    store: &dyn Store,
    indices: impl IntoIterator<Item = u32>,
) -> Result<Vec<SlotObject>> {
    stream::iter(indices)
        .map(|i| async move { Ok::<_, anyhow::Error>((i, store.get(&model::slot_key(i)).await?)) })
        .buffered(READ_CONCURRENCY)
        .try_collect()
        .await
}

fn slot_views(objs: Vec<SlotObject>, now: DateTime<Utc>) -> Vec<SlotView> {
    objs.into_iter()
        .map(|(index, obj)| slot_view(index, obj, now))
        .collect()
}

/// Reads every slot at index `from` or above that exists (after a
/// `cluster set --servers` lowered the count, or a junk record hid it): the
/// witness rule must see every server. One listing, then the slots found.
pub async fn read_slots_from(store: &dyn Store, from: u32) -> Result<Vec<SlotView>> {
    let mut indices: Vec<u32> = store
        .list("slots/", None)
        .await?
        .iter()
        .filter_map(|l| l.key.strip_prefix("slots/server-")?.parse().ok())
        .filter(|i| *i >= from && *i < 1000)
        .collect();
    indices.sort_unstable();
    indices.dedup();
    let objs = read_slot_objects_at(store, indices).await?;
    let now = store.now().await;
    Ok(slot_views(objs, now))
}

/// Reads slots `0..slots` at once.
pub async fn read_slots(store: &dyn Store, slots: u32) -> Result<Vec<SlotView>> {
    let objs = read_slot_objects(store, slots).await?;
    let now = store.now().await;
    Ok(slot_views(objs, now))
}

/// Reads slot `index` alone.
pub async fn read_slot(store: &dyn Store, index: u32) -> Result<SlotView> {
    let obj = store.get(&model::slot_key(index)).await?;
    let now = store.now().await;
    Ok(slot_view(index, obj, now))
}

fn slot_view(index: u32, obj: Option<super::Object>, now: DateTime<Utc>) -> SlotView {
    match obj {
        None => SlotView {
            index,
            etag: None,
            record: None,
            age_seconds: 0,
        },
        Some(obj) => {
            let record = SlotRecord::parse(&obj.body)
                .map_err(|why| {
                    tracing::warn!("skipping registry key {}: {why}", model::slot_key(index))
                })
                .ok();
            SlotView {
                index,
                etag: Some(obj.etag),
                record,
                age_seconds: age_seconds(obj.last_modified, now),
            }
        }
    }
}

/// Parses listed keys, skipping junk with a warning that names the key.
pub fn parse_listing(listed: Vec<Listed>) -> Vec<HeartbeatEntry> {
    listed
        .into_iter()
        .filter_map(|item| {
            let name = item.key.rsplit('/').next().unwrap_or_default();
            let parsed = HeartbeatKey::parse(name);
            if parsed.is_none() {
                tracing::warn!(
                    "skipping registry key {}: not <YYYYmmddHHMMSS>-<node>",
                    item.key.escape_debug()
                );
            }
            parsed.map(|parsed| HeartbeatEntry {
                key: item.key,
                parsed,
                last_modified: item.last_modified,
            })
        })
        .collect()
}

/// The newest live heartbeat per node, freshest first, with bodies read and
/// checked; stops after `limit` good ones.
async fn live_members(
    store: &dyn Store,
    entries: Vec<HeartbeatEntry>,
    now: DateTime<Utc>,
    expiry: u64,
    limit: usize,
) -> Result<Vec<Member>> {
    // Liveness and "newest" on the store's clock; the key's own time only
    // breaks ties (it is the writer's clock, which may be hours off).
    let written = |e: &HeartbeatEntry| (e.last_modified, e.parsed.time);
    let mut newest: HashMap<&str, &HeartbeatEntry> = HashMap::new();
    for e in &entries {
        if e.age_seconds(now) >= expiry {
            continue;
        }
        let slot = newest.entry(e.parsed.node.as_str()).or_insert(e);
        if written(e) > written(slot) {
            *slot = e;
        }
    }
    let mut candidates: Vec<&HeartbeatEntry> = newest.into_values().collect();
    candidates.sort_by(|a, b| {
        written(b)
            .cmp(&written(a))
            .then(a.parsed.node.cmp(&b.parsed.node))
    });

    // Reads stay READ_CONCURRENCY deep, in freshness order, and stop as
    // soon as `limit` good members are known.
    let mut bodies = stream::iter(candidates)
        .map(|e| async move { (e, store.get(&e.key).await) })
        .buffered(READ_CONCURRENCY.min(limit.max(1)));
    let mut members = Vec::new();
    while members.len() < limit
        && let Some((e, body)) = bodies.next().await
    {
        // A key deleted between the listing and the read was just purged.
        let Some(obj) = body? else { continue };
        match parse_heartbeat_body(&e.parsed.node, &obj.body) {
            Ok(info) => members.push(Member {
                node: e.parsed.node.clone(),
                address: info.address,
                instance_id: info.instance_id,
                age_seconds: e.age_seconds(now),
            }),
            Err(why) => tracing::warn!("skipping registry key {}: {why}", e.key),
        }
    }
    Ok(members)
}
