//! The AWS configuration, built once per process: region and credentials from
//! the standard chain, bounded retries and timeouts for the boot path.

use std::time::Duration;

use anyhow::Result;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};

use crate::error::usage;

/// Loads the shared AWS configuration. Endpoints come from the standard
/// variables (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`, ...).
pub async fn load() -> Result<SdkConfig> {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(10))
                .operation_timeout(Duration::from_secs(30))
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(4))
        .load()
        .await;
    if config.region().is_none() {
        return Err(usage(
            "no AWS region: set AWS_REGION (on EC2 it comes from the instance metadata service)",
        ));
    }
    Ok(config)
}
