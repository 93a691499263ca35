//! The AWS configuration, built once per process: region and credentials from
//! the standard chain, bounded retries and timeouts for the boot path.

use std::time::Duration;

use anyhow::Result;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};

/// Loads the shared AWS configuration. Endpoints come from the standard
/// variables (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`, ...).
pub async fn load() -> Result<SdkConfig> {
    load_in(None).await
}

/// [`load`], in `region` when given (a federated primary's registry or
/// secrets store lives in another region than this node).
pub async fn load_in(region: Option<&str>) -> Result<SdkConfig> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r.to_string()));
    }
    let config = loader
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
        // On EC2 the region comes from IMDS, which may not answer yet at
        // boot: an operational failure (exit 1, retried by the boot unit).
        anyhow::bail!(
            "no AWS region: the instance metadata service did not give one; set AWS_REGION off EC2"
        );
    }
    Ok(config)
}
