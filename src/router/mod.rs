//! Routing: turns a statement into a [`Plan`] saying where it runs and why.
//!
//! Today every statement goes to the primary of the first shard; the sharding router plugs in
//! here without touching the relay, which only ever acts on a `Plan`.

pub mod lex;

use std::fmt;

/// Index of a shard in the map's `shards` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub usize);

/// Which server of a shard runs the statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

/// Where a statement runs, and the reason (shown by `tessera route` and in debug logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub shard: ShardId,
    pub role: Role,
    pub reason: &'static str,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = match self.role {
            Role::Primary => "primary",
            Role::Replica => "replica",
        };
        write!(f, "shard {} ({role}): {}", self.shard.0, self.reason)
    }
}

/// Decides plans. Stateless today; will hold the ring, ranges and the analysis cache.
#[derive(Debug, Default)]
pub struct Router;

impl Router {
    pub fn new() -> Router {
        Router
    }

    /// The plan for one statement text.
    pub fn plan(&self, _sql: &[u8]) -> Plan {
        Plan {
            shard: ShardId(0),
            role: Role::Primary,
            reason: "single-shard passthrough: every statement goes to the first shard's primary",
        }
    }
}
