//! Global ids: 64-bit positive integers unique across proxies without coordination.
//!
//! An id packs, from the most significant bit down: a zero sign bit (ids are positive `bigint`s),
//! 41 bits of milliseconds since [`EPOCH_UNIX_MS`] (2025-01-01T00:00:00Z, good until 2094),
//! 10 bits of `node_id` and 12 bits of sequence within the millisecond. Two proxies with
//! different node ids can never make the same id; one proxy never repeats one because its
//! (millisecond, sequence) state only moves forward. Ids from one generator are strictly
//! increasing, and ids from different proxies are roughly ordered by time.
//!
//! What this cannot prevent: a proxy restarted while its clock is behind the last millisecond
//! its previous run used could reissue ids. Keep clocks synchronized (NTP slews, it does not
//! step backwards in normal operation).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// 2025-01-01T00:00:00Z in milliseconds since the Unix epoch.
pub const EPOCH_UNIX_MS: u64 = 1_735_689_600_000;

const TIME_BITS: u32 = 41;
const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;

const MAX_MS: u64 = (1 << TIME_BITS) - 1;
const NODE_MASK: u64 = (1 << NODE_BITS) - 1;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const NODE_SHIFT: u32 = SEQ_BITS;
const TIME_SHIFT: u32 = SEQ_BITS + NODE_BITS;

/// Makes global ids for one node.
///
/// Lock-free: the whole mutable state, (millisecond, sequence), packs into one `AtomicU64`
/// (`ms << 12 | seq`), so one compare-exchange claims an id. That suits callers on async worker
/// threads: no thread is ever parked holding a lock, contention costs only a retried CAS, and
/// the only wait is the sub-millisecond spin when 4096 ids were already taken in this
/// millisecond.
#[derive(Debug)]
pub struct IdGenerator {
    node: u64,
    /// `ms << SEQ_BITS | seq` of the last id handed out (0 = none yet).
    state: AtomicU64,
}

impl IdGenerator {
    /// A generator for `node_id`, which must be at most 1023 (`config::validate` guarantees it);
    /// higher bits are dropped.
    pub fn new(node_id: u16) -> IdGenerator {
        debug_assert!(u64::from(node_id) <= NODE_MASK, "node_id {node_id} > 1023");
        IdGenerator {
            node: u64::from(node_id) & NODE_MASK,
            state: AtomicU64::new(0),
        }
    }

    /// The node id this generator stamps into its ids.
    pub fn node_id(&self) -> u16 {
        // NODE_MASK keeps 10 bits, so this never truncates.
        self.node as u16
    }

    /// The next id: positive, unique across nodes, strictly greater than every id this
    /// generator returned before.
    pub fn next(&self) -> i64 {
        let mut current = self.state.load(Ordering::Relaxed);
        loop {
            let last_ms = current >> SEQ_BITS;
            let last_seq = current & SEQ_MASK;
            let now = now_ms();
            let (ms, seq) = if now > last_ms {
                (now, 0)
            } else if last_seq < SEQ_MASK {
                // Same millisecond, or the clock went backwards: keep the last timestamp so ids
                // keep increasing.
                (last_ms, last_seq + 1)
            } else if now == last_ms {
                // 4096 ids this millisecond: wait for the clock to tick (well under 1 ms).
                std::hint::spin_loop();
                std::thread::yield_now();
                current = self.state.load(Ordering::Relaxed);
                continue;
            } else {
                // Sequence exhausted while the clock is behind us: the clock may stay behind
                // for as long as it jumped back, far too long to block an async worker, so move
                // the logical millisecond on by one instead.
                (last_ms + 1, 0)
            };
            if ms > MAX_MS {
                // Past 2094: the time field is full. Saturating would repeat ids, so keep
                // spinning rather than return a duplicate; this is a deployment bug, not a
                // runtime condition.
                std::thread::yield_now();
                current = self.state.load(Ordering::Relaxed);
                continue;
            }
            let next = (ms << SEQ_BITS) | seq;
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return compose(ms, self.node, seq),
                Err(actual) => current = actual,
            }
        }
    }
}

/// Packs the three fields; `ms` fits 41 bits, so the sign bit stays clear.
fn compose(ms: u64, node: u64, seq: u64) -> i64 {
    let raw = (ms << TIME_SHIFT) | (node << NODE_SHIFT) | seq;
    // 41 + 10 + 12 = 63 bits: always representable as a positive i64.
    raw as i64
}

/// Milliseconds since [`EPOCH_UNIX_MS`] by the wall clock (0 if the clock is before it).
fn now_ms() -> u64 {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    unix_ms.saturating_sub(EPOCH_UNIX_MS)
}

/// The node id stamped into `id`.
pub fn node_of(id: i64) -> u16 {
    // Masked to 10 bits, so the cast never truncates.
    ((id as u64 >> NODE_SHIFT) & NODE_MASK) as u16
}

/// The sequence number of `id` within its millisecond.
pub fn sequence_of(id: i64) -> u16 {
    // Masked to 12 bits.
    (id as u64 & SEQ_MASK) as u16
}

/// When `id` was made, in milliseconds since the Unix epoch.
pub fn unix_ms_of(id: i64) -> u64 {
    (id as u64 >> TIME_SHIFT) + EPOCH_UNIX_MS
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn ids_are_positive_and_decode_back() {
        for node in [0u16, 1, 512, 1023] {
            let ids = IdGenerator::new(node);
            assert_eq!(ids.node_id(), node);
            let before = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock after 1970")
                .as_millis() as u64;
            let id = ids.next();
            let after = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock after 1970")
                .as_millis() as u64;
            assert!(id > 0, "{id}");
            assert_eq!(node_of(id), node);
            assert_eq!(sequence_of(id), 0);
            let at = unix_ms_of(id);
            assert!(before <= at && at <= after, "{before} <= {at} <= {after}");
        }
    }

    #[test]
    fn many_ids_from_many_threads_are_unique_and_increase_per_thread() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 100_000 / THREADS;
        let ids = Arc::new(IdGenerator::new(7));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let ids = ids.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::with_capacity(PER_THREAD);
                    for _ in 0..PER_THREAD {
                        mine.push(ids.next());
                    }
                    mine
                })
            })
            .collect();
        let mut all = HashSet::new();
        for handle in handles {
            let mine = handle.join().expect("thread finishes");
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "not increasing");
            for id in mine {
                assert!(id > 0);
                assert_eq!(node_of(id), 7);
                assert!(all.insert(id), "duplicate id {id}");
            }
        }
        assert_eq!(all.len(), THREADS * PER_THREAD);
    }

    #[test]
    fn different_nodes_never_collide() {
        let a = IdGenerator::new(1);
        let b = IdGenerator::new(2);
        let mut all = HashSet::new();
        for _ in 0..10_000 {
            assert!(all.insert(a.next()));
            assert!(all.insert(b.next()));
        }
    }

    #[test]
    fn sequence_overflow_and_backwards_clock_keep_ids_increasing() {
        let ids = IdGenerator::new(3);
        // Pretend the last id was the last of its millisecond, one hour in the future (as if
        // the clock had since jumped back an hour).
        let future = now_ms() + 3_600_000;
        ids.state
            .store((future << SEQ_BITS) | SEQ_MASK, Ordering::Relaxed);
        let first = ids.next();
        assert_eq!(unix_ms_of(first), future + 1 + EPOCH_UNIX_MS);
        assert_eq!(sequence_of(first), 0);
        let second = ids.next();
        assert!(second > first);
        assert_eq!(unix_ms_of(second), unix_ms_of(first));
        assert_eq!(sequence_of(second), 1);
    }
}
