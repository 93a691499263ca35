//! The commands, and what they share: the settings resolved from the command
//! line and the registry they open.

mod heartbeat;
mod install;
mod leave;
mod members;
mod purge;
mod run;

use std::path::Path;

use anyhow::Result;

use crate::cli::{Cli, Command, GlobalOpts};
use crate::error::usage;
use crate::identity::Identity;
use crate::registry::{self, RegistryUrl, Store};
use crate::render;

/// Runs one command.
pub async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run => run::run(&cli.global, false).await,
        Command::Plan => run::run(&cli.global, true).await,
        Command::Members => members::members(&cli.global).await,
        Command::Heartbeat => heartbeat::heartbeat(&cli.global).await,
        Command::Purge => purge::purge(&cli.global).await,
        Command::Leave => leave::leave(&cli.global).await,
        Command::Install => install::install(&cli.global),
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

/// The env file shared by `run`, the heartbeat and the boot unit: every
/// setting given or resolved. `install` passes no identity (each instance
/// learns its own at boot) and may pass no registry (user data gives it).
pub fn env_file(
    opts: &GlobalOpts,
    me: Option<&Identity>,
    registry: Option<&str>,
) -> Result<String> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let mut vars = Vec::new();
    if let Some(registry) = registry {
        vars.push(("AUTO_CONSUL_REGISTRY", registry.to_string()));
    }
    if let Some(me) = me {
        vars.push(("AUTO_CONSUL_ADDRESS", me.address.to_string()));
        vars.push(("AUTO_CONSUL_NODE", me.node.clone()));
    }
    vars.extend([
        ("AUTO_CONSUL_SERVERS", opts.servers.to_string()),
        ("AUTO_CONSUL_EXPIRY", opts.expiry.to_string()),
        ("AUTO_CONSUL_DATA_DIR", path(&opts.data_dir)),
        ("AUTO_CONSUL_CONFIG_DIR", path(&opts.config_dir)),
        ("AUTO_CONSUL_DATACENTER", opts.datacenter.clone()),
    ]);
    for (key, value) in [
        ("AUTO_CONSUL_ENCRYPT_FILE", &opts.encrypt_file),
        ("AUTO_CONSUL_ACL_TOKEN_FILE", &opts.acl_token_file),
        ("AUTO_CONSUL_CA_FILE", &opts.ca_file),
        ("AUTO_CONSUL_CERT_FILE", &opts.cert_file),
        ("AUTO_CONSUL_KEY_FILE", &opts.key_file),
    ] {
        if let Some(p) = value {
            vars.push((key, path(p)));
        }
    }
    if opts.allow_racy {
        vars.push(("AUTO_CONSUL_ALLOW_RACY", "true".into()));
    }
    render::env_file(&vars).map_err(|e| usage(format!("{e}; fix the option")))
}
