//! Logging to stderr without timestamps (journald adds its own).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Sets up the global subscriber: auto-consul's own `info` and up and
/// other crates' `warn` by default; `-v` adds auto-consul's `debug`, `-vv`
/// everything's `debug`; `RUST_LOG` overrides them.
pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "auto_consul=info,warn",
        1 => "auto_consul=debug,info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_target(false)
        .init();
}
