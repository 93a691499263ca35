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
}
