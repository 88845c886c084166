//! `stead`: thin wiring of the command line, logging, the CSI plugin and
//! signal handling.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tonic::transport::Server;
use tracing_subscriber::EnvFilter;

use stead::cli::{Cli, Command, LogFormat, NodeArgs};
use stead::csi::{self, Plugin};

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down; finishing in-flight RPCs");
}

async fn run_node(args: NodeArgs) -> stead::Result<()> {
    let socket = csi::server::socket_path(&args.endpoint)?;
    let config = args.csi_config();
    let plugin = tokio::task::spawn_blocking(move || Plugin::new(config))
        .await
        .map_err(|e| stead::Error::Config(format!("start-up task failed: {e}")))??;
    tracing::info!(
        node = plugin.node_id(),
        pools = %args.pools.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        volumes = plugin.volume_count(),
        version = env!("CARGO_PKG_VERSION"),
        "stead node starting"
    );

    // Other parts of the agent (provisioner, registration, health) are
    // started here, beside the CSI services; the provisioner calls
    // `plugin.controller_service()` in-process.

    let router = Server::builder()
        .add_service(plugin.identity())
        .add_service(plugin.controller())
        .add_service(plugin.node());
    csi::server::serve(router, &socket, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Node(args) => {
            init_tracing(args.log_format);
            match run_node(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "stead node failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
