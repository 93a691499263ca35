//! The witness rule of DESIGN.md's Day-2 rules: a new cluster replaces an
//! old one only when every server of the old one is confirmed gone.

use anyhow::Result;

use crate::ec2::{self, Witness};
use crate::model::SlotRecord;
use crate::registry::{RegistryView, read_slots_from};

use super::elect::{Elector, UNNAMED, Unconfirmed, old_cluster_id};

impl Elector<'_> {
    /// The witness rule: the servers of the registry's old cluster (the
    /// holders of unreleased slots) that are not confirmed gone. A slot
    /// released by `leave` confirms its holder gone; otherwise only EC2
    /// can (terminated, stopped or unknown). The operator's
    /// `cluster retire` or `--replace-cluster` confirms them all.
    pub(super) async fn unconfirmed_servers(
        &self,
        view: &RegistryView,
    ) -> Result<Vec<Unconfirmed>> {
        // Every slot, also those past the cluster's count (a lowered
        // `--servers`, a junk record): their holders may still serve.
        // A registry that never had a cluster (no record, no slot) has
        // nothing to witness: no listing.
        let fresh = view.cluster.is_none() && view.slots.iter().all(|s| s.etag.is_none());
        let beyond = if fresh {
            Vec::new()
        } else {
            read_slots_from(self.store, view.slots.len() as u32).await?
        };
        let holders: Vec<(u32, SlotRecord)> = view
            .slots
            .iter()
            .chain(beyond.iter())
            .filter_map(|s| s.record.clone().map(|r| (s.index, r)))
            .filter(|(_, r)| {
                !r.released && !r.held_by(&self.me.node, self.me.instance_id.as_deref())
            })
            .collect();
        if holders.is_empty() {
            return Ok(Vec::new());
        }
        let old = old_cluster_id(view).unwrap_or_else(|| UNNAMED.to_string());
        if view.record().is_some_and(|r| r.retired) {
            tracing::warn!(
                "cluster {old} was retired by an operator (`auto-consul cluster retire`): its servers count as gone"
            );
            return Ok(Vec::new());
        }
        if let Some(id) = &self.replace {
            if old == *id {
                tracing::warn!(
                    "--replace-cluster {id}: an operator confirmed the servers of cluster {id} gone"
                );
                return Ok(Vec::new());
            }
            tracing::warn!(
                "--replace-cluster {id} names no cluster of this registry (its cluster is {old}): ignored"
            );
        }
        let ids: Vec<String> = holders
            .iter()
            .filter_map(|(_, r)| r.instance_id.clone())
            .collect();
        let answer = if ids.is_empty() {
            Ok(Default::default())
        } else {
            match self.aws {
                Some(aws) => ec2::witness(aws, &ids).await,
                None => match crate::aws::load().await {
                    Ok(aws) => ec2::witness(&aws, &ids).await,
                    Err(e) => Err(e),
                },
            }
        };
        Ok(holders
            .into_iter()
            .filter_map(|(slot, holder)| {
                let why = not_confirmed(&holder, &answer)?;
                Some(Unconfirmed { slot, holder, why })
            })
            .collect())
    }

    pub(super) fn witness_message(
        &self,
        view: &RegistryView,
        unconfirmed: &[Unconfirmed],
    ) -> String {
        let old = old_cluster_id(view).unwrap_or_else(|| UNNAMED.to_string());
        // `cluster retire` needs a record to mark; without one, the flag.
        let way_out = if view.record().is_some() {
            format!(
                "run `auto-consul cluster retire {old}` (or boot once with --replace-cluster {old})"
            )
        } else {
            format!("boot once with --replace-cluster {old}")
        };
        let list: Vec<String> = unconfirmed
            .iter()
            .map(|u| {
                format!(
                    "{} ({}, slot {}: {})",
                    u.holder.node, u.holder.address, u.slot, u.why
                )
            })
            .collect();
        format!(
            "cluster {old} has no live server in the registry {}, but its servers are not confirmed gone: {}. \
             A new cluster beside them would split Consul in two, so none is started. If they are alive, \
             fix their heartbeats (registry permissions, the Consul agent, auto-consul-heartbeat.timer); \
             if they are gone for good, {way_out}.",
            self.registry,
            list.join("; ")
        )
    }
}

/// Why EC2's `answer` does not confirm `holder` gone (none: it does).
fn not_confirmed(
    holder: &SlotRecord,
    answer: &Result<std::collections::HashMap<String, Witness>>,
) -> Option<String> {
    match (&holder.instance_id, answer) {
        (None, _) => Some("no instance id to ask EC2 about".to_string()),
        (Some(_), Err(e)) => Some(format!("EC2 could not say ({e:#})")),
        (Some(id), Ok(words)) => match words.get(id) {
            Some(Witness::Running) => Some(format!("EC2 says {id} is running")),
            Some(Witness::Gone(state)) => {
                tracing::info!(
                    "server {} of the old cluster: EC2 says {id} is {state}",
                    holder.node
                );
                None
            }
            Some(Witness::Unknown) | None => {
                tracing::info!(
                    "server {} of the old cluster: EC2 does not know {id}",
                    holder.node
                );
                None
            }
        },
    }
}
