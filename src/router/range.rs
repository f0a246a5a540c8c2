//! Range placement: half-open `[from, to)` integer key ranges, one per shard, and the lookup of the
//! shard whose range holds a key.

/// One shard's range, kept sorted by `from` inside [`Ranges`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    /// Inclusive lower bound; `None` is unbounded below.
    from: Option<i64>,
    /// Exclusive upper bound; `None` is unbounded above.
    to: Option<i64>,
    shard: usize,
}

impl Span {
    fn contains(&self, key: i64) -> bool {
        self.from.is_none_or(|from| from <= key) && self.to.is_none_or(|to| key < to)
    }
}

/// Formats one bound pair as the map writes it, for error messages.
fn describe(from: Option<i64>, to: Option<i64>) -> String {
    let from = from.map_or_else(|| "-inf".to_owned(), |v| v.to_string());
    let to = to.map_or_else(|| "+inf".to_owned(), |v| v.to_string());
    format!("[{from}, {to})")
}

/// The key ranges of all shards, validated to be non-empty and disjoint. Gaps are allowed: a key in
/// a gap belongs to no shard, which the router reports as an error rather than broadcasting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranges {
    /// Sorted by `from` (unbounded first); disjoint, so also sorted by `to`.
    spans: Vec<Span>,
}

impl Ranges {
    /// Builds the ranges from one `(from, to)` pair per shard (shard `i` is `ranges[i]`), where
    /// `from` is inclusive, `to` exclusive and `None` unbounded.
    ///
    /// Errors name the shard indexes involved: a range with `from >= to` holds no key, and two
    /// ranges that share any key would make placement ambiguous.
    pub fn new(ranges: &[(Option<i64>, Option<i64>)]) -> Result<Ranges, String> {
        let mut spans = Vec::with_capacity(ranges.len());
        for (shard, &(from, to)) in ranges.iter().enumerate() {
            if let (Some(low), Some(high)) = (from, to)
                && low >= high
            {
                return Err(format!(
                    "shard {shard}: range {} is empty (from must be below to)",
                    describe(from, to)
                ));
            }
            spans.push(Span { from, to, shard });
        }
        // `None < Some(_)` for Option's Ord, so unbounded-below ranges sort first, as they should.
        spans.sort_by_key(|span| span.from);

        // With non-empty ranges sorted by start, any overlap shows up between neighbours: if each
        // range ends at or before the next one starts, it also ends before every later one.
        for pair in spans.windows(2) {
            let (earlier, later) = (pair[0], pair[1]);
            let disjoint = match (earlier.to, later.from) {
                (Some(end), Some(start)) => end <= start,
                // The earlier range runs to +inf, or both run from -inf.
                _ => false,
            };
            if !disjoint {
                let (first, second) = if earlier.shard < later.shard {
                    (earlier, later)
                } else {
                    (later, earlier)
                };
                return Err(format!(
                    "shards {} and {} have overlapping ranges {} and {}",
                    first.shard,
                    second.shard,
                    describe(first.from, first.to),
                    describe(second.from, second.to)
                ));
            }
        }
        Ok(Ranges { spans })
    }

    /// The shard whose range holds `key`, or `None` if the key falls in a gap.
    pub fn shard_for(&self, key: i64) -> Option<usize> {
        // Spans starting at or below the key form a prefix of the sorted list; only the last of
        // them can hold it, since the ranges are disjoint.
        let starts_at_or_below = self
            .spans
            .partition_point(|span| span.from.is_none_or(|from| from <= key));
        let candidate = self.spans.get(starts_at_or_below.checked_sub(1)?)?;
        candidate.contains(key).then_some(candidate.shard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_from_inclusive_to_exclusive() {
        let ranges = Ranges::new(&[(Some(0), Some(100)), (Some(100), Some(200))]).unwrap();
        assert_eq!(ranges.shard_for(0), Some(0));
        assert_eq!(ranges.shard_for(99), Some(0));
        assert_eq!(ranges.shard_for(100), Some(1));
        assert_eq!(ranges.shard_for(199), Some(1));
        assert_eq!(ranges.shard_for(200), None);
        assert_eq!(ranges.shard_for(-1), None);
    }

    #[test]
    fn keys_in_gaps_belong_to_no_shard() {
        // Shards listed out of key order on purpose: lookup must not depend on map order.
        let ranges = Ranges::new(&[(Some(50), Some(60)), (Some(0), Some(10))]).unwrap();
        assert_eq!(ranges.shard_for(5), Some(1));
        assert_eq!(ranges.shard_for(10), None);
        assert_eq!(ranges.shard_for(49), None);
        assert_eq!(ranges.shard_for(50), Some(0));
        assert_eq!(ranges.shard_for(60), None);
    }

    #[test]
    fn unbounded_ends_reach_the_extremes() {
        let ranges = Ranges::new(&[(Some(0), None), (None, Some(0))]).unwrap();
        assert_eq!(ranges.shard_for(i64::MIN), Some(1));
        assert_eq!(ranges.shard_for(-1), Some(1));
        assert_eq!(ranges.shard_for(0), Some(0));
        assert_eq!(ranges.shard_for(i64::MAX), Some(0));

        let everything = Ranges::new(&[(None, None)]).unwrap();
        assert_eq!(everything.shard_for(i64::MIN), Some(0));
        assert_eq!(everything.shard_for(i64::MAX), Some(0));
    }

    #[test]
    fn no_ranges_place_nothing() {
        let ranges = Ranges::new(&[]).unwrap();
        assert_eq!(ranges.shard_for(0), None);
    }

    #[test]
    fn overlaps_are_rejected_naming_both_shards() {
        let cases: [&[(Option<i64>, Option<i64>)]; 5] = [
            &[(Some(0), Some(10)), (Some(5), Some(20))],
            &[(Some(5), Some(20)), (Some(0), Some(10))],
            &[(None, Some(10)), (None, Some(5))],
            &[(Some(0), None), (Some(100), Some(200))],
            &[
                (Some(0), Some(10)),
                (Some(10), Some(20)),
                (Some(15), Some(16)),
            ],
        ];
        let expected = ["0 and 1", "0 and 1", "0 and 1", "0 and 1", "1 and 2"];
        for (ranges, names) in cases.iter().zip(expected) {
            let err = Ranges::new(ranges).unwrap_err();
            assert!(
                err.contains(&format!("shards {names} ")),
                "{ranges:?}: {err}"
            );
        }
    }

    #[test]
    fn touching_ranges_do_not_overlap() {
        let ranges =
            Ranges::new(&[(None, Some(-5)), (Some(-5), Some(5)), (Some(5), None)]).unwrap();
        assert_eq!(ranges.shard_for(-6), Some(0));
        assert_eq!(ranges.shard_for(-5), Some(1));
        assert_eq!(ranges.shard_for(4), Some(1));
        assert_eq!(ranges.shard_for(5), Some(2));
    }

    #[test]
    fn empty_ranges_are_rejected() {
        let err = Ranges::new(&[(Some(0), Some(10)), (Some(7), Some(7))]).unwrap_err();
        assert!(err.contains("shard 1"), "{err}");
        assert!(Ranges::new(&[(Some(9), Some(3))]).is_err());
    }
}
