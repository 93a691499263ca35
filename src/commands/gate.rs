//! `gate`: the launch gate of an instance in an autoscaling group (see
//! `crate::lifecycle`). Waits until the node is in service, then completes
//! the launch hook with CONTINUE; with ABANDON when --gate-wait passes.
//! Done once per instance (recorded), so a reboot asks nothing.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cli::GlobalOpts;
use crate::install::{self, Root};
use crate::lifecycle::{self, Completed, HEARTBEAT_EVERY, Outcome};
use crate::{agent, identity, state};

/// How often the node's readiness is asked.
const POLL: Duration = Duration::from_secs(2);

/// `gate`.
pub async fn gate(opts: &GlobalOpts) -> Result<()> {
    let root = Root::new(&opts.consul.root);
    let mut me =
        identity::of_with_group(&opts.identity, opts.waits.autoscaling_group.is_some()).await?;
    let registry = opts.cluster.registry_url()?.to_string();
    let saved = state::load_for(&root, &registry, &me);
    if me.instance_id.is_none() {
        me.instance_id = saved.as_ref().and_then(|s| s.instance_id.clone());
    }
    let Some(hook) = lifecycle::hook(&opts.waits, &me).await else {
        println!("not in an autoscaling group: no launch hook to complete");
        return Ok(());
    };
    if lifecycle::launch_completed(&root, &hook) {
        println!("the launch of {} was already completed", hook.instance_id);
        return Ok(());
    }
    let server = saved.as_ref().is_some_and(|s| s.mode.is_server());
    let token = match opts.tls.acl_token_file.as_deref() {
        Some(path) => std::fs::read_to_string(path)
            .ok()
            .map(|t| t.trim().to_string()),
        // A server's token for autopilot's report, when ACLs were made at
        // genesis. An agent asks only its own agent's status: it reads
        // no secret (its role may not).
        None if server => match saved.as_ref().and_then(|s| s.cluster_id.as_deref()) {
            Some(cluster) => {
                super::management_token(&opts.cluster, &opts.consul, &opts.tls, cluster)
                    .await
                    .ok()
                    .flatten()
            }
            None => None,
        },
        None => None,
    };
    let aws = crate::aws::load().await?;
    let deadline = Instant::now() + Duration::from_secs(opts.waits.gate_wait);
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
            match agent::status(opts.tls.acl_token_file.as_deref()).await {
                Ok(s) if s.leader.is_some() => (true, String::new()),
                Ok(_) => (false, "the local Consul agent knows no leader yet".into()),
                Err(e) => (false, format!("{e:#}")),
            }
        };
        if ready {
            let done = lifecycle::complete(&aws, &hook, Outcome::Continue).await?;
            record_done(&root, &hook)?;
            match done {
                Completed::Done => println!(
                    "in service: completed lifecycle hook {} of {} with CONTINUE",
                    hook.hook, hook.group
                ),
                Completed::NoAction(_) => no_action_line(&hook),
            }
            return Ok(());
        }
        if why != said {
            tracing::info!("not in service yet: {why}");
            said = why.clone();
        }
        if Instant::now() >= deadline {
            if let Completed::NoAction(_) =
                lifecycle::complete(&aws, &hook, Outcome::Abandon).await?
            {
                record_done(&root, &hook)?;
                no_action_line(&hook);
                return Ok(());
            }
            // Over either way: a restart of the unit asks nothing.
            record_done(&root, &hook)?;
            anyhow::bail!(
                "not in service after {}s ({why}): completed lifecycle hook {} of {} with ABANDON; \
                 the group replaces this instance",
                opts.waits.gate_wait,
                hook.hook,
                hook.group
            );
        }
        if last_heartbeat.is_none_or(|t| t.elapsed() >= HEARTBEAT_EVERY) {
            match lifecycle::still_waiting(&aws, &hook).await {
                Ok(true) => {}
                Ok(false) => {
                    record_done(&root, &hook)?;
                    no_action_line(&hook);
                    return Ok(());
                }
                Err(e) => tracing::warn!("{e:#}"),
            }
            last_heartbeat = Some(Instant::now());
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// Records that this instance's launch is over, so a reboot asks nothing.
fn record_done(root: &Root, hook: &lifecycle::Hook) -> Result<()> {
    install::write_atomic(
        root,
        &install::FileSpec {
            path: lifecycle::GATE_DONE.into(),
            contents: format!("{}\n", hook.instance_id),
            mode: 0o644,
            owner: None,
        },
    )
    .map(|_| ())
}

/// The one line of a gate that found no launch action under way.
fn no_action_line(hook: &lifecycle::Hook) {
    println!(
        "no launch lifecycle action under way for {} in {} (hook {}): it was completed or \
         timed out before, or the group has no such hook; nothing to complete",
        hook.instance_id, hook.group, hook.hook
    );
}
