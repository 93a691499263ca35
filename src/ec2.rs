//! Asking EC2 about members: instances that EC2 reports as stopped or
//! going away are not worth joining (best effort: any failure keeps them),
//! and an old cluster's servers are confirmed gone only on EC2's word
//! (the witness rule: any failure confirms nothing).

use std::collections::{HashMap, HashSet};

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use futures::future::join_all;

/// Instance ids per DescribeInstances request (EC2 takes at most 200
/// values in one filter).
const BATCH: usize = 200;

/// What EC2 says of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Witness {
    /// Pending, running, or a state this build does not know: the member
    /// may well be alive.
    Running,
    /// Stopped, stopping, shutting down or terminated (the state named).
    Gone(String),
    /// EC2 does not know the id (terminated long ago, or another account
    /// or region).
    Unknown,
}

/// EC2's word on each of `ids`, one result per batch of [`BATCH`] ids, the
/// batches asked at once. Ids are asked through an `instance-id` filter, so
/// an id EC2 does not know is simply absent from the answer ([`Witness::Unknown`])
/// and cannot hide the state of the others.
async fn ask(
    config: &aws_config::SdkConfig,
    ids: &[String],
) -> Vec<Result<HashMap<String, Witness>, String>> {
    let client = aws_sdk_ec2::Client::new(config);
    let batches = ids.chunks(BATCH).map(|batch| {
        let client = client.clone();
        async move {
            let mut out: HashMap<String, Witness> = batch
                .iter()
                .map(|id| (id.clone(), Witness::Unknown))
                .collect();
            let filter = Filter::builder()
                .name("instance-id")
                .set_values(Some(batch.to_vec()))
                .build();
            let mut pages = client
                .describe_instances()
                .filters(filter)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| {
                    let hint = match e.code() {
                        Some("UnauthorizedOperation") => {
                            "the instance role lacks ec2:DescribeInstances"
                        }
                        _ => "EC2 could not be asked",
                    };
                    format!("{hint}: {}", crate::error::messages(&e))
                })?;
                for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                    let Some(id) = instance.instance_id() else {
                        continue;
                    };
                    let word = match instance.state().and_then(|s| s.name()) {
                        Some(
                            s @ (InstanceStateName::Stopped
                            | InstanceStateName::Stopping
                            | InstanceStateName::ShuttingDown
                            | InstanceStateName::Terminated),
                        ) => Witness::Gone(s.as_str().to_string()),
                        _ => Witness::Running,
                    };
                    if let Some(slot) = out.get_mut(id) {
                        *slot = word;
                    }
                }
            }
            Ok(out)
        }
    });
    join_all(batches).await
}

/// The instances among `ids` that EC2 reports as stopped, stopping,
/// shutting down or terminated. An id EC2 does not know is kept. Without
/// permission, or on any error: a warning, and nothing of that batch
/// dropped.
pub async fn not_running(config: &aws_config::SdkConfig, ids: &[String]) -> HashSet<String> {
    if ids.is_empty() {
        return HashSet::new();
    }
    let mut out = HashSet::new();
    for result in ask(config, ids).await {
        match result {
            Ok(words) => out.extend(
                words
                    .into_iter()
                    .filter(|(_, w)| matches!(w, Witness::Gone(_)))
                    .map(|(id, _)| id),
            ),
            Err(e) => {
                tracing::warn!("not checking members against EC2; joining them unchecked: {e}")
            }
        }
    }
    out
}

/// EC2's word on each of `ids`, for the witness rule. Any failure (no
/// permission, no endpoint) is an error: silence is never an answer.
pub async fn witness(
    config: &aws_config::SdkConfig,
    ids: &[String],
) -> anyhow::Result<HashMap<String, Witness>> {
    let mut out = HashMap::new();
    for result in ask(config, ids).await {
        out.extend(result.map_err(anyhow::Error::msg)?);
    }
    Ok(out)
}

/// The running instances carrying tag `key` = `value`: each one's id and
/// ARN (`arn:<partition>:ec2:<region>:<owner>:instance/<id>`, what IAM
/// calls the caller's `ec2:SourceInstanceARN` when that instance signs a
/// request with its role's credentials).
pub async fn tagged_running(
    config: &aws_config::SdkConfig,
    key: &str,
    value: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let client = aws_sdk_ec2::Client::new(config);
    let region = config
        .region()
        .map(|r| r.as_ref().to_string())
        .unwrap_or_default();
    let partition = partition(&region);
    let mut pages = client
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{key}"))
                .values(value)
                .build(),
        )
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .build(),
        )
        .into_paginator()
        .send();
    let mut out = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            anyhow::anyhow!(
                "listing the instances tagged {key}={value}: {}",
                crate::error::messages(&e)
            )
        })?;
        for r in page.reservations() {
            let owner = r.owner_id().unwrap_or_default();
            for i in r.instances() {
                if let Some(id) = i
                    .instance_id()
                    .filter(|id| crate::model::instance_id_ok(id))
                {
                    out.push((
                        id.to_string(),
                        format!("arn:{partition}:ec2:{region}:{owner}:instance/{id}"),
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// The ARN of instance `id` when EC2 reports it pending or running (as
/// [`tagged_running`] makes it); `None` when it is not.
pub async fn running_arn(
    config: &aws_config::SdkConfig,
    id: &str,
) -> anyhow::Result<Option<String>> {
    let client = aws_sdk_ec2::Client::new(config);
    let region = config
        .region()
        .map(|r| r.as_ref().to_string())
        .unwrap_or_default();
    let out = client
        .describe_instances()
        .filters(Filter::builder().name("instance-id").values(id).build())
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("asking EC2 about {id}: {}", crate::error::messages(&e)))?;
    for r in out.reservations() {
        for i in r.instances() {
            let live = matches!(
                i.state().and_then(|s| s.name()),
                Some(InstanceStateName::Pending | InstanceStateName::Running)
            );
            if i.instance_id() == Some(id) && live {
                return Ok(Some(format!(
                    "arn:{}:ec2:{region}:{}:instance/{id}",
                    partition(&region),
                    r.owner_id().unwrap_or_default()
                )));
            }
        }
    }
    Ok(None)
}

/// The AWS partition of `region`.
fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}
