//! The units `run` writes pass `systemd-analyze verify`, with a stand-in
//! `consul` binary, both when Consul came from a zip (no unit: we write one)
//! and from its package (a unit exists: only the drop-in).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Runs `systemd-analyze verify` on `units` with the unit path set to
/// `dirs`; returns (success, everything it printed).
fn verify(dirs: &[&Path], units: &[&str]) -> (bool, String) {
    let path: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(units)
        .env("SYSTEMD_UNIT_PATH", format!("{}:", path.join(":")))
        .output()
        .expect("systemd-analyze is not installed: apt-get install systemd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn run_under(root: &Path, registry: &Path) {
    let moto = moto();
    let out = output(
        auto_consul(moto)
            .args([
                "run",
                "--json",
                "--address",
                "10.0.6.1",
                "--node",
                "units-1",
                "--expiry",
                "60",
            ])
            .arg("--registry")
            .arg(format!("file://{}", registry.display()))
            .arg("--root")
            .arg(root),
    );
    ok_json(&out);
}

#[test]
fn units_for_consul_from_a_zip_pass_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, registry) = (tmp.path().join("root"), tmp.path().join("registry"));
    std::fs::create_dir_all(&registry).unwrap();
    run_under(&root, &registry);
    let units = root.join("etc/systemd/system");
    for f in [
        "consul.service",
        "consul.service.d/auto-consul.conf",
        "auto-consul-heartbeat.service",
        "auto-consul-heartbeat.timer",
        "auto-consul-leave.service",
        // A server (this one bootstraps): the snapshot units.
        "auto-consul-snapshot.service",
        "auto-consul-snapshot.timer",
    ] {
        assert!(units.join(f).is_file(), "{f} not written");
    }
    let (ok, text) = verify(
        &[&units],
        &[
            "consul.service",
            "auto-consul-heartbeat.service",
            "auto-consul-heartbeat.timer",
            "auto-consul-leave.service",
            "auto-consul-snapshot.service",
            "auto-consul-snapshot.timer",
        ],
    );
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );
    let unit = std::fs::read_to_string(units.join("consul.service")).unwrap();
    assert!(
        unit.contains(&format!(
            "ExecStart={}/consul agent -config-dir=/etc/consul.d",
            fake_consul_dir().display()
        )),
        "{unit}"
    );
    let timer = std::fs::read_to_string(units.join("auto-consul-heartbeat.timer")).unwrap();
    assert!(
        timer.contains("OnUnitActiveSec=20s") && timer.contains("AccuracySec=1s"),
        "{timer}"
    );
}

#[test]
fn with_a_packaged_consul_unit_only_the_drop_in_is_written_and_it_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, registry) = (tmp.path().join("root"), tmp.path().join("registry"));
    std::fs::create_dir_all(&registry).unwrap();
    let lib = root.join("lib/systemd/system");
    std::fs::create_dir_all(&lib).unwrap();
    let packaged =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/packaged-consul.service");
    std::fs::copy(&packaged, lib.join("consul.service")).unwrap();
    run_under(&root, &registry);
    let etc = root.join("etc/systemd/system");
    assert!(
        !etc.join("consul.service").exists(),
        "the packaged unit must not be shadowed"
    );
    assert!(etc.join("consul.service.d/auto-consul.conf").is_file());
    let (ok, text) = verify(&[&etc, &lib], &["consul.service"]);
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );
}

#[test]
fn verify_does_catch_a_unit_whose_binary_is_missing() {
    // The check above is only worth something if it can fail.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("broken.service"),
        "[Service]\nType=oneshot\nExecStart=/nonexistent/auto-consul heartbeat\n",
    )
    .unwrap();
    let (ok, text) = verify(&[tmp.path()], &["broken.service"]);
    assert!(!ok, "verify accepted a unit with a missing binary: {text}");
}

#[test]
fn install_writes_a_boot_unit_that_verifies_and_rerunning_changes_nothing() {
    let moto = moto();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("image");
    let install = || {
        ok_json(&output(
            auto_consul(moto)
                .args(["install", "--json", "--servers", "3", "--expiry", "90"])
                .arg("--root")
                .arg(&root),
        ))
    };
    let first = install();
    // The boot unit, the unit that leaves on termination, the env file.
    assert_eq!(first["changed"].as_array().unwrap().len(), 3, "{first}");
    assert_eq!(first["enabled"], false, "nothing is enabled under a --root");
    let etc = root.join("etc/systemd/system");
    let unit = std::fs::read_to_string(etc.join("auto-consul.service")).unwrap();
    assert!(
        unit.contains(&format!(
            "ExecStart={} run",
            env!("CARGO_BIN_EXE_auto-consul")
        )),
        "{unit}"
    );
    assert!(
        unit.contains("EnvironmentFile=/etc/auto-consul/auto-consul.env"),
        "{unit}"
    );
    assert!(
        unit.contains("Before=consul.service") && unit.contains("After=network-online.target"),
        "{unit}"
    );
    let (ok, text) = verify(
        &[&etc],
        &["auto-consul.service", "auto-consul-leave.service"],
    );
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );
    let env = std::fs::read_to_string(root.join("etc/auto-consul/auto-consul.env")).unwrap();
    assert!(
        env.contains("AUTO_CONSUL_SERVERS='3'") && env.contains("AUTO_CONSUL_EXPIRY='90'"),
        "{env}"
    );
    assert!(
        !env.contains("AUTO_CONSUL_ADDRESS") && !env.contains("AUTO_CONSUL_NODE"),
        "a baked image must not pin an identity: {env}"
    );
    assert!(!env.contains("AUTO_CONSUL_REGISTRY"), "{env}");
    let before = files_under(&root);
    let again = install();
    assert_eq!(again["changed"], serde_json::json!([]));
    assert_eq!(files_under(&root), before);
}

/// Parses a systemd env file of `KEY='value'` lines.
fn env_vars(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.trim_matches('\'').to_string())
        })
        .collect()
}

#[test]
fn the_heartbeat_unit_runs_the_real_binary_with_the_settings_run_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, registry) = (tmp.path().join("root"), tmp.path().join("registry"));
    std::fs::create_dir_all(&registry).unwrap();
    run_under(&root, &registry);
    let service =
        std::fs::read_to_string(root.join("etc/systemd/system/auto-consul-heartbeat.service"))
            .unwrap();
    let exec = service
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let env_path = service
        .lines()
        .find_map(|l| l.strip_prefix("EnvironmentFile="))
        .expect("EnvironmentFile");
    let env_text = std::fs::read_to_string(root.join(env_path.trim_start_matches('/'))).unwrap();
    let mut words = exec.split_whitespace();
    let mut cmd = Command::new(words.next().unwrap());
    cmd.args(words);
    for (k, _) in std::env::vars() {
        if k.starts_with("AUTO_CONSUL_") || k.starts_with("CONSUL_") {
            cmd.env_remove(k);
        }
    }
    let agent = FakeAgent::start("units-1", false, &[]);
    let out = output(
        cmd.envs(env_vars(&env_text))
            .env("AUTO_CONSUL_ROOT", &root)
            .env(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                format!("http://127.0.0.1:{}", closed_port()),
            )
            .env("CONSUL_HTTP_ADDR", agent.addr()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written: Vec<_> = std::fs::read_dir(registry.join("agents"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(written.len(), 1, "{written:?}");
    assert!(written[0].to_string_lossy().ends_with("-units-1"));
    let body = std::fs::read_to_string(registry.join("agents").join(&written[0])).unwrap();
    assert!(body.contains("\"address\":\"10.0.6.1\""), "{body}");
}
