//! The Debian package builds (`cargo deb`, from the binary this test run
//! built) and holds the binary, the boot unit, the man page and the shell
//! completions.

mod common;

use std::process::Command;

use common::build_deb;

#[test]
fn the_debian_package_holds_the_binary_and_the_boot_unit() {
    let out_dir = tempfile::tempdir().unwrap();
    let deb = build_deb(out_dir.path());
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
    for path in [
        "./usr/share/man/man1/auto-consul.1",
        "./usr/share/bash-completion/completions/auto-consul",
        "./usr/share/zsh/vendor-completions/_auto-consul",
        "./usr/share/fish/vendor_completions.d/auto-consul.fish",
    ] {
        assert!(entry(path).is_some(), "no {path} in:\n{list}");
    }
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
