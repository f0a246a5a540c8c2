//! The command line: `serve` (default), `demo`, `check`, `route`. Names are public contract.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "tessera", version, about = "A sharding proxy for PostgreSQL")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default command).
    Serve {
        /// The shard map; default: $TESSERA_CONFIG, then ./shard-map.yaml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Start a throwaway local cluster, load sample data and serve it.
    Demo {
        #[arg(long, default_value_t = 2)]
        shards: usize,
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        #[arg(long, default_value_t = 6432)]
        port: u16,
    },
    /// Validate the shard map and print a summary.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the routing plan for one statement.
    Route {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The SQL statement (bind parameters stay unknown: `$n` keys route to every shard).
        sql: String,
    },
}

/// `--config`, else `$TESSERA_CONFIG`, else `./shard-map.yaml`.
pub fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("TESSERA_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("shard-map.yaml"))
}
