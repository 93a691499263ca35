//! auto-consul: decide, race-free, whether a booting EC2 instance becomes the
//! bootstrap Consul server, a joining server or an agent, and set it up.

pub mod agent;
pub mod archive;
pub mod aws;
pub mod claims;
pub mod cli;
pub mod commands;
pub mod decision;
pub mod ec2;
pub mod error;
pub mod identity;
pub mod install;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod precedence;
pub mod registry;
pub mod render;
pub mod retry;
pub mod secrets;
pub mod served;
pub mod spool;
pub mod state;
pub mod termination;

/// Runs one command line to completion on a fresh Tokio runtime.
pub fn run(cli: cli::Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    runtime.block_on(commands::dispatch(cli))
}
