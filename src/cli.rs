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
    Node(NodeArgs),
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

    /// A storage pool, NAME:BACKEND:PATH (repeat the flag for several, or
    /// give a comma-separated list in STEAD_POOLS). BACKEND is `dir` (a
    /// directory per volume, bind-mounted) or `image` (a sparse file per
    /// volume on a loop device, formatted ext4 or xfs). PATH is created if
    /// missing. The first pool is the default; StorageClass parameter `pool`
    /// picks another.
    #[arg(
        long = "pool",
        env = "STEAD_POOLS",
        value_delimiter = ',',
        required = true,
        value_name = "NAME:BACKEND:PATH"
    )]
    pub pools: Vec<PoolSpec>,

    /// Log format.
    #[arg(long, env = "STEAD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Maximum number of Stead volumes kubelet may place on this node
    /// (reported by NodeGetInfo). Unset: no limit.
    #[arg(long, env = "STEAD_MAX_VOLUMES_PER_NODE", value_parser = clap::value_parser!(i64).range(1..))]
    pub max_volumes_per_node: Option<i64>,
}

impl NodeArgs {
    /// The CSI plugin configuration these options describe.
    pub fn csi_config(&self) -> crate::csi::Config {
        crate::csi::Config {
            node_id: self.node_id.clone(),
            pools: self.pools.clone(),
            max_volumes_per_node: self.max_volumes_per_node,
        }
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
            "b:image:/y,c:dir:/z",
        ])
        .unwrap();
        let Command::Node(args) = cli.command;
        assert_eq!(args.pools.len(), 3);
        assert_eq!(args.pools[0].name, "a");
        assert_eq!(args.log_format, LogFormat::Text);
    }

    #[test]
    fn bad_pool_is_refused() {
        let r = Cli::try_parse_from(["stead", "node", "--node-id", "n", "--pool", "a:zfs:/x"]);
        assert!(r.is_err());
    }
}
