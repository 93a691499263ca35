//! One consistent-enough read of the registry: live members, slots and the
//! cluster record, with junk skipped (and named in a warning).

use std::collections::HashMap;

use anyhow::Result;
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt, TryStreamExt};

use super::{Listed, Store};
use crate::model::{
    self, CLUSTER_KEY, ClusterRecord, HeartbeatKey, Role, SlotRecord, age_seconds,
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

impl HeartbeatEntry {
    /// Stamped more than `expiry` seconds ahead of `now`: junk, or a clock
    /// far off. Never live, and purged.
    pub fn from_the_future(&self, now: DateTime<Utc>, expiry: u64) -> bool {
        (self.parsed.time - now).num_seconds() > expiry as i64
    }
}

/// A heartbeat key as listed, parsed.
#[derive(Debug, Clone)]
pub struct HeartbeatEntry {
    /// Key relative to the prefix.
    pub key: String,
    /// Parsed name.
    pub parsed: HeartbeatKey,
}

/// What the registry says, read once.
#[derive(Debug, Clone)]
pub struct RegistryView {
    /// When it was read.
    pub now: DateTime<Utc>,
    /// Live servers, newest heartbeat per node, freshest first.
    pub servers: Vec<Member>,
    /// Live agents, newest heartbeat per node, freshest first (at most the
    /// limit asked for).
    pub agents: Vec<Member>,
    /// Slots `0..n`.
    pub slots: Vec<SlotView>,
    /// The cluster record, when there is one.
    pub cluster: Option<ClusterView>,
}

/// Reads the registry: both heartbeat listings, the cluster record and slots
/// `0..slots` at once, then the bodies of the newest live heartbeat of each
/// server and of up to `agent_limit` agents, freshest first.
pub async fn read_view(
    store: &dyn Store,
    slots: u32,
    expiry: u64,
    agent_limit: usize,
) -> Result<RegistryView> {
    // Keys sort by time: listing from the expiry cut-off on skips every
    // expired heartbeat, however many there are.
    let cutoff = HeartbeatKey {
        time: Utc::now() - chrono::Duration::seconds(expiry as i64 + 1),
        node: String::new(),
    }
    .name();
    let (servers_from, agents_from) = (
        format!("{}{cutoff}", Role::Servers.dir()),
        format!("{}{cutoff}", Role::Agents.dir()),
    );
    let (servers, agents, cluster, slots) = tokio::try_join!(
        store.list(Role::Servers.dir(), Some(&servers_from)),
        store.list(Role::Agents.dir(), Some(&agents_from)),
        store.get(CLUSTER_KEY),
        read_slots(store, slots),
    )?;
    let now = Utc::now();

    let (servers, agents) = tokio::try_join!(
        live_members(store, parse_listing(servers), now, expiry, usize::MAX),
        live_members(store, parse_listing(agents), now, expiry, agent_limit),
    )?;
    let cluster = cluster.map(|obj| ClusterView {
        record: ClusterRecord::parse(&obj.body)
            .map_err(|why| tracing::warn!("skipping registry key {CLUSTER_KEY}: {why}"))
            .ok(),
        etag: obj.etag,
        age_seconds: age_seconds(obj.last_modified, now),
    });
    Ok(RegistryView {
        now,
        servers,
        agents,
        slots,
        cluster,
    })
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

/// Reads slots `0..slots` at once.
pub async fn read_slots(store: &dyn Store, slots: u32) -> Result<Vec<SlotView>> {
    let objs: Vec<_> = stream::iter(0..slots)
        .map(|i| async move { store.get(&model::slot_key(i)).await })
        .buffered(READ_CONCURRENCY)
        .try_collect()
        .await?;
    let now = Utc::now();
    Ok(objs
        .into_iter()
        .zip(0..)
        .map(|(obj, index)| slot_view(index, obj, now))
        .collect())
}

/// Reads slot `index` alone.
pub async fn read_slot(store: &dyn Store, index: u32) -> Result<SlotView> {
    let obj = store.get(&model::slot_key(index)).await?;
    Ok(slot_view(index, obj, Utc::now()))
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
fn parse_listing(listed: Vec<Listed>) -> Vec<HeartbeatEntry> {
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
    let mut newest: HashMap<&str, &HeartbeatEntry> = HashMap::new();
    for e in &entries {
        if e.parsed.age_seconds(now) >= expiry {
            continue;
        }
        if e.from_the_future(now, expiry) {
            tracing::warn!(
                "skipping registry key {}: stamped more than {expiry}s in the future",
                e.key
            );
            continue;
        }
        let slot = newest.entry(e.parsed.node.as_str()).or_insert(e);
        if e.parsed.time > slot.parsed.time {
            *slot = e;
        }
    }
    let mut candidates: Vec<&HeartbeatEntry> = newest.into_values().collect();
    candidates.sort_by(|a, b| {
        b.parsed
            .time
            .cmp(&a.parsed.time)
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
                age_seconds: e.parsed.age_seconds(now),
            }),
            Err(why) => tracing::warn!("skipping registry key {}: {why}", e.key),
        }
    }
    Ok(members)
}
