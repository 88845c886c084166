//! Command line of the `stead` binary. Every flag can also come from an
//! environment variable, which is how the DaemonSet configures it.

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::storage::PoolSpec;

/// Stead: node-local volumes for Kubernetes (CSI driver and provisioner).
#[derive(Debug, Parser)]
#[command(name = "stead", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: the CSI plugin of this node.
    Node(Box<NodeArgs>),
    /// Make the trust material of the agent-to-agent transfer path: a new
    /// CA (`ca.crt`) and one leaf certificate and key signed by it
    /// (`tls.crt`, `tls.key`) that every agent presents, to be put in the
    /// Secret the DaemonSet mounts. The CA's key is not kept.
    TransferCerts(TransferCertsArgs),
}

/// Options of `stead transfer-certs`.
#[derive(Debug, Clone, Args)]
pub struct TransferCertsArgs {
    /// Folder to write `ca.crt`, `tls.crt` and `tls.key` (0600) into;
    /// created if missing.
    #[arg(long)]
    pub out: std::path::PathBuf,

    /// The name the leaf certificate carries, which agents check when they
    /// pull from each other.
    #[arg(long, default_value = crate::transfer::DEFAULT_SERVER_NAME)]
    pub name: String,

    /// Days the CA and the leaf are valid.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: u32,

    /// Replace files already in --out (by default they are kept and the
    /// command fails, so that a CA in use is not replaced by mistake).
    #[arg(long, default_value_t = false)]
    pub force: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Options of `stead node`.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// CSI endpoint to listen on: a unix socket, `unix:///path/csi.sock`.
    /// The parent directory is created, a stale socket removed, and the
    /// socket made readable and writable by its owner only (0600).
    #[arg(
        long,
        env = "STEAD_CSI_ENDPOINT",
        default_value = "unix:///var/lib/kubelet/plugins/stead.csi.dev/csi.sock"
    )]
    pub endpoint: String,

    /// Name of this node, as Kubernetes knows it. Used as the CSI node id
    /// and as the value of the topology key topology.stead.csi.dev/node.
    #[arg(long = "node-id", env = "NODE_NAME")]
    pub node_id: String,

    /// A storage pool, NAME:BACKEND:PATH[:reserve=AMOUNT] (repeat the flag
    /// for several, or give a comma-separated list in STEAD_POOLS). BACKEND
    /// is `dir` (a directory per volume, bind-mounted; limited to its size
    /// where the pool's filesystem can: btrfs) or `image` (a file per volume
    /// on a loop device, formatted ext4 or xfs; its blocks reserved unless
    /// the class asks for `allocation: thin`). PATH is created if missing.
    /// `reserve` is what of the pool's filesystem Stead never promises, a
    /// percentage of its size or a size (`15%`, the default, keeps kubelet's
    /// default eviction thresholds clear on a shared root disk; `0` for a
    /// disk of its own; `20Gi`). The first pool is the default; StorageClass
    /// parameter `pool` picks another.
    #[arg(
        long = "pool",
        env = "STEAD_POOLS",
        value_delimiter = ',',
        required = true,
        value_name = "NAME:BACKEND:PATH[:reserve=AMOUNT]"
    )]
    pub pools: Vec<PoolSpec>,

    /// Log format.
    #[arg(long, env = "STEAD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Maximum number of Stead volumes kubelet may place on this node
    /// (reported by NodeGetInfo). Unset: no limit.
    #[arg(long, env = "STEAD_MAX_VOLUMES_PER_NODE", value_parser = clap::value_parser!(i64).range(1..))]
    pub max_volumes_per_node: Option<i64>,

    /// Serve kubelet's plugin-registration socket
    /// (`<kubelet-dir>/plugins_registry/stead.csi.dev-reg.sock`), so that
    /// kubelet finds this plugin without a node-driver-registrar sidecar.
    #[arg(long, env = "STEAD_REGISTRATION", default_value_t = false, action = clap::ArgAction::Set)]
    pub registration: bool,

    /// Kubelet's root directory: staging and target paths must lie under
    /// it (and never in a pool), the registration socket lives under it,
    /// and the provisioner keeps its state in
    /// `<kubelet-dir>/plugins/stead.csi.dev/state` unless --state-dir says.
    #[arg(long, env = "STEAD_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    pub kubelet_dir: std::path::PathBuf,

    /// Run the provisioner: create volumes and PersistentVolumes for the
    /// claims of Stead StorageClasses that land on this node, delete
    /// released ones, publish CSIStorageCapacity. Needs Kubernetes access
    /// (in-cluster service account, or KUBECONFIG).
    #[arg(long, env = "STEAD_PROVISIONER", default_value_t = false, action = clap::ArgAction::Set)]
    pub provisioner: bool,

    /// Where the provisioner records volumes it is creating (see the
    /// leak reaper). Default: `<kubelet-dir>/plugins/stead.csi.dev/state`.
    #[arg(long, env = "STEAD_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,

    /// Claims and PVs reconciled concurrently by the provisioner.
    #[arg(long, env = "STEAD_WORKERS", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: u16,

    /// Client-side limit on Kubernetes API requests per second (sustained).
    /// Events are recorded off the provisioning path but share this budget.
    /// At 100 a burst of 500 claims waited ~4.5 s (median) for its PV on the
    /// 2-core benchmark machine, at 400 ~1.3 s (docs/BENCHMARKS.md).
    #[arg(long, env = "STEAD_KUBE_QPS", default_value_t = 400.0, value_parser = positive_rate)]
    pub kube_qps: f64,

    /// Client-side burst of Kubernetes API requests above --kube-qps.
    #[arg(long, env = "STEAD_KUBE_BURST", default_value_t = 800, value_parser = clap::value_parser!(u32).range(1..))]
    pub kube_burst: u32,

    /// Namespace of this node's CSIStorageCapacity objects. Default: the
    /// agent's pod namespace (POD_NAMESPACE), else `stead-system`.
    #[arg(long, env = "STEAD_CAPACITY_NAMESPACE")]
    pub capacity_namespace: Option<String>,

    /// Seconds between capacity refreshes when nothing changed (changes
    /// publish at once).
    #[arg(long, env = "STEAD_CAPACITY_INTERVAL", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub capacity_interval: u64,

    /// Seconds a volume the provisioner created may stay without a PV and
    /// without its claim before it is reclaimed as leaked.
    #[arg(long, env = "STEAD_LEAK_GRACE", default_value_t = 600)]
    pub leak_grace: u64,

    /// The agent's pod name and namespace (downward API): used to own the
    /// CSIStorageCapacity objects so that they go when Stead is removed.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// Address of the HTTP health endpoint (/healthz, /readyz, /metrics),
    /// e.g. `0.0.0.0:9809`. Unset: not served.
    #[arg(long, env = "STEAD_HEALTH_ADDR")]
    pub health_addr: Option<std::net::SocketAddr>,

    /// Address to serve agent-to-agent transfers on (Pull of a volume's or
    /// snapshot's data over mutual TLS), e.g. `0.0.0.0:9810`. Served once
    /// the trust material is in --transfer-trust-dir (looked for every 10 s
    /// until then). With it, the provisioner also pulls the data of a claim
    /// restored on this node from the agent of the node that holds it
    /// (StorageClass parameter crossNodeRestore), from that agent's port
    /// named `transfer`, else this port. Unset: neither.
    #[arg(long, env = "STEAD_TRANSFER_ADDR")]
    pub transfer_addr: Option<std::net::SocketAddr>,

    /// Folder of the transfer trust material, `ca.crt`, `tls.crt` and
    /// `tls.key` (the Secret made from `stead transfer-certs`, mounted);
    /// read again at every connection, so a rotation needs no restart.
    #[arg(
        long,
        env = "STEAD_TRANSFER_TRUST_DIR",
        default_value = "/etc/stead/transfer"
    )]
    pub transfer_trust_dir: std::path::PathBuf,

    /// The name a peer agent's certificate must carry.
    #[arg(long, env = "STEAD_TRANSFER_SERVER_NAME", default_value = crate::transfer::DEFAULT_SERVER_NAME)]
    pub transfer_server_name: String,
}

impl NodeArgs {
    /// The provisioner configuration these options describe.
    pub fn provisioner_config(&self) -> crate::provisioner::Config {
        crate::provisioner::Config {
            node: self.node_id.clone(),
            workers: self.workers,
            state_dir: self.state_dir.clone().unwrap_or_else(|| {
                self.kubelet_dir
                    .join("plugins")
                    .join(crate::DRIVER_NAME)
                    .join("state")
            }),
            capacity_namespace: self
                .capacity_namespace
                .clone()
                .or_else(|| self.pod_namespace.clone())
                .unwrap_or_else(|| "stead-system".to_string()),
            capacity_interval: std::time::Duration::from_secs(self.capacity_interval),
            leak_grace: std::time::Duration::from_secs(self.leak_grace),
            pod_name: self.pod_name.clone(),
            pod_namespace: self.pod_namespace.clone(),
            freed: Default::default(),
            transfer: None,
        }
    }

    /// The CSI plugin configuration these options describe.
    pub fn csi_config(&self) -> crate::csi::Config {
        crate::csi::Config {
            node_id: self.node_id.clone(),
            pools: self.pools.clone(),
            max_volumes_per_node: self.max_volumes_per_node,
            kubelet_dir: self.kubelet_dir.clone(),
        }
    }
}

/// A request rate: a finite number above zero.
fn positive_rate(raw: &str) -> Result<f64, String> {
    let v: f64 = raw
        .parse()
        .map_err(|e| format!("{raw:?} is not a number: {e}"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("{raw:?} must be a finite number above 0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn pools_repeat_and_split_on_commas() {
        let cli = Cli::try_parse_from([
            "stead",
            "node",
            "--node-id",
            "n1",
            "--pool",
            "a:dir:/x",
            "--pool",
            "b:image:/y,c:dir:/z:reserve=0",
        ])
        .unwrap();
        let Command::Node(args) = cli.command else {
            panic!("not the node command");
        };
        assert_eq!(args.pools.len(), 3);
        assert_eq!(args.pools[0].name, "a");
        assert_eq!(args.pools[1].reserve, crate::storage::Reserve::DEFAULT);
        assert_eq!(args.pools[2].reserve, crate::storage::Reserve::Bytes(0));
        assert_eq!(args.log_format, LogFormat::Text);
    }

    #[test]
    fn transfer_certs_takes_a_folder_and_defaults() {
        let cli = Cli::try_parse_from(["stead", "transfer-certs", "--out", "/tmp/x"]).unwrap();
        let Command::TransferCerts(args) = cli.command else {
            panic!("not the transfer-certs command");
        };
        assert_eq!(args.name, crate::transfer::DEFAULT_SERVER_NAME);
        assert_eq!(args.days, 365);
        assert!(!args.force);
        assert!(Cli::try_parse_from(["stead", "transfer-certs"]).is_err());
    }

    #[test]
    fn rates_must_be_positive() {
        for bad in ["0", "-5", "NaN", "inf", "fast"] {
            let r = Cli::try_parse_from(["stead", "node", "--node-id", "n", "--kube-qps", bad]);
            assert!(r.is_err(), "{bad}");
        }
        assert_eq!(positive_rate("250").unwrap(), 250.0);
    }

    #[test]
    fn bad_pool_is_refused() {
        let r = Cli::try_parse_from(["stead", "node", "--node-id", "n", "--pool", "a:zfs:/x"]);
        assert!(r.is_err());
        let r = Cli::try_parse_from([
            "stead",
            "node",
            "--node-id",
            "n",
            "--pool",
            "a:dir:/x:reserve=all",
        ]);
        assert!(r.unwrap_err().to_string().contains("reserve \"all\""));
    }
}
