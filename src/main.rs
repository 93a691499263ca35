//! `auto-consul`: join this EC2 instance to the right Consul cluster in the right role.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = auto_consul::cli::Cli::parse();
    let json = cli.global.log_format == auto_consul::cli::LogFormat::Json;
    auto_consul::logging::init(cli.global.verbose, json);
    match auto_consul::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            auto_consul::error::report(&err, json);
            ExitCode::from(auto_consul::error::exit_code(&err))
        }
    }
}
