//! The test harness: a real S3/EC2/IMDS endpoint (moto_server, started on a
//! free loopback port), an S3 client to look at the bucket as a user would,
//! and the real `auto-consul` binary run with the standard AWS variables.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};

/// A running moto_server; killed on drop.
pub struct Moto {
    pub port: u16,
    child: Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python that has `moto[server]`: `AUTO_CONSUL_TEST_PYTHON`, else the
/// venv `.ci/run` makes, else `python3`.
pub fn python() -> String {
    std::env::var("AUTO_CONSUL_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = format!(
            "{}/.cache/auto-consul-venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        );
        if Path::new(&venv).exists() {
            venv
        } else {
            "python3".into()
        }
    })
}

/// Starts a Python helper from tests/support that prints `PORT=<n>` first.
fn start_helper(script: &str, args: &[&str]) -> (u16, Child) {
    start_helper_env(script, args, &[])
}

fn start_helper_env(script: &str, args: &[&str], env: &[(&str, String)]) -> (u16, Child) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(script);
    let mut child = Command::new(python())
        .arg(&script)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} (set AUTO_CONSUL_TEST_PYTHON to a Python with moto[server]): {e}",
                python()
            )
        });
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            panic!(
                "{} did not report its port within 60s (is moto[server] installed for {}?)",
                script.display(),
                python()
            )
        });
    let port = line
        .trim()
        .strip_prefix("PORT=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{} did not start (pip install 'moto[server]>=5.1.5'); it said {line:?}",
                script.display()
            )
        });
    (port, child)
}

/// A stand-in Consul agent serving /v1/agent/self; killed on drop.
pub struct FakeAgent {
    pub port: u16,
    child: Child,
}

impl FakeAgent {
    /// Starts one that reports `node`, as a server or not.
    pub fn start(node: &str, server: bool, extra: &[&str]) -> FakeAgent {
        let mut args = vec!["--node", node];
        if server {
            args.push("--server");
        }
        args.extend_from_slice(extra);
        let (port, child) = start_helper("fake_consul_agent.py", &args);
        FakeAgent { port, child }
    }

    /// [`FakeAgent::start`] with its wall clock shifted by `offset`
    /// (libfaketime syntax, as [`skewed`]).
    pub fn start_skewed(node: &str, server: bool, extra: &[&str], offset: &str) -> FakeAgent {
        let mut args = vec!["--node", node];
        if server {
            args.push("--server");
        }
        args.extend_from_slice(extra);
        let env = [
            ("LD_PRELOAD", libfaketime().display().to_string()),
            ("FAKETIME", offset.to_string()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
        ];
        let (port, child) = start_helper_env("fake_consul_agent.py", &args, &env);
        FakeAgent { port, child }
    }

    /// Its address, for CONSUL_HTTP_ADDR.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Starts moto_server through tests/support/moto_locked.py.
    pub fn start(extra: &[&str]) -> Moto {
        let (port, child) = start_helper("moto_locked.py", extra);
        Moto { port, child }
    }

    /// The endpoint URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Arms fault rules (see tests/support/moto_locked.py).
    pub fn faults(&self, rules: serde_json::Value) {
        http(self.port, "POST", "/_faults", &rules.to_string());
    }

    /// How many times each armed rule fired.
    pub fn fired(&self) -> Vec<u64> {
        serde_json::from_str(&http_get(self.port, "/_faults")).expect("a list")
    }

    /// Holds every request `ms` milliseconds before it is served.
    pub fn delay(&self, ms: f64) {
        http(self.port, "POST", "/_delay", &ms.to_string());
    }

    /// Creates `bucket` if needed and stores `items` straight into moto's
    /// S3 backend.
    pub fn seed(&self, bucket: &str, items: Vec<(String, String)>) {
        let mut chunks: Vec<&[(String, String)]> = items.chunks(20_000).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let body = serde_json::json!({ "bucket": bucket, "items": chunk }).to_string();
            http(self.port, "POST", "/_seed", &body);
        }
    }

    /// Moves the LastModified of every object under `prefix` of `bucket`
    /// `seconds` into the past: the registry as if silent that long.
    pub fn age(&self, bucket: &str, prefix: &str, seconds: u64) -> u64 {
        let body = serde_json::json!({ "bucket": bucket, "prefix": prefix, "seconds": seconds });
        http(self.port, "POST", "/_age", &body.to_string())
            .trim()
            .parse()
            .expect("a count")
    }

    /// Serves `body` at the metadata `path` (404 for `None`).
    pub fn imds(&self, path: &str, body: Option<&str>) {
        let rules = serde_json::json!({ path: body });
        http(self.port, "POST", "/_imds", &rules.to_string());
    }

    /// Requests served so far, by kind (LIST, GET, PUT, DELETE, ...).
    pub fn kinds(&self) -> std::collections::BTreeMap<String, u64> {
        serde_json::from_str(&http_get(self.port, "/_kinds")).expect("a map")
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        http_get(self.port, "/_stats")
            .trim()
            .parse()
            .expect("a count")
    }
}

/// One moto_server per test binary, shared by its tests (each uses its own
/// bucket or prefix).
pub fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| Moto::start(&[]))
}

fn http_get(port: u16, path: &str) -> String {
    http(port, "GET", path, "")
}

fn http(port: u16, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
}

/// A loopback port nobody listens on.
pub fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A name unique within this test run.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// An S3 client on a moto_server, as a user's `aws s3` would see the bucket.
pub fn s3(moto: &Moto) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(moto.url())
        .force_path_style(true)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// A Tokio runtime for the test's own AWS calls.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Creates a fresh bucket and returns its name.
pub fn bucket(moto: &Moto) -> String {
    let name = unique("reg").to_lowercase();
    rt().block_on(s3(moto).create_bucket().bucket(&name).send())
        .expect("create bucket");
    name
}

/// Every key under `prefix`, sorted.
pub fn keys(moto: &Moto, bucket: &str, prefix: &str) -> Vec<String> {
    rt().block_on(async {
        let out = s3(moto)
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .send()
            .await
            .expect("list");
        let mut keys: Vec<String> = out
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect();
        keys.sort();
        keys
    })
}

/// Writes one object.
pub fn put(moto: &Moto, bucket: &str, key: &str, body: &str) {
    rt().block_on(
        s3(moto)
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(body.as_bytes().to_vec().into())
            .send(),
    )
    .expect("put");
}

/// Reads one object.
pub fn get(moto: &Moto, bucket: &str, key: &str) -> String {
    rt().block_on(async {
        let out = s3(moto)
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .expect("get");
        String::from_utf8(out.body.collect().await.unwrap().into_bytes().to_vec()).unwrap()
    })
}

/// A directory holding a stand-in `consul` (the real one cannot be installed
/// here); put first on PATH.
pub fn fake_consul_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("fake-consul")
            .tempdir()
            .unwrap();
        let bin = dir.path().join("consul");
        std::fs::write(
            &bin,
            "#!/bin/sh\necho 'stand-in consul for the auto-consul tests'\n",
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    })
    .path()
}

/// The `auto-consul` binary with a clean environment pointed at `moto`:
/// no stray AUTO_CONSUL_* settings, and IMDS pointed at a closed port so
/// nothing ever reaches the real metadata address.
pub fn auto_consul(moto: &Moto) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_auto-consul"));
    for (k, _) in std::env::vars() {
        if k.starts_with("AUTO_CONSUL_") || k.starts_with("AWS_") || k.starts_with("CONSUL_") {
            cmd.env_remove(k);
        }
    }
    let path = format!(
        "{}:{}",
        fake_consul_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.env("PATH", path)
        .env("AWS_ENDPOINT_URL", moto.url())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            format!("http://127.0.0.1:{}", closed_port()),
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "auto_consul=info,aws_config=error,warn")
        .stdin(Stdio::null());
    cmd
}

/// Runs a command to completion.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("run auto-consul")
}

/// Parses stdout as one JSON object, with the whole output on failure.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}); status {}; stdout {}; stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Asserts success and returns the JSON output.
pub fn ok_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "status {}; stdout {}; stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    json(out)
}

/// Every file under `dir`, relative, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// The mode a `run --json` chose.
pub fn mode(v: &serde_json::Value) -> String {
    v["mode"].as_str().expect("mode").to_string()
}

/// `auto-consul COMMAND --json` as one node: its registry, root, name and
/// address.
pub fn node_cmd(
    moto: &Moto,
    command: &str,
    registry: &str,
    root: &Path,
    node: &str,
    ip: &str,
) -> Command {
    let mut cmd = auto_consul(moto);
    cmd.args([
        command,
        "--json",
        "--registry",
        registry,
        "--address",
        ip,
        "--node",
        node,
    ])
    .arg("--root")
    .arg(root);
    cmd
}

/// `auto-consul run --json` for one node: its registry, root, name, address
/// and the number of servers wanted.
pub fn run_cmd(
    moto: &Moto,
    registry: &str,
    root: &Path,
    node: &str,
    ip: &str,
    servers: u32,
) -> Command {
    let mut cmd = node_cmd(moto, "run", registry, root, node, ip);
    cmd.args(["--servers", &servers.to_string()]);
    cmd
}

/// `auto-consul heartbeat --json` for one node, talking to the (fake)
/// Consul agent at `agent` (`host:port`).
pub fn heartbeat_cmd(
    moto: &Moto,
    registry: &str,
    root: &Path,
    node: &str,
    ip: &str,
    agent: &str,
) -> Command {
    agent_cmd(moto, "heartbeat", registry, root, node, ip, agent)
}

/// `auto-consul COMMAND --json` for one node whose (fake) Consul agent is
/// at `agent` (`host:port`).
pub fn agent_cmd(
    moto: &Moto,
    command: &str,
    registry: &str,
    root: &Path,
    node: &str,
    ip: &str,
    agent: &str,
) -> Command {
    let mut cmd = node_cmd(moto, command, registry, root, node, ip);
    cmd.env("CONSUL_HTTP_ADDR", agent);
    cmd
}

/// Runs one node to success and returns its JSON output.
pub fn run_node(
    moto: &Moto,
    registry: &str,
    root: &Path,
    node: &str,
    ip: &str,
    servers: u32,
) -> serde_json::Value {
    ok_json(&output(&mut run_cmd(
        moto, registry, root, node, ip, servers,
    )))
}

/// A heartbeat key's timestamp, `seconds_ago` seconds ago.
pub fn stamp(seconds_ago: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::seconds(seconds_ago))
        .format("%Y%m%d%H%M%S")
        .to_string()
}

/// Writes many objects at once through the test's own S3 client.
pub fn put_many(moto: &Moto, bucket: &str, items: Vec<(String, String)>) {
    use futures::StreamExt;
    let client = s3(moto);
    rt().block_on(async {
        futures::stream::iter(items)
            .map(|(k, b)| {
                let client = client.clone();
                async move {
                    client
                        .put_object()
                        .bucket(bucket)
                        .key(k)
                        .body(b.into_bytes().into())
                        .send()
                        .await
                        .unwrap()
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
    });
}

/// An EC2 client on a moto_server.
pub fn ec2(moto: &Moto) -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::new()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-east-1"))
            .endpoint_url(moto.url())
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "testing", "testing", None, None, "tests",
            ))
            .build(),
    )
}

/// Starts `n` instances in moto's EC2; their ids.
pub fn run_instances(moto: &Moto, n: i32) -> Vec<String> {
    launch(moto, n, None)
}

/// `n` instances in moto's EC2 carrying tag `key` = `value` (as the
/// module's launch templates tag them); their ids.
pub fn run_tagged_instances(moto: &Moto, n: i32, key: &str, value: &str) -> Vec<String> {
    launch(moto, n, Some((key, value)))
}

/// `n` instances in moto's EC2, with one tag when given; their ids.
fn launch(moto: &Moto, n: i32, tag: Option<(&str, &str)>) -> Vec<String> {
    let ec2 = ec2(moto);
    rt().block_on(async {
        let images = ec2.describe_images().send().await.unwrap();
        let ami = images.images()[0].image_id().unwrap().to_string();
        let tags = tag.map(|(key, value)| {
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key(key)
                        .value(value)
                        .build(),
                )
                .build()
        });
        let out = ec2
            .run_instances()
            .image_id(ami)
            .min_count(n)
            .max_count(n)
            .set_tag_specifications(tags.map(|t| vec![t]))
            .send()
            .await
            .unwrap();
        out.instances()
            .iter()
            .map(|i| i.instance_id().unwrap().to_string())
            .collect()
    })
}

/// Terminates instances in moto's EC2.
pub fn terminate(moto: &Moto, ids: &[&str]) {
    let ec2 = ec2(moto);
    rt().block_on(async {
        let mut req = ec2.terminate_instances();
        for id in ids {
            req = req.instance_ids(*id);
        }
        req.send().await.unwrap();
    });
}

/// libfaketime's preload library (Debian package `faketime`), for running
/// the real binary on a shifted clock.
pub fn libfaketime() -> PathBuf {
    for p in [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("libfaketime is missing: apt-get install faketime (the .ci/run script does)");
}

/// Runs `cmd` with its wall clock shifted by `offset` (libfaketime syntax,
/// e.g. "+1h", "-1h"); the monotonic clock is left alone.
pub fn skewed<'a>(cmd: &'a mut Command, offset: &str) -> &'a mut Command {
    cmd.env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
}

/// The seconds between a heartbeat key's stamp and now: how far the
/// writer's clock was off.
pub fn key_skew_seconds(key: &str) -> i64 {
    let name = key.rsplit('/').next().unwrap();
    let stamp = &name[..14];
    let t = chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%d%H%M%S")
        .unwrap()
        .and_utc();
    (t - chrono::Utc::now()).num_seconds()
}

/// How many keys are under `prefix`, over every listing page.
pub fn count_keys(moto: &Moto, bucket: &str, prefix: &str) -> usize {
    rt().block_on(async {
        let mut pages = s3(moto)
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut n = 0;
        while let Some(page) = pages.next().await {
            n += page.expect("list").contents().len();
        }
        n
    })
}

/// Builds the Debian package from the binary this test run built (no
/// build: `cargo deb --profile dev --no-build`), with the man page and the
/// shell completions generated as packaging/build-deb.sh makes them, into
/// `out_dir`; returns the .deb's path.
pub fn build_deb(out_dir: &Path) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_auto-consul"));
    // The binary lives in <target>/debug/: package that one.
    let target = bin.parent().and_then(Path::parent).expect("a target dir");
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
        .arg(out_dir)
        .env("CARGO_TARGET_DIR", target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo is on PATH");
    assert!(
        out.status.success(),
        "cargo deb failed (cargo install cargo-deb --locked): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_dir(out_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb was written")
}

/// The line the fake agent's state machine writes first in `state.bin`
/// (tests/support/fake_consul_agent.py, `FSM_HEADER`): a snapshot without
/// it is one the fake's Consul cannot restore.
pub const FAKE_FSM_HEADER: &[u8] = b"fake-consul-fsm 1\n";

/// Writes at `path` a snapshot in Consul's archive format
/// (hashicorp/consul snapshot/archive.go: a gzipped tar of `meta.json`,
/// `state.bin` and `SHA256SUMS`, the tar ended by its two zero blocks),
/// holding `state` as `state.bin`; stored, not compressed, so that its
/// size is about `state`'s. Returns the file's SHA-256 (hex).
pub fn write_snapshot(path: &Path, state: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    let meta = format!(
        "{{\"Version\":1,\"ID\":\"2-42-1700000000000\",\"Index\":42,\"Term\":2,\"Size\":{}}}\n",
        state.len()
    );
    let sums = format!(
        "{:x}  meta.json\n{:x}  state.bin\n",
        Sha256::digest(meta.as_bytes()),
        Sha256::digest(state)
    );
    let mut tar = tar::Builder::new(Vec::new());
    for (name, body) in [
        ("meta.json", meta.as_bytes()),
        ("state.bin", state),
        ("SHA256SUMS", sums.as_bytes()),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(body.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        tar.append_data(&mut h, name, body).unwrap();
    }
    let raw = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    gz.write_all(&raw).unwrap();
    let bytes = gz.finish().unwrap();
    std::fs::write(path, &bytes).unwrap();
    format!("{:x}", Sha256::digest(&bytes))
}

/// The Terraform module's IAM policy for `role` (`server` or `agent`),
/// rendered as its `templatefile()` renders it for `bucket`, registry
/// prefix `prefix` (without a trailing `/`) and SSM path `ssm_path`.
pub fn module_policy(role: &str, bucket: &str, prefix: &str, ssm_path: &str) -> String {
    render_module_policy(role, role, bucket, prefix, ssm_path, None)
}

/// A secondary's server role: the module's server policy for its own
/// bucket, prefix and SSM path, with the statements of its
/// `primary_secrets` policy for the primary's SSM path (any region), as
/// one document.
pub fn secondary_server_policy(
    bucket: &str,
    prefix: &str,
    ssm_path: &str,
    primary_ssm_path: &str,
) -> serde_json::Value {
    let mut policy: serde_json::Value =
        serde_json::from_str(&module_policy("server", bucket, prefix, ssm_path)).unwrap();
    let more: serde_json::Value = serde_json::from_str(&render_module_policy(
        "primary-secrets",
        "server",
        bucket,
        prefix,
        ssm_path,
        Some(primary_ssm_path),
    ))
    .unwrap();
    policy["Statement"]
        .as_array_mut()
        .unwrap()
        .extend(more["Statement"].as_array().unwrap().clone());
    policy
}

/// The module's policy template `policies/<stem>.json.tftpl` rendered as
/// `templatefile()` renders it for `role`'s group.
fn render_module_policy(
    stem: &str,
    role: &str,
    bucket: &str,
    prefix: &str,
    ssm_path: &str,
    primary_ssm_path: Option<&str>,
) -> String {
    let file = format!(
        "{}/terraform/modules/auto-consul/policies/{stem}.json.tftpl",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace(
            "${primary_ssm_parameter_arn}",
            &format!(
                "arn:aws:ssm:*:123456789012:parameter{}",
                primary_ssm_path.unwrap_or_default()
            ),
        )
        .replace("${bucket_arn}", &format!("arn:aws:s3:::{bucket}"))
        .replace("${key_prefix}", &format!("{prefix}/"))
        .replace(
            "${ssm_parameter_arn}",
            &format!("arn:aws:ssm:us-east-1:123456789012:parameter{ssm_path}"),
        )
        .replace(
            "${asg_arn}",
            &format!(
                "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:*:autoScalingGroupName/lp-{role}s-{}",
                "?".repeat(26)
            ),
        )
        // templatefile's escape: `$${` is a literal `${` (a policy variable).
        .replace("$${", "\u{0}");
    assert!(!text.contains("${"), "{file}: a variable left");
    let text = text.replace('\u{0}', "${");
    serde_json::from_str::<serde_json::Value>(&text).expect("the rendered policy is JSON");
    text
}

/// An SSM client for moto in `region` (SSM is regional: a parameter made
/// in one region is not found in another).
pub fn ssm_in(moto: &Moto, region: &str) -> aws_sdk_ssm::Client {
    aws_sdk_ssm::Client::from_conf(
        aws_sdk_ssm::config::Builder::new()
            .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
            .region(aws_sdk_ssm::config::Region::new(region.to_string()))
            .endpoint_url(moto.url())
            .credentials_provider(aws_sdk_ssm::config::Credentials::new(
                "testing", "testing", None, None, "tests",
            ))
            .build(),
    )
}

/// The value of SSM parameter `name` in `region`, if it exists there.
pub fn ssm_value(moto: &Moto, region: &str, name: &str) -> Option<String> {
    rt().block_on(
        ssm_in(moto, region)
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send(),
    )
    .ok()
    .and_then(|o| o.parameter().and_then(|p| p.value().map(str::to_string)))
}

/// A bucket made in `region` (its LocationConstraint).
pub fn bucket_in(moto: &Moto, region: &str) -> String {
    use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
    let name = unique("reg").to_lowercase();
    rt().block_on(
        s3(moto)
            .create_bucket()
            .bucket(&name)
            .create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region))
                    .build(),
            )
            .send(),
    )
    .expect("create bucket");
    name
}
