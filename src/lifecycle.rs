//! The launch gate (DESIGN.md: "In service means in service"): in an
//! autoscaling group with an `EC2_INSTANCE_LAUNCHING` lifecycle hook, the
//! instance is put in service (`CompleteLifecycleAction`, CONTINUE) only
//! once it really is: an agent once its Consul knows a leader, a server
//! once autopilot reports it a healthy voter. A boot that cannot succeed
//! completes ABANDON, so the group replaces the instance at once instead of
//! waiting out the hook. Outside a group, nothing is called.

use anyhow::{Context, Result};
use aws_config::SdkConfig;

use crate::cli::GlobalOpts;

/// The hook name the Terraform module gives its launch hooks, used when
/// only the group is known (from the instance's metadata tags).
pub const DEFAULT_HOOK: &str = "auto-consul-launch";

/// The lifecycle hook this instance answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub group: String,
    pub hook: String,
    pub instance_id: String,
}

/// The hook of this instance: `--autoscaling-group` and `--lifecycle-hook`
/// (env too), or the group from the instance's metadata tags
/// (`aws:autoscaling:groupName`, when the launch template puts tags in
/// IMDS) with the module's hook name. `None` outside a group, or without
/// an instance id.
pub async fn hook(opts: &GlobalOpts, instance_id: Option<&str>) -> Option<Hook> {
    let instance_id = instance_id?.to_string();
    let group = match &opts.autoscaling_group {
        Some(g) => g.clone(),
        None => {
            let client = crate::identity::imds_client(1);
            let path = "/latest/meta-data/tags/instance/aws:autoscaling:groupName";
            let asked = tokio::time::timeout(std::time::Duration::from_secs(2), client.get(path));
            match asked.await {
                Ok(Ok(name)) if !name.as_ref().trim().is_empty() => {
                    name.as_ref().trim().to_string()
                }
                _ => return None,
            }
        }
    };
    Some(Hook {
        group,
        hook: opts
            .lifecycle_hook
            .clone()
            .unwrap_or_else(|| DEFAULT_HOOK.to_string()),
        instance_id,
    })
}

/// What the launch comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// In service: the group goes on.
    Continue,
    /// The boot cannot succeed: the group replaces the instance.
    Abandon,
}

/// Completes the launch hook.
pub async fn complete(aws: &SdkConfig, hook: &Hook, outcome: Outcome) -> Result<()> {
    let result = match outcome {
        Outcome::Continue => "CONTINUE",
        Outcome::Abandon => "ABANDON",
    };
    aws_sdk_autoscaling::Client::new(aws)
        .complete_lifecycle_action()
        .auto_scaling_group_name(&hook.group)
        .lifecycle_hook_name(&hook.hook)
        .instance_id(&hook.instance_id)
        .lifecycle_action_result(result)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "completing lifecycle hook {} of autoscaling group {} with {result} failed: {}; \
                 this instance's role needs autoscaling:CompleteLifecycleAction on the group",
                hook.hook,
                hook.group,
                crate::error::messages(&e)
            )
        })?;
    tracing::info!(
        "lifecycle hook {} of {}: {result} for {}",
        hook.hook,
        hook.group,
        hook.instance_id
    );
    Ok(())
}

/// Tells the group the launch is still under way (the hook's timeout
/// starts again).
pub async fn still_waiting(aws: &SdkConfig, hook: &Hook) -> Result<()> {
    aws_sdk_autoscaling::Client::new(aws)
        .record_lifecycle_action_heartbeat()
        .auto_scaling_group_name(&hook.group)
        .lifecycle_hook_name(&hook.hook)
        .instance_id(&hook.instance_id)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!(crate::error::messages(&e)))
        .context("recording a lifecycle heartbeat")
}

/// Completes the hook with ABANDON when this instance is in a group: the
/// boot failed for good (the witness rule forbids a cluster, no server
/// slot within the wait). Failures to do so are warnings: the hook's own
/// timeout ends it.
pub async fn abandon(opts: &GlobalOpts, instance_id: Option<&str>, why: &str) {
    let Some(hook) = hook(opts, instance_id).await else {
        return;
    };
    tracing::warn!("{why}: abandoning this launch so the autoscaling group replaces the instance");
    let done = async {
        let aws = crate::aws::load().await?;
        complete(&aws, &hook, Outcome::Abandon).await
    };
    if let Err(e) = done.await {
        tracing::warn!("{e:#}");
    }
}
