//! Secrets read from the files named by options.

use std::path::PathBuf;

use anyhow::Result;

use crate::cli::SecretOpts;
use crate::error::usage;

/// Secrets read from the files named by options; never from argv values.
pub(super) struct Secrets {
    pub(super) encrypt: Option<String>,
    pub(super) acl_token: Option<String>,
}

impl Secrets {
    pub(super) fn read(tls: &SecretOpts) -> Result<Secrets> {
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
        let encrypt = read(&tls.encrypt_file, "gossip encryption key")?;
        if let (Some(key), Some(path)) = (&encrypt, &tls.encrypt_file) {
            crate::secrets::check_gossip_key(key).map_err(|why| {
                usage(format!(
                    "the gossip encryption key in {} {why}: Consul would refuse to start with it; \
                     write one made by `consul keygen` (base64 of 32 random bytes, 44 characters)",
                    path.display()
                ))
            })?;
        }
        Ok(Secrets {
            encrypt,
            acl_token: read(&tls.acl_token_file, "ACL token")?,
        })
    }

    pub(super) fn any(&self) -> bool {
        self.encrypt.is_some() || self.acl_token.is_some()
    }
}
