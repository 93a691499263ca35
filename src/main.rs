//! `auto-consul`: join this EC2 instance to the right Consul cluster in the right role.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // A command a person types on a configured node (status, members,
    // cluster, ...) takes the node's settings from the env file `run`
    // wrote, as the units do; the environment and flags still win.
    if let Ok(first) = auto_consul::cli::Cli::try_parse_from(&args)
        && first.command.reads_env_file()
    {
        let skips = first.command.env_file_skips();
        for (key, value) in auto_consul::commands::node_env_file(&first.global.consul.root) {
            if std::env::var_os(&key).is_none() && !skips.contains(&key.as_str()) {
                // SAFETY: still single-threaded: no runtime, no logging
                // thread, nothing else reads the environment yet.
                unsafe { std::env::set_var(key, value) };
            }
        }
    }
    let cli = match auto_consul::cli::Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        // A command's help shows its own options first.
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {
            match auto_consul::cli::help_for(&args) {
                Some(text) => {
                    print!("{text}");
                    return ExitCode::SUCCESS;
                }
                None => e.exit(),
            }
        }
        Err(e) => e.exit(),
    };
    let json = cli.global.output.log_format == auto_consul::cli::LogFormat::Json;
    auto_consul::logging::init(cli.global.output.verbose, json);
    match auto_consul::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            auto_consul::error::report(&err, json);
            ExitCode::from(auto_consul::error::exit_code(&err))
        }
    }
}
