//! Checking members against EC2: instances that EC2 reports as stopped or
//! going away are not worth joining. Best effort: any failure keeps them.

use std::collections::HashSet;

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use futures::future::join_all;

/// Instance ids per DescribeInstances request (EC2 takes at most 200
/// values in one filter).
const BATCH: usize = 200;

/// The instances among `ids` that EC2 reports as stopped, stopping,
/// shutting down or terminated. Ids are asked through an `instance-id`
/// filter, so an id EC2 does not know (another account or region, long
/// gone) is simply absent from the answer and kept, and cannot hide the
/// state of the others. Without permission, or on any error: a warning and
/// nothing dropped.
pub async fn not_running(config: &aws_config::SdkConfig, ids: &[String]) -> HashSet<String> {
    if ids.is_empty() {
        return HashSet::new();
    }
    let client = aws_sdk_ec2::Client::new(config);
    let batches = ids.chunks(BATCH).map(|batch| {
        let client = client.clone();
        async move {
            let filter = Filter::builder()
                .name("instance-id")
                .set_values(Some(batch.to_vec()))
                .build();
            let mut pages = client
                .describe_instances()
                .filters(filter)
                .into_paginator()
                .send();
            let mut dead = Vec::new();
            while let Some(page) = pages.next().await {
                let page = page?;
                for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                    let state = instance.state().and_then(|s| s.name());
                    let gone = matches!(
                        state,
                        Some(
                            InstanceStateName::Stopped
                                | InstanceStateName::Stopping
                                | InstanceStateName::ShuttingDown
                                | InstanceStateName::Terminated
                        )
                    );
                    if gone && let Some(id) = instance.instance_id() {
                        dead.push(id.to_string());
                    }
                }
            }
            Ok::<_, aws_sdk_ec2::error::SdkError<_>>(dead)
        }
    });
    let mut out = HashSet::new();
    for result in join_all(batches).await {
        match result {
            Ok(dead) => out.extend(dead),
            Err(e) => {
                let hint = match e.code() {
                    Some("UnauthorizedOperation") => {
                        "the instance role lacks ec2:DescribeInstances"
                    }
                    _ => "EC2 could not be asked",
                };
                tracing::warn!(
                    "not checking members against EC2 ({hint}); joining them unchecked: {}",
                    DisplayErrorContext(&e)
                );
            }
        }
    }
    out
}
