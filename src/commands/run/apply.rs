//! `run`'s third phase, apply: carries out a [`NodePlan`] and nothing
//! else: the consul user checked, files moved aside, every file written
//! atomically under the lock the heartbeat's rewrites take, files no
//! longer wanted removed, the generations recorded, then systemctl.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::decide::NodePlan;
use super::files::ensure_consul_user;
use crate::install::{self, Root};

/// What applying a plan did: the paths rewritten (files whose contents,
/// mode and owner already matched are left alone).
pub(super) struct Applied {
    pub(super) written: Vec<PathBuf>,
}

/// Carries out `plan` under `root`.
pub(super) fn apply(root: &Root, plan: &NodePlan) -> Result<Applied> {
    if plan.check_consul_user {
        ensure_consul_user(root)?;
    }
    for a in &plan.aside {
        let (from, to) = (root.path(&a.from), root.path(&a.to));
        match std::fs::rename(&from, &to) {
            Ok(()) => tracing::warn!(
                "moved {} {} to {}: {}",
                a.what,
                from.display(),
                to.display(),
                a.why
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow::anyhow!(e).context(format!(
                    "moving {} aside ({})",
                    from.display(),
                    a.why
                )));
            }
        }
    }
    if let Some(k) = &plan.keyring {
        if let Some(dir) = k.path.parent() {
            consul_dir(root, dir)?;
        }
        install::write_atomic(root, k)?;
        tracing::info!(
            "a gossip key rotation is under way: {} holds both keys",
            k.path.display()
        );
    }
    let written = write_files(root, plan)?;
    for r in &plan.records {
        if let Err(e) = install::write_atomic(root, r) {
            tracing::warn!("could not record {}: {e:#}", r.path.display());
        }
    }
    if plan.start {
        install::systemctl(&["daemon-reload"])?;
        let mut args = vec!["enable", "--now", "--no-block"];
        args.extend(plan.units.iter().copied());
        install::systemctl(&args)?;
    }
    Ok(Applied { written })
}

/// Every file, atomically, under the lock the heartbeat's rewrites take;
/// then the removals. Returns the paths actually rewritten.
fn write_files(root: &Root, plan: &NodePlan) -> Result<Vec<PathBuf>> {
    let _lock = install::lock(root, "consul-config")?;
    let mut written = Vec::new();
    for f in &plan.files {
        if install::write_atomic(root, f)? {
            written.push(root.path(&f.path));
        }
    }
    for r in &plan.remove {
        let path = root.path(&r.path);
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!("removed {} ({})", path.display(), r.why),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow::anyhow!(e).context(format!(
                    "removing {} ({}): remove it by hand",
                    path.display(),
                    r.why
                )));
            }
        }
    }
    Ok(written)
}

/// Makes directory `dir` (Consul's, under its data dir) owned by the
/// consul user when it is new: Consul writes there.
fn consul_dir(root: &Root, dir: &std::path::Path) -> Result<()> {
    let path = root.path(dir);
    if path.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    if let Some((uid, gid)) = root.user("consul") {
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))
            .with_context(|| format!("changing the owner of {}", path.display()))?;
    }
    Ok(())
}
