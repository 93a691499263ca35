//! The mode decision, pure: a registry view in, the next step and the join
//! list out. DESIGN.md's algorithm, steps 2 to 4; the IO that carries a step
//! out (and step 1, sticky state) lives in `commands::run`.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::model::{ClusterRecord, Mode};
use crate::registry::{Condition, Member, RegistryView, SlotView};

/// At most this many addresses go into `retry_join`.
pub const MAX_JOIN: usize = 10;

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// This node already holds a live slot (say, its state file was lost):
    /// it stays a server and renews the slot.
    Renew {
        /// Slot number.
        index: u32,
        /// Version tag to renew with.
        etag: String,
        /// The slot is slot 0 of the cluster this node created: it is the
        /// bootstrap node (its state file was lost before it was written).
        bootstrap: bool,
    },
    /// No live server: race to take slot 0 under its condition; the winner
    /// bootstraps and writes the cluster record under its condition.
    Bootstrap {
        /// `Absent` for a new registry, `Matches` for a dead cluster's record.
        cluster: Condition,
        /// How to take slot 0 after winning.
        slot0: Condition,
    },
    /// Fewer live servers than wanted (or none, for a node with Raft
    /// state, which never bootstraps): claim one of these slots, in order.
    /// Empty when every slot is held.
    Claim(Vec<(u32, Condition)>),
    /// Enough servers.
    Agent,
}

/// Whether a slot is held by a live holder.
pub fn slot_is_live(slot: &SlotView, expiry: u64) -> bool {
    slot.record.as_ref().is_some_and(|r| !r.released) && slot.age_seconds < expiry
}

/// Whether the cluster record was written within the expiry: its
/// bootstrap node may not have taken slot 0 or sent a heartbeat yet.
///
/// Once the bootstrap node holds slot 0 for this cluster, the slot speaks
/// for it (live, expired or released), and the record no longer does.
fn pending_bootstrap(view: &RegistryView, expiry: u64) -> Option<&ClusterRecord> {
    let cluster = view.cluster.as_ref().filter(|c| c.age_seconds < expiry)?;
    let record = cluster.record.as_ref()?;
    let slot0_taken = view
        .slots
        .first()
        .and_then(|s| s.record.as_ref())
        .is_some_and(|r| r.cluster_id.as_deref() == Some(record.cluster_id.as_str()));
    (!slot0_taken).then_some(record)
}

/// The live servers other than `me`, freshest first: live slot holders,
/// nodes with a live `servers/` heartbeat (the original tool's servers have
/// only these), and a bootstrap node that created the cluster record within
/// the expiry.
pub fn live_servers(view: &RegistryView, me: &str, expiry: u64) -> Vec<Member> {
    live_servers_for(view, me, None, expiry)
}

/// [`live_servers`], where a member of this node's name but another known
/// instance id (a copy of this node's image with a fixed name) counts.
pub fn live_servers_for(
    view: &RegistryView,
    me: &str,
    me_instance: Option<&str>,
    expiry: u64,
) -> Vec<Member> {
    let mut out: Vec<Member> = Vec::new();
    let mut seen = HashSet::new();
    let mut push = |m: Member, out: &mut Vec<Member>| {
        let other_instance = matches!(
            (m.instance_id.as_deref(), me_instance),
            (Some(theirs), Some(mine)) if theirs != mine
        );
        if (m.node != me || other_instance) && seen.insert(m.node.clone()) {
            out.push(m);
        }
    };
    let mut candidates: Vec<Member> = view
        .slots
        .iter()
        .filter(|s| slot_is_live(s, expiry))
        .filter_map(|s| {
            s.record.as_ref().map(|r| Member {
                node: r.node.clone(),
                address: r.address,
                instance_id: r.instance_id.clone(),
                age_seconds: s.age_seconds,
            })
        })
        .chain(view.servers.iter().cloned())
        .collect();
    if let Some(rec) = pending_bootstrap(view, expiry)
        && let Some(c) = &view.cluster
    {
        candidates.push(Member {
            node: rec.bootstrap_node.clone(),
            address: rec.bootstrap_address,
            instance_id: None,
            age_seconds: c.age_seconds,
        });
    }
    // Freshest first; among equals, the slot holder (listed first) wins.
    candidates.sort_by_key(|m| m.age_seconds);
    for m in candidates {
        push(m, &mut out);
    }
    out
}

/// The cluster whose bootstrap is under way: slot 0 is live and was
/// claimed for cluster Y (not by `me`), and the record does not name Y yet.
/// Until it does, Y's settings are unknown: a joiner that decided on the
/// old record's (or its own) could claim a slot Y does not want.
pub fn bootstrap_in_progress(
    view: &RegistryView,
    me: &str,
    me_instance: Option<&str>,
    expiry: u64,
) -> Option<String> {
    let slot0 = view.slots.first().filter(|s| slot_is_live(s, expiry))?;
    let holder = slot0.record.as_ref()?;
    let y = holder.cluster_id.as_ref()?;
    let named = view.record().is_some_and(|r| r.cluster_id == *y);
    (!named && !holder.held_by(me, me_instance)).then(|| y.clone())
}

/// Decides the next step for node `me` (instance `me_instance`, when
/// known) wanting `wanted` servers; `raft` when this node's data dir holds
/// Raft state (it was a server: it never bootstraps).
pub fn decide(
    view: &RegistryView,
    me: &str,
    me_instance: Option<&str>,
    wanted: u32,
    expiry: u64,
    raft: bool,
) -> Step {
    if let Some(slot) = view.slots.iter().find(|s| {
        slot_is_live(s, expiry)
            && s.record
                .as_ref()
                .is_some_and(|r| r.held_by(me, me_instance))
    }) {
        // Slot 0 claimed for cluster X makes this node X's bootstrap node
        // when the record names X and this node, or names no X at all: a
        // bootstrap interrupted between taking slot 0 and writing the
        // record is finished, not abandoned.
        let slot_cluster = slot.record.as_ref().and_then(|r| r.cluster_id.as_deref());
        let created_by_me = match (slot_cluster, view.record()) {
            (Some(x), Some(c)) if c.cluster_id == x => c.bootstrap_node == me,
            (Some(_), _) => true,
            (None, _) => false,
        };
        return Step::Renew {
            index: slot.index,
            etag: slot.etag.clone().unwrap_or_default(),
            bootstrap: slot.index == 0 && created_by_me,
        };
    }
    let live = live_servers_for(view, me, me_instance, expiry).len();
    if live >= wanted as usize {
        return Step::Agent;
    }
    if live == 0 && !raft {
        let cluster = match &view.cluster {
            None => Condition::Absent,
            Some(c) => Condition::Matches(c.etag.clone()),
        };
        let slot0 = view.slots.first().map_or(Condition::Absent, take_condition);
        return Step::Bootstrap { cluster, slot0 };
    }
    // Only as many slots as servers are missing: live servers without a
    // slot (the original tool's, a server with Raft state but no slot)
    // count too, so racing claimers cannot push the total past `wanted`.
    let reserve_slot0 = pending_bootstrap(view, expiry).is_some();
    let free: Vec<(u32, Condition)> = view
        .slots
        .iter()
        .filter(|s| !slot_is_live(s, expiry))
        .filter(|s| !(reserve_slot0 && s.index == 0))
        .map(|s| (s.index, take_condition(s)))
        .take(wanted as usize - live)
        .collect();
    if free.is_empty() && !raft {
        Step::Agent
    } else {
        Step::Claim(free)
    }
}

/// The condition under which a slot that is not live can be taken.
fn take_condition(slot: &SlotView) -> Condition {
    match &slot.etag {
        None => Condition::Absent,
        Some(etag) => Condition::Matches(etag.clone()),
    }
}

/// The instance ids of every member `join_list` may choose from, for the
/// EC2 check.
pub fn join_candidates(view: &RegistryView, me: &str, expiry: u64) -> Vec<String> {
    let mut ids: Vec<String> = live_servers(view, me, expiry)
        .into_iter()
        .chain(view.agents.iter().cloned())
        .filter_map(|m| m.instance_id)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The `retry_join` list for a node in `mode`: live servers, then (for an
/// agent) live agents, freshest first, never this node, none whose instance
/// is in `not_running`, no duplicates, at most [`MAX_JOIN`].
pub fn join_list(
    view: &RegistryView,
    mode: Mode,
    me: &str,
    my_address: IpAddr,
    expiry: u64,
    not_running: &HashSet<String>,
) -> Vec<IpAddr> {
    let servers = live_servers(view, me, expiry);
    let agents = view.agents.iter().filter(|m| m.node != me);
    let chosen: Box<dyn Iterator<Item = &Member>> = match mode {
        Mode::Agent => Box::new(servers.iter().chain(agents)),
        Mode::Bootstrap | Mode::Server => Box::new(servers.iter()),
    };
    let mut seen = HashSet::from([my_address]);
    chosen
        .filter(|m| {
            m.instance_id
                .as_ref()
                .is_none_or(|id| !not_running.contains(id))
        })
        .map(|m| m.address)
        .filter(|a| seen.insert(*a))
        .take(MAX_JOIN)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SlotRecord;
    use crate::registry::view::ClusterView;

    fn view(slots: u32) -> RegistryView {
        RegistryView {
            now: chrono::Utc::now(),
            settings: crate::model::Settings {
                servers: slots,
                expiry: 120,
                agent_expiry: 7200,
            },
            servers: vec![],
            agents: vec![],
            slots: (0..slots)
                .map(|index| SlotView {
                    index,
                    etag: None,
                    record: None,
                    age_seconds: 0,
                })
                .collect(),
            cluster: None,
        }
    }

    fn member(node: &str, ip: &str, age: u64) -> Member {
        Member {
            node: node.into(),
            address: ip.parse().unwrap(),
            instance_id: None,
            age_seconds: age,
        }
    }

    fn hold(v: &mut RegistryView, i: usize, node: &str, ip: &str, age: u64) {
        v.slots[i].etag = Some(format!("\"e{i}\""));
        v.slots[i].age_seconds = age;
        v.slots[i].record = Some(SlotRecord {
            node: node.into(),
            address: ip.parse().unwrap(),
            instance_id: None,
            claim_id: "c".into(),
            sequence: 1,
            released: false,
            cluster_id: None,
        });
    }

    fn cluster(v: &mut RegistryView, node: &str, age: u64) {
        v.cluster = Some(ClusterView {
            etag: "\"cl\"".into(),
            age_seconds: age,
            record: Some(ClusterRecord {
                cluster_id: "id".into(),
                bootstrap_node: node.into(),
                bootstrap_address: "10.0.0.1".parse().unwrap(),
                servers: 3,
                expiry: None,
                agent_expiry: None,
                created: String::new(),
                retired: false,
                restore: None,
                gossip_key: None,
                agent_token: None,
                ca: None,
                management_token: None,
                datacenter: None,
                primary: None,
                secrets: None,
            }),
        });
    }

    #[test]
    fn empty_registry_bootstraps_by_creating_the_cluster_record() {
        assert_eq!(
            decide(&view(3), "me", None, 3, 120, false),
            Step::Bootstrap {
                cluster: Condition::Absent,
                slot0: Condition::Absent
            }
        );
    }

    #[test]
    fn a_fresh_cluster_record_counts_as_a_server_and_reserves_slot_0() {
        let mut v = view(3);
        cluster(&mut v, "boot", 1);
        assert_eq!(
            decide(&v, "me", None, 3, 120, false),
            Step::Claim(vec![(1, Condition::Absent), (2, Condition::Absent)])
        );
        assert_eq!(decide(&v, "me", None, 1, 120, false), Step::Agent);
    }

    #[test]
    fn a_dead_cluster_is_replaced_under_if_match() {
        let mut v = view(1);
        cluster(&mut v, "boot", 500);
        hold(&mut v, 0, "boot", "10.0.0.1", 500);
        assert_eq!(
            decide(&v, "me", None, 1, 120, false),
            Step::Bootstrap {
                cluster: Condition::Matches("\"cl\"".into()),
                slot0: Condition::Matches("\"e0\"".into())
            }
        );
    }

    #[test]
    fn a_bootstrap_node_that_took_slot_0_and_left_no_longer_counts() {
        let mut v = view(2);
        cluster(&mut v, "boot", 1);
        hold(&mut v, 0, "boot", "10.0.0.1", 1);
        v.slots[0].record.as_mut().unwrap().cluster_id = Some("id".into());
        assert_eq!(live_servers(&v, "me", 120).len(), 1);
        v.slots[0].record.as_mut().unwrap().released = true;
        assert!(live_servers(&v, "me", 120).is_empty());
        // A stale slot 0 from an older cluster does not stand for the new one.
        v.slots[0].record.as_mut().unwrap().cluster_id = Some("older".into());
        assert_eq!(live_servers(&v, "me", 120).len(), 1);
    }

    #[test]
    fn enough_servers_makes_an_agent() {
        let mut v = view(3);
        hold(&mut v, 0, "a", "10.0.0.1", 5);
        hold(&mut v, 1, "b", "10.0.0.2", 5);
        v.servers.push(member("c", "10.0.0.3", 3));
        assert_eq!(decide(&v, "me", None, 3, 120, false), Step::Agent);
    }

    #[test]
    fn expired_and_released_slots_are_taken_over() {
        let mut v = view(3);
        hold(&mut v, 0, "a", "10.0.0.1", 5);
        hold(&mut v, 1, "b", "10.0.0.2", 121);
        hold(&mut v, 2, "c", "10.0.0.3", 1);
        v.slots[2].record.as_mut().unwrap().released = true;
        assert_eq!(
            decide(&v, "me", None, 3, 120, false),
            Step::Claim(vec![
                (1, Condition::Matches("\"e1\"".into())),
                (2, Condition::Matches("\"e2\"".into()))
            ])
        );
    }

    #[test]
    fn slotless_live_servers_limit_the_slots_offered() {
        // Two of the original tool's servers, three wanted: one slot only,
        // so that racing claimers cannot make five servers.
        let mut v = view(3);
        v.servers.push(member("old-1", "10.0.0.1", 3));
        v.servers.push(member("old-2", "10.0.0.2", 3));
        assert_eq!(
            decide(&v, "me", None, 3, 120, false),
            Step::Claim(vec![(0, Condition::Absent)])
        );
    }

    #[test]
    fn a_node_with_raft_state_claims_instead_of_bootstrapping() {
        assert_eq!(
            decide(&view(2), "me", None, 2, 120, true),
            Step::Claim(vec![(0, Condition::Absent), (1, Condition::Absent)])
        );
    }

    #[test]
    fn the_bootstrap_node_that_lost_its_state_is_still_the_bootstrap_node() {
        let mut v = view(3);
        cluster(&mut v, "me", 2);
        hold(&mut v, 0, "me", "10.0.0.1", 2);
        v.slots[0].record.as_mut().unwrap().cluster_id = Some("id".into());
        assert_eq!(
            decide(&v, "me", None, 3, 120, false),
            Step::Renew {
                index: 0,
                etag: "\"e0\"".into(),
                bootstrap: true
            }
        );
    }

    #[test]
    fn a_bootstrap_interrupted_before_its_record_is_finished_by_its_node_only() {
        // Slot 0 taken for cluster "new", no record of it: its holder is
        // the bootstrap node (it writes the record), whoever else looks.
        let mut v = view(3);
        hold(&mut v, 0, "me", "10.0.0.1", 2);
        v.slots[0].record.as_mut().unwrap().cluster_id = Some("new".into());
        let renew = decide(&v, "me", None, 3, 120, false);
        assert!(
            matches!(
                renew,
                Step::Renew {
                    index: 0,
                    bootstrap: true,
                    ..
                }
            ),
            "{renew:?}"
        );
        // Still so when an older cluster's record is there.
        cluster(&mut v, "someone-else", 500);
        let renew = decide(&v, "me", None, 3, 120, false);
        assert!(
            matches!(
                renew,
                Step::Renew {
                    index: 0,
                    bootstrap: true,
                    ..
                }
            ),
            "{renew:?}"
        );
        // A server that took over slot 0 of a cluster bootstrapped by
        // another node is a plain server.
        v.slots[0].record.as_mut().unwrap().cluster_id = Some("id".into());
        let renew = decide(&v, "me", None, 3, 120, false);
        assert!(
            matches!(
                renew,
                Step::Renew {
                    index: 0,
                    bootstrap: false,
                    ..
                }
            ),
            "{renew:?}"
        );
        // Others see a live server, and claim the remaining slots.
        v.cluster = None;
        v.slots[0].record.as_mut().unwrap().cluster_id = Some("new".into());
        assert_eq!(
            decide(&v, "other", None, 3, 120, false),
            Step::Claim(vec![(1, Condition::Absent), (2, Condition::Absent)])
        );
    }

    #[test]
    fn a_bootstrap_under_way_is_seen_by_others_only() {
        let mut v = view(3);
        hold(&mut v, 0, "boot", "10.0.0.1", 1);
        v.slots[0].record.as_mut().unwrap().cluster_id = Some("new".into());
        assert_eq!(
            bootstrap_in_progress(&v, "me", None, 120).as_deref(),
            Some("new")
        );
        assert_eq!(bootstrap_in_progress(&v, "boot", None, 120), None);
        // An older cluster's record does not name it either.
        cluster(&mut v, "someone", 500);
        assert!(bootstrap_in_progress(&v, "me", None, 120).is_some());
        // Once the record names it, or once slot 0 expires, it is not.
        v.cluster
            .as_mut()
            .unwrap()
            .record
            .as_mut()
            .unwrap()
            .cluster_id = "new".into();
        assert_eq!(bootstrap_in_progress(&v, "me", None, 120), None);
        v.cluster = None;
        v.slots[0].age_seconds = 121;
        assert_eq!(bootstrap_in_progress(&v, "me", None, 120), None);
    }

    #[test]
    fn the_original_tools_servers_count() {
        let mut v = view(1);
        v.servers.push(member("server1", "192.168.50.100", 30));
        assert_eq!(decide(&v, "agent1", None, 1, 120, false), Step::Agent);
    }

    #[test]
    fn a_node_never_counts_itself() {
        let mut v = view(1);
        v.servers.push(member("me", "10.0.0.9", 3));
        assert!(matches!(
            decide(&v, "me", None, 1, 120, false),
            Step::Bootstrap { .. }
        ));
    }

    #[test]
    fn a_node_of_the_same_name_on_another_instance_does_not_hold_the_slot() {
        let mut v = view(1);
        hold(&mut v, 0, "me", "10.0.0.9", 3);
        v.slots[0].record.as_mut().unwrap().instance_id = Some("i-0aaa".into());
        assert_eq!(decide(&v, "me", Some("i-0bbb"), 1, 120, false), Step::Agent);
        assert!(matches!(
            decide(&v, "me", Some("i-0aaa"), 1, 120, false),
            Step::Renew { index: 0, .. }
        ));
    }

    #[test]
    fn a_node_holding_a_live_slot_renews_it() {
        let mut v = view(3);
        hold(&mut v, 2, "me", "10.0.0.9", 3);
        assert_eq!(
            decide(&v, "me", None, 3, 120, false),
            Step::Renew {
                index: 2,
                etag: "\"e2\"".into(),
                bootstrap: false
            }
        );
    }

    #[test]
    fn join_lists_are_fresh_first_deduplicated_and_bounded() {
        let mut v = view(3);
        hold(&mut v, 0, "a", "10.0.0.1", 50);
        v.servers.push(member("a", "10.0.0.1", 10));
        v.servers.push(member("b", "10.0.0.2", 5));
        for i in 0..20 {
            v.agents
                .push(member(&format!("x{i}"), &format!("10.0.1.{i}"), i));
        }
        v.agents.push(member("me", "10.0.0.9", 0));
        let me: IpAddr = "10.0.0.9".parse().unwrap();
        let none = HashSet::new();
        let servers = join_list(&v, Mode::Server, "me", me, 120, &none);
        assert_eq!(
            servers,
            [
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "10.0.0.1".parse().unwrap()
            ]
        );
        let agents = join_list(&v, Mode::Agent, "me", me, 120, &none);
        assert_eq!(agents.len(), MAX_JOIN);
        assert_eq!(
            &agents[..3],
            &[
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "10.0.0.1".parse().unwrap(),
                "10.0.1.0".parse().unwrap()
            ]
        );
        assert!(!agents.contains(&me));
    }

    #[test]
    fn members_whose_instance_is_not_running_are_not_joined() {
        let mut v = view(1);
        v.servers.push(Member {
            instance_id: Some("i-dead".into()),
            ..member("a", "10.0.0.1", 1)
        });
        v.servers.push(Member {
            instance_id: Some("i-live".into()),
            ..member("b", "10.0.0.2", 2)
        });
        v.servers.push(member("c", "10.0.0.3", 3));
        assert_eq!(join_candidates(&v, "me", 120), ["i-dead", "i-live"]);
        let dead = HashSet::from(["i-dead".to_string()]);
        let list = join_list(
            &v,
            Mode::Agent,
            "me",
            "10.0.0.9".parse().unwrap(),
            120,
            &dead,
        );
        assert_eq!(
            list,
            [
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "10.0.0.3".parse().unwrap()
            ]
        );
    }
}
