//! The operator's side: JSON logs one object a line, the man page and the
//! shell completions generated from the command line's definition.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn json_logs_are_one_object_a_line_and_so_is_the_error() {
    let moto = moto();
    let tmp = tempfile::tempdir().unwrap();
    let reg = tmp.path().join("registry");
    std::fs::create_dir_all(&reg).unwrap();
    let registry = format!("file://{}", reg.display());
    run_node(
        moto,
        &registry,
        &tmp.path().join("a"),
        "js-a",
        "10.50.0.1",
        3,
    );
    // A joiner with other settings logs a warning; then a failing command
    // logs its error, both as JSON lines on stderr.
    let out = output(
        run_cmd(
            moto,
            &registry,
            &tmp.path().join("b"),
            "js-b",
            "10.50.0.2",
            5,
        )
        .args(["--log-format", "json"]),
    );
    assert!(out.status.success());
    let failed = output(
        auto_consul(moto)
            .args(["members", "--registry", "file:///nonexistent-dir"])
            .env("AUTO_CONSUL_LOG_FORMAT", "json"),
    );
    assert_eq!(failed.status.code(), Some(2));
    let mut levels = Vec::new();
    for stderr in [&out.stderr, &failed.stderr] {
        for line in String::from_utf8_lossy(stderr).lines() {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            assert!(v["message"].is_string(), "{line}");
            levels.push(v["level"].as_str().unwrap().to_string());
        }
    }
    assert!(levels.contains(&"WARN".to_string()), "{levels:?}");
    assert!(levels.contains(&"ERROR".to_string()), "{levels:?}");
}

#[test]
fn a_commands_help_shows_its_own_options_first() {
    let moto = moto();
    // `gate -h`: its three options (hidden from the top-level -h) come
    // first, before the grouped headings; options given before it are no
    // obstacle.
    for args in [&["gate", "-h"][..], &["-r", "file:///x", "gate", "--help"]] {
        let out = output(auto_consul(moto).args(args));
        assert!(out.status.success(), "{args:?}");
        let help = String::from_utf8(out.stdout).unwrap();
        // From "Options:" to the first heading.
        let start = help.find("Options:").unwrap();
        let own = &help[start..start + help[start..].find("\nIdentity:").unwrap()];
        for opt in ["--autoscaling-group", "--lifecycle-hook", "--gate-wait"] {
            assert!(own.contains(opt), "{args:?}: {opt} not first:\n{help}");
        }
        assert!(help.contains("Registry and cluster:"), "{help}");
    }
    // A command under a command: its own help.
    let set = output(auto_consul(moto).args(["cluster", "set", "-h"]));
    let help = String::from_utf8(set.stdout).unwrap();
    assert!(help.contains("Usage: auto-consul cluster set"), "{help}");
    // A bad value still fails as before.
    let bad = output(auto_consul(moto).args(["gate", "--gate-wait", "0"]));
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn the_man_page_and_completions_cover_every_command() {
    let moto = moto();
    let man = output(auto_consul(moto).arg("man"));
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(man.contains(".TH auto-consul 1"), "{man}");
    for shell in ["bash", "zsh", "fish"] {
        let out = output(auto_consul(moto).args(["completions", shell]));
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        for word in [
            "run",
            "heartbeat",
            "cluster",
            "retire",
            "role",
            "agent-expiry",
        ] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
    }
    let bad = output(auto_consul(moto).args(["completions", "tcsh"]));
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn sdk_errors_read_as_messages_not_debug_dumps() {
    let moto = moto();
    let check = |out: &std::process::Output, code: i32, needle: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{stderr}");
        let lines = stderr.lines().count();
        assert!((1..=6).contains(&lines), "{lines} lines: {stderr}");
        assert!(stderr.lines().next().unwrap().contains(needle), "{stderr}");
        for dump in ["HeaderValue", "SdkBody", "ErrorMetadata", "raw: Response"] {
            assert!(!stderr.contains(dump), "debug dump ({dump}) in: {stderr}");
        }
    };
    // A bucket that does not exist: a usage error.
    let out =
        output(auto_consul(moto).args(["members", "--registry", "s3://no-such-bucket-here/p"]));
    check(&out, 2, "the bucket does not exist");
    // An endpoint nobody answers: operational.
    let out = output(
        auto_consul(moto)
            .args(["members", "--registry", "s3://some-bucket/p"])
            .env(
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", closed_port()),
            ),
    );
    check(&out, 1, "cannot be reached");
    // No credentials anywhere (none in the environment, no profile, no
    // instance metadata): the first line says so, not "unreachable", and
    // no warning dump of the SDK's providers comes before it.
    let out = output(
        auto_consul(moto)
            .args(["members", "--registry", "s3://some-bucket/p"])
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("RUST_LOG"),
    );
    check(&out, 1, "no AWS credentials");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error:"), "{stderr}");
}

#[test]
fn denied_access_reads_as_one_message_naming_the_permissions() {
    let moto = moto();
    let bucket = bucket(moto);
    // S3 answers 403 AccessDenied to every request on this bucket, as it
    // does for an instance role without s3:ListBucket.
    moto.faults(serde_json::json!([
        {"status": 403, "code": "AccessDenied", "match": bucket, "count": 50}
    ]));
    let out =
        output(auto_consul(moto).args(["members", "--registry", &format!("s3://{bucket}/p")]));
    moto.faults(serde_json::json!([]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    let lines = stderr.lines().count();
    assert!((1..=6).contains(&lines), "{lines} lines: {stderr}");
    assert!(
        stderr.lines().next().unwrap().contains("access denied"),
        "{stderr}"
    );
    // It names the permission and which role has it.
    let first = stderr.lines().next().unwrap();
    assert!(
        // (the reads go at once: whichever is refused first)
        first.contains("access denied: s3:") && first.contains("agents' roles"),
        "{stderr}"
    );
    for dump in ["HeaderValue", "SdkBody", "ErrorMetadata", "raw: Response"] {
        assert!(!stderr.contains(dump), "debug dump ({dump}) in: {stderr}");
    }
}

/// A bootstrap node set up by `run` in its own root, with its heartbeat
/// written against a fake agent.
fn healthy_node(moto: &Moto, tmp: &std::path::Path, metrics: Option<&str>) -> (String, FakeAgent) {
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/status");
    let root = tmp.join("root");
    let mut run = run_cmd(moto, &registry, &root, "st-1", "10.60.0.1", 1);
    if let Some(m) = metrics {
        // A short expiry: its failed heartbeat gives up within a second
        // (the retry deadline follows the installed timer, every 5 s).
        run.args(["--metrics-file", m, "--expiry", "15"]);
    }
    ok_json(&output(&mut run));
    let agent = FakeAgent::start("st-1", true, &["--address", "10.60.0.1"]);
    let mut beat = heartbeat_cmd(moto, &registry, &root, "st-1", "10.60.0.1", &agent.addr());
    if let Some(m) = metrics {
        beat.args(["--metrics-file", m]);
    }
    ok_json(&output(&mut beat));
    (registry, agent)
}

fn status(
    moto: &Moto,
    registry: &str,
    root: &std::path::Path,
    agent: &str,
) -> std::process::Output {
    output(
        auto_consul(moto)
            .args(["status", "--json", "--registry", registry])
            .arg("--root")
            .arg(root)
            .env("CONSUL_HTTP_ADDR", agent),
    )
}

#[test]
fn status_says_healthy_or_names_what_is_degraded() {
    let moto = moto();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let (registry, agent) = healthy_node(moto, tmp.path(), None);
    let out = status(moto, &registry, &root, &agent.addr());
    let v = json(&out);
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v["healthy"], true, "{v}");
    assert_eq!(v["mode"], "bootstrap", "{v}");
    assert_eq!(v["slot"]["index"], 0, "{v}");
    assert_eq!(v["slot"]["held"], true, "{v}");
    assert_eq!(v["agent"]["leader"], "10.60.0.1:8300", "{v}");
    assert!(v["cluster"]["cluster_id"].is_string(), "{v}");
    assert!(v["heartbeat_age_seconds"].as_i64().unwrap() <= 5, "{v}");
    // Text for a person, the same verdict.
    let text = output(
        auto_consul(moto)
            .args(["status", "--registry", &registry])
            .arg("--root")
            .arg(&root)
            .env("CONSUL_HTTP_ADDR", agent.addr()),
    );
    let shown = String::from_utf8_lossy(&text.stdout);
    assert!(
        shown.contains("bootstrap in server slot 0") && shown.trim_end().ends_with("healthy"),
        "{shown}"
    );
    // On the node itself, with no settings typed: the env file `run`
    // wrote gives the registry and the rest, as it does to the units.
    let bare = output(
        auto_consul(moto)
            .args(["status", "--json"])
            .arg("--root")
            .arg(&root)
            .env("CONSUL_HTTP_ADDR", agent.addr()),
    );
    let v = json(&bare);
    assert_eq!(bare.status.code(), Some(0), "{v}");
    assert_eq!(v["mode"], "bootstrap", "{v}");
    let members = ok_json(&output(
        auto_consul(moto)
            .args(["members", "--json"])
            .arg("--root")
            .arg(&root),
    ));
    assert!(members["cluster"]["cluster_id"].is_string(), "{members}");
    // The environment still wins over the file.
    let elsewhere = output(
        auto_consul(moto)
            .args(["members", "--json"])
            .arg("--root")
            .arg(&root)
            .env("AUTO_CONSUL_REGISTRY", "s3://no-such-bucket-here/x"),
    );
    assert_ne!(elsewhere.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&elsewhere.stderr).contains("no-such-bucket-here"),
        "{}",
        String::from_utf8_lossy(&elsewhere.stderr)
    );

    // The agent is down: degraded, exit 1, the reason named.
    drop(agent);
    let out = status(
        moto,
        &registry,
        &root,
        &format!("127.0.0.1:{}", closed_port()),
    );
    let v = json(&out);
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert_eq!(v["healthy"], false);
    let reasons = v["reasons"].to_string();
    assert!(reasons.contains("not answering"), "{reasons}");
    // A node that never heartbeat: degraded for that reason too.
    let fresh = tmp.path().join("fresh");
    let agent = FakeAgent::start("st-2", false, &["--leader", "10.60.0.1:8300"]);
    ok_json(&output(&mut run_cmd(
        moto,
        &registry,
        &fresh,
        "st-2",
        "10.60.0.2",
        1,
    )));
    let out = status(moto, &registry, &fresh, &agent.addr());
    let v = json(&out);
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert!(v["reasons"].to_string().contains("no heartbeat"), "{v}");
    let text = output(
        auto_consul(moto)
            .args(["status", "--registry", &registry])
            .arg("--root")
            .arg(&fresh)
            .env("CONSUL_HTTP_ADDR", agent.addr()),
    );
    assert!(String::from_utf8_lossy(&text.stdout).contains("DEGRADED: no heartbeat"));
    assert!(
        text.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
}

/// The samples of a metrics file as a real parser reads them
/// (prometheus_client's): "name{labels}" -> value.
fn parse_metrics(path: &std::path::Path) -> std::collections::BTreeMap<String, f64> {
    let script = "import json, sys\n\
                  from prometheus_client.parser import text_string_to_metric_families\n\
                  out = {}\n\
                  for fam in text_string_to_metric_families(open(sys.argv[1]).read()):\n\
                  \x20   for s in fam.samples:\n\
                  \x20       labels = ','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))\n\
                  \x20       out[f'{s.name}{{{labels}}}'] = s.value\n\
                  print(json.dumps(out))\n";
    let out = std::process::Command::new(python())
        .args(["-c", script])
        .arg(path)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "prometheus_client refused the metrics file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn metrics_are_valid_exposition_format_and_keep_each_commands_last_run() {
    let moto = moto();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let file = "/var/lib/node_exporter/textfile/auto-consul.prom";
    let on_disk = root.join(file.trim_start_matches('/'));
    let (registry, agent) = healthy_node(moto, tmp.path(), Some(file));
    let m = parse_metrics(&on_disk);
    for key in [
        "auto_consul_last_success_timestamp_seconds{command=run}",
        "auto_consul_last_success_timestamp_seconds{command=heartbeat}",
    ] {
        assert!(m.get(key).is_some_and(|t| *t > 1.7e9), "{key}: {m:?}");
    }
    assert_eq!(m["auto_consul_mode{mode=bootstrap}"], 1.0, "{m:?}");
    assert_eq!(m["auto_consul_mode{mode=agent}"], 0.0, "{m:?}");
    assert_eq!(m["auto_consul_server_slot_held{slot=0}"], 1.0, "{m:?}");
    assert!(
        m["auto_consul_registry_requests{command=heartbeat,kind=put}"] >= 2.0,
        "{m:?}"
    );
    assert!(
        m["auto_consul_registry_requests{command=run,kind=put}"] >= 2.0,
        "{m:?}"
    );
    assert_eq!(
        m["auto_consul_registry_errors{command=run,kind=put}"], 0.0,
        "{m:?}"
    );
    assert_eq!(m["auto_consul_last_run_success{command=heartbeat}"], 1.0);
    assert!(
        m.contains_key("auto_consul_heartbeats_purged{command=heartbeat}"),
        "{m:?}"
    );
    let first_success = m["auto_consul_last_success_timestamp_seconds{command=heartbeat}"];

    // A failed heartbeat (its agent is gone): the failure is recorded, the
    // last success and the run's samples stay.
    drop(agent);
    let failed = output(
        heartbeat_cmd(
            moto,
            &registry,
            &root,
            "st-1",
            "10.60.0.1",
            &format!("127.0.0.1:{}", closed_port()),
        )
        .args(["--metrics-file", file]),
    );
    assert!(!failed.status.success());
    let m = parse_metrics(&on_disk);
    assert_eq!(
        m["auto_consul_last_run_success{command=heartbeat}"], 0.0,
        "{m:?}"
    );
    assert_eq!(
        m["auto_consul_last_success_timestamp_seconds{command=heartbeat}"],
        first_success
    );
    assert!(
        m.contains_key("auto_consul_last_success_timestamp_seconds{command=run}"),
        "{m:?}"
    );
    assert_eq!(m["auto_consul_mode{mode=bootstrap}"], 1.0, "{m:?}");
}

#[test]
fn baking_an_image_whose_env_file_names_a_node_is_warned_about() {
    let moto = moto();
    let tmp = tempfile::tempdir().unwrap();
    let env = tmp.path().join("etc/auto-consul/auto-consul.env");
    std::fs::create_dir_all(env.parent().unwrap()).unwrap();
    // As an older `run` left it on the node the image is made from.
    std::fs::write(
        &env,
        "AUTO_CONSUL_REGISTRY='s3://b/p'\nAUTO_CONSUL_ADDRESS='10.1.2.3'\nAUTO_CONSUL_NODE='i-0abc'\n",
    )
    .unwrap();
    let install = |now: bool| {
        let mut cmd = auto_consul(moto);
        cmd.args(["install", "--json"])
            .arg("--root")
            .arg(tmp.path());
        if now {
            cmd.arg("--now");
        }
        output(&mut cmd)
    };
    let bake = install(false);
    assert!(bake.status.success());
    let stderr = String::from_utf8_lossy(&bake.stderr);
    assert!(
        stderr.contains("sets AUTO_CONSUL_ADDRESS, AUTO_CONSUL_NODE: an image baked now"),
        "{stderr}"
    );
    // At boot (`--now`, from user data) the identity is this instance's.
    let boot = install(true);
    assert!(!String::from_utf8_lossy(&boot.stderr).contains("an image baked now"));
}

#[test]
fn cluster_set_on_a_node_changes_only_what_its_command_line_names() {
    let moto = moto();
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/set-on-node");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("n");
    // The node's env file holds its seeds: expiry 120.
    ok_json(&output(
        run_cmd(moto, &registry, &root, "set-1", "10.61.0.1", 3).args(["--expiry", "120"]),
    ));
    let set = |args: &[&str], on_node: bool| {
        let mut cmd = auto_consul(moto);
        cmd.args(["cluster", "set", "--json"]).args(args);
        if on_node {
            cmd.arg("--root").arg(&root);
        } else {
            cmd.args(["--registry", &registry]);
        }
        ok_json(&output(&mut cmd))
    };
    // An operator lengthens the expiry from anywhere...
    assert_eq!(set(&["--expiry", "300"], false)["expiry"], 300);
    // ...then, on the node (registry from its env file), adds servers: the
    // env file's seed (120) does not undo the expiry.
    let v = set(&["--servers", "5"], true);
    assert_eq!(v["servers"], 5, "{v}");
    assert_eq!(v["expiry"], 300, "{v}");
    // And with nothing to change on its command line, it changes nothing.
    let mut none = auto_consul(moto);
    let out = output(none.args(["cluster", "set"]).arg("--root").arg(&root));
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_heartbeat_before_run_says_so_at_once_and_writes_nothing() {
    // Its own moto: nothing may be written, counted exactly.
    let moto = &Moto::start(&[]);
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/before-run");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("n");
    // No agent at all: one line, exit 2, no minute of retries (the
    // retries would print "trying again" warnings first).
    let out = output(&mut heartbeat_cmd(
        moto,
        &registry,
        &root,
        "early",
        "10.63.0.1",
        &format!("127.0.0.1:{}", closed_port()),
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("error:") && err.contains("auto-consul run"),
        "{err}"
    );
    assert!(!err.contains("trying again"), "{err}");
    // An agent that says it is a server, and a registry with no cluster.
    let agent = FakeAgent::start("early", true, &["--address", "10.63.0.1"]);
    let before = moto.kinds();
    let out = output(&mut heartbeat_cmd(
        moto,
        &registry,
        &root,
        "early",
        "10.63.0.1",
        &agent.addr(),
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no cluster record") && err.contains("auto-consul run"),
        "{err}"
    );
    assert_eq!(
        moto.kinds().get("PUT"),
        before.get("PUT"),
        "nothing written"
    );
    assert!(keys(moto, &bucket, "before-run/").is_empty());
}
