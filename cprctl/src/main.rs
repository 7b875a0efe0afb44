//! `cprctl`: see `cprctl --help`.

use std::process::ExitCode;

use clap::Parser;
use cprctl::commands::{self, Cli, EXIT_FAILED};
use cprctl::output;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CPRCTL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cprctl: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cprctl: {err}");
            if json && !err.already_reported() {
                // Best effort: the human message is already on stderr.
                let _ = output::print(&mut std::io::stdout().lock(), &err.to_view(), true);
            }
            ExitCode::from(err.exit_code())
        }
    }
}
