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
    ] {
        assert!(units.join(f).is_file(), "{f} not written");
    }
    let (ok, text) = verify(
        &[&units],
        &[
            "consul.service",
            "auto-consul-heartbeat.service",
            "auto-consul-heartbeat.timer",
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
        timer.contains("OnUnitActiveSec=30s") && timer.contains("AccuracySec=1s"),
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
