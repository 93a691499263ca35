//! The launch gate (DESIGN.md: "In service means in service"): in an
//! autoscaling group with an `EC2_INSTANCE_LAUNCHING` lifecycle hook, the
//! instance is put in service (`CompleteLifecycleAction`, CONTINUE) only
//! once it really is: an agent once its Consul knows a leader, a server
//! once autopilot reports it a healthy voter. A boot that cannot succeed
//! completes ABANDON, so the group replaces the instance at once instead of
//! waiting out the hook. From the start of `run` until the gate completes
//! the hook, the group hears every [`HEARTBEAT_EVERY`] that the launch is
//! still under way. Outside a group, nothing is called.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aws_config::SdkConfig;
use aws_config::imds::client::error::ImdsError;

use crate::cli::WaitOpts;
use crate::identity::Identity;
use crate::install::Root;

/// The hook name the Terraform module gives its launch hooks, used when
/// only the group is known (from the instance's metadata tags).
pub const DEFAULT_HOOK: &str = "auto-consul-launch";

/// How often the group hears that the launch is still under way: a third
/// of the shortest hook timeout the Terraform module allows
/// (`launch_wait` = 60 s), so that two lost heartbeats in a row still
/// leave the hook alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(20);

/// Where the gate records that this instance's launch was completed.
pub const GATE_DONE: &str = "/var/lib/auto-consul/launch-gate";

/// The IMDS path of the group's name among the instance's tags.
const GROUP_TAG: &str = "/latest/meta-data/tags/instance/aws:autoscaling:groupName";
/// The IMDS path listing the instance's tags: 404 when tags are not in
/// instance metadata.
const TAGS: &str = "/latest/meta-data/tags/instance";

/// What instance metadata said of the group tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupTag {
    /// IMDS was not asked (the identity was given on the command line).
    NotAsked,
    /// `aws:autoscaling:groupName`.
    Found(String),
    /// No such tag (404): not in a group, or tags not in instance metadata.
    Absent,
    /// No usable answer.
    Unreadable(String),
}

/// Reads the group tag with `client` (the identity's IMDS session: its
/// token is shared, so this costs no round trip of its own).
pub async fn read_group_tag(client: &aws_config::imds::Client) -> GroupTag {
    match client.get(GROUP_TAG).await {
        Ok(name) if !name.as_ref().trim().is_empty() => {
            GroupTag::Found(name.as_ref().trim().into())
        }
        Ok(_) => GroupTag::Absent,
        Err(ImdsError::ErrorResponse(e)) if e.response().status().as_u16() == 404 => {
            GroupTag::Absent
        }
        Err(e) => GroupTag::Unreadable(crate::error::messages(&e)),
    }
}

/// The lifecycle hook this instance answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub group: String,
    pub hook: String,
    pub instance_id: String,
}

/// This instance's launch hook, and its heartbeats running for as long as
/// the value lives.
pub struct Launch {
    pub hook: Option<Hook>,
    _heartbeats: Option<KeepAlive>,
}

/// Finds this instance's launch hook and starts its heartbeats (unless the
/// gate already completed it), in the background: `run` goes on with its
/// claims meanwhile, and a group found through DescribeAutoScalingInstances
/// (instance tags not in IMDS) delays nothing.
pub fn watch_launch(
    waits: &WaitOpts,
    me: &Identity,
    root: &Root,
) -> tokio::task::JoinHandle<Launch> {
    let (group, name) = (
        waits.autoscaling_group.clone(),
        waits.lifecycle_hook.clone(),
    );
    let (me, root) = (me.clone(), root.clone());
    tokio::spawn(async move {
        let hook = hook_of(group, name, &me).await;
        let heartbeats = hook
            .clone()
            .filter(|h| !launch_completed(&root, h))
            .map(keep_alive);
        Launch {
            hook,
            _heartbeats: heartbeats,
        }
    })
}

/// The hook of this instance: `--autoscaling-group` and `--lifecycle-hook`
/// (env too), or the group from the instance's metadata tag
/// `aws:autoscaling:groupName` (read with the identity) with the module's
/// hook name; when instance metadata has no tags, DescribeAutoScalingInstances
/// for this instance. `None` outside a group, or without an instance id;
/// when the group cannot be found at all, a warning says no gate runs.
pub async fn hook(waits: &WaitOpts, me: &Identity) -> Option<Hook> {
    hook_of(
        waits.autoscaling_group.clone(),
        waits.lifecycle_hook.clone(),
        me,
    )
    .await
}

async fn hook_of(group: Option<String>, name: Option<String>, me: &Identity) -> Option<Hook> {
    let instance_id = me.instance_id.clone()?;
    let group = match group {
        Some(g) => g,
        None => find_group(me, &instance_id).await?,
    };
    Some(Hook {
        group,
        hook: name.unwrap_or_else(|| DEFAULT_HOOK.to_string()),
        instance_id,
    })
}

async fn find_group(me: &Identity, instance_id: &str) -> Option<String> {
    let client = crate::identity::imds_client(1);
    let bounded = |path: &'static str| {
        let client = client.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(2), client.get(path))
                .await
                .map_err(|_| "no answer within 2s".to_string())
        }
    };
    let tag = match &me.group_tag {
        GroupTag::NotAsked => match bounded(GROUP_TAG).await {
            Ok(Ok(name)) if !name.as_ref().trim().is_empty() => {
                GroupTag::Found(name.as_ref().trim().into())
            }
            Ok(Err(ImdsError::ErrorResponse(e))) if e.response().status().as_u16() == 404 => {
                GroupTag::Absent
            }
            Ok(Ok(_)) => GroupTag::Absent,
            Ok(Err(e)) => GroupTag::Unreadable(crate::error::messages(&e)),
            Err(e) => GroupTag::Unreadable(e),
        },
        known => known.clone(),
    };
    let why = match tag {
        GroupTag::Found(group) => return Some(group),
        // Tags in metadata without the group's: not in a group.
        GroupTag::Absent if matches!(bounded(TAGS).await, Ok(Ok(_))) => return None,
        GroupTag::Absent => "instance tags are not in instance metadata".to_string(),
        GroupTag::Unreadable(e) => format!("instance metadata tags cannot be read: {e}"),
        GroupTag::NotAsked => unreachable!("asked above"),
    };
    let asked = tokio::time::timeout(Duration::from_secs(10), async {
        let aws = crate::aws::load().await?;
        let out = aws_sdk_autoscaling::Client::new(&aws)
            .describe_auto_scaling_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!(crate::error::messages(&e)))?;
        Ok::<_, anyhow::Error>(
            out.auto_scaling_instances()
                .iter()
                .find(|i| i.instance_id() == Some(instance_id))
                .and_then(|i| i.auto_scaling_group_name().map(String::from)),
        )
    })
    .await;
    match asked {
        Ok(Ok(Some(group))) => {
            tracing::info!("{why}; autoscaling group {group} from DescribeAutoScalingInstances");
            Some(group)
        }
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            warn_no_gate(&why, &format!("DescribeAutoScalingInstances failed: {e:#}"));
            None
        }
        Err(_) => {
            warn_no_gate(
                &why,
                "DescribeAutoScalingInstances gave no answer within 10s",
            );
            None
        }
    }
}

fn warn_no_gate(why: &str, then: &str) {
    tracing::warn!(
        "no launch gate runs: cannot tell whether this instance is in an autoscaling group \
         ({why}; {then}); a launch lifecycle hook on its group would time out and abandon it: \
         enable instance tags in instance metadata (InstanceMetadataTags), grant \
         autoscaling:DescribeAutoScalingInstances, or pass --autoscaling-group"
    );
}

/// Whether the gate already completed this instance's launch (a reboot
/// asks nothing).
pub fn launch_completed(root: &Root, hook: &Hook) -> bool {
    std::fs::read_to_string(root.path(std::path::Path::new(GATE_DONE)))
        .is_ok_and(|d| d.trim() == hook.instance_id)
}

/// What the launch comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// In service: the group goes on.
    Continue,
    /// The boot cannot succeed: the group replaces the instance.
    Abandon,
}

/// How a completion ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completed {
    /// The group took the result.
    Done,
    /// The group has no launch action under way for this instance (the hook
    /// already completed or timed out, a group without the hook): AWS's own
    /// words.
    NoAction(String),
}

/// AWS's answer when the instance has no lifecycle action under way
/// (a ValidationError: "No active Lifecycle Action found with instance ID
/// i-...").
fn no_action(message: &str) -> bool {
    message.contains("No active Lifecycle Action found")
}

/// How long a completion is retried (the SDK's own retries inside each
/// attempt): well inside the shortest hook timeout left after a heartbeat.
const COMPLETE_RETRY: Duration = Duration::from_secs(40);

/// Completes the launch hook, retrying transient failures; a hook with no
/// action under way is not a failure.
pub async fn complete(aws: &SdkConfig, hook: &Hook, outcome: Outcome) -> Result<Completed> {
    let result = match outcome {
        Outcome::Continue => "CONTINUE",
        Outcome::Abandon => "ABANDON",
    };
    let client = aws_sdk_autoscaling::Client::new(aws);
    let what = format!(
        "completing lifecycle hook {} of autoscaling group {} with {result}",
        hook.hook, hook.group
    );
    let done = crate::retry::until(Instant::now() + COMPLETE_RETRY, &what, || async {
        match client
            .complete_lifecycle_action()
            .auto_scaling_group_name(&hook.group)
            .lifecycle_hook_name(&hook.hook)
            .instance_id(&hook.instance_id)
            .lifecycle_action_result(result)
            .send()
            .await
        {
            Ok(_) => Ok(Completed::Done),
            Err(e) => {
                let message = crate::error::messages(&e);
                if no_action(&message) {
                    Ok(Completed::NoAction(message))
                } else {
                    Err(anyhow::anyhow!(
                        "{what} failed: {message}{}",
                        denied_hint(&message)
                    ))
                }
            }
        }
    })
    .await?;
    match &done {
        Completed::Done => tracing::info!(
            "lifecycle hook {} of {}: {result} for {}",
            hook.hook,
            hook.group,
            hook.instance_id
        ),
        Completed::NoAction(message) => tracing::info!(
            "lifecycle hook {} of {}: no launch action under way for {} (completed or timed out \
             before, or the group has no such hook), nothing to {result}: {message}",
            hook.hook,
            hook.group,
            hook.instance_id
        ),
    }
    Ok(done)
}

/// The IAM hint, only when AWS said the call was denied.
fn denied_hint(message: &str) -> &'static str {
    if message.contains("AccessDenied") || message.contains("not authorized") {
        "; this instance's role needs autoscaling:CompleteLifecycleAction and \
         autoscaling:RecordLifecycleActionHeartbeat on its own group"
    } else {
        ""
    }
}

/// Tells the group the launch is still under way (the hook's timeout
/// starts again). `Ok(false)`: no launch action under way.
pub async fn still_waiting(aws: &SdkConfig, hook: &Hook) -> Result<bool> {
    match aws_sdk_autoscaling::Client::new(aws)
        .record_lifecycle_action_heartbeat()
        .auto_scaling_group_name(&hook.group)
        .lifecycle_hook_name(&hook.hook)
        .instance_id(&hook.instance_id)
        .send()
        .await
    {
        Ok(_) => Ok(true),
        Err(e) => {
            let message = crate::error::messages(&e);
            if no_action(&message) {
                Ok(false)
            } else {
                Err(anyhow::anyhow!("{message}{}", denied_hint(&message)))
                    .context("recording a lifecycle heartbeat")
            }
        }
    }
}

/// Lifecycle heartbeats in the background, every [`HEARTBEAT_EVERY`] from
/// now until the value is dropped: `run`'s own waits (the role wait, the
/// witness wait, retries) never let the launch hook time out.
pub struct KeepAlive(tokio::task::JoinHandle<()>);

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the heartbeats of `hook`'s launch.
pub fn keep_alive(hook: Hook) -> KeepAlive {
    KeepAlive(tokio::spawn(async move {
        let aws = match crate::aws::load().await {
            Ok(aws) => aws,
            Err(e) => {
                tracing::warn!("no lifecycle heartbeats: {e:#}");
                return;
            }
        };
        loop {
            match still_waiting(&aws, &hook).await {
                Ok(true) => tracing::debug!("lifecycle heartbeat for {}", hook.instance_id),
                Ok(false) => {
                    tracing::info!(
                        "lifecycle hook {} of {}: no launch action under way for {}, \
                         no heartbeats needed",
                        hook.hook,
                        hook.group,
                        hook.instance_id
                    );
                    return;
                }
                Err(e) => tracing::warn!("{e:#}"),
            }
            tokio::time::sleep(HEARTBEAT_EVERY).await;
        }
    }))
}

/// Completes the hook with ABANDON when this instance is in a group: the
/// boot failed for good (the witness rule forbids a cluster, no server
/// slot within the wait). Failures to do so are warnings: the hook's own
/// timeout ends it.
pub async fn abandon(hook: Option<&Hook>, why: &str) {
    let Some(hook) = hook else {
        return;
    };
    tracing::warn!("{why}: abandoning this launch so the autoscaling group replaces the instance");
    let done = async {
        let aws = crate::aws::load().await?;
        complete(&aws, hook, Outcome::Abandon).await
    };
    if let Err(e) = done.await {
        tracing::warn!("{e:#}");
    }
}
