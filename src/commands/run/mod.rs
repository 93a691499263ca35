//! `run` and `plan`: identity, mode decision (sticky state first, then the
//! atomic claims of DESIGN.md), files, systemctl. One concern a file: the
//! election (`elect`), the witness rule (`witness`), the conditional-write
//! probe (`probe`), the files written (`files`), the secrets read (`secrets`).

//! `run` and `plan`: one boot in three phases, each in its own file.
//!
//! 1. gather (`gather`): everything read from outside into plain values;
//!    the election (`elect`, with `witness` and `probe`) is the one write
//!    before apply: its claims settle the mode in the registry.
//! 2. decide (`decide`): a [`decide::NodePlan`], every file, move, removal
//!    and unit action, from those values (`files` holds the renderings).
//! 3. apply (`apply`): carries the plan out; `plan` shows it instead
//!    (`report`).

use anyhow::Result;

use crate::cli::GlobalOpts;

mod apply;
mod decide;
mod elect;
mod files;
mod gather;
mod probe;
mod report;
mod secrets;
mod witness;

pub use files::{
    CONFIG_FILE, ENV_FILE, HEARTBEAT_TIMER, LEAVE_UNIT, TlsPaths, UnitStrings, ensure_consul_user,
    has_raft_state, own_binary,
};

/// `run` (or `plan` with `dry_run`: nothing claimed, made or written;
/// the plan shown).
pub async fn run(opts: &GlobalOpts, dry_run: bool) -> Result<()> {
    let (mut before, first_view) = gather::before(opts, dry_run).await?;
    let mut election = gather::election(opts, &mut before, first_view, dry_run).await?;
    let after = gather::after(opts, &before, &mut election, dry_run).await?;
    if !dry_run {
        let elected = &election.elected;
        crate::metrics::node(elected.mode, elected.slot);
        crate::metrics::live_servers(
            crate::decision::live_servers(
                &elected.view,
                &before.me.node,
                elected.view.settings.expiry,
            )
            .len(),
        );
    }
    let plan = decide::decide(opts, &before, &election, &after)?;
    let written = if dry_run {
        Vec::new()
    } else {
        apply::apply(&before.root, &plan)?.written
    };
    let done = report::Done {
        elected: &election.elected,
        me: &before.me,
        plan: &plan,
        root: &before.root,
        written,
        dry_run,
        hook: election.launch.as_ref().and_then(|l| l.hook.as_ref()),
        secrets_at_genesis: dry_run
            && opts.tls.secrets.is_some()
            && after.made.is_none()
            && gather::is_new_cluster(&election.elected),
    };
    if opts.output.json {
        println!("{}", done.json(&opts.consul));
    } else {
        done.print(&opts.consul);
    }
    Ok(())
}
