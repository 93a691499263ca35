//! Who this node is: its address and Consul node name, from the command line
//! or the EC2 instance metadata service (IMDSv2, token based).

use crate::cli::IdentityOpts;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use aws_config::imds;

use crate::lifecycle::GroupTag;
use crate::model::{instance_id_ok, validate_address, validate_node_name};
use crate::retry::Backoff;

/// This node's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Address to advertise and bind.
    pub address: IpAddr,
    /// Consul node name.
    pub node: String,
    /// EC2 instance id, when it was read or is the node name.
    pub instance_id: Option<String>,
    /// The autoscaling group tag, read in the same IMDS session when asked
    /// for ([`of_with_group`]).
    pub group_tag: GroupTag,
}

/// Resolves the identity, asking IMDS only for what was not given, all
/// within one overall `wait` (IMDS can be slow in the first seconds of boot).
/// `--instance-id`, when given, is the instance id (and the node name when
/// `--node` is not given), and IMDS is not asked for it.
pub async fn resolve(
    address: Option<IpAddr>,
    node: Option<String>,
    instance_id: Option<String>,
    wait: Duration,
    group: bool,
) -> Result<Identity> {
    let given_id = instance_id.clone();
    let identity = resolve_inner(address, node.or(instance_id), wait, group).await?;
    Ok(Identity {
        instance_id: given_id.or(identity.instance_id),
        ..identity
    })
}

/// The identity from the options shared by every command.
pub async fn of(opts: &IdentityOpts) -> Result<Identity> {
    from_opts(opts, false).await
}

/// The identity and, when IMDS is asked and `--autoscaling-group` is not
/// given (`group_given`), the autoscaling group tag, read at the same time
/// in the same IMDS session (no round trip of its own).
pub async fn of_with_group(opts: &IdentityOpts, group_given: bool) -> Result<Identity> {
    from_opts(opts, !group_given).await
}

async fn from_opts(opts: &IdentityOpts, group: bool) -> Result<Identity> {
    resolve(
        opts.address,
        opts.node.clone(),
        opts.instance_id.clone(),
        Duration::from_secs(opts.imds_timeout),
        group,
    )
    .await
}

async fn resolve_inner(
    address: Option<IpAddr>,
    node: Option<String>,
    wait: Duration,
    group: bool,
) -> Result<Identity> {
    if let (Some(address), Some(node)) = (address, node.clone()) {
        let instance_id = instance_id_ok(&node).then(|| node.clone());
        return Ok(Identity {
            address,
            node,
            instance_id,
            group_tag: GroupTag::NotAsked,
        });
    }
    let client = imds_client(2);
    let deadline = Instant::now() + wait;
    // Every IMDS read after the first reuses the client's cached token, so
    // the instance id (worth publishing) costs one more round trip at most.
    let lookup = async {
        let tag = async {
            if group {
                Ok(crate::lifecycle::read_group_tag(&client).await)
            } else {
                Ok(GroupTag::NotAsked)
            }
        };
        let (address, instance_id, group_tag) = tokio::try_join!(
            async {
                match address {
                    Some(a) => Ok(a),
                    None => {
                        let raw =
                            get_retrying(&client, "/latest/meta-data/local-ipv4", deadline).await?;
                        validate_address(raw.trim()).map_err(|e| {
                            anyhow!("IMDS local-ipv4 answered something unusable: {e}")
                        })
                    }
                }
            },
            async {
                let raw = get_retrying(&client, "/latest/meta-data/instance-id", deadline).await?;
                let id = raw.trim().to_string();
                if instance_id_ok(&id) {
                    Ok(id)
                } else {
                    Err(anyhow!(
                        "IMDS instance-id answered `{}`, not an instance id",
                        id.escape_debug()
                    ))
                }
            },
            tag,
        )?;
        let node = match node {
            Some(n) => n,
            None => {
                validate_node_name(&instance_id).map_err(|e| anyhow!("IMDS instance-id: {e}"))?;
                instance_id.clone()
            }
        };
        Ok::<_, anyhow::Error>(Identity {
            address,
            node,
            instance_id: Some(instance_id),
            group_tag,
        })
    };
    tokio::time::timeout(wait, lookup)
        .await
        .map_err(|_| anyhow!("no answer within {}s", wait.as_secs()))
        .and_then(|r| r)
        .context(
            "cannot learn this node's identity from the EC2 instance metadata service (IMDSv2): \
             not on EC2? pass --address and --node",
        )
}

/// An IMDSv2 client with short timeouts (1 s to connect, 2 s to read): the
/// callers bound their own overall waits.
pub fn imds_client(max_attempts: u32) -> imds::Client {
    imds::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .read_timeout(Duration::from_secs(2))
        .max_attempts(max_attempts)
        .build()
}

/// Reads one IMDS path, retrying ([`Backoff::IMDS`]) until `deadline`.
async fn get_retrying(client: &imds::Client, path: &str, deadline: Instant) -> Result<String> {
    let mut backoff = Backoff::IMDS;
    loop {
        match client.get(path).await {
            Ok(value) => return Ok(value.as_ref().to_string()),
            Err(e) => {
                tracing::debug!("IMDS {path}: {}", crate::error::messages(&e));
                if !backoff.sleep_within(deadline).await {
                    return Err(anyhow!("IMDS {path}: {}", crate::error::messages(&e)));
                }
            }
        }
    }
}
