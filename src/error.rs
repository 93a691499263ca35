//! Error classes and how they reach the operator: one line, then the causes.

use std::fmt;

/// A usage or configuration error: the operator must change a flag, a
/// variable or a file. Exits with code 2; everything else exits with 1.
#[derive(Debug)]
pub struct UsageError {
    message: String,
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UsageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Builds an `anyhow::Error` carrying [`UsageError`].
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError {
        message: msg.into(),
        cause: None,
    })
}

/// A [`UsageError`] whose cause chain continues with `cause`.
pub fn usage_because(msg: impl Into<String>, cause: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(UsageError {
        message: msg.into(),
        cause: Some(cause.into()),
    })
}

/// An error and its sources as their messages, joined with ": " (repeats
/// dropped): what the SDK's `DisplayErrorContext` says, without the debug
/// dump of the raw response (headers, body) it appends.
pub fn messages(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// A failure that passes by itself (no leader yet, another server busy):
/// exit 75 (EX_TEMPFAIL), which the snapshot unit retries after 30 s; its
/// other failures wait for the next interval.
#[derive(Debug)]
pub struct TryAgainSoon(pub String);

impl fmt::Display for TryAgainSoon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TryAgainSoon {}

/// The exit code of a [`TryAgainSoon`].
pub const EXIT_TRY_AGAIN_SOON: u8 = 75;

/// A [`TryAgainSoon`] error.
pub fn soon(msg: impl Into<String>) -> anyhow::Error {
    TryAgainSoon(msg.into()).into()
}

/// A [`TryAgainSoon`] error saying `msg`, because of `cause` (its message
/// kept after `msg`). Never `cause.context(soon(..))`: anyhow keeps a
/// context's own value out of `chain()`, and the exit code would be 1.
pub fn soon_because(msg: impl Into<String>, cause: &anyhow::Error) -> anyhow::Error {
    soon(format!("{}: {cause:#}", msg.into()))
}

/// The process exit code for an error: 2 when a [`UsageError`] is anywhere in
/// the chain, 75 for a [`TryAgainSoon`] (in the chain, or the context of the
/// error itself), 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err
        .chain()
        .any(|e| e.downcast_ref::<UsageError>().is_some())
    {
        2
    } else if err
        .chain()
        .any(|e| e.downcast_ref::<TryAgainSoon>().is_some())
        || err.downcast_ref::<TryAgainSoon>().is_some()
    {
        EXIT_TRY_AGAIN_SOON
    } else {
        1
    }
}

/// `status` found the node degraded: exit 1, its output already says why.
#[derive(Debug)]
pub struct Degraded;

impl fmt::Display for Degraded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("this node is degraded")
    }
}

impl std::error::Error for Degraded {}

/// Prints the error on stderr: `error: <what failed>` then one
/// `  caused by: ...` line per cause.
pub fn report(err: &anyhow::Error, json: bool) {
    if err.downcast_ref::<Degraded>().is_some() {
        return;
    }
    if json {
        let mut chain = err.chain().map(|e| e.to_string());
        let line = serde_json::json!({
            "level": "ERROR",
            "message": chain.next().unwrap_or_default(),
            "causes": chain.collect::<Vec<_>>(),
            "exit_code": exit_code(err),
        });
        eprintln!("{line}");
        return;
    }
    let mut chain = err.chain();
    if let Some(top) = chain.next() {
        eprintln!("error: {top}");
    }
    for cause in chain {
        eprintln!("  caused by: {cause}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_join_the_chain_without_repeats() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = anyhow::Error::new(io).context("connecting");
        assert_eq!(messages(outer.as_ref()), "connecting: refused");
    }

    #[test]
    fn usage_errors_exit_2_wherever_they_are_in_the_chain() {
        assert_eq!(exit_code(&usage("bad flag")), 2);
        assert_eq!(exit_code(&usage("bad flag").context("while starting")), 2);
        let because = usage_because("fix it", anyhow::anyhow!("sdk detail"));
        assert_eq!(
            because.chain().map(|e| e.to_string()).collect::<Vec<_>>(),
            ["fix it", "sdk detail"]
        );
        assert_eq!(exit_code(&because), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("network down")), 1);
        assert_eq!(exit_code(&soon("no leader").context("saving")), 75);
    }

    /// Exit 75 survives every way the code wraps a [`TryAgainSoon`]: a
    /// context on it, a context computed lazily, a cause it names, and a
    /// [`TryAgainSoon`] given as the context of another error.
    #[test]
    fn try_again_soon_survives_each_wrapping_used() {
        use anyhow::Context;
        let cause =
            anyhow::anyhow!("Raft error when restoring snapshot: cannot restore snapshot now");
        assert_eq!(exit_code(&soon("no leader")), 75);
        assert_eq!(exit_code(&soon("no leader").context("saving")), 75);
        assert_eq!(exit_code(&soon("no leader").context("a").context("b")), 75);
        let lazily: Result<(), anyhow::Error> = Err(soon("busy"));
        assert_eq!(
            exit_code(&lazily.with_context(|| "restoring".to_string()).unwrap_err()),
            75
        );
        let because = soon_because("the restore is not done", &cause);
        assert_eq!(exit_code(&because), 75);
        assert!(because.to_string().contains("cannot restore snapshot now"));
        assert_eq!(exit_code(&because.context("snapshot")), 75);
        // The wrapping that hid it: a TryAgainSoon as another error's
        // context.
        let as_context = anyhow::anyhow!("PUT failed").context(TryAgainSoon("owed".into()));
        assert_eq!(exit_code(&as_context), 75);
        // And never for a plain failure.
        assert_eq!(exit_code(&cause.context("restoring")), 1);
    }
}
