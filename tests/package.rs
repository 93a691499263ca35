//! The Debian package builds (`cargo deb`, from the binary this test run
//! built) and holds the binary and the boot unit.

use std::path::Path;
use std::process::Command;

#[test]
fn the_debian_package_holds_the_binary_and_the_boot_unit() {
    let bin = Path::new(env!("CARGO_BIN_EXE_auto-consul"));
    // The binary lives in <target>/debug/: package that one, build nothing.
    let target = bin.parent().and_then(Path::parent).expect("a target dir");
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new("cargo")
        .args([
            "deb",
            "--profile",
            "dev",
            "--no-build",
            "--fast",
            "--quiet",
            "-o",
        ])
        .arg(out_dir.path())
        .env("CARGO_TARGET_DIR", target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo is on PATH");
    assert!(
        out.status.success(),
        "cargo deb failed (cargo install cargo-deb --locked): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = std::fs::read_dir(out_dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb was written");
    let list = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .expect("dpkg-deb");
    let list = String::from_utf8_lossy(&list.stdout);
    let entry = |path: &str| list.lines().find(|l| l.ends_with(path)).map(str::to_string);
    let binary = entry("./usr/bin/auto-consul").unwrap_or_else(|| panic!("no binary in:\n{list}"));
    assert!(binary.starts_with("-rwxr-xr-x"), "{binary}");
    assert!(
        entry("./lib/systemd/system/auto-consul.service").is_some(),
        "no boot unit in:\n{list}"
    );
    let info = Command::new("dpkg-deb")
        .arg("-f")
        .arg(&deb)
        .arg("Depends")
        .output()
        .expect("dpkg-deb");
    assert!(String::from_utf8_lossy(&info.stdout).contains("systemd"));
    let unit = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb)
        .output()
        .expect("dpkg-deb");
    let tar = String::from_utf8_lossy(&unit.stdout);
    assert!(
        tar.contains("ExecStart=/usr/bin/auto-consul run"),
        "the packaged unit runs the packaged binary"
    );
}
