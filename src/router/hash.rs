//! Hash placement: Postgres' own key hash functions ported to Rust, and the consistent-hash ring of
//! virtual nodes that maps a key's hash to a shard.
//!
//! # Why Postgres' hash functions
//! A key's ring position is exactly what the server computes with `hashint8extended(key, 0)`,
//! `hashtextextended(key, 0)` or `uuid_hash_extended(key, 0)`. The rebalancer can therefore select
//! the rows that move in plain SQL, and logical-replication row filters (which only accept built-in
//! immutable functions) can carry the same predicate. `integration/hash_golden.rs` checks the port
//! against a real server.
//!
//! # Why our own `Hasher`
//! The `hashring` crate positions nodes and keys by feeding them through `Hash` and a
//! `BuildHasher`. Both are ours ([`VNode`], the private key wrapper, [`RingHasher`]), and each
//! `Hash` impl writes one precomputed `u64`, so placement never depends on std's `Hash` impls,
//! `DefaultHasher`, platform endianness or map iteration order.

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher};

use hashring::HashRing;

/// A sharding-key value, canonicalized: every integer type (int2/int4/int8, SQL literal, text or
/// binary parameter) becomes [`ShardKey::Int`], so equal numbers land on the same shard.
///
/// Deliberately not `Hash`: ring placement goes through [`pg_hash`] only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardKey {
    /// Any integer key, widened to i64.
    Int(i64),
    /// A text key; hashed as its UTF-8 bytes (what Postgres does under a deterministic collation
    /// such as C).
    Text(String),
    /// A uuid key, in its 16 network-order bytes (the order of the text form).
    Uuid([u8; 16]),
}

/// The key's hash exactly as Postgres computes it with seed 0: `hashint8extended(k, 0)`,
/// `hashtextextended(t, 0)` (deterministic collation) or `uuid_hash_extended(u, 0)`.
pub fn pg_hash(key: &ShardKey) -> i64 {
    pg_hash_with_seed(key, 0)
}

/// [`pg_hash`] with an explicit seed: the second argument of the `*extended` SQL functions.
pub fn pg_hash_with_seed(key: &ShardKey, seed: u64) -> i64 {
    // Postgres returns the uint64 hash through an int8 Datum, so SQL sees it as signed.
    let hash = match key {
        ShardKey::Int(value) => hashint8_extended(*value, seed),
        ShardKey::Text(text) => hash_bytes_extended(text.as_bytes(), seed),
        ShardKey::Uuid(bytes) => hash_bytes_extended(bytes, seed),
    };
    hash as i64
}

/// A key's position on the ring: [`pg_hash`] reinterpreted as u64.
///
/// In SQL, u64 order is the signed order of `hash # (-9223372036854775808)::bigint` (flipping the
/// sign bit), which is how a position range is expressed as a predicate on the server.
pub fn ring_position(key: &ShardKey) -> u64 {
    pg_hash(key) as u64
}

/// Postgres' `hashint8extended`: folds the high half into the low half so that int2/int4/int8
/// values that are equal hash equally (for i32-range values the fold is a no-op), then hashes the
/// 32-bit result.
fn hashint8_extended(value: i64, seed: u64) -> u64 {
    let hihalf = (value >> 32) as u32;
    let mut lohalf = value as u32;
    lohalf ^= if value >= 0 { hihalf } else { !hihalf };
    hash_uint32_extended(lohalf, seed)
}

// ---------------------------------------------------------------------------------------------
// Bob Jenkins' lookup3 as Postgres implements it in src/common/hashfn.c. All arithmetic is mod
// 2^32. Postgres reads input words in native order, which on the little-endian machines it
// normally runs on means little-endian; this port always reads little-endian, so results do not
// depend on the platform we run on.
// ---------------------------------------------------------------------------------------------

/// The initial value of all three state words before the length is added (the golden ratio).
const GOLDEN: u32 = 0x9e37_79b9;
/// Postgres' extra constant in the initial state.
const PG_INIT: u32 = 3_923_095;

/// lookup3's `mix`: reversibly mixes three words (run once per 12-byte block).
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

/// lookup3's `final`: the last avalanche of the three words into `b` and `c`.
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// The initial state for an input of `len` bytes, perturbed by a non-zero seed. A zero seed leaves
/// the state untouched so the extended hashes agree with the 32-bit ones (their low half).
fn initial_state(len: u32, seed: u64) -> (u32, u32, u32) {
    let init = GOLDEN.wrapping_add(len).wrapping_add(PG_INIT);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    (a, b, c)
}

/// Little-endian u32 from exactly four bytes.
fn le_word(bytes: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(bytes);
    u32::from_le_bytes(word)
}

/// Postgres' `hash_bytes_extended` (`hash_any_extended`): 64-bit lookup3 hash of `bytes`.
pub fn hash_bytes_extended(bytes: &[u8], seed: u64) -> u64 {
    // Postgres takes the length as a C int; no Postgres datum reaches 2^31 bytes (varlena values
    // are capped at 1 GB), so the truncation never matters for real keys.
    let (mut a, mut b, mut c) = initial_state(bytes.len() as u32, seed);

    let mut blocks = bytes.chunks_exact(12);
    for block in &mut blocks {
        a = a.wrapping_add(le_word(&block[0..4]));
        b = b.wrapping_add(le_word(&block[4..8]));
        c = c.wrapping_add(le_word(&block[8..12]));
        mix(&mut a, &mut b, &mut c);
    }

    // The last 0..=11 bytes: zero-padding them to 12 is equivalent to Postgres' fall-through
    // switch, since absent bytes add nothing. Bytes 8..11 go into c shifted up by one byte,
    // because lookup3 reserves c's lowest byte for the length (which Postgres instead mixes into
    // the initial state, leaving that byte empty).
    let rest = blocks.remainder();
    let mut tail = [0u8; 12];
    tail[..rest.len()].copy_from_slice(rest);
    a = a.wrapping_add(le_word(&tail[0..4]));
    b = b.wrapping_add(le_word(&tail[4..8]));
    c = c.wrapping_add(le_word(&tail[8..12]) << 8);

    // Unlike Jenkins' hashlittle, Postgres runs `final` even for empty input.
    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// Postgres' `hash_bytes_uint32_extended`: the 64-bit hash of one 32-bit value (the same as
/// [`hash_bytes_extended`] over its four little-endian bytes).
pub fn hash_uint32_extended(value: u32, seed: u64) -> u64 {
    let (mut a, mut b, mut c) = initial_state(4, seed);
    a = a.wrapping_add(value);
    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

// ---------------------------------------------------------------------------------------------
// The ring.
// ---------------------------------------------------------------------------------------------

/// A `Hasher` that passes one precomputed `u64` through: `finish` returns the value given to the
/// first `write_u64`.
///
/// Only [`VNode`] and the ring's key wrapper are ever hashed with it, and each writes exactly one
/// `u64`. Any other write is a bug (debug builds assert); release builds still fold it in with a
/// fixed byte-wise function (FNV-1a steps over little-endian bytes) so placement stays
/// deterministic and platform-independent even then.
#[derive(Debug, Clone, Default)]
pub struct RingHasher {
    state: u64,
    writes: u32,
}

/// FNV-1a 64-bit prime, for folding unexpected writes.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl RingHasher {
    /// Folds unexpected input into the state; never used on the correct path.
    fn fold(&mut self, bytes: &[u8]) {
        debug_assert!(
            false,
            "RingHasher accepts exactly one write_u64; got another write of {} bytes",
            bytes.len()
        );
        for &byte in bytes {
            self.state = (self.state ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
        }
        self.writes = self.writes.saturating_add(1);
    }
}

impl Hasher for RingHasher {
    fn finish(&self) -> u64 {
        self.state
    }

    fn write_u64(&mut self, value: u64) {
        if self.writes == 0 {
            self.state = value;
            self.writes = 1;
        } else {
            self.fold(&value.to_le_bytes());
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.fold(bytes);
    }

    // The provided methods for these widths would go through `write` with native-endian bytes;
    // pin them to little-endian so even the bug path does not depend on the platform.
    fn write_u16(&mut self, value: u16) {
        self.fold(&value.to_le_bytes());
    }

    fn write_u32(&mut self, value: u32) {
        self.fold(&value.to_le_bytes());
    }

    fn write_u128(&mut self, value: u128) {
        self.fold(&value.to_le_bytes());
    }

    fn write_usize(&mut self, value: usize) {
        self.fold(&(value as u64).to_le_bytes());
    }
}

/// The `BuildHasher` the ring is built with: fresh [`RingHasher`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingHasherBuilder;

impl BuildHasher for RingHasherBuilder {
    type Hasher = RingHasher;

    fn build_hasher(&self) -> RingHasher {
        RingHasher::default()
    }
}

/// One virtual node: a point of the ring owned by a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VNode {
    /// Index into the shard names the ring was built from.
    pub shard: usize,
    /// Frozen position: `pg_hash(Text("{shard_name}#{index}")) as u64`.
    pub position: u64,
}

impl Hash for VNode {
    /// Writes only the precomputed position, so the ring places the vnode exactly there.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.position);
    }
}

/// A key as hashring sees it: its `Hash` writes the key's ring position and nothing else.
struct RingKey<'a>(&'a ShardKey);

impl Hash for RingKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(ring_position(self.0));
    }
}

/// Why a ring cannot be built from a shard list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// No shards were given.
    #[error("a hash ring needs at least one shard")]
    NoShards,
    /// `vnodes` was 0.
    #[error("a hash ring needs at least one virtual node per shard")]
    NoVnodes,
    /// Two shards share a name, which would give them identical vnode labels.
    #[error("shard name {0:?} appears more than once")]
    DuplicateShard(String),
    /// Two vnode labels hash to the same position; the ring could not order them
    /// deterministically, so this is a config error (rename a shard).
    #[error("vnodes {first:?} and {second:?} hash to the same ring position {position:#018x}")]
    DuplicatePosition {
        first: String,
        second: String,
        position: u64,
    },
}

/// The consistent-hash ring: `vnodes` virtual nodes per shard, each at a frozen position.
///
/// # Which vnode owns a key
/// hashring 0.3.6 keeps the nodes sorted by position and, for a key at position `k`, binary-searches
/// for `k`: an exact hit returns that node, otherwise the insertion point, i.e. the first node with
/// position > `k`; past the last node it wraps to the first (lowest) one. So a key belongs to the
/// first vnode clockwise at or after it: vnode `i` (in position order) owns the interval
/// `(pos[i-1], pos[i]]`, and the lowest vnode also owns the wrapped part `(pos[last], u64::MAX]`.
/// With duplicate positions the binary search could pick either node, which is why
/// [`Ring::new`] rejects them.
#[derive(Debug, Clone)]
pub struct Ring {
    ring: HashRing<VNode, RingHasherBuilder>,
    /// All vnodes in ascending position order (hashring keeps its own copy private).
    vnodes: Vec<VNode>,
    shard_count: usize,
}

impl Ring {
    /// Builds the ring for `shard_names` (shard `i` is `shard_names[i]`) with `vnodes` virtual
    /// nodes each, labelled `"{name}#{index}"` for index `0..vnodes`.
    pub fn new(shard_names: &[String], vnodes: u32) -> Result<Ring, RingError> {
        if shard_names.is_empty() {
            return Err(RingError::NoShards);
        }
        if vnodes == 0 {
            return Err(RingError::NoVnodes);
        }
        let mut seen_names = HashSet::new();
        let mut labelled = Vec::with_capacity(shard_names.len() * vnodes as usize);
        for (shard, name) in shard_names.iter().enumerate() {
            // Labels split uniquely at their last '#', so distinct names give distinct labels;
            // a repeated name is the only way to get identical ones, and deserves its own error.
            if !seen_names.insert(name.as_str()) {
                return Err(RingError::DuplicateShard(name.clone()));
            }
            for index in 0..vnodes {
                let label = vnode_label(name, index);
                let position = ring_position(&ShardKey::Text(label.clone()));
                labelled.push((label, VNode { shard, position }));
            }
        }
        Ring::from_vnodes(labelled, shard_names.len())
    }

    /// Builds the ring from labelled vnodes, rejecting duplicate positions (with distinct labels
    /// that takes a 64-bit hash collision, so the check is separate to be testable).
    fn from_vnodes(labelled: Vec<(String, VNode)>, shard_count: usize) -> Result<Ring, RingError> {
        let mut by_position: BTreeMap<u64, String> = BTreeMap::new();
        let mut nodes = Vec::with_capacity(labelled.len());
        for (label, node) in labelled {
            if let Some(first) = by_position.get(&node.position) {
                return Err(RingError::DuplicatePosition {
                    first: first.clone(),
                    second: label,
                    position: node.position,
                });
            }
            by_position.insert(node.position, label);
            nodes.push(node);
        }
        nodes.sort_by_key(|node| node.position);

        let mut ring = HashRing::with_hasher(RingHasherBuilder);
        // batch_add sorts once; `add` would re-sort the whole ring per node.
        ring.batch_add(nodes.clone());
        Ok(Ring {
            ring,
            vnodes: nodes,
            shard_count,
        })
    }

    /// The shard (index into the names given to [`Ring::new`]) that owns `key`.
    pub fn shard_for(&self, key: &ShardKey) -> usize {
        match self.ring.get(&RingKey(key)) {
            Some(node) => node.shard,
            None => unreachable!("Ring::new never builds an empty ring"),
        }
    }

    /// All vnodes in ascending position order (for placement summaries and the rebalancer).
    pub fn vnodes(&self) -> &[VNode] {
        &self.vnodes
    }

    /// Each shard's fraction of the u64 ring space (by the ownership rule documented on
    /// [`Ring`]); sums to 1.0.
    pub fn shares(&self) -> Vec<f64> {
        const SPACE: f64 = 18_446_744_073_709_551_616.0; // 2^64
        let mut owned = vec![0u128; self.shard_count];
        let mut previous = match self.vnodes.last() {
            // The lowest vnode's interval starts after the highest one, wrapping through 0.
            Some(last) => i128::from(last.position) - (1i128 << 64),
            None => return vec![0.0; self.shard_count],
        };
        for node in &self.vnodes {
            let position = i128::from(node.position);
            // Non-negative: positions ascend, and the first interval starts below zero.
            owned[node.shard] += (position - previous) as u128;
            previous = position;
        }
        owned.into_iter().map(|size| size as f64 / SPACE).collect()
    }
}

/// The label a vnode's position is hashed from; part of the placement contract, never change it.
fn vnode_label(shard_name: &str, index: u32) -> String {
    format!("{shard_name}#{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuid(text: &str) -> [u8; 16] {
        let hex: String = text.chars().filter(|c| *c != '-').collect();
        let mut bytes = [0u8; 16];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        bytes
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    /// `SELECT k, hashint8extended(k, 0)` on PostgreSQL 15.
    const INT_VECTORS: [(i64, i64); 20] = [
        (0, 4154612158245552303),
        (1, -3670598878359251130),
        (-1, -1888257769727981238),
        (2, 3647684041653542134),
        (-2, 495194309054116481),
        (42, 8010225493015854792),
        (100, -4553584787365626411),
        (1000, 475869958805627156),
        (12345, -4060231184274664867),
        (-12345, 919240276591220109),
        (2147483647, -9109110466470504941),
        (-2147483648, 1977219185673256887),
        (2147483648, 1977219185673256887),
        (-2147483649, -9109110466470504941),
        (4294967295, -1888257769727981238),
        (4294967296, -3670598878359251130),
        (1234567890123, -6236938892533063859),
        (-987654321098765, -6904906232979732645),
        (i64::MAX, 1977219185673256887),
        (i64::MIN, -9109110466470504941),
    ];
    /// `SELECT k, hashtextextended(k, 0)` on PostgreSQL 15 (UTF8, C collation).
    const TEXT_VECTORS: [(&str, i64); 20] = [
        ("", -6939563903564495251),
        ("a", 3591986179850072241),
        ("ab", 2833316173711343549),
        ("abc", -6747756470228489321),
        ("abcd", -1038429303365892052),
        ("hello", 3449563369152288809),
        ("hello world", 6947366892317592103),
        ("twelve chars", 3775680797941944007),
        ("thirteen char", 1778844127111168792),
        ("user:42", 8169282796211187818),
        (
            "The quick brown fox jumps over the lazy dog",
            2182139051089226439,
        ),
        ("é", -763932721387459829),
        ("naïve café", -8900095927675910636),
        ("日本語", 2870829529307104068),
        ("🦀 rust", -372207366068049502),
        ("Ünïcödé ßtraße", -4174135931694093874),
        ("abcdefghijklmnopqrstuvwx", -1933194731779935345),
        ("abcdefghijklmnopqrstuvwxy", 5649064133428767341),
        (" ", 6600704740418937010),
        ("s0#0", -182383375006875011),
    ];
    /// `SELECT k, uuid_hash_extended(k, 0)` on PostgreSQL 15.
    const UUID_VECTORS: [(&str, i64); 5] = [
        ("00000000-0000-0000-0000-000000000000", -6859010066814654381),
        ("ffffffff-ffff-ffff-ffff-ffffffffffff", 293445543803463785),
        ("123e4567-e89b-12d3-a456-426614174000", -1647950126005018481),
        ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", 7543054272012930821),
        ("550e8400-e29b-41d4-a716-446655440000", -2609285026036278665),
    ];

    #[test]
    fn int_keys_match_postgres() {
        for (key, expected) in INT_VECTORS {
            assert_eq!(
                pg_hash(&ShardKey::Int(key)),
                expected,
                "hashint8extended({key}, 0)"
            );
        }
    }

    #[test]
    fn text_keys_match_postgres() {
        for (key, expected) in TEXT_VECTORS {
            let got = pg_hash(&ShardKey::Text(key.to_owned()));
            assert_eq!(got, expected, "hashtextextended({key:?}, 0)");
        }
    }

    #[test]
    fn uuid_keys_match_postgres() {
        for (key, expected) in UUID_VECTORS {
            assert_eq!(
                pg_hash(&ShardKey::Uuid(uuid(key))),
                expected,
                "uuid_hash_extended({key})"
            );
        }
    }

    #[test]
    fn int_hash_is_the_uint32_hash_of_the_folded_halves() {
        // For i32-range values the fold is a no-op, which is what makes int4 and int8 keys agree.
        for value in [0i64, 1, -1, 42, i64::from(i32::MIN), i64::from(i32::MAX)] {
            let as_bytes = hash_bytes_extended(&(value as i32).to_le_bytes(), 7);
            assert_eq!(hashint8_extended(value, 7), as_bytes, "{value}");
        }
    }

    #[test]
    fn ring_hasher_passes_positions_through() {
        let node = VNode {
            shard: 3,
            position: 0xdead_beef_0123_4567,
        };
        assert_eq!(RingHasherBuilder.hash_one(node), node.position);
        let key = ShardKey::Text("user:42".to_owned());
        assert_eq!(
            RingHasherBuilder.hash_one(RingKey(&key)),
            ring_position(&key)
        );
    }

    /// (key, shard) on the ring of s0, s1, s2 with 64 vnodes each. Placement is a contract with
    /// the data already on the shards: if this test fails, existing rows would be misrouted.
    #[test]
    fn placement_is_pinned() {
        let ring = Ring::new(&names(&["s0", "s1", "s2"]), 64).unwrap();
        let text = |key: &str| ShardKey::Text(key.to_owned());
        // Computed independently on the server: the first vnode at or after the key in u64 order
        // (see `integration/hash_golden.rs` for the SQL).
        let pinned = [
            (ShardKey::Int(0), 1),
            (ShardKey::Int(1), 1),
            (ShardKey::Int(-1), 2),
            (ShardKey::Int(42), 0),
            (ShardKey::Int(1000), 0),
            (ShardKey::Int(123456789), 1),
            (ShardKey::Int(-987654321), 1),
            (ShardKey::Int(i64::MAX), 0),
            (ShardKey::Int(i64::MIN), 0),
            (text(""), 0),
            (text("alice"), 2),
            (text("bob"), 0),
            (text("user:42"), 0),
            (text("日本語"), 2),
            (text("carol@example.com"), 0),
            (text("Z"), 2),
            (
                ShardKey::Uuid(uuid("00000000-0000-0000-0000-000000000000")),
                0,
            ),
            (
                ShardKey::Uuid(uuid("ffffffff-ffff-ffff-ffff-ffffffffffff")),
                1,
            ),
            (
                ShardKey::Uuid(uuid("123e4567-e89b-12d3-a456-426614174000")),
                0,
            ),
            (
                ShardKey::Uuid(uuid("550e8400-e29b-41d4-a716-446655440000")),
                2,
            ),
        ];
        for (key, shard) in pinned {
            assert_eq!(ring.shard_for(&key), shard, "{key:?}");
        }
    }

    #[test]
    fn shard_for_takes_the_first_vnode_at_or_after_the_key() {
        let ring = Ring::new(&names(&["s0", "s1", "s2"]), 64).unwrap();
        let nodes = ring.vnodes();
        let owner = |position: u64| {
            nodes
                .iter()
                .find(|node| node.position >= position)
                .unwrap_or(&nodes[0])
                .shard
        };
        for value in -2_000i64..2_000 {
            let key = ShardKey::Int(value);
            assert_eq!(ring.shard_for(&key), owner(ring_position(&key)), "{value}");
        }
        // A key exactly on a vnode belongs to that vnode; the ring wraps past the last one.
        for node in nodes {
            assert_eq!(owner(node.position), node.shard);
        }
        assert_eq!(owner(u64::MAX), nodes[0].shard);
    }

    #[test]
    fn two_shards_split_the_ring_evenly_enough() {
        let ring = Ring::new(&names(&["s0", "s1"]), 256).unwrap();
        let shares = ring.shares();
        assert_eq!(shares.len(), 2);
        assert!(
            (shares.iter().sum::<f64>() - 1.0).abs() < 1e-9,
            "{shares:?}"
        );
        for share in &shares {
            assert!((0.35..=0.65).contains(share), "{shares:?}");
        }
    }

    #[test]
    fn a_single_vnode_owns_the_whole_ring() {
        let ring = Ring::new(&names(&["only"]), 1).unwrap();
        assert_eq!(ring.shares(), vec![1.0]);
        assert_eq!(ring.shard_for(&ShardKey::Int(7)), 0);
    }

    #[test]
    fn adding_a_shard_moves_about_a_third_of_the_keys_only_to_it() {
        let before = Ring::new(&names(&["s0", "s1"]), 256).unwrap();
        let after = Ring::new(&names(&["s0", "s1", "s2"]), 256).unwrap();
        let mut moved = 0;
        for value in 0..10_000 {
            let key = ShardKey::Int(value);
            let (old, new) = (before.shard_for(&key), after.shard_for(&key));
            if old != new {
                assert_eq!(new, 2, "key {value} moved between old shards");
                moved += 1;
            }
        }
        let fraction = f64::from(moved) / 10_000.0;
        assert!((0.20..=0.45).contains(&fraction), "moved {fraction}");
    }

    #[test]
    fn ring_rejects_bad_shard_lists() {
        assert_eq!(Ring::new(&[], 8).unwrap_err(), RingError::NoShards);
        assert_eq!(
            Ring::new(&names(&["a"]), 0).unwrap_err(),
            RingError::NoVnodes
        );
        assert_eq!(
            Ring::new(&names(&["a", "b", "a"]), 8).unwrap_err(),
            RingError::DuplicateShard("a".to_owned())
        );
    }

    #[test]
    fn duplicate_positions_name_both_labels() {
        // Distinct labels only collide through a 64-bit hash collision, so inject positions.
        let node = |shard, position| VNode { shard, position };
        let labelled = vec![
            ("a#0".to_owned(), node(0, 10)),
            ("a#1".to_owned(), node(0, 20)),
            ("b#0".to_owned(), node(1, 20)),
        ];
        assert_eq!(
            Ring::from_vnodes(labelled, 2).unwrap_err(),
            RingError::DuplicatePosition {
                first: "a#1".to_owned(),
                second: "b#0".to_owned(),
                position: 20,
            }
        );
    }
}
