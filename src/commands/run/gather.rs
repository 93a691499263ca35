//! `run`'s first phase, gather: everything read from outside into plain
//! values, no decision about files. Before the election: local input
//! (binaries, secret files, flags), identity (IMDS), the first look at the
//! registry, the secrets store. The election itself (`elect`) is the one
//! write before apply: its claims must be settled in the registry before
//! anything depends on the mode. After it: whom to join (registry, EC2,
//! the primary's registry), the secrets (store), and what the disk holds
//! that the decision depends on.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use super::elect::VIEW_AGENTS;
use super::elect::{self, Elected, Elector};
use super::files::*;
use super::secrets::Secrets;
use crate::cli::{
    ClusterOpts, ConsulOpts, GlobalOpts, IdentityOpts, RoleWanted, SecretOpts, WaitOpts,
};
use crate::commands::{Opened, open_store};
use crate::error::usage;
use crate::identity::{self, Identity};
use crate::install::{FileSpec, Root};
use crate::lifecycle::Launch;
use crate::model::{Mode, Primary};
use crate::precedence;
use crate::registry::{Agents, RegistryUrl, RegistryView, read_view};
use crate::secrets::{Material, SecretStore};
use crate::state::{self, State};

/// The most a default wait (`--role-wait`, `--witness-wait`) lasts: both,
/// with the IMDS wait, stay inside the boot unit's 15-minute start timeout.
const DEFAULT_WAIT_CAP: u64 = 400;

/// What `run` checked of its local input.
pub(super) struct Local {
    pub(super) auto_consul: PathBuf,
    pub(super) secrets: Secrets,
    pub(super) manages_consul: bool,
}

/// Everything read before the election.
pub(super) struct Before {
    pub(super) root: Root,
    pub(super) url: RegistryUrl,
    pub(super) local: Local,
    pub(super) me: Identity,
    pub(super) launch: Option<tokio::task::JoinHandle<Launch>>,
    pub(super) opened: Opened,
    pub(super) racy: bool,
    pub(super) units: UnitStrings,
    /// The consul binary as the units name it.
    pub(super) consul: String,
    /// The files the decision does not change (checked writable).
    pub(super) fixed: Vec<FileSpec>,
    pub(super) raft: bool,
    pub(super) previous: Option<State>,
    pub(super) secrets_store: Option<Box<dyn SecretStore>>,
}

/// Local input (it fails before anything is asked), then identity, the
/// conditional-write probe and the first read of the registry at once (no
/// claim before the probe has passed), then the files the decision does
/// not change, checked writable before any claim.
pub(super) async fn before(opts: &GlobalOpts, dry_run: bool) -> Result<(Before, RegistryView)> {
    let url = opts.cluster.registry_url()?;
    let root = Root::new(&opts.consul.root);
    let (local, consul_path) = local_checks(&opts.waits, &opts.consul, &opts.tls, &root, dry_run)?;
    let (me, launch, opened, racy, first_view) = first_look(
        &opts.cluster,
        &opts.identity,
        &opts.waits,
        &root,
        &url,
        dry_run,
    )
    .await?;
    crate::commands::warn_on_mismatch(&opts.cluster, &first_view);
    let units = UnitStrings::new(
        &opts.consul,
        &opts.tls,
        &opts.output,
        &local.auto_consul,
        Some(&url),
    )?;
    let consul = crate::render::unit_path(&consul_path).context("the consul binary's path")?;
    let fixed = fixed_files(
        opts,
        &root,
        local.manages_consul,
        &units,
        &consul,
        &url.to_string(),
    )?;
    crate::install::check_writable(&root, &fixed)?;
    let raft = has_raft_state(&root, &opts.consul.data_dir);
    let previous = sticky_state(&opts.waits, &root, &url.to_string(), &me);
    // `plan` reads the store too (never makes a secret: `ReadOnly`).
    let secrets_store = match &opts.tls.secrets {
        Some(url) => crate::secrets::open(url).await?.map(|s| {
            if dry_run {
                Box::new(crate::secrets::ReadOnly(s)) as Box<dyn SecretStore>
            } else {
                s
            }
        }),
        None => None,
    };
    let before = Before {
        root,
        url,
        local,
        me,
        launch,
        opened,
        racy,
        units,
        consul,
        fixed,
        raft,
        previous,
        secrets_store,
    };
    Ok((before, first_view))
}

/// The binaries, the secret files, the TLS flags, other files of the
/// config dir that would bootstrap, the consul user (made before anything
/// is claimed on the running system). Returns the consul binary's path.
fn local_checks(
    waits: &WaitOpts,
    consul_opts: &ConsulOpts,
    tls: &SecretOpts,
    root: &Root,
    dry_run: bool,
) -> Result<(Local, PathBuf)> {
    let consul = find_consul(root)?;
    let auto_consul = own_binary(root)?;
    let secrets = Secrets::read(tls)?;
    if tls.ca_file.is_some() && tls.cert_file.is_none() && waits.role != RoleWanted::Agent {
        return Err(usage(
            "--ca-file without --cert-file: a server needs its own certificate (--cert-file and \
             --key-file); only a node run with --role agent does without one (it gets one from \
             the servers through auto_encrypt)",
        ));
    }
    if let Some(c) = precedence::bootstrapping(
        &root.path(&consul_opts.config_dir),
        &consul_opts.config_dir,
        CONFIG_FILE,
        &[LEGACY_CONFIG_FILE],
    )
    .first()
    {
        return Err(usage(format!(
            "{c}: auto-consul alone decides which node bootstraps"
        )));
    }
    // On the running system the user is made before anything is claimed
    // or rendered (the drop-in hands it the data dir); under another root
    // its absence is only a warning, given with the files.
    let manages_consul = manages_consul_unit(root);
    if !dry_run && root.is_system() && manages_consul {
        ensure_consul_user(root)?;
    }
    let local = Local {
        auto_consul,
        secrets,
        manages_consul,
    };
    Ok((local, consul))
}

/// Identity, the probe of conditional writes (none for an agent, which
/// never makes one, nor for `plan`) and the first read, at once.
async fn first_look(
    cluster: &ClusterOpts,
    identity_opts: &IdentityOpts,
    waits: &WaitOpts,
    root: &Root,
    url: &RegistryUrl,
    dry_run: bool,
) -> Result<(
    Identity,
    Option<tokio::task::JoinHandle<Launch>>,
    Opened,
    bool,
    RegistryView,
)> {
    // Who this node is; then, in the background, its launch hook (the
    // group tag was read with the identity), whose heartbeats start at once.
    let who = async {
        let me = identity::of_with_group(identity_opts, waits.autoscaling_group.is_some()).await?;
        let launch = (!dry_run).then(|| crate::lifecycle::watch_launch(waits, &me, root));
        Ok::<_, anyhow::Error>((me, launch))
    };
    let registry = async {
        let opened = open_store(url).await?;
        let store = opened.store.as_ref();
        let probe = async {
            if dry_run || waits.role == RoleWanted::Agent {
                Ok(false)
            } else {
                super::probe::check_conditional_writes(store, cluster.allow_racy).await
            }
        };
        let (racy, view) = tokio::try_join!(
            probe,
            read_view(store, cluster.seed(), Agents::Recent(VIEW_AGENTS))
        )?;
        Ok::<_, anyhow::Error>((opened, racy, view))
    };
    let ((me, launch), (opened, racy, view)) = tokio::try_join!(who, registry)?;
    Ok((me, launch, opened, racy, view))
}

/// The state file's mode, when it is sticky: only server modes are; an
/// agent decides again at each boot, and a node now given `--role agent`
/// becomes one.
fn sticky_state(waits: &WaitOpts, root: &Root, registry: &str, me: &Identity) -> Option<State> {
    state::load_for(root, registry, me)
        .filter(|s| s.mode.is_server())
        .filter(|s| {
            let keep = waits.role != RoleWanted::Agent;
            if !keep {
                tracing::warn!(
                    "this node ran as {} but is now given --role agent: it runs as an agent; \
                     its slot expires, and a server replaces it",
                    s.mode.as_str()
                );
            }
            keep
        })
}

/// `--witness-wait`, or a default that fits, with IMDS, inside the boot
/// unit's start timeout (15 min).
fn witness_wait(waits: &WaitOpts, view: &RegistryView) -> Duration {
    Duration::from_secs(
        waits
            .witness_wait
            .unwrap_or(view.settings.expiry.min(DEFAULT_WAIT_CAP)),
    )
}

/// `--role-wait`, or one expiry and one heartbeat interval, capped alike.
fn role_wait(waits: &WaitOpts, view: &RegistryView) -> Duration {
    Duration::from_secs(waits.role_wait.unwrap_or_else(|| {
        let e = view.settings.expiry;
        (e + e / 3 + 10).min(DEFAULT_WAIT_CAP)
    }))
}

/// What the election settled, and what it made on the way.
pub(super) struct Election {
    pub(super) elected: Elected,
    pub(super) launch: Option<Launch>,
    /// The primary a secondary's genesis recorded.
    pub(super) primary: Option<Primary>,
    /// The secrets a genesis made.
    pub(super) made: Option<Material>,
}

/// The election (the one write before apply: claims in the registry);
/// a boot that cannot succeed abandons its launch in an autoscaling group
/// (the group replaces the instance at once).
pub(super) async fn election(
    opts: &GlobalOpts,
    b: &mut Before,
    first: RegistryView,
    dry_run: bool,
) -> Result<Election> {
    let me = &b.me;
    let elector = Elector {
        secrets: b.secrets_store.as_deref().filter(|_| !dry_run),
        store: b.opened.store.as_ref(),
        me,
        registry: b.url.to_string(),
        seed: opts.cluster.seed(),
        dry_run,
        racy: b.racy,
        aws: b.opened.aws.as_ref(),
        replace: opts.cluster.replace_cluster.clone(),
        witness_wait: witness_wait(&opts.waits, &first),
        role: opts.waits.role,
        role_wait: role_wait(&opts.waits, &first),
        restore: !opts.snapshots.no_restore,
        made: Default::default(),
        own_token: crate::commands::node_tokens::own_instance(
            &opts.tls,
            &me.node,
            me.instance_id.as_deref(),
        )
        .map(str::to_string),
        opts,
        recorded_primary: Default::default(),
    };
    let elected = elector.elect(b.previous.as_ref(), b.raft, first).await;
    let launch = match b.launch.take() {
        Some(task) => Some(task.await.context("finding this instance's launch hook")?),
        None => None,
    };
    let elected = match elected {
        Ok(elected) => elected,
        Err(e) => {
            if !dry_run && e.downcast_ref::<elect::Definitive>().is_some() {
                let hook = launch.as_ref().and_then(|l| l.hook.as_ref());
                crate::lifecycle::abandon(hook, "this boot cannot succeed").await;
            }
            return Err(e);
        }
    };
    let mut primary = take_ours(&elector.recorded_primary, &elected);
    // `plan` of a genesis (or of one left unfinished) checks the primary a
    // secondary names, as `run` does when it writes the record (reads
    // only), and shows what follows from it.
    if dry_run && is_new_cluster(&elected) {
        primary = crate::commands::federation::primary_for_genesis(
            &opts.cluster,
            &opts.consul,
            &opts.tls,
        )
        .await?
        .map(|(p, _)| p);
    }
    let made = take_ours(&elector.made, &elected).filter(|_| elected.mode.is_server());
    Ok(Election {
        elected,
        launch,
        primary,
        made,
    })
}

/// What the election left in `m` for the cluster it settled on (a
/// genesis's: a retried one may have drawn another id).
fn take_ours<T>(m: &std::sync::Mutex<Option<(String, T)>>, elected: &Elected) -> Option<T> {
    m.lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .filter(|(id, _)| Some(id) == elected.cluster_id.as_ref())
        .map(|(_, v)| v)
}

/// Everything read after the election.
pub(super) struct After {
    /// A secondary datacenter's primary.
    pub(super) primary: Option<Primary>,
    pub(super) retry_join: Vec<IpAddr>,
    pub(super) retry_join_wan: Vec<IpAddr>,
    /// The primary's ACL replication token (a secondary's servers).
    pub(super) replication: Option<String>,
    /// The secrets this node runs with (`--secrets`).
    pub(super) made: Option<Material>,
    /// This node's instance, when it runs with a token of its own.
    pub(super) own: Option<String>,
    pub(super) disk: Disk,
}

/// An agent waits for a restore the cluster owes; then whom to join, the
/// primary's servers and replication token, the secrets (the genesis's, or
/// read), this node's own token, and the disk.
pub(super) async fn after(
    opts: &GlobalOpts,
    b: &Before,
    e: &mut Election,
    dry_run: bool,
) -> Result<After> {
    let elected = &e.elected;
    if !dry_run && elected.mode == Mode::Agent {
        wait_for_restore(&opts.waits, b.opened.store.as_ref(), elected).await?;
    }
    let primary = e.primary.take().or_else(|| {
        elected
            .view
            .record()
            .filter(|r| Some(&r.cluster_id) == elected.cluster_id.as_ref())
            .and_then(|r| r.primary.clone())
    });
    let config_on_disk = b.root.path(&opts.consul.config_dir.join(CONFIG_FILE));
    let (retry_join, (retry_join_wan, replication)) = tokio::join!(
        join_list(&b.opened, elected, &b.me),
        crate::commands::federation::at_run(
            &opts.cluster,
            &opts.tls,
            primary.as_ref(),
            elected.mode,
            &config_on_disk
        )
    );
    let own = crate::commands::node_tokens::own_instance(
        &opts.tls,
        &b.me.node,
        b.me.instance_id.as_deref(),
    )
    .map(str::to_string);
    let made = material(opts, b, e, own.as_deref(), dry_run).await?;
    let disk = Disk::read(&opts.consul, &b.root, &e.elected, made.is_some());
    Ok(After {
        primary,
        retry_join,
        retry_join_wan,
        replication,
        made,
        own,
        disk,
    })
}

/// An agent does not join a cluster that owes the restore of a snapshot
/// (the restore would replace the registrations and the Connect CA that
/// signed its certificates): it waits, bounded by `--restore-wait`, while
/// its launch stays pending.
async fn wait_for_restore(
    waits: &WaitOpts,
    store: &dyn crate::registry::Store,
    elected: &Elected,
) -> Result<()> {
    let owed = |r: &crate::model::ClusterRecord| {
        r.restore
            .as_ref()
            .filter(|p| p.state.open())
            .map(|p| p.from.clone())
    };
    let Some((cluster, from)) = elected
        .view
        .record()
        .and_then(|r| Some((r.cluster_id.clone(), owed(r)?)))
    else {
        return Ok(());
    };
    tracing::warn!(
        "cluster {cluster} owes the restore of cluster {from}'s snapshot: this agent joins once it is done \
         (waiting up to {}s, --restore-wait)",
        waits.restore_wait
    );
    let poll = Duration::from_secs((waits.restore_wait / 40).clamp(1, 10));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(waits.restore_wait);
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(anyhow::anyhow!(
                "cluster {cluster} still owes the restore of cluster {from}'s snapshot after {}s: this \
                 agent does not join it yet (auto-consul.service tries again; `auto-consul status` on a \
                 server says why, `auto-consul restore --cancel` drops the restore)",
                waits.restore_wait
            ));
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
        match crate::commands::snapshot::read_record(store).await {
            Ok(Some((r, _))) if r.cluster_id == cluster && owed(&r).is_some() => {}
            Ok(_) => {
                tracing::info!("cluster {cluster} owes no restore now: this agent joins");
                return Ok(());
            }
            Err(e) => tracing::warn!("reading the cluster record again: {e:#}"),
        }
    }
}

/// `retry_join`, members EC2 reports not running left out.
async fn join_list(opened: &Opened, elected: &Elected, me: &Identity) -> Vec<IpAddr> {
    let expiry = elected.view.settings.expiry;
    let not_running = match &opened.aws {
        Some(aws) => {
            crate::ec2::not_running(
                aws,
                &crate::decision::join_candidates(&elected.view, &me.node, expiry),
            )
            .await
        }
        None => Default::default(),
    };
    crate::decision::join_list(
        &elected.view,
        elected.mode,
        &me.node,
        me.address,
        expiry,
        &not_running,
    )
}

/// The secrets this node runs with: the ones its genesis made, or read
/// (a server makes what is missing; `plan` makes nothing, and a cluster it
/// would make has none yet), with this node's own token.
async fn material(
    opts: &GlobalOpts,
    b: &Before,
    e: &mut Election,
    own: Option<&str>,
    dry_run: bool,
) -> Result<Option<Material>> {
    let elected = &e.elected;
    let store = b.secrets_store.as_deref();
    let made = match e.made.take() {
        Some(m) => Some(m),
        None if dry_run && is_new_cluster(elected) => None,
        None => genesis_material(store, elected, own).await?,
    };
    match (made, store, elected.cluster_id.as_deref(), own) {
        (Some(m), Some(store), Some(cluster), Some(own)) if !dry_run => Ok(Some(
            crate::commands::node_tokens::at_run(
                opts,
                store,
                elected.mode.is_server(),
                generations(elected).per_node,
                cluster,
                own,
                m,
            )
            .await?,
        )),
        (made, ..) => Ok(made),
    }
}

/// Whether the election settled on a cluster the registry's record does
/// not name yet (a genesis: its secrets are made when `run` makes it).
pub(super) fn is_new_cluster(elected: &Elected) -> bool {
    elected.mode == Mode::Bootstrap
        && (elected.cluster_id.is_none()
            || elected.cluster_id.as_deref()
                != elected.view.record().map(|r| r.cluster_id.as_str()))
}

/// The secrets made at genesis (--secrets): read, or made by a server and
/// read back.
async fn genesis_material(
    store: Option<&dyn SecretStore>,
    elected: &Elected,
    own: Option<&str>,
) -> Result<Option<Material>> {
    // The generations are the record's (a rotation moves them).
    let gens = generations(elected);
    match (store, elected.cluster_id.as_deref()) {
        (Some(store), Some(cluster)) => {
            // This node's own token, in the same round of reads.
            // (Read by `plan` too: it only reads.)
            let node = async {
                match own {
                    Some(id) => crate::commands::node_tokens::read(store, cluster, id).await,
                    None => Ok(None),
                }
            };
            let (mut m, node) = tokio::try_join!(
                crate::secrets::genesis_with(store, cluster, elected.mode.is_server(), gens),
                node
            )?;
            m.node_token = node;
            Ok(Some(m))
        }
        (Some(_), None) => Err(usage(
            "--secrets needs a cluster id to keep secrets under, and this registry has no \
             cluster record (the original tool's): run `auto-consul cluster set` or drop --secrets",
        )),
        (None, _) => Ok(None),
    }
}

/// The generations of the secrets nodes run with, by the record of the
/// cluster this node is in (rotations move them).
pub(super) fn generations(elected: &Elected) -> crate::secrets::Generations {
    crate::secrets::Generations::of(
        elected
            .view
            .record()
            .filter(|r| Some(r.cluster_id.as_str()) == elected.cluster_id.as_deref()),
    )
}

/// What the disk holds that the decision depends on.
pub(super) struct Disk {
    /// Now, Unix seconds (this host's clock: how long a server was off).
    pub(super) now_unix: i64,
    /// A server with Raft state: Consul's `server_metadata.json`.
    pub(super) server_metadata: Option<String>,
    /// Consul's gossip keyrings in the data dir (relative path, text).
    pub(super) keyrings: Vec<(&'static str, String)>,
    /// The cluster this node was in (its state file).
    pub(super) previous_cluster: Option<String>,
    /// A server's TLS files auto-consul keeps: certificate, key, CA.
    pub(super) tls: Option<(String, String, String)>,
    /// The other files of Consul's config dir, parsed.
    pub(super) other_config: Vec<(String, Result<serde_json::Value, String>)>,
    /// The `consul` user under the root (uid, gid).
    pub(super) consul_user: Option<(u32, u32)>,
    /// The config file an older auto-consul wrote is there.
    pub(super) legacy_config: bool,
    /// A sandbox drop-in auto-consul wrote is there.
    pub(super) sandbox_dropin_ours: bool,
}

impl Disk {
    /// Reads what the decision depends on, under the root.
    fn read(consul_opts: &ConsulOpts, root: &Root, elected: &Elected, made: bool) -> Disk {
        let data = |rel: &str| std::fs::read_to_string(root.path(&consul_opts.data_dir.join(rel)));
        let server = elected.mode.is_server();
        let tls = TlsPaths::new(&consul_opts.config_dir);
        let read = |p: &std::path::Path| std::fs::read_to_string(root.path(p));
        Disk {
            now_unix: chrono::Utc::now().timestamp(),
            server_metadata: server.then(|| data(SERVER_METADATA).ok()).flatten(),
            keyrings: KEYRINGS
                .iter()
                .filter_map(|rel| Some((*rel, data(rel).ok()?)))
                .collect(),
            previous_cluster: state::load(root).and_then(|s| s.cluster_id),
            tls: match (
                server && made,
                read(&tls.cert),
                read(&tls.key),
                read(&tls.ca),
            ) {
                (true, Ok(c), Ok(k), Ok(a)) => Some((c, k, a)),
                _ => None,
            },
            other_config: precedence::other_files(
                &root.path(&consul_opts.config_dir),
                CONFIG_FILE,
                &[LEGACY_CONFIG_FILE],
            ),
            consul_user: root.user("consul"),
            legacy_config: root
                .path(&consul_opts.config_dir.join(LEGACY_CONFIG_FILE))
                .exists(),
            sandbox_dropin_ours: read(std::path::Path::new(SANDBOX_DROPIN))
                .is_ok_and(|t| t.starts_with(crate::render::MARKER)),
        }
    }
}
