//! Cross-shard result merging: turns the replies of one statement run on several shards into
//! the one reply a single Postgres would give. Streams where the query allows (k-way ORDER BY
//! merge, LIMIT/OFFSET, DISTINCT), holds one entry per group where it must (GROUP BY,
//! aggregates), and errors rather than guesses.
//!
//! The router writes a [`MergeSpec`] when it rewrites the statement for the shards (see
//! `router::rewrite`); the session feeds a [`Merger`] the shards' RowDescription and DataRows and
//! writes what it emits. This module does no I/O.

pub mod value;

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::{build, tag};
use value::{ColumnType, Format};

/// Why a merge cannot go on. The client gets the SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not supported across shards: {0}")]
    Unsupported(String),
    #[error("a cross-shard merge would hold more than {0} groups or rows (limits.max_merge_rows)")]
    TooMany(usize),
    #[error("{0}")]
    OutOfRange(String),
    #[error("cannot merge shard results: {0}")]
    Malformed(String),
}

impl Error {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Error::Unsupported(_) => "0A000",
            Error::TooMany(_) => "54000",
            Error::OutOfRange(_) => "22003",
            Error::Malformed(_) => "XX000",
        }
    }
}

impl From<value::Error> for Error {
    fn from(e: value::Error) -> Self {
        match e {
            value::Error::Unsupported(m) => Error::Unsupported(m),
            value::Error::Malformed(m) if m.contains("22003") => {
                Error::OutOfRange(m.replace(" (SQLSTATE 22003)", ""))
            }
            value::Error::Malformed(m) => Error::Malformed(m),
        }
    }
}

/// A column of the shard query's result: one the client sees, or one of the extra columns the
/// rewrite appended after them (numbered from the first extra).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Col {
    Visible(usize),
    Extra(usize),
}

/// A LIMIT or OFFSET: a constant, or a bind parameter read at plan time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Const(u64),
    Param(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortKey {
    pub col: Col,
    pub desc: bool,
    pub nulls_first: bool,
}

/// What one shard column holds in an aggregating query, and how partials combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A GROUP BY key, or an expression of the keys: every shard agrees within a group.
    Key,
    /// count(...): partial counts are summed.
    Count,
    Sum,
    Min,
    Max,
    BoolAnd,
    BoolOr,
    /// avg(x): this column is sum(x); the count(x) partials are in `count`.
    Avg {
        count: Col,
    },
    /// count(DISTINCT x): this column carries the values of x (the shards group by it); the
    /// result is the number of distinct non-NULL values.
    CountDistinct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

/// HAVING, evaluated on merged groups: comparisons of aggregates with constants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Predicate {
    Cmp {
        col: Col,
        op: CmpOp,
        literal: String,
    },
    And(Box<Predicate>, Box<Predicate>),
    Or(Box<Predicate>, Box<Predicate>),
    Not(Box<Predicate>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    /// One entry per shard column (client columns, then extras).
    pub outputs: Vec<Output>,
    /// The group key columns.
    pub keys: Vec<Col>,
    pub having: Option<Predicate>,
}

/// How to merge one rewritten statement's shard results.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MergeSpec {
    /// Columns appended after the client's (hidden sort keys, avg counts, HAVING aggregates).
    pub extras: usize,
    /// Every shard column when the statement has no `*`: per-column result formats can be sent.
    pub columns: Option<usize>,
    pub order: Vec<SortKey>,
    pub limit: Option<Count>,
    pub offset: Option<Count>,
    pub distinct: bool,
    pub aggregate: Option<Aggregate>,
    /// Rows are emitted taking the next row of these shard slots in turn (a split INSERT's
    /// RETURNING, in VALUES order).
    pub interleave: Option<Vec<usize>>,
}

/// One DataRow: the message body and where each field lies in it.
#[derive(Debug, Clone)]
struct Row {
    body: Bytes,
    fields: Vec<Option<(usize, usize)>>,
}

impl Row {
    fn parse(body: Bytes) -> Result<Row, Error> {
        let bad = || Error::Malformed("malformed DataRow".into());
        let n = u16::from_be_bytes(
            body.get(..2)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        );
        let mut fields = Vec::with_capacity(n as usize);
        let mut at = 2;
        for _ in 0..n {
            let len = i32::from_be_bytes(
                body.get(at..at + 4)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?,
            );
            at += 4;
            if len < 0 {
                fields.push(None);
            } else {
                let end = at + len as usize;
                if end > body.len() {
                    return Err(bad());
                }
                fields.push(Some((at, end)));
                at = end;
            }
        }
        Ok(Row { body, fields })
    }

    fn get(&self, i: usize) -> Option<&[u8]> {
        self.fields
            .get(i)
            .copied()
            .flatten()
            .map(|(a, b)| &self.body[a..b])
    }
}

/// Writes a DataRow message of the first `n` values.
fn write_row<'a>(out: &mut BytesMut, values: impl ExactSizeIterator<Item = Option<&'a [u8]>>) {
    build::message(out, tag::DATA_ROW, |b| {
        b.put_u16(values.len() as u16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
    });
}

/// A RowDescription field, as far as the merge needs it.
#[derive(Debug, Clone)]
struct Field {
    name: Vec<u8>,
    table: u32,
    attnum: i16,
    oid: u32,
    len: i16,
    typmod: i32,
    format: i16,
}

fn parse_description(body: &[u8]) -> Result<Vec<Field>, Error> {
    let bad = || Error::Malformed("malformed RowDescription".into());
    let n = u16::from_be_bytes(
        body.get(..2)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let mut at = 2;
    let mut fields = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let nul = body[at..].iter().position(|&b| b == 0).ok_or_else(bad)?;
        let name = body[at..at + nul].to_vec();
        at += nul + 1;
        let rest = body.get(at..at + 18).ok_or_else(bad)?;
        fields.push(Field {
            name,
            table: u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
            attnum: i16::from_be_bytes([rest[4], rest[5]]),
            oid: u32::from_be_bytes([rest[6], rest[7], rest[8], rest[9]]),
            len: i16::from_be_bytes([rest[10], rest[11]]),
            typmod: i32::from_be_bytes([rest[12], rest[13], rest[14], rest[15]]),
            format: i16::from_be_bytes([rest[16], rest[17]]),
        });
        at += 18;
    }
    Ok(fields)
}

fn write_description(out: &mut BytesMut, fields: &[Field]) {
    build::message(out, tag::ROW_DESCRIPTION, |b| {
        b.put_u16(fields.len() as u16);
        for f in fields {
            b.put_slice(&f.name);
            b.put_u8(0);
            b.put_u32(f.table);
            b.put_i16(f.attnum);
            b.put_u32(f.oid);
            b.put_i16(f.len);
            b.put_i32(f.typmod);
            b.put_i16(f.format);
        }
    });
}

/// Accumulated state of one aggregate column in one group.
#[derive(Debug)]
enum Acc {
    Key(Option<Vec<u8>>),
    Count(i64),
    Sum(Option<value::Sum>),
    Extreme(Option<Vec<u8>>),
    Bool(Option<bool>),
    Distinct(HashSet<Vec<u8>>),
}

#[derive(Debug)]
struct Group {
    accs: Vec<Acc>,
    /// The shards that contributed a row (bit per shard, the first 64).
    from: u64,
}

/// Merges one statement's replies from `shards` shards.
#[derive(Debug)]
pub struct Merger {
    spec: Arc<MergeSpec>,
    limit: Option<u64>,
    offset: u64,
    max_rows: usize,
    /// The shards' text ordering is bytewise (the "C" collation): text sort keys are usable.
    bytewise_text: bool,
    cols: Vec<ColumnType>,
    visible: usize,
    description: Option<Bytes>,
    queues: Vec<VecDeque<Row>>,
    ended: Vec<bool>,
    /// Each shard's last row (ORDER BY), to check the shard's order agrees with ours.
    last: Vec<Option<Row>>,
    skipped: u64,
    emitted: u64,
    seen: HashSet<Vec<u8>>,
    groups: HashMap<Vec<Option<Vec<u8>>>, usize>,
    group_list: Vec<Group>,
    /// Position in `spec.interleave`.
    turn: usize,
}

impl Merger {
    pub fn new(
        spec: Arc<MergeSpec>,
        limit: Option<u64>,
        offset: u64,
        shards: usize,
        max_rows: usize,
        bytewise_text: bool,
    ) -> Merger {
        Merger {
            spec,
            limit,
            offset,
            max_rows,
            bytewise_text,
            cols: Vec::new(),
            visible: 0,
            description: None,
            queues: (0..shards).map(|_| VecDeque::new()).collect(),
            ended: vec![false; shards],
            last: vec![None; shards],
            skipped: 0,
            emitted: 0,
            seen: HashSet::new(),
            groups: HashMap::new(),
            group_list: Vec::new(),
            turn: 0,
        }
    }

    fn index(&self, col: Col) -> usize {
        match col {
            Col::Visible(i) => i,
            Col::Extra(i) => self.visible + i,
        }
    }

    /// Learns the columns from a shard's RowDescription; returns the RowDescription message
    /// the client should see (extra columns removed, aggregate types as the client's query
    /// would return them).
    pub fn describe(&mut self, body: &[u8]) -> Result<Bytes, Error> {
        if let Some(d) = &self.description {
            return Ok(d.clone());
        }
        let mut fields = parse_description(body)?;
        if fields.len() < self.spec.extras {
            return Err(Error::Malformed("fewer columns than expected".into()));
        }
        self.visible = fields.len() - self.spec.extras;
        self.cols = fields
            .iter()
            .map(|f| ColumnType {
                oid: f.oid,
                format: if f.format == 1 {
                    Format::Binary
                } else {
                    Format::Text
                },
            })
            .collect();
        // Check up front what the merge will compare or add, so an unsupported type fails
        // before any row reaches the client.
        for key in &self.spec.order {
            let i = self.index(key.col);
            let col = self.final_type(i)?;
            if !col.comparable() {
                return Err(Error::Unsupported(format!(
                    "ORDER BY a column of type oid {} over several shards",
                    col.oid
                )));
            }
            self.check_collation(col, "ORDER BY")?;
        }
        if let Some(agg) = &self.spec.aggregate {
            for (i, out) in agg.outputs.iter().enumerate() {
                let col = self.cols[i];
                match out {
                    Output::Min | Output::Max => {
                        if !col.comparable() {
                            return Err(Error::Unsupported(format!(
                                "min()/max() of type oid {} over several shards",
                                col.oid
                            )));
                        }
                        self.check_collation(col, "min()/max()")?;
                    }
                    Output::Sum => {
                        value::Sum::new(col)?;
                    }
                    Output::Avg { .. } => {
                        if col.oid == value::oid::FLOAT4 {
                            // Shards add real in real: a sum of many rows loses digits that
                            // avg() on one server (which adds in double precision) keeps.
                            return Err(Error::Unsupported(
                                "avg() of real over several shards (cast it to double precision)"
                                    .into(),
                            ));
                        }
                        let out_oid = value::avg_type(col.oid)?;
                        let f = &mut fields[i];
                        f.oid = out_oid;
                        f.len = if out_oid == 701 { 8 } else { -1 };
                        f.typmod = -1;
                    }
                    Output::CountDistinct => {
                        let f = &mut fields[i];
                        f.oid = 20;
                        f.len = 8;
                        f.typmod = -1;
                        f.table = 0;
                        f.attnum = 0;
                    }
                    _ => {}
                }
            }
        }
        fields.truncate(self.visible);
        let mut out = BytesMut::new();
        write_description(&mut out, &fields);
        let d = out.freeze();
        self.description = Some(d.clone());
        Ok(d)
    }

    /// The type of a column's merged value (what avg or count(DISTINCT) turn it into).
    fn final_type(&self, i: usize) -> Result<ColumnType, Error> {
        let col = *self
            .cols
            .get(i)
            .ok_or_else(|| Error::Malformed("column out of range".into()))?;
        Ok(match self.spec.aggregate.as_ref().map(|a| a.outputs[i]) {
            Some(Output::Avg { .. }) => ColumnType {
                oid: value::avg_type(col.oid)?,
                format: col.format,
            },
            Some(Output::Count | Output::CountDistinct) => ColumnType {
                oid: 20,
                format: col.format,
            },
            _ => col,
        })
    }

    fn check_collation(&self, col: ColumnType, what: &str) -> Result<(), Error> {
        if col.collatable() && !self.bytewise_text {
            return Err(Error::Unsupported(format!(
                "{what} of a text column over several shards: the shards' collation is not \"C\", and Tessera compares text bytewise"
            )));
        }
        Ok(())
    }

    fn described(&self) -> Result<(), Error> {
        if self.description.is_none() {
            return Err(Error::Malformed("rows before RowDescription".into()));
        }
        Ok(())
    }

    /// The first shard's reply must be read up to its description (or its end) before any
    /// other: its ParseComplete, BindComplete and RowDescription are the client's, in order.
    pub fn preamble_done(&self) -> bool {
        self.description.is_some() || self.ended.first().is_none_or(|e| *e)
    }

    /// The LIMIT has been reached: further rows are read only to be discarded.
    pub fn satisfied(&self) -> bool {
        self.spec.aggregate.is_none() && self.limit.is_some_and(|l| self.emitted >= l)
    }

    /// One DataRow from shard `shard`.
    pub fn row(&mut self, shard: usize, body: Bytes) -> Result<(), Error> {
        self.described()?;
        if self.satisfied() {
            return Ok(());
        }
        let row = Row::parse(body)?;
        if row.fields.len() != self.cols.len() {
            return Err(Error::Malformed(
                "a DataRow with the wrong number of columns".into(),
            ));
        }
        if self.spec.aggregate.is_some() {
            return self.accumulate(shard, &row);
        }
        if !self.spec.order.is_empty() {
            // The shard's previous row: still queued, or the last one emitted from it.
            let prev = self.queues[shard].back().or(self.last[shard].as_ref());
            if let Some(prev) = prev
                && self.compare(prev, &row)? == Ordering::Greater
            {
                // The shard sorted differently than we compare: merging would misorder.
                return Err(Error::Unsupported(
                    "ORDER BY over several shards: a shard's order disagrees with Tessera's comparison of these values (collation or type)".into(),
                ));
            }
        }
        self.queues[shard].push_back(row);
        Ok(())
    }

    /// Shard `shard` sent its CommandComplete (or failed): no more rows from it.
    pub fn end(&mut self, shard: usize) {
        self.ended[shard] = true;
    }

    /// Which shard must be read before more rows can be emitted; `None` when rows are ready
    /// or every shard has ended.
    pub fn next_read(&self) -> Option<usize> {
        let open = |s: &usize| !self.ended[*s] && self.queues[*s].is_empty();
        if self.spec.aggregate.is_some() || self.satisfied() {
            return (0..self.queues.len()).find(|s| !self.ended[*s]);
        }
        if let Some(order) = &self.spec.interleave {
            return match order.get(self.turn) {
                Some(&s) if s < self.queues.len() && open(&s) => Some(s),
                Some(_) => None,
                None => (0..self.queues.len()).find(open),
            };
        }
        if self.spec.order.is_empty() {
            // Concatenation: one shard after the other.
            return (0..self.queues.len())
                .find(|s| !self.ended[*s] && self.queues.iter().all(VecDeque::is_empty));
        }
        (0..self.queues.len()).find(open)
    }

    fn compare(&self, a: &Row, b: &Row) -> Result<Ordering, Error> {
        for key in &self.spec.order {
            let i = self.index(key.col);
            let ord = match (a.get(i), b.get(i)) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => {
                    if key.nulls_first {
                        Ordering::Less
                    } else {
                        Ordering::Greater
                    }
                }
                (Some(_), None) => {
                    if key.nulls_first {
                        Ordering::Greater
                    } else {
                        Ordering::Less
                    }
                }
                (Some(x), Some(y)) => {
                    let o = value::compare(self.cols[i], x, y)?;
                    if key.desc { o.reverse() } else { o }
                }
            };
            if ord != Ordering::Equal {
                return Ok(ord);
            }
        }
        Ok(Ordering::Equal)
    }

    /// Writes every row that can be emitted now.
    pub fn emit(&mut self, out: &mut BytesMut) -> Result<(), Error> {
        if self.spec.aggregate.is_some() {
            return Ok(());
        }
        loop {
            if self.satisfied() {
                return Ok(());
            }
            let pick = if let Some(order) = &self.spec.interleave {
                match order.get(self.turn) {
                    Some(&s) if self.queues.get(s).is_some_and(|q| !q.is_empty()) => {
                        self.turn += 1;
                        Some(s)
                    }
                    // That shard returned fewer rows than it was sent: no order to keep.
                    Some(&s) if self.ended.get(s).is_none_or(|e| *e) => {
                        self.turn = order.len();
                        (0..self.queues.len()).find(|&s| !self.queues[s].is_empty())
                    }
                    Some(_) => None,
                    None => (0..self.queues.len()).find(|&s| !self.queues[s].is_empty()),
                }
            } else if self.spec.order.is_empty() {
                (0..self.queues.len()).find(|&s| !self.queues[s].is_empty())
            } else {
                if (0..self.queues.len()).any(|s| !self.ended[s] && self.queues[s].is_empty()) {
                    return Ok(());
                }
                let mut best: Option<usize> = None;
                for s in 0..self.queues.len() {
                    let Some(row) = self.queues[s].front() else {
                        continue;
                    };
                    best = match best {
                        Some(b) => {
                            let head = self.queues[b].front().expect("invariant: chosen non-empty");
                            if self.compare(row, head)? == Ordering::Less {
                                Some(s)
                            } else {
                                Some(b)
                            }
                        }
                        None => Some(s),
                    };
                }
                best
            };
            let Some(s) = pick else {
                return Ok(());
            };
            let row = self.queues[s]
                .pop_front()
                .expect("invariant: picked non-empty");
            self.offer(&row, out)?;
            if !self.spec.order.is_empty() && self.queues[s].is_empty() {
                // Kept only when nothing of that shard is queued: the order check needs it.
                self.last[s] = Some(row);
            }
        }
    }

    /// A row in final order: deduplicated, offset, limited, extras stripped.
    fn offer(&mut self, row: &Row, out: &mut BytesMut) -> Result<(), Error> {
        if self.spec.distinct {
            let key = visible_key(row, self.visible);
            if !self.seen.contains(&key) {
                if self.seen.len() >= self.max_rows {
                    return Err(Error::TooMany(self.max_rows));
                }
                self.seen.insert(key);
            } else {
                return Ok(());
            }
        }
        if self.skipped < self.offset {
            self.skipped += 1;
            return Ok(());
        }
        if self.limit.is_some_and(|l| self.emitted >= l) {
            return Ok(());
        }
        self.emitted += 1;
        if self.spec.extras == 0 {
            build::message(out, tag::DATA_ROW, |b| b.put_slice(&row.body));
        } else {
            write_row(out, (0..self.visible).map(|i| row.get(i)));
        }
        Ok(())
    }

    fn new_group(&self, agg: &Aggregate) -> Group {
        let accs = agg
            .outputs
            .iter()
            .map(|o| match o {
                Output::Key => Acc::Key(None),
                Output::Count => Acc::Count(0),
                Output::Sum | Output::Avg { .. } => Acc::Sum(None),
                Output::Min | Output::Max => Acc::Extreme(None),
                Output::BoolAnd | Output::BoolOr => Acc::Bool(None),
                Output::CountDistinct => Acc::Distinct(HashSet::new()),
            })
            .collect();
        Group { accs, from: 0 }
    }

    fn accumulate(&mut self, shard: usize, row: &Row) -> Result<(), Error> {
        // The spec is shared: holding it apart from `self` avoids copying it per row.
        let spec = self.spec.clone();
        let agg = spec.aggregate.as_ref().expect("invariant: aggregating");
        let regrouped = agg.outputs.contains(&Output::CountDistinct);
        let key: Vec<Option<Vec<u8>>> = agg
            .keys
            .iter()
            .map(|c| row.get(self.index(*c)).map(<[u8]>::to_vec))
            .collect();
        let g = match self.groups.get(&key) {
            Some(&g) => g,
            None => {
                if self.group_list.len() >= self.max_rows {
                    return Err(Error::TooMany(self.max_rows));
                }
                let group = self.new_group(agg);
                self.group_list.push(group);
                let g = self.group_list.len() - 1;
                self.groups.insert(key, g);
                g
            }
        };
        // One shard returns each of its groups once: two rows of one shard in one merged group
        // mean the merge's key is coarser than the shard's grouping (a GROUP BY name that is
        // both a column and an output alias, say). Unless count(DISTINCT) regrouped the shards.
        let bit = 1u64.checked_shl(shard as u32).unwrap_or(0);
        if !regrouped && self.group_list[g].from & bit != 0 {
            return Err(Error::Unsupported(
                "this GROUP BY over several shards: the proxy cannot tell the shards' groups apart (is a GROUP BY name also an output alias?)".into(),
            ));
        }
        self.group_list[g].from |= bit;
        for (i, out) in agg.outputs.iter().enumerate() {
            let col = self.cols[i];
            let v = row.get(i);
            let acc = &mut self.group_list[g].accs[i];
            match (acc, v) {
                (Acc::Key(slot), v) => {
                    if slot.is_none() {
                        *slot = v.map(<[u8]>::to_vec);
                    }
                }
                (Acc::Count(n), Some(v)) => {
                    *n = n
                        .checked_add(value::decode_count(col, v)?)
                        .ok_or_else(|| Error::Malformed("count out of range".into()))?;
                }
                (Acc::Sum(sum), Some(v)) => {
                    if sum.is_none() {
                        *sum = Some(value::Sum::new(col)?);
                    }
                    sum.as_mut().expect("invariant: set above").add(v)?;
                }
                (Acc::Extreme(best), Some(v)) => {
                    let replace = match best {
                        None => true,
                        Some(b) => {
                            let o = value::compare(col, v, b)?;
                            if *out == Output::Min {
                                o == Ordering::Less
                            } else {
                                o == Ordering::Greater
                            }
                        }
                    };
                    if replace {
                        *best = Some(v.to_vec());
                    }
                }
                (Acc::Bool(b), Some(v)) => {
                    let x = value::decode_bool(col, v)?;
                    *b = Some(match (*b, *out) {
                        (None, _) => x,
                        (Some(prev), Output::BoolAnd) => prev && x,
                        (Some(prev), _) => prev || x,
                    });
                }
                (Acc::Distinct(set), Some(v)) => {
                    if !set.contains(v) {
                        set.insert(v.to_vec());
                    }
                }
                (_, None) => {}
            }
        }
        Ok(())
    }

    /// Every shard has ended: emits what is left (the groups of an aggregate) and returns the
    /// row count for CommandComplete.
    pub fn finish(&mut self, out: &mut BytesMut) -> Result<u64, Error> {
        if self.spec.aggregate.is_none() {
            self.emit(out)?;
            return Ok(self.emitted);
        }
        if self.description.is_none() {
            return Ok(0);
        }
        let agg = self.spec.aggregate.clone().expect("invariant: aggregating");
        if agg.keys.is_empty() && self.group_list.is_empty() {
            // An aggregate without GROUP BY answers one row even over no rows at all (the
            // shards may have returned none when count(DISTINCT) grouped them).
            self.group_list.push(self.new_group(&agg));
        }
        let mut rows: Vec<Vec<Option<Vec<u8>>>> = Vec::with_capacity(self.group_list.len());
        for g in std::mem::take(&mut self.group_list) {
            let row = self.finalize(&agg, g)?;
            if let Some(having) = &agg.having
                && self.eval(having, &row)? != Some(true)
            {
                continue;
            }
            rows.push(row);
        }
        if !self.spec.order.is_empty() {
            let mut failed = None;
            rows.sort_by(|a, b| match self.compare_final(a, b) {
                Ok(o) => o,
                Err(e) => {
                    failed.get_or_insert(e);
                    Ordering::Equal
                }
            });
            if let Some(e) = failed {
                return Err(e);
            }
        }
        for row in rows.into_iter().skip(self.offset as usize) {
            if self.limit.is_some_and(|l| self.emitted >= l) {
                break;
            }
            self.emitted += 1;
            write_row(out, row[..self.visible].iter().map(Option::as_deref));
        }
        Ok(self.emitted)
    }

    fn finalize(&self, agg: &Aggregate, g: Group) -> Result<Vec<Option<Vec<u8>>>, Error> {
        let mut counts: Vec<Option<i64>> = vec![None; g.accs.len()];
        for (i, acc) in g.accs.iter().enumerate() {
            if let Acc::Count(n) = acc {
                counts[i] = Some(*n);
            }
        }
        let mut row = Vec::with_capacity(g.accs.len());
        for (i, acc) in g.accs.into_iter().enumerate() {
            let col = self.cols[i];
            row.push(match (acc, agg.outputs[i]) {
                (Acc::Key(v) | Acc::Extreme(v), _) => v,
                (Acc::Count(n), _) => Some(value::encode_int8(n, col.format)),
                (Acc::Sum(None), _) => None,
                (Acc::Sum(Some(sum)), Output::Avg { count }) => {
                    let n = counts[self.index(count)].unwrap_or(0);
                    match sum.finish()? {
                        Some(total) => value::avg(col, &total, n, col.format)?,
                        None => None,
                    }
                }
                (Acc::Sum(Some(sum)), _) => sum.finish()?,
                (Acc::Bool(b), _) => b.map(|b| value::encode_bool(b, col.format)),
                (Acc::Distinct(set), _) => Some(value::encode_int8(set.len() as i64, col.format)),
            });
        }
        Ok(row)
    }

    fn compare_final(
        &self,
        a: &[Option<Vec<u8>>],
        b: &[Option<Vec<u8>>],
    ) -> Result<Ordering, Error> {
        for key in &self.spec.order {
            let i = self.index(key.col);
            let ord = match (&a[i], &b[i]) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) if key.nulls_first => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) if key.nulls_first => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(x), Some(y)) => {
                    let o = value::compare(self.final_type(i)?, x, y)?;
                    if key.desc { o.reverse() } else { o }
                }
            };
            if ord != Ordering::Equal {
                return Ok(ord);
            }
        }
        Ok(Ordering::Equal)
    }

    /// SQL three-valued logic: `None` is unknown (a NULL was compared).
    fn eval(&self, p: &Predicate, row: &[Option<Vec<u8>>]) -> Result<Option<bool>, Error> {
        Ok(match p {
            Predicate::Cmp { col, op, literal } => {
                let i = self.index(*col);
                let Some(v) = &row[i] else {
                    return Ok(None);
                };
                let ty = self.final_type(i)?;
                if ty.format != Format::Text {
                    return Err(Error::Unsupported(
                        "HAVING on a binary-format column".into(),
                    ));
                }
                let o = match value::compare(ty, v, literal.as_bytes()) {
                    Ok(o) => o,
                    // `count(*) > 1.5`: Postgres compares integers with a numeric constant
                    // as numerics.
                    Err(_) if matches!(ty.oid, 20 | 21 | 23 | 1700) => {
                        let numeric = ColumnType {
                            oid: 1700,
                            format: Format::Text,
                        };
                        value::compare(numeric, v, literal.as_bytes())?
                    }
                    Err(e) => return Err(e.into()),
                };
                Some(match op {
                    CmpOp::Eq => o == Ordering::Equal,
                    CmpOp::NotEq => o != Ordering::Equal,
                    CmpOp::Lt => o == Ordering::Less,
                    CmpOp::LtEq => o != Ordering::Greater,
                    CmpOp::Gt => o == Ordering::Greater,
                    CmpOp::GtEq => o != Ordering::Less,
                })
            }
            Predicate::And(a, b) => match (self.eval(a, row)?, self.eval(b, row)?) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Predicate::Or(a, b) => match (self.eval(a, row)?, self.eval(b, row)?) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Predicate::Not(a) => self.eval(a, row)?.map(|b| !b),
        })
    }
}

/// The client-visible values of a row, as one byte string (NULL distinct from empty).
fn visible_key(row: &Row, visible: usize) -> Vec<u8> {
    let mut key = Vec::new();
    for i in 0..visible {
        match row.get(i) {
            Some(v) => {
                key.extend_from_slice(&(v.len() as i32).to_be_bytes());
                key.extend_from_slice(v);
            }
            None => key.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A RowDescription of text-format columns with these type oids.
    fn description(oids: &[u32]) -> Vec<u8> {
        let mut out = BytesMut::new();
        let fields: Vec<Field> = oids
            .iter()
            .enumerate()
            .map(|(i, &oid)| Field {
                name: format!("c{i}").into_bytes(),
                table: 0,
                attnum: 0,
                oid,
                len: -1,
                typmod: -1,
                format: 0,
            })
            .collect();
        write_description(&mut out, &fields);
        out[5..].to_vec()
    }

    fn data_row(values: &[Option<&str>]) -> Bytes {
        let mut out = BytesMut::new();
        write_row(&mut out, values.iter().map(|v| v.map(str::as_bytes)));
        out.freeze().slice(5..)
    }

    /// The text values of the DataRows in `out`.
    fn rows_of(out: &[u8]) -> Vec<Vec<Option<String>>> {
        let mut rows = Vec::new();
        let mut at = 0;
        while at < out.len() {
            let len = u32::from_be_bytes([out[at + 1], out[at + 2], out[at + 3], out[at + 4]]);
            let end = at + 1 + len as usize;
            if out[at] == tag::DATA_ROW {
                let row = Row::parse(Bytes::copy_from_slice(&out[at + 5..end])).expect("row");
                rows.push(
                    (0..row.fields.len())
                        .map(|i| row.get(i).map(|v| String::from_utf8_lossy(v).into_owned()))
                        .collect(),
                );
            }
            at = end;
        }
        rows
    }

    /// Drives a merger the way the session does: read what it asks for, emit what it can.
    fn run(mut merger: Merger, description: &[u8], shards: Vec<Vec<Bytes>>) -> Vec<u8> {
        let mut out = BytesMut::new();
        merger.describe(description).expect("describe");
        let mut queues: Vec<std::collections::VecDeque<Bytes>> =
            shards.into_iter().map(Into::into).collect();
        loop {
            merger.emit(&mut out).expect("emit");
            let Some(s) = merger.next_read() else { break };
            match queues[s].pop_front() {
                Some(row) => merger.row(s, row).expect("row"),
                None => merger.end(s),
            }
        }
        merger.finish(&mut out).expect("finish");
        out.to_vec()
    }

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn k_way_merge_equals_sorting_the_union_under_limit_and_offset() {
        let mut rng = Lcg(7);
        for case in 0..200 {
            let shards = 1 + (rng.next() % 4) as usize;
            let mut all: Vec<(Option<i64>, i64)> = Vec::new();
            let mut streams = Vec::new();
            let desc = case % 2 == 1;
            let nulls_first = case % 3 == 0;
            // The order the shards sort by, and the one the merged result must follow.
            let order = |a: &(Option<i64>, i64), b: &(Option<i64>, i64)| {
                let o = match (a.0, b.0) {
                    (None, None) => Ordering::Equal,
                    (None, Some(_)) if nulls_first => Ordering::Less,
                    (None, Some(_)) => Ordering::Greater,
                    (Some(_), None) if nulls_first => Ordering::Greater,
                    (Some(_), None) => Ordering::Less,
                    (Some(x), Some(y)) if desc => y.cmp(&x),
                    (Some(x), Some(y)) => x.cmp(&y),
                };
                o.then(a.1.cmp(&b.1))
            };
            for s in 0..shards {
                let n = rng.next() % 30;
                let mut rows: Vec<(Option<i64>, i64)> = (0..n)
                    .map(|k| {
                        let v = if rng.next().is_multiple_of(7) {
                            None
                        } else {
                            Some((rng.next() % 50) as i64 - 25)
                        };
                        (v, (s as i64) * 1000 + k as i64)
                    })
                    .collect();
                rows.sort_by(order);
                all.extend(rows.iter().copied());
                streams.push(rows);
            }
            let limit = (!rng.next().is_multiple_of(3)).then(|| rng.next() % 40);
            let offset = rng.next() % 10;
            let spec = MergeSpec {
                order: vec![
                    SortKey {
                        col: Col::Visible(0),
                        desc,
                        nulls_first,
                    },
                    SortKey {
                        col: Col::Extra(0),
                        desc: false,
                        nulls_first: false,
                    },
                ],
                extras: 1,
                ..MergeSpec::default()
            };
            let merger = Merger::new(Arc::new(spec), limit, offset, shards, 1000, true);
            let input: Vec<Vec<Bytes>> = streams
                .iter()
                .map(|rows| {
                    rows.iter()
                        .map(|(v, id)| {
                            let v = v.map(|v| v.to_string());
                            data_row(&[v.as_deref(), Some(&id.to_string())])
                        })
                        .collect()
                })
                .collect();
            let out = run(merger, &description(&[20, 20]), input);
            all.sort_by(order);
            let want: Vec<Vec<Option<String>>> = all
                .iter()
                .skip(offset as usize)
                .take(limit.map_or(usize::MAX, |l| l as usize))
                .map(|(v, _)| vec![v.map(|v| v.to_string())])
                .collect();
            assert_eq!(rows_of(&out), want, "case {case}");
        }
    }

    #[test]
    fn groups_reaggregate_partials_and_apply_having_order_and_limit() {
        // SELECT g, count(*), sum(x), min(x), max(x), avg(x) ... GROUP BY g
        // HAVING count(*) > 1 ORDER BY g LIMIT 2, as the shards return it:
        // g, count(*), sum(x), min(x), max(x), sum(x) AS avg, count(x) [extra], count(*) [extra]
        let spec = MergeSpec {
            extras: 2,
            order: vec![SortKey {
                col: Col::Visible(0),
                desc: false,
                nulls_first: false,
            }],
            limit: Some(Count::Const(2)),
            aggregate: Some(Aggregate {
                outputs: vec![
                    Output::Key,
                    Output::Count,
                    Output::Sum,
                    Output::Min,
                    Output::Max,
                    Output::Avg {
                        count: Col::Extra(0),
                    },
                    Output::Count,
                    Output::Count,
                ],
                keys: vec![Col::Visible(0)],
                having: Some(Predicate::Cmp {
                    col: Col::Extra(1),
                    op: CmpOp::Gt,
                    literal: "1".into(),
                }),
            }),
            ..MergeSpec::default()
        };
        let row = |g: &str,
                   n: &str,
                   sum: Option<&str>,
                   min: Option<&str>,
                   max: Option<&str>,
                   cx: &str| {
            data_row(&[Some(g), Some(n), sum, min, max, sum, Some(cx), Some(n)])
        };
        let shard0 = vec![
            row("a", "2", Some("3"), Some("1"), Some("2"), "2"),
            row("b", "1", Some("10"), Some("10"), Some("10"), "1"),
            row("d", "1", None, None, None, "0"),
        ];
        let shard1 = vec![
            row("a", "1", Some("4"), Some("4"), Some("4"), "1"),
            row("c", "3", Some("-3"), Some("-2"), Some("0"), "3"),
            row("d", "1", None, None, None, "0"),
        ];
        let merger = Merger::new(Arc::new(spec), Some(2), 0, 2, 100, true);
        let out = run(
            merger,
            &description(&[25, 20, 20, 20, 20, 20, 20, 20]),
            vec![shard0, shard1],
        );
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            rows_of(&out),
            vec![
                // a: 3 rows, sum 7, avg 7/3
                vec![
                    s("a"),
                    s("3"),
                    s("7"),
                    s("1"),
                    s("4"),
                    s("2.3333333333333333")
                ],
                // b has one row (HAVING drops it); c: 3 rows
                vec![
                    s("c"),
                    s("3"),
                    s("-3"),
                    s("-2"),
                    s("0"),
                    s("-1.00000000000000000000")
                ],
            ]
        );
    }

    #[test]
    fn distinct_and_cap() {
        let spec = MergeSpec {
            distinct: true,
            ..MergeSpec::default()
        };
        let rows = |vals: &[&str]| {
            vals.iter()
                .map(|v| data_row(&[Some(v)]))
                .collect::<Vec<_>>()
        };
        let merger = Merger::new(Arc::new(spec.clone()), None, 0, 2, 100, true);
        let out = run(
            merger,
            &description(&[25]),
            vec![rows(&["x", "y"]), rows(&["y", "z", "x"])],
        );
        assert_eq!(rows_of(&out).len(), 3);
        let mut merger = Merger::new(Arc::new(spec), None, 0, 1, 2, true);
        merger.describe(&description(&[25])).expect("describe");
        let mut out = BytesMut::new();
        for v in ["a", "b", "c"] {
            merger.row(0, data_row(&[Some(v)])).expect("row");
        }
        assert_eq!(merger.emit(&mut out), Err(Error::TooMany(2)));
    }

    #[test]
    fn text_sort_keys_need_a_bytewise_collation() {
        let spec = MergeSpec {
            order: vec![SortKey {
                col: Col::Visible(0),
                desc: false,
                nulls_first: false,
            }],
            ..MergeSpec::default()
        };
        let mut merger = Merger::new(Arc::new(spec), None, 0, 2, 10, false);
        let err = merger
            .describe(&description(&[25]))
            .expect_err("collation unknown");
        assert_eq!(err.sqlstate(), "0A000");
    }
}
