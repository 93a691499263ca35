//! `install`: the image-baking step. Writes the boot unit and the env file,
//! enables the unit, starts nothing.

use std::path::Path;

use anyhow::Result;
use serde_json::json;

use super::env_file;
use super::run::{ENV_FILE, LEAVE_UNIT, UnitStrings, own_binary};
use crate::cli::GlobalOpts;
use crate::install::{self, FileSpec, Root};
use crate::registry::RegistryUrl;
use crate::render;

/// The boot unit on the target system.
pub const BOOT_UNIT: &str = "/etc/systemd/system/auto-consul.service";

/// `install`.
pub fn install(opts: &GlobalOpts, now: bool) -> Result<()> {
    let root = Root::new(&opts.consul.root);
    // The registry may be left for user data to give at boot; if given, it
    // must be right.
    let registry = match opts.cluster.registry.as_deref().filter(|s| !s.is_empty()) {
        Some(raw) => Some(RegistryUrl::parse(raw)?),
        None => None,
    };
    if !now {
        warn_identity_in_image(&root);
    }
    let units = UnitStrings::new(
        &opts.consul,
        &opts.tls,
        &opts.output,
        &own_binary(&root)?,
        registry.as_ref(),
    )?;
    let paths = units.paths();
    let files = [
        FileSpec {
            path: BOOT_UNIT.into(),
            contents: render::boot_unit(&paths),
            mode: 0o644,
            owner: None,
        },
        FileSpec {
            path: LEAVE_UNIT.into(),
            contents: render::leave_unit(&paths),
            mode: 0o644,
            owner: None,
        },
        FileSpec {
            path: ENV_FILE.into(),
            contents: env_file(
                opts,
                &root,
                registry.as_ref().map(|r| r.to_string()).as_deref(),
            )?,
            mode: super::env_file_mode(&root),
            owner: None,
        },
    ];
    install::check_writable(&root, &files)?;
    // Consul from a zip (or not installed yet): `run` will write a
    // consul.service that runs Consul as `consul`, and the boot unit's
    // sandbox cannot create users.
    if root.units_named("consul.service").is_empty() {
        super::run::ensure_consul_user(&root)?;
    }
    let mut changed = Vec::new();
    for f in &files {
        if install::write_atomic(&root, f)? {
            changed.push(root.path(&f.path));
        }
    }
    let enable = root.is_system() && !opts.consul.no_start;
    let start = enable && now;
    if enable {
        install::systemctl(&["daemon-reload"])?;
        install::systemctl(&["enable", "auto-consul.service", "auto-consul-leave.service"])?;
    }
    if start {
        // Not waiting: cloud-init's runcmd must not hang on a first boot
        // that waits for a slot; systemd retries it on failure.
        install::systemctl(&["start", "--no-block", "auto-consul.service"])?;
    }
    let paths: Vec<_> = files.iter().map(|f| root.path(&f.path)).collect();
    if opts.output.json {
        println!(
            "{}",
            json!({ "files": paths, "changed": changed, "enabled": enable, "started": start })
        );
    } else {
        for p in &paths {
            println!(
                "{}: {}",
                if changed.contains(p) {
                    "wrote"
                } else {
                    "unchanged"
                },
                p.display()
            );
        }
        if enable {
            println!("enabled: auto-consul.service (runs `auto-consul run` at every boot)");
        }
        if start {
            println!("started: auto-consul.service (retried until `run` succeeds)");
        }
        if registry.is_none() {
            println!(
                "no registry given: user data must write AUTO_CONSUL_REGISTRY into {}",
                Path::new(ENV_FILE).display()
            );
        }
    }
    Ok(())
}

/// `install` without `--now` is the bake step: an env file that names one
/// node's identity (written by an older `run`, or by hand) would give every
/// instance of the image the same address and name.
fn warn_identity_in_image(root: &Root) {
    let Ok(text) = std::fs::read_to_string(root.path(Path::new(ENV_FILE))) else {
        return;
    };
    let named: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
        .filter(|k| {
            matches!(
                *k,
                "AUTO_CONSUL_ADDRESS" | "AUTO_CONSUL_NODE" | "AUTO_CONSUL_INSTANCE_ID"
            )
        })
        .collect();
    if !named.is_empty() {
        tracing::warn!(
            "{ENV_FILE} sets {}: an image baked now gives every instance this one identity; \
             remove those lines before baking (each instance learns its own from IMDS)",
            named.join(", ")
        );
    }
}
