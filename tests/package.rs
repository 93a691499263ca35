//! The Debian package builds (`cargo deb`, from the binary this test run
//! built) and holds the binary, the boot unit, the man page and the shell
//! completions.

use std::path::Path;
use std::process::Command;

#[test]
fn the_debian_package_holds_the_binary_and_the_boot_unit() {
    let bin = Path::new(env!("CARGO_BIN_EXE_auto-consul"));
    // The binary lives in <target>/debug/: package that one, build nothing.
    let target = bin.parent().and_then(Path::parent).expect("a target dir");
    // The generated assets, as packaging/build-deb.sh makes them, next to
    // the binary being packaged.
    let generated = bin.parent().unwrap().join("generated");
    std::fs::create_dir_all(&generated).unwrap();
    for (args, file) in [
        (&["man"][..], "auto-consul.1"),
        (&["completions", "bash"][..], "auto-consul.bash"),
        (&["completions", "zsh"][..], "_auto-consul"),
        (&["completions", "fish"][..], "auto-consul.fish"),
    ] {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{args:?}");
        std::fs::write(generated.join(file), &out.stdout).unwrap();
    }
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
