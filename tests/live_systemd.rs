//! Proven where it runs: the .deb, the units and the user data under a live
//! systemd (PID 1 of a Debian bookworm container booted with
//! `systemd-nspawn`) and the real cloud-init, which runs the repository's
//! `cloud-init/launch-template.yaml` from a NoCloud seed, as EC2 would.
//! moto serves S3 and EC2 (one for all) and IMDSv2 (one per container, for
//! its identity and termination notices) and SSM (the secrets made at
//! genesis); a stand-in `consul` serves the agent API and sends READY=1.
//!
//! The scenarios live in `tests/live/smoke.sh` (also runnable by hand);
//! this test builds the package, runs them, and holds them to the list
//! below: every check must be run and pass, so none can silently go.
//! Needs root (`.ci/run` runs as root, and installs debootstrap and
//! systemd-container); the Debian tree is built once and cached under
//! `~/.cache/auto-consul-nspawn/`. Run it alone with
//! `cargo test --test live_systemd -- --nocapture`.

mod common;

use std::process::Command;

/// Every check the scenarios must pass, by the name they print.
const CHECKS: &[&str] = &[
    // A bootstrap server with HashiCorp's packaged Consul.
    "c1: cloud-init done, no errors",
    "c1: auto-consul.service succeeded",
    "c1: auto-consul.service active",
    "c1: auto-consul.service never restarted",
    "c1: consul.service running",
    "c1: heartbeat timer active",
    "c1: leave unit active",
    "c1: runs as bootstrap",
    "c1: consul.service Type=exec (a lone bootstrap server)",
    "c1: registry has a cluster record naming c1",
    "c1: slot 0 is c1's",
    "c1: heartbeat published (servers/)",
    "c1: auto-consul status healthy",
    "c1: ACLs default deny, gossip key set (secrets from SSM)",
    "c1: its certificate verifies against the cluster's CA",
    "c1: snapshot timer active (a server)",
    "c1: snapshot unit succeeded",
    "c1: the leader's snapshot is in the registry",
    "c1: the snapshot is the agent's bytes",
    // An agent of that cluster.
    "c2: cloud-init done, no errors",
    "c2: auto-consul.service succeeded",
    "c2: auto-consul.service active",
    "c2: auto-consul.service never restarted",
    "c2: consul.service running",
    "c2: heartbeat timer active",
    "c2: leave unit active",
    "c2: runs as agent",
    "c2: no snapshot units on an agent",
    "c2: consul.service Type=notify, started (READY=1)",
    "c2: heartbeat published (agents/)",
    "c2: the same gossip key as c1",
    "c2: no CA key or management token on the agent",
    // A token per node (AUTO_CONSUL_INSTANCE_TAG).
    "c2: runs with a token of its own",
    "c2: its token is not the shared agents' token",
    "c2: its token's policy names it alone",
    // The heartbeat timer follows `cluster set`.
    "cluster set --expiry 45",
    "c1: heartbeat timer rewritten to 15s",
    "c1: timer running the new interval",
    // A reboot keeps the slot and the mode.
    "c1 after reboot: auto-consul.service succeeded",
    "c1 after reboot: consul.service running",
    "c1 after reboot: now a plain server (Raft state)",
    "c1 after reboot: no bootstrap in the config",
    "c1 after reboot: slot 0 still c1's, not released",
    "c1 after reboot: the expiry hint names the env file, not undoing cluster set",
    "c1 after reboot: runcmd not run again",
    // A management token rotation restarts Consul from the heartbeat.
    "c1: secrets rotate management-token",
    "c1: its heartbeats finish the rotation",
    "c1: consul.service restarted by the heartbeat",
    "c1: consul.service running after the restart",
    "c1: its config holds generation 2 of the management token",
    "c1: the old management token is deleted",
    "c1: the new one is in the ACL state",
    // Terminations: a spot notice, the autoscaling lifecycle state.
    "c2: left at shutdown (spot notice)",
    "c2: the agent got the leave",
    "c2: its heartbeats are gone",
    "c1: left at shutdown (lifecycle Terminated)",
    "c1: slot 0 released",
    "c1: leave ran before Consul stopped",
    // Consul from a zip, with a custom config dir: neither dir exists.
    "c3: cloud-init done, no errors",
    "c3: auto-consul.service succeeded",
    "c3: auto-consul.service active",
    "c3: auto-consul.service never restarted",
    "c3: consul.service running",
    "c3: heartbeat timer active",
    "c3: leave unit active",
    "c3: consul.service is auto-consul's",
    "c3: the consul user was created",
    "c3: its config in the custom config dir",
    "c3: no /etc/consul.d made",
    // Every journal, all boots and shutdowns.
    "c1: journal has no sandbox/chroot failure",
    "c1: no auto-consul or consul unit failed",
    "c2: journal has no sandbox/chroot failure",
    "c2: no auto-consul or consul unit failed",
    "c3: journal has no sandbox/chroot failure",
    "c3: no auto-consul or consul unit failed",
];

#[test]
fn the_package_units_and_user_data_work_under_a_live_systemd_and_real_cloud_init() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "the live-systemd test boots containers with systemd-nspawn and needs root: \
         run it as root (.ci/run does)"
    );
    let out_dir = tempfile::tempdir().unwrap();
    let deb = common::build_deb(out_dir.path());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/live/smoke.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(&deb)
        .env("AUTO_CONSUL_TEST_PYTHON", common::python())
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The phases' times and every check, in the test's log.
    eprintln!("{stdout}");
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL ")).collect();
    assert!(
        failed.is_empty(),
        "checks failed:\n{}\n\n{stdout}\n{stderr}",
        failed.join("\n")
    );
    let passed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("PASS "))
        .collect();
    let missing: Vec<&&str> = CHECKS.iter().filter(|c| !passed.contains(c)).collect();
    assert!(
        missing.is_empty(),
        "checks not run: {missing:?}\n\n{stdout}\n{stderr}"
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
}
