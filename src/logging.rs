//! Logging to stderr without timestamps (journald adds its own).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Sets up the global subscriber: auto-consul's own `info` and up and
/// other crates' `warn` (aws_config's `error`) by default; `-v` adds auto-consul's `debug`, `-vv`
/// everything's `debug`; `RUST_LOG` overrides them.
/// With `json`, one JSON object a line (timestamp, level, message and
/// fields), through tracing-subscriber's JSON layer.
pub fn init(verbose: u8, json: bool) {
    let default = match verbose {
        // aws_config's own warnings (a region or credentials not found in
        // IMDS off EC2: a debug dump each) stay quiet: the error they lead
        // to is reported once, readably.
        0 => "auto_consul=info,aws_config=error,warn",
        1 => "auto_consul=debug,info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if json {
        fmt.json().flatten_event(true).init();
    } else {
        fmt.with_ansi(std::io::stderr().is_terminal())
            .without_time()
            .init();
    }
}
