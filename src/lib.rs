//! Tessera: a sharding proxy for PostgreSQL.
//!
//! # Layout
//! - [`config`]: `shard-map.yaml` types, defaults and validation (the only place that reads YAML).
//! - [`protocol`]: wire framing and the few messages the proxy decodes or synthesizes (no sockets).
//! - [`frontend`]: one client session: startup, authentication, the relay state machine.
//! - [`backend`]: one server connection (startup, auth) and the pools of them.
//! - [`router`]: turns a statement into a [`router::Plan`] (which shard, which role, how to merge).
//! - [`merge`]: merging the results of one statement run on several shards.
//! - [`server`]: the accept loop, cancel-key registry and shutdown.
//! - [`twopc`]: two-phase commit ids, the durable decision log and startup recovery.
//! - [`ids`]: global ids unique across proxies (time, node id, sequence).
//! - [`cluster`]: a throwaway local Postgres cluster (primaries + streaming replicas) for tests and
//!   `tessera demo`.

pub mod backend;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod frontend;
pub mod ids;
pub mod merge;
pub mod protocol;
pub mod router;
pub mod run;
pub mod server;
pub mod twopc;
