//! `gate`: the launch gate of an instance in an autoscaling group (see
//! `crate::lifecycle`). Waits until the node is in service, then completes
//! the launch hook with CONTINUE; with ABANDON when --gate-wait passes.
//! Done once per instance (recorded), so a reboot asks nothing.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cli::GlobalOpts;
use crate::install::{self, Root};
use crate::lifecycle::{self, Outcome};
use crate::{agent, identity, state};

/// Where the gate records that this instance's launch was completed.
const GATE_DONE: &str = "/var/lib/auto-consul/launch-gate";
/// How often the node's readiness is asked.
const POLL: Duration = Duration::from_secs(2);
/// How often the group hears that the launch is still under way.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(60);

/// `gate`.
pub async fn gate(opts: &GlobalOpts) -> Result<()> {
    let root = Root::new(&opts.root);
    let mut me = identity::of(opts).await?;
    let registry = super::registry_url(opts)?.to_string();
    let saved = state::load_for(&root, &registry, &me);
    if me.instance_id.is_none() {
        me.instance_id = saved.as_ref().and_then(|s| s.instance_id.clone());
    }
    let Some(hook) = lifecycle::hook(opts, me.instance_id.as_deref()).await else {
        println!("not in an autoscaling group: no launch hook to complete");
        return Ok(());
    };
    let done = root.path(std::path::Path::new(GATE_DONE));
    if std::fs::read_to_string(&done).is_ok_and(|d| d.trim() == hook.instance_id) {
        println!("the launch of {} was already completed", hook.instance_id);
        return Ok(());
    }
    let server = saved.as_ref().is_some_and(|s| s.mode.is_server());
    let token = match opts.acl_token_file.as_deref() {
        Some(path) => std::fs::read_to_string(path)
            .ok()
            .map(|t| t.trim().to_string()),
        // A server's token for autopilot's report, when ACLs were made
        // at genesis.
        None => match saved.as_ref().and_then(|s| s.cluster_id.as_deref()) {
            Some(cluster) => super::management_token(opts, cluster).await.ok().flatten(),
            None => None,
        },
    };
    let aws = crate::aws::load().await?;
    let deadline = Instant::now() + Duration::from_secs(opts.gate_wait);
    let mut last_heartbeat: Option<Instant> = None;
    let mut said = String::new();
    loop {
        let (ready, why) = if server {
            match agent::autopilot_self(token.as_deref(), &me.node, me.address).await {
                Ok(Some((true, true))) => (true, String::new()),
                Ok(Some((healthy, voter))) => (
                    false,
                    format!("autopilot reports this server healthy: {healthy}, voter: {voter}"),
                ),
                Ok(None) => (false, "autopilot does not list this server yet".into()),
                Err(e) => (false, format!("{e:#}")),
            }
        } else {
            match agent::status(opts.acl_token_file.as_deref()).await {
                Ok(s) if s.leader.is_some() => (true, String::new()),
                Ok(_) => (false, "the local Consul agent knows no leader yet".into()),
                Err(e) => (false, format!("{e:#}")),
            }
        };
        if ready {
            lifecycle::complete(&aws, &hook, Outcome::Continue).await?;
            install::write_atomic(
                &root,
                &install::FileSpec {
                    path: GATE_DONE.into(),
                    contents: format!("{}\n", hook.instance_id),
                    mode: 0o644,
                    owner: None,
                },
            )?;
            println!(
                "in service: completed lifecycle hook {} of {} with CONTINUE",
                hook.hook, hook.group
            );
            return Ok(());
        }
        if why != said {
            tracing::info!("not in service yet: {why}");
            said = why.clone();
        }
        if Instant::now() >= deadline {
            lifecycle::complete(&aws, &hook, Outcome::Abandon).await?;
            anyhow::bail!(
                "not in service after {}s ({why}): completed lifecycle hook {} of {} with ABANDON; \
                 the group replaces this instance",
                opts.gate_wait,
                hook.hook,
                hook.group
            );
        }
        if last_heartbeat.is_none_or(|t| t.elapsed() >= HEARTBEAT_EVERY) {
            if let Err(e) = lifecycle::still_waiting(&aws, &hook).await {
                tracing::warn!("{e:#}");
            }
            last_heartbeat = Some(Instant::now());
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}
