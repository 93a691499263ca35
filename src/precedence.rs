//! Other files in Consul's config dir that set what auto-consul decides.
//!
//! Consul reads every `.json` and `.hcl` file of `-config-dir` in lexical
//! order of their names; for a single value the file read last wins, and
//! lists (`retry_join`) add up. auto-consul's file is named to be read
//! last (`zz-auto-consul.json`, after HashiCorp's packaged `consul.hcl`),
//! and `run` warns about every other file that sets one of the keys it
//! owns, naming the file and the key.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The keys auto-consul decides: a node's identity and place, its role,
/// whom it joins.
const OWNED: &[&str] = &[
    "node_name",
    "advertise_addr",
    "bind_addr",
    "data_dir",
    "datacenter",
    "server",
    "bootstrap",
    "bootstrap_expect",
    "retry_join",
    "start_join",
    "leave_on_terminate",
    "encrypt",
];

/// Keys whose values are secrets: compared, never shown.
const SECRETS: &[&str] = &["encrypt"];

/// Keys that start a cluster: set anywhere but in auto-consul's file, a
/// node could bootstrap a second cluster. `run` refuses them (exit 2).
pub const BOOTSTRAPPING: &[&str] = &["bootstrap", "bootstrap_expect"];

/// Keys whose values are lists that Consul joins across files.
const LISTS: &[&str] = &["retry_join", "start_join"];

/// A key another file sets that auto-consul owns.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// The other file (a path on the target system).
    pub file: PathBuf,
    /// The key.
    pub key: String,
    /// What it means for the node.
    pub effect: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sets `{}`, which auto-consul decides: {}; remove it from {}",
            self.file.display(),
            self.key,
            self.effect,
            self.file.display()
        )
    }
}

/// The conflicts between auto-consul's configuration (`ours`, written as
/// `own_name` in `config_dir`) and the other files there, but for `skip`
/// (auto-consul's own file under an older name); `dir_on_disk` is where
/// `config_dir` lies (under `--root`). Files that cannot be read or parsed
/// are reported too: Consul would refuse to start on them.
pub fn conflicts(
    dir_on_disk: &Path,
    config_dir: &Path,
    own_name: &str,
    skip: &[&str],
    ours: &Value,
) -> Vec<Conflict> {
    conflicts_with(
        &other_files(dir_on_disk, own_name, skip),
        config_dir,
        own_name,
        ours,
    )
}

/// [`conflicts`] against the other files already read (`other_files`).
pub fn conflicts_with(
    others: &[(String, Result<Value, String>)],
    config_dir: &Path,
    own_name: &str,
    ours: &Value,
) -> Vec<Conflict> {
    let mut out = Vec::new();
    for (name, parsed) in others {
        let name = name.clone();
        let file = config_dir.join(&name);
        let theirs = match parsed {
            Ok(Value::Object(map)) => map,
            Ok(_) => continue,
            Err(e) => {
                out.push(Conflict {
                    file,
                    key: "(the whole file)".into(),
                    effect: format!("it cannot be read ({e}), and Consul will not start with it"),
                });
                continue;
            }
        };
        let read_after_ours = name.as_str() > own_name;
        for key in OWNED {
            let Some(value) = theirs.get(*key) else {
                continue;
            };
            let real_mine = ours.get(*key);
            if !LISTS.contains(key) && real_mine == Some(value) {
                continue;
            }
            // A secret is never shown, in a log or in `--json`.
            let show = |v: &Value| {
                if SECRETS.contains(key) {
                    Value::String("(a secret, not shown)".into())
                } else {
                    v.clone()
                }
            };
            let value = show(value);
            let mine = real_mine.map(show);
            let effect = if LISTS.contains(key) {
                if value.as_array().is_some_and(|a| a.is_empty()) {
                    continue;
                }
                format!(
                    "Consul adds its {value} to auto-consul's list, so this node also joins those"
                )
            } else {
                match mine {
                    Some(m) if read_after_ours => format!(
                        "its {value} is read after auto-consul's {m} and wins, so the node does not run as decided"
                    ),
                    Some(m) => {
                        format!("auto-consul's file is read last, so its {m} is used, not {value}")
                    }
                    None if BOOTSTRAPPING.contains(key) => format!(
                        "its {value} could make this node bootstrap a second cluster beside the one auto-consul decides"
                    ),
                    None => format!("its {value} conflicts with auto-consul's decision"),
                }
            };
            out.push(Conflict {
                file: file.clone(),
                key: (*key).to_string(),
                effect,
            });
        }
    }
    out
}

/// Other files that set `bootstrap: true` or a `bootstrap_expect` above 0:
/// with them a node could bootstrap a second cluster, whatever auto-consul
/// decides, so `run` refuses to go on (checked before anything is claimed).
pub fn bootstrapping(
    dir_on_disk: &Path,
    config_dir: &Path,
    own_name: &str,
    skip: &[&str],
) -> Vec<Conflict> {
    let mut out = Vec::new();
    for (name, parsed) in other_files(dir_on_disk, own_name, skip) {
        let Ok(Value::Object(map)) = parsed else {
            continue;
        };
        for key in BOOTSTRAPPING {
            let on = match map.get(*key) {
                Some(Value::Bool(b)) => *b,
                Some(Value::Number(n)) => n.as_f64().is_some_and(|n| n > 0.0),
                _ => false,
            };
            if on {
                out.push(Conflict {
                    file: config_dir.join(&name),
                    key: (*key).to_string(),
                    effect: format!(
                        "it could make this node bootstrap a second cluster, whatever auto-consul decides (= {})",
                        map[*key]
                    ),
                });
            }
        }
    }
    out
}

/// The other `.json` and `.hcl` files of the config dir (all but
/// `own_name` and `skip`), in the order Consul reads them, each parsed.
/// The other files of a config dir (`.json` and `.hcl`, sorted), parsed.
pub fn other_files(
    dir_on_disk: &Path,
    own_name: &str,
    skip: &[&str],
) -> Vec<(String, Result<Value, String>)> {
    let Ok(entries) = std::fs::read_dir(dir_on_disk) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != own_name && !skip.contains(&n.as_str()))
        .filter(|n| n.ends_with(".json") || n.ends_with(".hcl"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let parsed = std::fs::read_to_string(dir_on_disk.join(&name))
                .map_err(|e| e.to_string())
                .and_then(|text| parse(&name, &text));
            (name, parsed)
        })
        .collect()
}

/// A config file's top-level keys as JSON values: `.json` with serde_json,
/// `.hcl` with the hcl crate (blocks become objects).
fn parse(name: &str, text: &str) -> Result<Value, String> {
    if name.ends_with(".hcl") {
        hcl::from_str::<Value>(text).map_err(|e| e.to_string())
    } else {
        serde_json::from_str::<Value>(text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_each_file_and_key_that_auto_consul_owns() {
        let dir = tempfile::tempdir().unwrap();
        // HashiCorp's packaged file: the same data_dir is no conflict.
        std::fs::write(
            dir.path().join("consul.hcl"),
            "# packaged\ndatacenter = \"dc1\"\ndata_dir = \"/opt/consul\"\nui_config {\n  enabled = true\n}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("operator.json"),
            r#"{"server": true, "retry_join": ["10.9.9.9"], "bootstrap_expect": 3, "ports": {"grpc": 8502}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("zzz-late.hcl"), "node_name = \"other\"\n").unwrap();
        std::fs::write(dir.path().join("broken.hcl"), "server = = true\n").unwrap();
        std::fs::write(dir.path().join("consul.env"), "server=true\n").unwrap();
        let ours = json!({
            "node_name": "i-1", "data_dir": "/opt/consul", "datacenter": "dc1",
            "server": false, "retry_join": ["10.0.0.1"],
        });
        let found = conflicts(
            dir.path(),
            Path::new("/etc/consul.d"),
            "zz-auto-consul.json",
            &[],
            &ours,
        );
        let keys: Vec<(String, String)> = found
            .iter()
            .map(|c| (c.file.display().to_string(), c.key.clone()))
            .collect();
        assert_eq!(
            keys,
            [
                ("/etc/consul.d/broken.hcl", "(the whole file)"),
                ("/etc/consul.d/operator.json", "server"),
                ("/etc/consul.d/operator.json", "bootstrap_expect"),
                ("/etc/consul.d/operator.json", "retry_join"),
                ("/etc/consul.d/zzz-late.hcl", "node_name"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        assert!(
            found[1].effect.contains("auto-consul's file is read last"),
            "{}",
            found[1]
        );
        assert!(found[4].effect.contains("wins"), "{}", found[4]);
        assert!(
            found[3]
                .to_string()
                .contains("remove it from /etc/consul.d/operator.json")
        );
    }

    #[test]
    fn a_missing_dir_has_no_conflicts() {
        assert!(
            conflicts(
                Path::new("/nonexistent/x"),
                Path::new("/x"),
                "a.json",
                &[],
                &json!({})
            )
            .is_empty()
        );
    }
}
