//! The commands, and what they share: the settings resolved from the command
//! line and the registry they open.

mod heartbeat;
mod leave;
mod members;
mod purge;
mod run;

use anyhow::Result;

use crate::cli::{Cli, Command, GlobalOpts};
use crate::error::usage;
use crate::registry::{self, RegistryUrl, Store};

/// Runs one command.
pub async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run => run::run(&cli.global, false).await,
        Command::Plan => run::run(&cli.global, true).await,
        Command::Members => members::members(&cli.global).await,
        Command::Heartbeat => heartbeat::heartbeat(&cli.global).await,
        Command::Purge => purge::purge(&cli.global).await,
        Command::Leave => leave::leave(&cli.global).await,
    }
}

/// The registry URL, required by every command that talks to the registry.
pub fn registry_url(opts: &GlobalOpts) -> Result<RegistryUrl> {
    let raw = opts
        .registry
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            usage(
                "no registry given: pass --registry s3://BUCKET/PREFIX or set AUTO_CONSUL_REGISTRY",
            )
        })?;
    RegistryUrl::parse(raw)
}

/// An open registry, and the AWS configuration when it lives in S3.
pub struct Opened {
    /// The store.
    pub store: Box<dyn Store>,
    /// The AWS configuration (S3 registries only).
    pub aws: Option<aws_config::SdkConfig>,
}

/// Opens the registry's store, loading the AWS configuration only for S3.
pub async fn open_store(url: &RegistryUrl) -> Result<Opened> {
    let aws = match url {
        RegistryUrl::S3 { .. } => Some(crate::aws::load().await?),
        RegistryUrl::File { .. } => None,
    };
    let store = registry::open(url, aws.as_ref()).await?;
    Ok(Opened { store, aws })
}
