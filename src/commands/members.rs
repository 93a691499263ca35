//! `members`: the live servers and agents in the registry.

use anyhow::Result;
use serde_json::json;

use super::{open_store, registry_url};
use crate::cli::GlobalOpts;
use crate::decision::live_servers;
use crate::registry::{Member, read_view};

/// Lists every live server and agent.
pub async fn members(opts: &GlobalOpts) -> Result<()> {
    let url = registry_url(opts)?;
    let opened = open_store(&url).await?;
    let view = read_view(opened.store.as_ref(), opts.servers, opts.expiry, usize::MAX).await?;
    // Servers as the decision counts them: slot holders and heartbeats.
    let servers = live_servers(&view, "", opts.expiry);
    if opts.json {
        let list = |ms: &[Member]| {
            ms.iter()
                .map(|m| {
                    json!({
                        "node": m.node,
                        "address": m.address.to_string(),
                        "instance_id": m.instance_id,
                        "age_seconds": m.age_seconds,
                    })
                })
                .collect::<Vec<_>>()
        };
        println!(
            "{}",
            json!({ "servers": list(&servers), "agents": list(&view.agents) })
        );
        return Ok(());
    }
    for (title, ms) in [("servers", &servers), ("agents", &view.agents)] {
        println!("{title} ({}):", ms.len());
        for m in ms {
            println!(
                "  {:<24} {:<40} {:>5}s ago{}",
                m.node,
                m.address,
                m.age_seconds,
                m.instance_id
                    .as_deref()
                    .map(|i| format!("  {i}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
