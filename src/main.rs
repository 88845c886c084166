//! `stead`: thin wiring of the command line, logging, the CSI plugin and
//! signal handling.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use futures::FutureExt;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use stead::cli::{Cli, Command, LogFormat, NodeArgs, TransferCertsArgs};
use stead::csi::{self, Plugin};
use stead::health;
use stead::metrics::Metrics;
use stead::metrics::rpc::ObservedController;
use stead::registration::{self, RegistrationState};

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A line that cannot be written (stderr on a full disk) is dropped:
    // reporting that failure goes to stderr too, and eprintln! panics when
    // it cannot write, which took the whole agent down with the disk.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// How long the parts of the agent get to stop after SIGTERM/SIGINT.
const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);

/// How often the allocator's free pages go back to the kernel.
const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

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

    let shutdown = shutdown_signal().shared();
    let registration_state = Arc::new(RegistrationState::default());
    let metrics = {
        let plugin = plugin.clone();
        Arc::new(Metrics::new(move || plugin.pool_stats()))
    };

    let csi_server = async {
        let router = csi::server::router(&plugin, metrics.clone());
        csi::server::serve(router, &socket, shutdown.clone()).await?;
        Ok::<_, stead::Error>(())
    };

    let registration = async {
        if !args.registration {
            return Ok(());
        }
        let reg_socket = registration::socket_path(&args.kubelet_dir);
        registration::serve(
            reg_socket,
            socket.clone(),
            registration_state.clone(),
            shutdown.clone(),
        )
        .await?;
        Ok::<_, stead::Error>(())
    };

    let pacing = args
        .provisioner
        .then(|| stead::provisioner::client::Pacing::new(args.kube_qps, args.kube_burst));
    let provisioner_status = Arc::new(stead::provisioner::supervisor::Status::default());
    // Supervised, never joined with `?`: a provisioner fault (its state dir,
    // the apiserver, a bug) is logged and the provisioner restarted with
    // backoff, while CSI and registration go on serving kubelet.
    let provisioner = async {
        let Some(pacing) = pacing else {
            return Ok(());
        };
        // Its in-process RPCs are timed as the socket's are.
        let csi = Arc::new(ObservedController::new(
            plugin.controller_service(),
            metrics.clone(),
        ));
        // Pulls of other nodes' data go with serving one's own: an agent
        // with --transfer-addr does both, with the same trust material.
        let transfer = args.transfer_addr.map(|addr| {
            Arc::new(stead::provisioner::crossnode::Transfer::new(
                Arc::new(plugin.clone()),
                args.transfer_trust_dir.clone(),
                args.transfer_server_name.clone(),
                addr.port(),
                args.pod_namespace
                    .clone()
                    .unwrap_or_else(|| "stead-system".to_string()),
            ))
        });
        let config = stead::provisioner::Config {
            freed: plugin.freed(),
            transfer,
            ..args.provisioner_config()
        };
        let status = provisioner_status.clone();
        let attempt = {
            let shutdown = shutdown.clone();
            let status = status.clone();
            let metrics = metrics.clone();
            move || {
                let (pacing, csi, config) = (pacing.clone(), csi.clone(), config.clone());
                let (status, shutdown) = (status.clone(), shutdown.clone());
                let metrics = metrics.clone();
                async move {
                    let client = stead::provisioner::client::build(&pacing, &metrics).await?;
                    stead::provisioner::run(client, csi, config, metrics, status, shutdown).await
                }
            }
        };
        stead::provisioner::supervisor::supervise(attempt, status, shutdown.clone()).await;
        Ok::<_, stead::Error>(())
    };

    let health = async {
        let Some(addr) = args.health_addr else {
            return Ok(());
        };
        let identity = plugin.identity_service();
        let needs_registration = args.registration;
        let state = registration_state.clone();
        let provisioner = args.provisioner.then(|| provisioner_status.clone());
        let ready: health::ReadyCheck = Arc::new(move || {
            let identity = identity.clone();
            let state = state.clone();
            let provisioner = provisioner.clone();
            Box::pin(async move {
                use stead::proto::csi::v1::identity_server::Identity;
                identity
                    .probe(tonic::Request::new(Default::default()))
                    .await
                    .map_err(|s| format!("probe: {}", s.message()))?;
                if needs_registration && !state.registered() {
                    return Err("kubelet has not registered the plugin yet".to_string());
                }
                // Readiness only: liveness never fails for the provisioner,
                // since restarting the agent would take CSI down with it.
                if let Some(p) = &provisioner {
                    p.readiness()?;
                }
                Ok(())
            })
        });
        let csi_socket = socket.clone();
        let live: health::ReadyCheck = Arc::new(move || {
            use std::os::unix::fs::FileTypeExt;
            let ok =
                std::fs::symlink_metadata(&csi_socket).is_ok_and(|m| m.file_type().is_socket());
            let why = format!("CSI socket {} is gone", csi_socket.display());
            Box::pin(async move { if ok { Ok(()) } else { Err(why) } })
        });
        health::serve(addr, live, ready, metrics.clone(), shutdown.clone())
            .await
            .map_err(stead::Error::Health)
    };

    let transfer = async {
        let Some(addr) = args.transfer_addr else {
            return Ok(());
        };
        let Some(trust) = wait_for_trust(&args, shutdown.clone()).await else {
            return Ok(());
        };
        let listener = stead::transfer::server::bind(addr).await?;
        tracing::info!(addr = %addr, trust.dir = %args.transfer_trust_dir.display(),
            "serving agent-to-agent transfers");
        let sources: Arc<dyn stead::transfer::Sources> = Arc::new(plugin.clone());
        stead::transfer::serve(
            listener,
            stead::transfer::TransferService::new(sources),
            Arc::new(trust),
            shutdown.clone(),
        )
        .await?;
        Ok::<_, stead::Error>(())
    };

    // What a burst freed goes back to the kernel (see `stead::memory`).
    tokio::spawn(async {
        let mut every = tokio::time::interval(TRIM_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let _ = tokio::task::spawn_blocking(stead::memory::release_free).await;
        }
    });

    // Every part stops on the signal; should one hang (an unreachable
    // apiserver, a stuck kernel call), the agent still exits, so that a
    // restart is never blocked.
    let parts = async { tokio::try_join!(csi_server, registration, provisioner, health, transfer) };
    let deadline = async {
        shutdown.clone().await;
        tokio::time::sleep(SHUTDOWN_DEADLINE).await;
    };
    tokio::select! {
        r = parts => { r?; }
        _ = deadline => {
            tracing::warn!(deadline = ?SHUTDOWN_DEADLINE, "not every part stopped in time after the signal; exiting");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

fn main() -> ExitCode {
    stead::memory::limit_arenas();
    // Storage work runs on blocking threads; a bound keeps a burst of
    // hundreds of claims from spawning hundreds of threads (and as many
    // malloc arenas), which is most of the agent's memory under load.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build();
    match runtime {
        Ok(rt) => rt.block_on(run()),
        Err(e) => {
            eprintln!("stead: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Node(args) => {
            init_tracing(args.log_format);
            match run_node(*args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "stead node failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::TransferCerts(args) => match transfer_certs(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stead transfer-certs: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// How often the agent looks for transfer trust material that is missing.
const TRUST_POLL: std::time::Duration = std::time::Duration::from_secs(10);

/// The transfer trust material, once it is there: deploy mounts Secret
/// stead-transfer-tls optionally, so an agent may start before it exists,
/// and kubelet fills the mount when it appears. Said once while it is
/// missing, and once when it is found; `None` on shutdown.
async fn wait_for_trust(
    args: &NodeArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> Option<stead::transfer::TrustDir> {
    let dir = &args.transfer_trust_dir;
    let mut said = false;
    tokio::pin!(shutdown);
    loop {
        match stead::transfer::TrustDir::open(dir, &args.transfer_server_name) {
            Ok(t) => {
                if said {
                    tracing::info!(trust.dir = %dir.display(), "transfer trust material found");
                }
                return Some(t);
            }
            Err(e) if !said => {
                tracing::warn!(trust.dir = %dir.display(), error = %e,
                    "agent-to-agent transfers are not served until the trust material is there (Secret stead-transfer-tls, made with `stead transfer-certs`); looking again every 10 s");
                said = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            () = tokio::time::sleep(TRUST_POLL) => {}
            () = &mut shutdown => return None,
        }
    }
}

/// `stead transfer-certs`: a CA and the agents' leaf, written to --out.
fn transfer_certs(args: &TransferCertsArgs) -> Result<(), String> {
    use stead::transfer::certs;
    let out = args.out.display();
    if !args.force
        && let Some(name) = certs::present_in(&args.out)
    {
        return Err(format!(
            "{out} already holds {name}; pass --force to replace the trust material"
        ));
    }
    let material = certs::generate(&args.name, args.days)
        .map_err(|e| format!("making the certificates for {:?}: {e}", args.name))?;
    material
        .write_to(&args.out)
        .map_err(|e| format!("writing into {out}: {e}"))?;
    println!(
        "wrote {out}/ca.crt, {out}/tls.crt and {out}/tls.key (name {}, valid {} days)",
        args.name, args.days
    );
    Ok(())
}
