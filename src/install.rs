//! Putting files in place under a root: atomic writes with explicit modes,
//! unchanged files left alone, and the systemctl calls.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Where systemd looks for units, in its order of precedence.
const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// The directory every local path is taken under (`--root`).
#[derive(Debug, Clone)]
pub struct Root(PathBuf);

impl Root {
    /// A root directory; `/` for the running system.
    pub fn new(dir: &Path) -> Root {
        Root(dir.to_path_buf())
    }

    /// Whether this is the running system (systemctl may be called).
    pub fn is_system(&self) -> bool {
        self.0 == Path::new("/")
    }

    /// `abs` (an absolute path on the target system) under the root.
    pub fn path(&self, abs: &Path) -> PathBuf {
        self.0.join(abs.strip_prefix("/").unwrap_or(abs))
    }

    /// Where on the unit path a unit named `name` exists (paths on the
    /// target system).
    pub fn units_named(&self, name: &str) -> Vec<PathBuf> {
        UNIT_DIRS
            .iter()
            .map(|d| Path::new(d).join(name))
            .filter(|p| self.path(p).exists())
            .collect()
    }

    /// The uid and gid of a user in the root's `/etc/passwd`, if it exists.
    pub fn user(&self, name: &str) -> Option<(u32, u32)> {
        let passwd = fs::read_to_string(self.path(Path::new("/etc/passwd"))).ok()?;
        passwd.lines().find_map(|line| {
            let mut f = line.split(':');
            if f.next()? != name {
                return None;
            }
            let _password = f.next()?;
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
    }
}

/// A file to put in place.
#[derive(Debug, Clone)]
pub struct FileSpec {
    /// Absolute path on the target system.
    pub path: PathBuf,
    /// Contents.
    pub contents: String,
    /// Permission bits.
    pub mode: u32,
    /// Owner (uid, gid), when it must not stay root's.
    pub owner: Option<(u32, u32)>,
}

/// Writes `spec` under `root` atomically: a temporary file in the same
/// directory, fsync, rename, fsync of the directory. A file whose contents,
/// mode and owner already match is left alone. Returns whether it wrote.
pub fn write_atomic(root: &Root, spec: &FileSpec) -> Result<bool> {
    let path = root.path(&spec.path);
    if unchanged(&path, spec) {
        return Ok(false);
    }
    let dir = path
        .parent()
        .context("a file to write has no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".auto-consul-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(spec.contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    let file = tmp.as_file();
    file.set_permissions(fs::Permissions::from_mode(spec.mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    if let Some((uid, gid)) = spec.owner {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))
            .with_context(|| format!("changing the owner of {}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    tmp.persist(&path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))?;
    Ok(true)
}

pub fn unchanged(path: &Path, spec: &FileSpec) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(path) else {
        return false;
    };
    if meta.permissions().mode() & 0o7777 != spec.mode {
        return false;
    }
    if let Some((uid, gid)) = spec.owner
        && (meta.uid() != uid || meta.gid() != gid)
    {
        return false;
    }
    fs::read(path).is_ok_and(|old| old == spec.contents.as_bytes())
}

/// Checks that the files could be written, before anything is claimed or
/// written: in each target directory, or the nearest existing ancestor of
/// one not created yet, a temporary file can be made (which also tells
/// who may write there, not only the permission bits).
pub fn check_writable(root: &Root, specs: &[FileSpec]) -> Result<()> {
    let mut checked = std::collections::HashSet::new();
    for spec in specs {
        let path = root.path(&spec.path);
        let mut dir = path.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            match fs::metadata(&d) {
                Ok(m) if m.is_dir() => {
                    if checked.insert(d.clone()) {
                        tempfile::tempfile_in(&d).map_err(|e| {
                            crate::error::usage(format!(
                                "cannot write {}: {} is not writable ({e}); run as root or fix --root",
                                path.display(),
                                d.display()
                            ))
                        })?;
                    }
                    break;
                }
                Ok(_) => bail!(
                    "cannot write {}: {} is not a directory",
                    path.display(),
                    d.display()
                ),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    dir = d.parent().map(Path::to_path_buf)
                }
                Err(e) => return Err(e).with_context(|| format!("checking {}", d.display())),
            }
        }
    }
    Ok(())
}

/// Takes the lock `name` (a file in /var/lib/auto-consul under the root),
/// waiting for another auto-consul process that holds it: `run` and
/// `heartbeat` both rewrite Consul's config file and the metrics file,
/// each by read, change, rename. Released when the file is dropped.
pub fn lock(root: &Root, name: &str) -> Result<fs::File> {
    let dir = root.path(Path::new("/var/lib/auto-consul"));
    fs::create_dir_all(&dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let path = dir.join(format!("{name}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening the lock {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// Runs `systemctl` with `args`, failing with its output when it fails.
pub fn systemctl(args: &[&str]) -> Result<()> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .with_context(|| {
            format!(
                "running systemctl {}: is systemd installed?",
                args.join(" ")
            )
        })?;
    if !out.status.success() {
        bail!(
            "systemctl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_leaves_unchanged_files_alone() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let spec = FileSpec {
            path: "/etc/x/y.conf".into(),
            contents: "a\n".into(),
            mode: 0o640,
            owner: None,
        };
        assert!(write_atomic(&root, &spec).unwrap());
        assert!(!write_atomic(&root, &spec).unwrap());
        let written = dir.path().join("etc/x/y.conf");
        assert_eq!(fs::read_to_string(&written).unwrap(), "a\n");
        assert_eq!(
            fs::metadata(&written).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let spec = FileSpec {
            mode: 0o600,
            ..spec
        };
        assert!(write_atomic(&root, &spec).unwrap());
        assert_eq!(
            fs::metadata(&written).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("etc/x")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary files left behind");
    }

    #[test]
    fn finds_users_and_units_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nconsul:x:998:997::/opt/consul:/bin/false\n",
        )
        .unwrap();
        assert_eq!(root.user("consul"), Some((998, 997)));
        assert_eq!(root.user("nobody"), None);
        assert!(root.units_named("consul.service").is_empty());
        fs::create_dir_all(dir.path().join("lib/systemd/system")).unwrap();
        fs::write(dir.path().join("lib/systemd/system/consul.service"), "").unwrap();
        assert_eq!(
            root.units_named("consul.service"),
            [PathBuf::from("/lib/systemd/system/consul.service")]
        );
    }
}
