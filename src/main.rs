//! `auto-consul`: join this EC2 instance to the right Consul cluster in the right role.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = auto_consul::cli::Cli::parse();
    auto_consul::logging::init(cli.global.verbose);
    match auto_consul::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            auto_consul::error::report(&err);
            ExitCode::from(auto_consul::error::exit_code(&err))
        }
    }
}
