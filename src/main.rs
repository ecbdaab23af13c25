//! Entry point: read `.env`, parse the command line, set up logging and the
//! shutdown signal, and hand off to the command.

use clap::Parser;
use msys::{cli, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A missing .env is normal; real environment variables win over it.
    let _ = dotenvy::dotenv();
    let cli = cli::Cli::parse();
    telemetry::init(cli.log_format);
    cli::run(cli.command, shutdown::on_signal()).await
}
