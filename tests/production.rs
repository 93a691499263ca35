//! Consul as HashiCorp runs it in production: the units' exposure scores
//! (`systemd-analyze security --offline=true`), config precedence beside
//! the packaged `consul.hcl`, Consul's readiness type, agents that find
//! servers again, and the heartbeat over HTTPS with a client certificate.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

/// `systemd-analyze security --offline=true` of `unit` under `root`: the
/// overall exposure it prints.
fn exposure(root: &Path, unit: &str) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .expect("systemd-analyze is not installed: apt-get install systemd");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for"))
        .unwrap_or_else(|| panic!("no exposure level for {unit}: {text}"));
    line.split(": ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unreadable exposure line: {line}"))
}

fn run_file(
    root: &Path,
    registry: &Path,
    node: &str,
    ip: &str,
    extra: &[&str],
) -> serde_json::Value {
    let moto = moto();
    ok_json(&output(
        auto_consul(moto)
            .args([
                "run",
                "--json",
                "--address",
                ip,
                "--node",
                node,
                "--expiry",
                "60",
            ])
            .arg("--registry")
            .arg(format!("file://{}", registry.display()))
            .arg("--root")
            .arg(root)
            .args(extra),
    ))
}

#[test]
fn the_units_run_and_install_write_meet_their_exposure_goals() {
    let moto = moto();
    let tmp = tempfile::tempdir().unwrap();
    let (root, registry) = (tmp.path().join("root"), tmp.path().join("registry"));
    std::fs::create_dir_all(&registry).unwrap();
    // Consul from a zip: no unit, so `run` writes consul.service.
    // In an autoscaling group: the launch gate's unit is written too.
    let first = run_file(
        &root,
        &registry,
        "prod-1",
        "10.0.8.1",
        &[
            "--instance-id",
            "i-0123456789abcdef0",
            "--autoscaling-group",
            "consul-servers",
        ],
    );
    assert_eq!(
        first["consul_type"], "exec",
        "a lone bootstrap server: {first}"
    );
    ok_json(&output(
        auto_consul(moto)
            .args(["install", "--json"])
            .arg("--registry")
            .arg(format!("file://{}", registry.display()))
            .arg("--root")
            .arg(&root),
    ));
    let units = root.join("etc/systemd/system");
    let consul = std::fs::read_to_string(units.join("consul.service")).unwrap();
    assert!(
        consul.contains("\nUser=consul\n") && consul.contains("\nGroup=consul\n"),
        "{consul}"
    );
    let scores = [
        ("auto-consul-heartbeat.service", 3.0),
        ("auto-consul-leave.service", 3.0),
        ("auto-consul-gate.service", 3.0),
        ("auto-consul-snapshot.service", 3.0),
        ("auto-consul.service", 6.0),
        ("consul.service", 5.0),
    ];
    for (unit, goal) in scores {
        let score = exposure(&root, unit);
        eprintln!("{unit}: exposure {score}");
        assert!(score <= goal, "{unit}: exposure {score}, goal <= {goal}");
    }
    // The measure can fail: the unit as it was before hardening scores 9.6.
    std::fs::write(
        units.join("plain.service"),
        "[Service]\nType=oneshot\nExecStart=/bin/true\n",
    )
    .unwrap();
    assert!(exposure(&root, "plain.service") > 9.0);

    // A node with someone to join waits for Consul's readiness notice.
    let root2 = tmp.path().join("root2");
    let second = run_file(&root2, &registry, "prod-2", "10.0.8.2", &[]);
    assert_eq!(second["consul_type"], "notify", "{second}");
    let dropin =
        std::fs::read_to_string(root2.join("etc/systemd/system/consul.service.d/auto-consul.conf"))
            .unwrap();
    assert!(
        dropin.contains("\nType=notify\n") && dropin.contains("\nLimitNOFILE=65536\n"),
        "{dropin}"
    );
    let lone = std::fs::read_to_string(units.join("consul.service.d/auto-consul.conf")).unwrap();
    assert!(lone.contains("\nType=exec\n"), "{lone}");
}

/// A root with HashiCorp's packaged consul.service (the fixture) under
/// `dir`, and an empty directory registry: (root, registry).
fn packaged(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (root, registry) = (dir.join("root"), dir.join("registry"));
    std::fs::create_dir_all(&registry).unwrap();
    let lib = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/packaged-consul.service"),
        lib.join("consul.service"),
    )
    .unwrap();
    (root, registry)
}

#[test]
fn files_that_set_what_auto_consul_decides_are_named_and_lose() {
    let tmp = tempfile::tempdir().unwrap();
    // HashiCorp's package: its unit, its consul.hcl (data_dir /opt/consul),
    // and an operator's file; plus the config file of the previous version.
    let (root, registry) = packaged(tmp.path());
    let conf = root.join("etc/consul.d");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("consul.hcl"),
        "# Full configuration options can be found at https://developer.hashicorp.com/consul/docs/agent/config\n\
         datacenter = \"dc1\"\ndata_dir = \"/opt/consul\"\n#server = true\n",
    )
    .unwrap();
    std::fs::write(
        conf.join("operator.json"),
        r#"{"server": false, "retry_join": ["10.1.1.1"], "ports": {"grpc": 8502}}"#,
    )
    .unwrap();
    std::fs::write(conf.join("auto-consul.json"), r#"{"server": false}"#).unwrap();

    let moto = moto();
    let out = output(
        auto_consul(moto)
            .args(["run", "--json", "--address", "10.0.8.9", "--node", "prec-1"])
            .args(["--data-dir", "/data/consul"])
            .arg("--registry")
            .arg(format!("file://{}", registry.display()))
            .arg("--root")
            .arg(&root),
    );
    let v = ok_json(&out);
    let found: Vec<(String, String)> = v["config_conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["file"].as_str().unwrap().to_string(),
                c["key"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            ("/etc/consul.d/consul.hcl", "data_dir"),
            ("/etc/consul.d/operator.json", "server"),
            ("/etc/consul.d/operator.json", "retry_join"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string())),
        "{v}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/etc/consul.d/consul.hcl sets `data_dir`, which auto-consul decides"),
        "{stderr}"
    );
    // auto-consul's file is read after the packaged one, and the old name
    // is gone (Consul would read both).
    assert!(conf.join("zz-auto-consul.json").is_file());
    assert!(!conf.join("auto-consul.json").exists());
    let mut names: Vec<String> = std::fs::read_dir(&conf)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json") || n.ends_with(".hcl"))
        .collect();
    names.sort();
    assert_eq!(
        names.last().map(String::as_str),
        Some("zz-auto-consul.json")
    );
    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf.join("zz-auto-consul.json")).unwrap())
            .unwrap();
    assert_eq!(ours["data_dir"], "/data/consul");
    // The package's condition on consul.hcl is reset for auto-consul's file.
    let dropin =
        std::fs::read_to_string(root.join("etc/systemd/system/consul.service.d/auto-consul.conf"))
            .unwrap();
    assert!(
        dropin.contains(
            "ConditionFileNotEmpty=\nConditionFileNotEmpty=/etc/consul.d/zz-auto-consul.json\n"
        ),
        "{dropin}"
    );
    // Nothing to warn about on a clean config dir.
    let clean = tmp.path().join("clean");
    let v = run_file(&clean, &registry, "prec-2", "10.0.8.10", &[]);
    assert_eq!(v["config_conflicts"], serde_json::json!([]), "{v}");
}

/// A node set up by `run` as an agent, whose config names a server that
/// is gone, and a live server in the registry.
struct Stranded {
    moto: &'static Moto,
    registry: String,
    root: std::path::PathBuf,
    config: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

fn stranded() -> Stranded {
    let moto = moto();
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/heal");
    let tmp = tempfile::tempdir().unwrap();
    // The live server: bootstrapped, heartbeating.
    let s1 = tmp.path().join("s1");
    run_node(moto, &registry, &s1, "heal-s1", "10.0.7.1", 1);
    let agent = FakeAgent::start("heal-s1", true, &["--address", "10.0.7.1"]);
    ok_json(&output(&mut heartbeat_cmd(
        moto,
        &registry,
        &s1,
        "heal-s1",
        "10.0.7.1",
        &agent.addr(),
    )));
    // The agent, with the cloud auto-join fallback.
    let root = tmp.path().join("a1");
    let v = ok_json(&output(
        run_cmd(moto, &registry, &root, "heal-a1", "10.0.7.50", 1).args([
            "--cloud-join",
            "provider=aws tag_key=auto-consul:cluster tag_value=heal",
        ]),
    ));
    assert_eq!(v["mode"], "agent", "{v}");
    let config = root.join("etc/consul.d/zz-auto-consul.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert_eq!(
        c["retry_join"],
        serde_json::json!([
            "10.0.7.1",
            "provider=aws tag_key=auto-consul:cluster tag_value=heal"
        ])
    );
    // Every server it knew has since been replaced.
    c["retry_join"] = serde_json::json!([
        "10.9.9.9",
        "provider=aws tag_key=auto-consul:cluster tag_value=heal"
    ]);
    std::fs::write(&config, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o640)).unwrap();
    Stranded {
        moto,
        registry,
        root,
        config,
        _tmp: tmp,
    }
}

impl Stranded {
    /// `heartbeat` of the stranded agent against `agent`.
    fn beat(&self, agent: &FakeAgent) -> Command {
        heartbeat_cmd(
            self.moto,
            &self.registry,
            &self.root,
            "heal-a1",
            "10.0.7.50",
            &agent.addr(),
        )
    }
}

fn retry_join(config: &Path) -> serde_json::Value {
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(config).unwrap()).unwrap();
    c["retry_join"].clone()
}

#[test]
fn an_agent_with_no_leader_joins_a_live_server_and_keeps_retry_join_current() {
    let s = stranded();
    let tmp = tempfile::tempdir().unwrap();
    let joins = tmp.path().join("joins");
    // A client agent that knows no server answers 500 on the status
    // endpoints, as Consul's does.
    let agent = FakeAgent::start(
        "heal-a1",
        false,
        &["--no-servers", "--join-file", joins.to_str().unwrap()],
    );
    let v = ok_json(&output(&mut s.beat(&agent)));
    assert_eq!(v["live_servers_from"], "registry", "{v}");
    assert_eq!(v["joined"], "10.0.7.1", "{v}");
    assert_eq!(std::fs::read_to_string(&joins).unwrap(), "10.0.7.1\n");
    // The dead address is gone, the cloud entry kept after the live ones;
    // the file keeps its mode.
    let want = serde_json::json!([
        "10.0.7.1",
        "provider=aws tag_key=auto-consul:cluster tag_value=heal"
    ]);
    assert_eq!(retry_join(&s.config), want);
    assert_eq!(v["retry_join"], want, "{v}");
    assert_eq!(
        std::fs::metadata(&s.config).unwrap().permissions().mode() & 0o777,
        0o640
    );

    // With a leader, the live servers come from Consul's Raft peers: no
    // registry read, the agent's heartbeat stays one request.
    let agent = FakeAgent::start(
        "heal-a1",
        false,
        &[
            "--leader",
            "10.0.7.2:8300",
            "--peers",
            "10.0.7.2:8300,10.0.7.3:8300",
        ],
    );
    let before = s.moto.requests();
    let v = ok_json(&output(&mut s.beat(&agent)));
    assert_eq!(s.moto.requests() - before, 1, "an agent's heartbeat: {v}");
    assert_eq!(v["live_servers_from"], "consul", "{v}");
    assert_eq!(v["joined"], serde_json::Value::Null, "{v}");
    assert_eq!(
        retry_join(&s.config),
        serde_json::json!([
            "10.0.7.2",
            "10.0.7.3",
            "provider=aws tag_key=auto-consul:cluster tag_value=heal"
        ])
    );
    // Unchanged servers: the file is left alone.
    let v = ok_json(&output(&mut s.beat(&agent)));
    assert_eq!(v["retry_join"], serde_json::Value::Null, "{v}");
}

#[test]
fn a_join_the_token_may_not_make_is_a_warning() {
    let s = stranded();
    let tmp = tempfile::tempdir().unwrap();
    let joins = tmp.path().join("joins");
    let agent = FakeAgent::start(
        "heal-a1",
        false,
        &[
            "--no-servers",
            "--token",
            "secret",
            "--join-file",
            joins.to_str().unwrap(),
        ],
    );
    let out = output(s.beat(&agent).env("CONSUL_HTTP_TOKEN", "not-the-token"));
    let v = ok_json(&out);
    assert_eq!(v["joined"], serde_json::Value::Null, "{v}");
    assert!(!joins.exists());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("agent:write"), "{stderr}");
    // retry_join is still made current for the next restart.
    assert_eq!(retry_join(&s.config)[0], "10.0.7.1");
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is not installed: apt-get install openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a certificate for `server.dc1.consul` and a client certificate.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    ]);
    openssl(dir, &ca);
    for (name, san) in [
        ("server", "DNS:server.dc1.consul"),
        ("client", "DNS:client.dc1.consul"),
    ] {
        let mut req = vec!["req"];
        req.extend(ec);
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&ext), format!("subjectAltName={san}\n")).unwrap();
        req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=x"]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

#[test]
fn the_heartbeat_shows_a_client_certificate_and_checks_the_agents_name() {
    let moto = moto();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    certificates(d);
    let registry = d.join("registry");
    std::fs::create_dir_all(&registry).unwrap();
    let root = d.join("root");
    // The node was set up by `run` (a heartbeat before it is refused).
    run_file(&root, &registry, "tls-1", "10.0.7.9", &[]);
    let registry = format!("file://{}", registry.display());
    let p = |n: &str| d.join(n).display().to_string();
    let agent = FakeAgent::start(
        "tls-1",
        true,
        &[
            "--address",
            "10.0.7.9",
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("server.key"),
            "--tls-client-ca",
            &p("ca.pem"),
        ],
    );
    let https = format!("https://127.0.0.1:{}", agent.port);
    let beat = |client: bool, name: Option<&str>| {
        let mut cmd = heartbeat_cmd(moto, &registry, &root, "tls-1", "10.0.7.9", &https);
        cmd.env("CONSUL_CACERT", p("ca.pem"));
        if client {
            cmd.env("CONSUL_CLIENT_CERT", p("client.pem"))
                .env("CONSUL_CLIENT_KEY", p("client.key"));
        }
        if let Some(n) = name {
            cmd.env("CONSUL_TLS_SERVER_NAME", n);
        }
        // One try is enough to tell: the heartbeat's retries would only
        // make a refused handshake take longer.
        cmd.args(["--expiry", "15"]);
        output(&mut cmd)
    };
    let ok = beat(true, Some("server.dc1.consul"));
    let v = ok_json(&ok);
    assert_eq!(v["mode"], "server", "{v}");
    // Without the client certificate the agent refuses the handshake.
    let refused = beat(false, Some("server.dc1.consul"));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is not answering"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // Without the server name, 127.0.0.1 is not the certificate's name.
    let wrong = beat(true, None);
    assert!(!wrong.status.success());
    // Half a client identity is a usage error.
    let mut half = heartbeat_cmd(moto, &registry, &root, "tls-1", "10.0.7.9", &https);
    let half = output(half.env("CONSUL_CLIENT_CERT", p("client.pem")));
    assert_eq!(
        half.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&half.stderr)
    );
}

#[test]
fn tls_flags_that_cannot_work_are_refused_before_anything_is_claimed() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = tmp.path().join("registry");
    std::fs::create_dir_all(&registry).unwrap();
    let moto = moto();
    let run = |extra: &[&str]| {
        output(
            auto_consul(moto)
                .args(["run", "--address", "10.0.8.20", "--node", "tlsflags"])
                .arg("--registry")
                .arg(format!("file://{}", registry.display()))
                .arg("--root")
                .arg(tmp.path().join("root"))
                .args(extra),
        )
    };
    // A server without a certificate.
    let out = run(&["--ca-file", "/etc/consul.d/ca.pem"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--role agent"), "{stderr}");
    // A certificate without a CA to check the others with.
    let out = run(&["--cert-file", "/c.pem", "--key-file", "/k.pem"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        std::fs::read_dir(&registry).unwrap().next().is_none(),
        "nothing claimed"
    );
}

#[test]
fn another_file_that_would_bootstrap_stops_run_before_any_claim() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, registry) = (tmp.path().join("root"), tmp.path().join("registry"));
    std::fs::create_dir_all(&registry).unwrap();
    let conf = root.join("etc/consul.d");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("server.hcl"),
        "server = true\nbootstrap_expect = 3\n",
    )
    .unwrap();
    let moto = moto();
    let out = output(
        auto_consul(moto)
            .args(["run", "--address", "10.0.8.30", "--node", "boot-x"])
            .arg("--registry")
            .arg(format!("file://{}", registry.display()))
            .arg("--root")
            .arg(&root),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("/etc/consul.d/server.hcl sets `bootstrap_expect`"),
        "{stderr}"
    );
    assert!(
        std::fs::read_dir(&registry).unwrap().next().is_none(),
        "nothing claimed"
    );
    assert!(!conf.join("zz-auto-consul.json").exists());
}

#[test]
fn a_node_of_a_replaced_cluster_never_joins_the_new_one() {
    let s = stranded();
    // This node's state names another cluster than the registry's now.
    let state = s.root.join("var/lib/auto-consul/state.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    v["cluster_id"] = serde_json::json!("an-old-cluster");
    std::fs::write(&state, v.to_string()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let joins = tmp.path().join("joins");
    let agent = FakeAgent::start(
        "heal-a1",
        false,
        &["--no-servers", "--join-file", joins.to_str().unwrap()],
    );
    let out = output(&mut s.beat(&agent));
    let v = ok_json(&out);
    assert_eq!(v["joined"], serde_json::Value::Null, "{v}");
    assert!(!joins.exists());
    assert_eq!(retry_join(&s.config)[0], "10.9.9.9", "left as it was");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another cluster"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_packaged_consul_is_sandboxed_only_when_asked_and_unsandboxed_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, registry) = packaged(tmp.path());
    let sandbox = root.join("etc/systemd/system/consul.service.d/auto-consul-sandbox.conf");
    // By default the package's unit keeps its exposure: only the drop-in
    // that makes it run auto-consul's configuration is written.
    run_file(&root, &registry, "pkg-1", "10.0.8.40", &[]);
    assert!(!sandbox.exists());
    let plain = exposure(&root, "consul.service");
    assert!(plain > 9.0, "packaged: {plain}");
    // Asked for: the same sandbox as the consul.service auto-consul writes.
    run_file(
        &root,
        &registry,
        "pkg-1",
        "10.0.8.40",
        &["--sandbox-consul"],
    );
    let boxed = exposure(&root, "consul.service");
    eprintln!("packaged consul.service: exposure {plain}, with --sandbox-consul {boxed}");
    assert!(boxed <= 5.0, "with --sandbox-consul: {boxed}");
    let text = std::fs::read_to_string(&sandbox).unwrap();
    assert!(text.contains("ReadWritePaths=-/opt/consul\n"), "{text}");
    let env = std::fs::read_to_string(root.join("etc/auto-consul/auto-consul.env")).unwrap();
    assert!(env.contains("AUTO_CONSUL_SANDBOX_CONSUL='true'"), "{env}");
    // No longer asked for (the env line removed): the drop-in goes.
    let kept: String = env
        .lines()
        .filter(|l| !l.starts_with("AUTO_CONSUL_SANDBOX_CONSUL"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(root.join("etc/auto-consul/auto-consul.env"), kept).unwrap();
    run_file(&root, &registry, "pkg-1", "10.0.8.40", &[]);
    assert!(!sandbox.exists());
}
