//! The docs are held to the code, so their tables cannot drift: every
//! option and environment variable clap defines is in docs/reference.md,
//! every line of the env file `run` writes is there too, and every file
//! `run` writes is in docs/how-it-works.md's table of files.

mod common;

use clap::CommandFactory;
use common::*;

fn doc(name: &str) -> String {
    std::fs::read_to_string(format!("{}/docs/{name}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("docs/{name}: {e}"))
}

/// Whether `doc` names `word` as a whole (not as the start of a longer
/// option: `--expiry` is not named by `--expiry-x`).
fn mentions(doc: &str, word: &str) -> bool {
    doc.match_indices(word).any(|(i, _)| {
        !doc[i + word.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

#[test]
fn every_option_and_its_variable_is_in_the_reference() {
    let reference = doc("reference.md");
    let cli = auto_consul::cli::Cli::command();
    let mut missing = Vec::new();
    let mut commands = vec![&cli];
    commands.extend(cli.get_subcommands());
    for cmd in commands {
        for arg in cmd.get_arguments() {
            if let Some(long) = arg.get_long()
                && !["help", "version"].contains(&long)
                && !mentions(&reference, &format!("--{long}"))
            {
                missing.push(format!("--{long}"));
            }
            if let Some(env) = arg.get_env()
                && !reference.contains(&*env.to_string_lossy())
            {
                missing.push(env.to_string_lossy().into_owned());
            }
        }
    }
    for sub in cli.get_subcommands() {
        let name = sub.get_name();
        if name != "help" && !reference.contains(&format!("`{name}")) {
            missing.push(format!("command {name}"));
        }
    }
    missing.sort();
    missing.dedup();
    assert!(missing.is_empty(), "not in docs/reference.md: {missing:?}");
}

#[test]
fn every_file_and_env_line_run_writes_is_documented() {
    let moto = moto();
    let tmp = tempfile::tempdir().unwrap();
    let registry = tmp.path().join("registry");
    let secrets = tmp.path().join("secrets");
    std::fs::create_dir_all(&registry).unwrap();
    let root = tmp.path().join("root");
    // Every option that adds a file or a line: secrets (TLS files), an
    // autoscaling group (the gate's unit), a metrics file, a cloud join.
    let v = ok_json(&output(
        auto_consul(moto)
            .args([
                "run",
                "--json",
                "--address",
                "10.62.0.1",
                "--node",
                "docs-1",
            ])
            .arg("--registry")
            .arg(format!("file://{}", registry.display()))
            .arg("--root")
            .arg(&root)
            .arg("--secrets")
            .arg(format!("file://{}", secrets.display()))
            .args([
                "--instance-id",
                "i-0123456789abcdef0",
                "--autoscaling-group",
                "consul-servers",
                "--metrics-file",
                "/var/lib/node_exporter/textfile/auto-consul.prom",
            ]),
    ));
    let files_doc = doc("how-it-works.md");
    let mut missing = Vec::new();
    for f in v["files"].as_array().unwrap() {
        let path = f.as_str().unwrap();
        let name = std::path::Path::new(path)
            .file_name()
            .unwrap()
            .to_string_lossy();
        if !files_doc.contains(&*name) {
            missing.push(path.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "files run writes, not in docs/how-it-works.md: {missing:?}"
    );
    let reference = doc("reference.md");
    let env = std::fs::read_to_string(root.join("etc/auto-consul/auto-consul.env")).unwrap();
    let undocumented: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
        .filter(|k| !k.starts_with('#') && !reference.contains(k))
        .collect();
    assert!(
        undocumented.is_empty(),
        "env file lines not in docs/reference.md: {undocumented:?}"
    );
}
