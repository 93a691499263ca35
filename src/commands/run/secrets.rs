//! Secrets read from the files named by options.

use std::path::PathBuf;

use anyhow::Result;

use crate::cli::GlobalOpts;
use crate::error::usage;

/// Secrets read from the files named by options; never from argv values.
pub(super) struct Secrets {
    pub(super) encrypt: Option<String>,
    pub(super) acl_token: Option<String>,
}

/// Consul's own check of `encrypt` (agent/config/builder.go decodes it
/// with Go's standard base64; memberlist's keyring takes 16, 24 or 32
/// bytes: AES-128, -192 or -256). Says why a key fails, never the key.
pub(crate) fn check_gossip_key(key: &str) -> Result<(), String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| "is not base64 (standard alphabet, with padding)".to_string())?;
    match bytes.len() {
        16 | 24 | 32 => Ok(()),
        n => Err(format!("decodes to {n} bytes, not 16, 24 or 32")),
    }
}

impl Secrets {
    pub(super) fn read(opts: &GlobalOpts) -> Result<Secrets> {
        let read = |path: &Option<PathBuf>, what: &str| -> Result<Option<String>> {
            let Some(path) = path else { return Ok(None) };
            let text = std::fs::read_to_string(path).map_err(|e| {
                usage(format!(
                    "cannot read the {what} file {}: {e}; fix the path or its permissions",
                    path.display()
                ))
            })?;
            let value = text.trim().to_string();
            if value.is_empty() || value.contains(char::is_whitespace) {
                return Err(usage(format!(
                    "the {what} file {} must hold one value on one line",
                    path.display()
                )));
            }
            Ok(Some(value))
        };
        let encrypt = read(&opts.encrypt_file, "gossip encryption key")?;
        if let (Some(key), Some(path)) = (&encrypt, &opts.encrypt_file) {
            check_gossip_key(key).map_err(|why| {
                usage(format!(
                    "the gossip encryption key in {} {why}: Consul would refuse to start with it; \
                     write one made by `consul keygen` (base64 of 32 random bytes, 44 characters)",
                    path.display()
                ))
            })?;
        }
        Ok(Secrets {
            encrypt,
            acl_token: read(&opts.acl_token_file, "ACL token")?,
        })
    }

    pub(super) fn any(&self) -> bool {
        self.encrypt.is_some() || self.acl_token.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::check_gossip_key;

    #[test]
    fn gossip_keys_are_checked_as_consul_checks_them() {
        // 32, 24 and 16 bytes, as `consul keygen` and older tools make them.
        for key in [
            "pUqJrVyVRj5jsiYEkM/tFQYfWyJIv4s3XkvDwy7Cu5s=",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYX",
            "AAECAwQFBgcICQoLDA0ODw==",
        ] {
            assert_eq!(check_gossip_key(key), Ok(()), "{key}");
        }
        let err = |k: &str| check_gossip_key(k).unwrap_err();
        assert!(err("not a key!").contains("not base64"));
        // Unpadded base64 of 16 bytes: Go's StdEncoding refuses it too.
        assert!(err("AAECAwQFBgcICQoLDA0ODw").contains("not base64"));
        assert!(err("AAECAwQFBgcICQoLDA0O").contains("15 bytes"));
        assert!(err("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g").contains("33 bytes"));
    }
}
