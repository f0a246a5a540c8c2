//! Typed Postgres result values for cross-shard merging: decoding, ordering, summing and
//! encoding the column types a merge must compare or aggregate, in text and binary format. Pure:
//! no I/O, no session state (text formats assume the defaults noted on each parser).

use std::cmp::Ordering;

/// Wire format of one result column (RowDescription format code 0 = text, 1 = binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Binary,
}

/// The type and format of one result column, as RowDescription gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnType {
    pub oid: u32,
    pub format: Format,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A type the merge cannot compare or aggregate (message names the type oid / operation).
    #[error("{0}")]
    Unsupported(String),
    /// A value that does not decode as its declared type.
    #[error("{0}")]
    Malformed(String),
}

/// Built-in type oids this module knows (pg_type.dat).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
}

use oid::*;

impl ColumnType {
    /// True for types whose ordering depends on collation (text, varchar, bpchar, name).
    pub fn collatable(&self) -> bool {
        matches!(self.oid, TEXT | VARCHAR | BPCHAR | NAME)
    }

    /// Whether compare() supports this type (in this format).
    pub fn comparable(&self) -> bool {
        // Every supported type is handled in both formats.
        matches!(
            self.oid,
            BOOL | BYTEA
                | NAME
                | INT8
                | INT2
                | INT4
                | TEXT
                | OID
                | FLOAT4
                | FLOAT8
                | BPCHAR
                | VARCHAR
                | DATE
                | TIME
                | TIMESTAMP
                | TIMESTAMPTZ
                | NUMERIC
                | UUID
        )
    }
}

fn type_name(oid: u32) -> &'static str {
    match oid {
        BOOL => "boolean",
        BYTEA => "bytea",
        NAME => "name",
        INT8 => "bigint",
        INT2 => "smallint",
        INT4 => "integer",
        TEXT => "text",
        OID => "oid",
        FLOAT4 => "real",
        FLOAT8 => "double precision",
        BPCHAR => "character",
        VARCHAR => "character varying",
        DATE => "date",
        TIME => "time",
        TIMESTAMP => "timestamp",
        TIMESTAMPTZ => "timestamptz",
        NUMERIC => "numeric",
        UUID => "uuid",
        _ => "type",
    }
}

// Messages name the type and oid but never the value: values are user data and errors get logged.
fn malformed(col: ColumnType, why: &str) -> Error {
    let format = match col.format {
        Format::Text => "text",
        Format::Binary => "binary",
    };
    Error::Malformed(format!(
        "malformed {format} {} (oid {}) value: {why}",
        type_name(col.oid),
        col.oid
    ))
}

/// `what` is a noun phrase: callers prefix the message with "not supported across shards".
fn unsupported(oid: u32, what: &str) -> Error {
    Error::Unsupported(format!("{what} of type oid {oid}"))
}

fn utf8(col: ColumnType, value: &[u8]) -> Result<&str, Error> {
    std::str::from_utf8(value).map_err(|_| malformed(col, "not UTF-8"))
}

fn fixed<const N: usize>(col: ColumnType, value: &[u8]) -> Result<[u8; N], Error> {
    value
        .try_into()
        .map_err(|_| malformed(col, &format!("expected {N} bytes, got {}", value.len())))
}

/// Compares two non-NULL values of the same column by the type's ordering (text types: bytewise,
/// i.e. the "C" collation — the caller checks collation). NULL handling is the caller's job.
pub fn compare(col: ColumnType, a: &[u8], b: &[u8]) -> Result<Ordering, Error> {
    match (col.oid, col.format) {
        (INT2 | INT4 | INT8 | OID, _) => Ok(decode_int(col, a)?.cmp(&decode_int(col, b)?)),
        (FLOAT4 | FLOAT8, _) => Ok(cmp_float(decode_float(col, a)?, decode_float(col, b)?)),
        (NUMERIC, Format::Text) => cmp_numeric_text(col, a, b),
        (NUMERIC, Format::Binary) => cmp_numeric_binary(col, a, b),
        (TEXT | VARCHAR | NAME, _) => Ok(a.cmp(b)),
        // bpcharcmp ignores trailing spaces (bcTruelen), in both formats.
        (BPCHAR, _) => Ok(trim_trailing_spaces(a).cmp(trim_trailing_spaces(b))),
        (BOOL, _) => Ok(decode_bool(col, a)?.cmp(&decode_bool(col, b)?)),
        (DATE, _) => Ok(decode_date(col, a)?.cmp(&decode_date(col, b)?)),
        (TIME, _) => Ok(decode_time(col, a)?.cmp(&decode_time(col, b)?)),
        (TIMESTAMP | TIMESTAMPTZ, _) => {
            Ok(decode_timestamp(col, a)?.cmp(&decode_timestamp(col, b)?))
        }
        (UUID, _) => Ok(decode_uuid(col, a)?.cmp(&decode_uuid(col, b)?)),
        (BYTEA, Format::Binary) => Ok(a.cmp(b)),
        (BYTEA, Format::Text) => Ok(decode_bytea_text(col, a)?.cmp(&decode_bytea_text(col, b)?)),
        (other, _) => Err(unsupported(other, "comparing values")),
    }
}

fn trim_trailing_spaces(v: &[u8]) -> &[u8] {
    let end = v.iter().rposition(|&c| c != b' ').map_or(0, |i| i + 1);
    &v[..end]
}

// ---------------------------------------------------------------------------------------------
// Integers, booleans

/// int2/int4/int8/oid widened to i64 (oid is unsigned 32-bit, so it fits).
fn decode_int(col: ColumnType, value: &[u8]) -> Result<i64, Error> {
    match col.format {
        Format::Text => {
            let s = utf8(col, value)?;
            let v: i64 = if col.oid == OID {
                s.parse::<u32>().map(i64::from)
            } else {
                s.parse::<i64>()
            }
            .map_err(|_| malformed(col, "not an integer"))?;
            let fits = match col.oid {
                INT2 => i16::try_from(v).is_ok(),
                INT4 => i32::try_from(v).is_ok(),
                _ => true,
            };
            if fits {
                Ok(v)
            } else {
                Err(malformed(col, "out of range for the type"))
            }
        }
        Format::Binary => Ok(match col.oid {
            INT2 => i64::from(i16::from_be_bytes(fixed(col, value)?)),
            INT4 => i64::from(i32::from_be_bytes(fixed(col, value)?)),
            OID => i64::from(u32::from_be_bytes(fixed(col, value)?)),
            _ => i64::from_be_bytes(fixed(col, value)?),
        }),
    }
}

/// Decodes an int8 count (the result of count()/count(*)) in either format.
pub fn decode_count(col: ColumnType, value: &[u8]) -> Result<i64, Error> {
    // count() is always int8; narrower integers are accepted because they widen exactly.
    match col.oid {
        INT8 | INT4 | INT2 => decode_int(col, value),
        other => Err(unsupported(other, "a count")),
    }
}

/// Encodes an int8 in the given format.
pub fn encode_int8(v: i64, format: Format) -> Vec<u8> {
    match format {
        Format::Text => v.to_string().into_bytes(),
        Format::Binary => v.to_be_bytes().to_vec(),
    }
}

/// Decodes a bool (for bool_and/bool_or) in either format.
pub fn decode_bool(col: ColumnType, value: &[u8]) -> Result<bool, Error> {
    if col.oid != BOOL {
        return Err(unsupported(col.oid, "bool_and()/bool_or()"));
    }
    match col.format {
        // boolrecv treats any nonzero byte as true.
        Format::Binary => Ok(fixed::<1>(col, value)?[0] != 0),
        // boolout prints t/f; the spelled-out forms are accepted for robustness.
        Format::Text => match value {
            b"t" | b"true" => Ok(true),
            b"f" | b"false" => Ok(false),
            _ => Err(malformed(col, "expected t or f")),
        },
    }
}

/// Encodes a bool in the given format.
pub fn encode_bool(v: bool, format: Format) -> Vec<u8> {
    match (format, v) {
        (Format::Text, true) => b"t".to_vec(),
        (Format::Text, false) => b"f".to_vec(),
        (Format::Binary, v) => vec![u8::from(v)],
    }
}

// ---------------------------------------------------------------------------------------------
// Floats

/// float4/float8 as f64 (widening f32 is exact, so ordering is preserved).
fn decode_float(col: ColumnType, value: &[u8]) -> Result<f64, Error> {
    match (col.oid, col.format) {
        (FLOAT4, Format::Binary) => Ok(f64::from(f32::from_be_bytes(fixed(col, value)?))),
        (_, Format::Binary) => Ok(f64::from_be_bytes(fixed(col, value)?)),
        (FLOAT4, Format::Text) => parse_float_text::<f32>(col, value).map(f64::from),
        (_, Format::Text) => parse_float_text::<f64>(col, value),
    }
}

fn decode_float4(col: ColumnType, value: &[u8]) -> Result<f32, Error> {
    match col.format {
        Format::Binary => Ok(f32::from_be_bytes(fixed(col, value)?)),
        Format::Text => parse_float_text::<f32>(col, value),
    }
}

fn parse_float_text<F: std::str::FromStr>(col: ColumnType, value: &[u8]) -> Result<F, Error> {
    // Rust's parser accepts everything float8out/float4out print: "NaN", "Infinity",
    // "-Infinity", "1e+20", "-0" (it is case-insensitive for the special words).
    utf8(col, value)?
        .parse::<F>()
        .map_err(|_| malformed(col, "not a floating-point number"))
}

/// Postgres' float ordering: NaN equals NaN and sorts above everything; -0 equals 0.
fn cmp_float(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a
            .partial_cmp(&b)
            .expect("invariant: non-NaN floats are ordered"),
    }
}

/// float8out with extra_float_digits = 1 (the default since Postgres 12).
fn float8_text(v: f64) -> String {
    if v.is_nan() {
        return "NaN".to_owned();
    }
    if v.is_infinite() {
        return if v < 0.0 { "-Infinity" } else { "Infinity" }.to_owned();
    }
    let bits = v.to_bits();
    let exp_field = ((bits >> 52) & 0x7ff) as i32;
    let mantissa = bits & ((1 << 52) - 1);
    let (digits, exp) = if exp_field == 0 {
        shortest_digits(mantissa, -1074, false)
    } else {
        shortest_digits(
            mantissa | 1 << 52,
            exp_field - 1075,
            mantissa == 0 && exp_field > 1,
        )
    };
    // Fixed notation when the decimal exponent is in [-4, 15), as %g with precision 15.
    layout_float(&digits, exp, v.is_sign_negative(), 15)
}

/// float4out with extra_float_digits = 1.
fn float4_text(v: f32) -> String {
    if v.is_nan() {
        return "NaN".to_owned();
    }
    if v.is_infinite() {
        return if v < 0.0 { "-Infinity" } else { "Infinity" }.to_owned();
    }
    let bits = v.to_bits();
    let exp_field = ((bits >> 23) & 0xff) as i32;
    let mantissa = u64::from(bits & ((1 << 23) - 1));
    let (digits, exp) = if exp_field == 0 {
        shortest_digits(mantissa, -149, false)
    } else {
        shortest_digits(
            mantissa | 1 << 23,
            exp_field - 150,
            mantissa == 0 && exp_field > 1,
        )
    };
    // float4 switches to exponential notation from 1e+06 (%g with precision 6).
    layout_float(&digits, exp, v.is_sign_negative(), 6)
}

/// The decimal digits Postgres prints for the positive float `f × 2^e`, and the power of ten
/// of the first one ("0" and 0 for zero). `narrow_below` is set when the next float down is
/// only half as far away (the value is a power of two above the subnormals).
///
/// Postgres prints with its port of Ryu built without STRICTLY_SHORTEST: the shortest digits
/// strictly between the midpoints to the neighbouring floats (never on a midpoint, unlike
/// the `ryu` crate and Rust's own formatting), and among those the one nearest the value,
/// exact ties to even. This computes the same answer exactly with Steele & White's digit
/// generation on big integers: slower than Ryu, but only merged aggregates are printed here.
fn shortest_digits(f: u64, e: i32, narrow_below: bool) -> (String, i32) {
    if f == 0 {
        return ("0".to_owned(), 0);
    }
    // Everything in units of 2^(e-2): the value is 4f, the midpoint above 2 units away, the
    // one below 2 (or 1) units away. `s` is the unit of the digit being generated.
    let mut r = Big::from_u64(4 * f);
    let mut above = Big::from_u64(2);
    let mut below = Big::from_u64(if narrow_below { 1 } else { 2 });
    let mut s = Big::from_u64(1);
    let shift = e - 2;
    if shift >= 0 {
        for b in [&mut r, &mut above, &mut below] {
            b.shl(shift as u32);
        }
    } else {
        s.shl(shift.unsigned_abs());
    }
    // k: the least power of ten with upper midpoint <= 10^k; the first digit is at 10^(k-1).
    // Start from a floating-point estimate and correct it exactly.
    let mut k = ((f as f64).log10() + f64::from(e) * std::f64::consts::LOG10_2).ceil() as i32;
    if k >= 0 {
        s.mul_pow10(k.unsigned_abs());
    } else {
        for b in [&mut r, &mut above, &mut below] {
            b.mul_pow10(k.unsigned_abs());
        }
    }
    while r.add(&above) > s {
        s.mul_pow10(1);
        k += 1;
    }
    loop {
        let mut high = r.add(&above);
        high.mul_pow10(1);
        if high > s {
            break;
        }
        for b in [&mut r, &mut above, &mut below] {
            b.mul_pow10(1);
        }
        k -= 1;
    }
    let mut digits: Vec<u8> = Vec::with_capacity(20);
    loop {
        for b in [&mut r, &mut above, &mut below] {
            b.mul_pow10(1);
        }
        let mut d = 0u8;
        while r >= s {
            r.sub_assign(&s);
            d += 1;
        }
        // Whether the digits so far (truncated) lie above the lower midpoint, and whether
        // rounding them up stays below the upper one.
        let down_ok = r < below;
        let up_ok = r.add(&above) > s;
        if !down_ok && !up_ok {
            digits.push(d);
            continue;
        }
        let up = match (down_ok, up_ok) {
            (true, false) => false,
            (false, true) => true,
            _ => {
                let mut twice = r.clone();
                twice.mul_small(2);
                match twice.cmp(&s) {
                    Ordering::Less => false,
                    Ordering::Greater => true,
                    Ordering::Equal => d % 2 == 1,
                }
            }
        };
        digits.push(d + u8::from(up));
        break;
    }
    // Rounding up cannot carry (a carry would have ended generation a digit earlier), but
    // propagate it anyway rather than print a digit "10".
    let mut i = digits.len() - 1;
    while digits[i] == 10 {
        digits[i] = 0;
        if i == 0 {
            digits.insert(0, 1);
            k += 1;
            break;
        }
        i -= 1;
        digits[i] += 1;
    }
    while digits.len() > 1 && digits.last() == Some(&0) {
        digits.pop();
    }
    let text = digits.iter().map(|&d| char::from(b'0' + d)).collect();
    (text, k - 1)
}

/// A little-endian base-2^32 natural number: just enough for exact float-to-decimal
/// conversion (f64's range needs about 2,200 bits).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Big(Vec<u32>);

impl Big {
    fn from_u64(v: u64) -> Big {
        let mut b = Big(vec![v as u32, (v >> 32) as u32]);
        b.trim();
        b
    }

    fn trim(&mut self) {
        while self.0.last() == Some(&0) {
            self.0.pop();
        }
    }

    fn mul_small(&mut self, m: u32) {
        let mut carry = 0u64;
        for limb in &mut self.0 {
            let p = u64::from(*limb) * u64::from(m) + carry;
            *limb = p as u32;
            carry = p >> 32;
        }
        if carry > 0 {
            self.0.push(carry as u32);
        }
    }

    fn mul_pow10(&mut self, mut n: u32) {
        while n >= 9 {
            self.mul_small(1_000_000_000);
            n -= 9;
        }
        if n > 0 {
            self.mul_small(10u32.pow(n));
        }
    }

    fn shl(&mut self, bits: u32) {
        let (limbs, rem) = ((bits / 32) as usize, bits % 32);
        if rem > 0 {
            let mut carry = 0u32;
            for limb in &mut self.0 {
                let next = *limb >> (32 - rem);
                *limb = *limb << rem | carry;
                carry = next;
            }
            if carry > 0 {
                self.0.push(carry);
            }
        }
        self.0.splice(0..0, std::iter::repeat_n(0, limbs));
    }

    fn add(&self, other: &Big) -> Big {
        let (long, short) = if self.0.len() >= other.0.len() {
            (&self.0, &other.0)
        } else {
            (&other.0, &self.0)
        };
        let mut out = Vec::with_capacity(long.len() + 1);
        let mut carry = 0u64;
        for (i, &limb) in long.iter().enumerate() {
            let sum = u64::from(limb) + u64::from(short.get(i).copied().unwrap_or(0)) + carry;
            out.push(sum as u32);
            carry = sum >> 32;
        }
        if carry > 0 {
            out.push(carry as u32);
        }
        Big(out)
    }

    /// `self -= other`, for `self >= other`.
    fn sub_assign(&mut self, other: &Big) {
        let mut borrow = 0i64;
        for (i, limb) in self.0.iter_mut().enumerate() {
            let diff = i64::from(*limb) - i64::from(other.0.get(i).copied().unwrap_or(0)) - borrow;
            *limb = diff.rem_euclid(1 << 32) as u32;
            borrow = i64::from(diff < 0);
        }
        self.trim();
    }
}

impl Ord for Big {
    fn cmp(&self, other: &Big) -> Ordering {
        // Both are trimmed, so the longer is larger.
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.iter().rev().cmp(other.0.iter().rev()))
    }
}

impl PartialOrd for Big {
    fn partial_cmp(&self, other: &Big) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Lays out shortest `digits` whose first digit multiplies 10^`exp` the way Postgres' ryu
/// wrappers do: fixed for exponents in [-4, fixed_below), else `d.ddde+XX`.
fn layout_float(digits: &str, exp: i32, negative: bool, fixed_below: i32) -> String {
    let mut out = String::with_capacity(digits.len() + 8);
    if negative {
        out.push('-');
    }
    if (-4..fixed_below).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let exp_sign = if exp < 0 { '-' } else { '+' };
        out.push_str(&format!("e{exp_sign}{:02}", exp.unsigned_abs()));
    }
    out
}

fn encode_float8(v: f64, format: Format) -> Vec<u8> {
    match format {
        Format::Text => float8_text(v).into_bytes(),
        Format::Binary => v.to_be_bytes().to_vec(),
    }
}

fn encode_float4(v: f32, format: Format) -> Vec<u8> {
    match format {
        Format::Text => float4_text(v).into_bytes(),
        Format::Binary => v.to_be_bytes().to_vec(),
    }
}

// ---------------------------------------------------------------------------------------------
// Numeric: comparison without allocation

/// Where a numeric sits before its digits are looked at. The derived order is Postgres':
/// NaN sorts above +Infinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    NegInf,
    Neg,
    Zero,
    Pos,
    PosInf,
    NaN,
}

/// Binary numeric header sign words.
const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;
/// Largest display scale a numeric can carry (NUMERIC_DSCALE_MAX).
const NUMERIC_DSCALE_MAX: usize = 0x3FFF;
/// Bounds of a numeric's base-10000 weight (int16 on disk and on the wire).
const NUMERIC_WEIGHT_MAX: i64 = i16::MAX as i64;
const NUMERIC_WEIGHT_MIN: i64 = i16::MIN as i64;
/// select_div_scale's constants (numeric.c).
const NUMERIC_MIN_SIG_DIGITS: i64 = 16;
const NUMERIC_MAX_DISPLAY_SCALE: i64 = 1000;

/// A numeric in text form, borrowed: `int` has no leading zeros, `frac` is as printed.
struct TextNum<'a> {
    class: Class,
    int: &'a [u8],
    frac: &'a [u8],
}

fn parse_numeric_text(col: ColumnType, value: &[u8]) -> Result<TextNum<'_>, Error> {
    let special = |class| {
        Ok(TextNum {
            class,
            int: &[],
            frac: &[],
        })
    };
    // numeric_out prints NaN, Infinity, -Infinity; numeric_in's other spellings are accepted.
    if value.eq_ignore_ascii_case(b"nan") {
        return special(Class::NaN);
    }
    if value.eq_ignore_ascii_case(b"infinity")
        || value.eq_ignore_ascii_case(b"+infinity")
        || value.eq_ignore_ascii_case(b"inf")
        || value.eq_ignore_ascii_case(b"+inf")
    {
        return special(Class::PosInf);
    }
    if value.eq_ignore_ascii_case(b"-infinity") || value.eq_ignore_ascii_case(b"-inf") {
        return special(Class::NegInf);
    }
    let (neg, rest) = match value.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, value),
    };
    let (int, frac) = match rest.iter().position(|&c| c == b'.') {
        Some(dot) => (&rest[..dot], &rest[dot + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    let all_digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    if int.len() + frac.len() == 0 || !all_digits(int) || !all_digits(frac) {
        return Err(malformed(col, "not a decimal number"));
    }
    if frac.len() > NUMERIC_DSCALE_MAX {
        return Err(malformed(col, "too many digits after the decimal point"));
    }
    let int = &int[int.iter().take_while(|&&c| c == b'0').count()..];
    let class = if int.is_empty() && frac.iter().all(|&c| c == b'0') {
        Class::Zero
    } else if neg {
        Class::Neg
    } else {
        Class::Pos
    };
    Ok(TextNum { class, int, frac })
}

impl<'a> TextNum<'a> {
    /// The power of ten of the first significant digit, and the digits from there on
    /// (only meaningful for nonzero finite values).
    fn significant(&self) -> (i64, impl Iterator<Item = u8> + 'a) {
        // Without integer digits, the first significant one is past the fraction's zeros.
        let lead = if self.int.is_empty() {
            self.frac.iter().take_while(|&&c| c == b'0').count()
        } else {
            0
        };
        let exp = self.int.len() as i64 - lead as i64 - 1;
        let digits = self.int.iter().chain(self.frac).map(|c| c - b'0');
        (exp, digits.skip(lead))
    }
}

/// A numeric in binary form, borrowed: base-10000 `digits` (2 bytes each) with no leading
/// zero digit, `weight` the power of 10000 of the first one.
struct BinNum<'a> {
    class: Class,
    weight: i64,
    dscale: u16,
    digits: &'a [u8],
}

fn parse_numeric_binary(col: ColumnType, value: &[u8]) -> Result<BinNum<'_>, Error> {
    if value.len() < 8 {
        return Err(malformed(col, "shorter than the 8-byte header"));
    }
    let word = |i: usize| u16::from_be_bytes([value[i], value[i + 1]]);
    let ndigits = i16::from_be_bytes([value[0], value[1]]);
    let weight = i64::from(i16::from_be_bytes([value[2], value[3]]));
    let sign = word(4);
    let dscale = word(6);
    if ndigits < 0 || value.len() != 8 + 2 * ndigits as usize {
        return Err(malformed(col, "digit count does not match the length"));
    }
    if usize::from(dscale) > NUMERIC_DSCALE_MAX {
        return Err(malformed(col, "invalid display scale"));
    }
    let digits = &value[8..];
    if digits
        .chunks_exact(2)
        .any(|d| u16::from_be_bytes([d[0], d[1]]) >= 10000)
    {
        return Err(malformed(col, "digit out of range"));
    }
    let class = match sign {
        NUMERIC_POS => Class::Pos,
        NUMERIC_NEG => Class::Neg,
        NUMERIC_NAN => Class::NaN,
        NUMERIC_PINF => Class::PosInf,
        NUMERIC_NINF => Class::NegInf,
        _ => return Err(malformed(col, "invalid sign")),
    };
    let special = !matches!(class, Class::Pos | Class::Neg);
    // Canonical values have no leading zero digits, but tolerate them rather than misorder.
    let lead = digits.chunks_exact(2).take_while(|d| d == &[0, 0]).count();
    let digits = if special {
        &[][..]
    } else {
        &digits[2 * lead..]
    };
    let class = if !special && digits.is_empty() {
        Class::Zero
    } else {
        class
    };
    Ok(BinNum {
        class,
        weight: weight - lead as i64,
        dscale,
        digits,
    })
}

fn nbase_digit(d: &[u8]) -> u16 {
    u16::from_be_bytes([d[0], d[1]])
}

/// The four decimal digits of one base-10000 digit, most significant first.
fn decimal_digits(d: u16) -> [u8; 4] {
    [
        (d / 1000) as u8,
        (d / 100 % 10) as u8,
        (d / 10 % 10) as u8,
        (d % 10) as u8,
    ]
}

impl<'a> BinNum<'a> {
    /// As [`TextNum::significant`].
    fn significant(&self) -> (i64, impl Iterator<Item = u8> + 'a) {
        let first = self.digits.get(..2).map_or(0, nbase_digit);
        let width = match first {
            0..=9 => 1,
            10..=99 => 2,
            100..=999 => 3,
            _ => 4,
        };
        let digits = self
            .digits
            .chunks_exact(2)
            .flat_map(|d| decimal_digits(nbase_digit(d)))
            .skip(4 - width);
        (4 * self.weight + width as i64 - 1, digits)
    }
}

/// Compares magnitudes given as (power of ten of the first significant digit, digits);
/// a shorter digit run is padded with zeros.
fn cmp_significant(
    (a_exp, mut a): (i64, impl Iterator<Item = u8>),
    (b_exp, mut b): (i64, impl Iterator<Item = u8>),
) -> Ordering {
    if a_exp != b_exp {
        return a_exp.cmp(&b_exp);
    }
    loop {
        match (a.next(), b.next()) {
            (Some(x), Some(y)) if x != y => return x.cmp(&y),
            (Some(_), Some(_)) => {}
            (Some(x), None) => {
                return if x != 0 || a.any(|d| d != 0) {
                    Ordering::Greater
                } else {
                    Ordering::Equal
                };
            }
            (None, Some(y)) => {
                return if y != 0 || b.any(|d| d != 0) {
                    Ordering::Less
                } else {
                    Ordering::Equal
                };
            }
            (None, None) => return Ordering::Equal,
        }
    }
}

/// Orders by class, then by magnitude (reversed for negatives) when both are finite nonzero.
fn cmp_classes(a: Class, b: Class, magnitude: impl FnOnce() -> Ordering) -> Ordering {
    match a.cmp(&b) {
        Ordering::Equal => match a {
            Class::Pos => magnitude(),
            Class::Neg => magnitude().reverse(),
            _ => Ordering::Equal,
        },
        other => other,
    }
}

fn cmp_numeric_text(col: ColumnType, a: &[u8], b: &[u8]) -> Result<Ordering, Error> {
    let (a, b) = (parse_numeric_text(col, a)?, parse_numeric_text(col, b)?);
    Ok(cmp_classes(a.class, b.class, || {
        cmp_significant(a.significant(), b.significant())
    }))
}

fn cmp_numeric_binary(col: ColumnType, a: &[u8], b: &[u8]) -> Result<Ordering, Error> {
    let (a, b) = (parse_numeric_binary(col, a)?, parse_numeric_binary(col, b)?);
    Ok(cmp_classes(a.class, b.class, || {
        cmp_significant(a.significant(), b.significant())
    }))
}

// ---------------------------------------------------------------------------------------------
// Numeric: exact arithmetic

/// An exact numeric value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Numeric {
    NaN,
    PosInf,
    NegInf,
    Finite(Dec),
}

/// A finite decimal `(-1)^neg × coef × 10^-dscale`. Base-10 digits keep every operation here
/// simple and exact; merges add a handful of partials, so speed is not the concern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dec {
    /// Never true for zero, like Postgres (strip_var makes zero positive).
    neg: bool,
    /// Decimal digits, most significant first, no leading zeros; empty for zero.
    coef: Vec<u8>,
    /// Digits after the decimal point, both stored and displayed.
    dscale: usize,
}

impl Dec {
    fn new(neg: bool, mut coef: Vec<u8>, dscale: usize) -> Dec {
        let lead = coef.iter().take_while(|&&d| d == 0).count();
        coef.drain(..lead);
        Dec {
            neg: neg && !coef.is_empty(),
            coef,
            dscale,
        }
    }

    fn from_i128(v: i128) -> Dec {
        let coef = v
            .unsigned_abs()
            .to_string()
            .bytes()
            .map(|c| c - b'0')
            .collect();
        Dec::new(v < 0, coef, 0)
    }

    /// The coefficient rescaled to `dscale` digits after the point (never fewer than now).
    fn coef_at(&self, dscale: usize) -> Vec<u8> {
        let mut coef = self.coef.clone();
        coef.resize(coef.len() + (dscale - self.dscale), 0);
        coef
    }

    /// Exact sum; the display scale is the larger of the two, as in Postgres' add_var.
    fn add(&self, other: &Dec) -> Dec {
        let dscale = self.dscale.max(other.dscale);
        let (a, b) = (self.coef_at(dscale), other.coef_at(dscale));
        if self.neg == other.neg {
            return Dec::new(self.neg, add_magnitudes(&a, &b), dscale);
        }
        match cmp_magnitudes(&a, &b) {
            Ordering::Equal => Dec::new(false, Vec::new(), dscale),
            Ordering::Greater => Dec::new(self.neg, sub_magnitudes(&a, &b), dscale),
            Ordering::Less => Dec::new(other.neg, sub_magnitudes(&b, &a), dscale),
        }
    }

    /// Canonical base-10000 form: (weight, digits) with no leading or trailing zero digit;
    /// zero is (0, []).
    fn nbase(&self) -> (i64, Vec<u16>) {
        if self.coef.is_empty() {
            return (0, Vec::new());
        }
        // coef[i] multiplies 10^(top - i).
        let top = self.coef.len() as i64 - self.dscale as i64 - 1;
        let weight = top.div_euclid(4);
        let mut digits = Vec::with_capacity(self.coef.len() / 4 + 2);
        let mut current = weight;
        let mut acc: u16 = 0;
        for (i, &d) in self.coef.iter().enumerate() {
            let power = top - i as i64;
            if power.div_euclid(4) != current {
                digits.push(acc);
                acc = 0;
                current = power.div_euclid(4);
            }
            acc += u16::from(d) * 10u16.pow(power.rem_euclid(4) as u32);
        }
        digits.push(acc);
        while digits.last() == Some(&0) {
            digits.pop();
        }
        // coef has no leading zeros, so digits[0] is nonzero: weight needs no adjusting.
        (weight, digits)
    }

    /// Exact quotient by a positive count, rounded half away from zero at `rscale` digits.
    fn div_round(&self, count: u64, rscale: usize) -> Dec {
        // Truncate to one digit past rscale; that digit alone decides half-away-from-zero
        // rounding because the digits are exact (what round_var sees after div_var).
        let guard = rscale + 1;
        let numerator: Vec<u8> = if guard >= self.dscale {
            self.coef_at(guard)
        } else {
            let keep = self.coef.len().saturating_sub(self.dscale - guard);
            self.coef[..keep].to_vec()
        };
        let divisor = u128::from(count);
        let mut rem: u128 = 0;
        let mut quotient = Vec::with_capacity(numerator.len());
        for &d in &numerator {
            rem = rem * 10 + u128::from(d);
            quotient.push((rem / divisor) as u8);
            rem %= divisor;
        }
        let last = quotient.pop().unwrap_or(0);
        if last >= 5 {
            increment_magnitude(&mut quotient);
        }
        Dec::new(self.neg, quotient, rscale)
    }

    /// numeric_out: exactly dscale digits after the point, no exponent.
    fn to_text(&self) -> String {
        let mut out = String::with_capacity(self.coef.len() + self.dscale + 3);
        if self.neg {
            out.push('-');
        }
        let width = self.coef.len().max(self.dscale + 1);
        let digits =
            std::iter::repeat_n(0, width - self.coef.len()).chain(self.coef.iter().copied());
        for (i, d) in digits.enumerate() {
            if i == width - self.dscale {
                out.push('.');
            }
            out.push(char::from(b'0' + d));
        }
        out
    }

    /// numeric_send's layout: ndigits, weight, sign, dscale, then the base-10000 digits.
    fn to_binary(&self) -> Result<Vec<u8>, Error> {
        let (weight, digits) = self.nbase();
        let sign = if self.neg { NUMERIC_NEG } else { NUMERIC_POS };
        let mut out = Vec::with_capacity(8 + 2 * digits.len());
        let ndigits = i16::try_from(digits.len()).map_err(|_| overflow_error())?;
        out.extend_from_slice(&ndigits.to_be_bytes());
        let weight = i16::try_from(weight).map_err(|_| overflow_error())?;
        out.extend_from_slice(&weight.to_be_bytes());
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&(self.dscale as u16).to_be_bytes());
        for d in digits {
            out.extend_from_slice(&d.to_be_bytes());
        }
        Ok(out)
    }

    /// Postgres refuses numerics whose weight does not fit its int16 (make_result).
    fn check_range(&self) -> Result<(), Error> {
        let (weight, _) = self.nbase();
        if (NUMERIC_WEIGHT_MIN..=NUMERIC_WEIGHT_MAX).contains(&weight) {
            Ok(())
        } else {
            Err(overflow_error())
        }
    }
}

fn overflow_error() -> Error {
    Error::Malformed("value overflows numeric format (SQLSTATE 22003)".to_owned())
}

fn cmp_magnitudes(a: &[u8], b: &[u8]) -> Ordering {
    let strip = |v: &[u8]| v.iter().take_while(|&&d| d == 0).count();
    let (a, b) = (&a[strip(a)..], &b[strip(b)..]);
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

fn add_magnitudes(a: &[u8], b: &[u8]) -> Vec<u8> {
    let len = a.len().max(b.len());
    let mut out = Vec::with_capacity(len + 1);
    let mut carry = 0;
    for i in 0..len {
        let digit = |v: &[u8]| if i < v.len() { v[v.len() - 1 - i] } else { 0 };
        let s = digit(a) + digit(b) + carry;
        out.push(s % 10);
        carry = s / 10;
    }
    if carry > 0 {
        out.push(carry);
    }
    out.reverse();
    out
}

/// `a - b` for `a >= b`.
fn sub_magnitudes(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len());
    let mut borrow = 0;
    for i in 0..a.len() {
        let x = a[a.len() - 1 - i];
        let y = if i < b.len() { b[b.len() - 1 - i] } else { 0 };
        let (d, next) = if x >= y + borrow {
            (x - y - borrow, 0)
        } else {
            (x + 10 - y - borrow, 1)
        };
        out.push(d);
        borrow = next;
    }
    out.reverse();
    out
}

fn increment_magnitude(v: &mut Vec<u8>) {
    for d in v.iter_mut().rev() {
        if *d == 9 {
            *d = 0;
        } else {
            *d += 1;
            return;
        }
    }
    v.insert(0, 1);
}

impl Numeric {
    fn decode(col: ColumnType, value: &[u8]) -> Result<Numeric, Error> {
        match col.format {
            Format::Text => {
                let t = parse_numeric_text(col, value)?;
                Ok(match t.class {
                    Class::NaN => Numeric::NaN,
                    Class::PosInf => Numeric::PosInf,
                    Class::NegInf => Numeric::NegInf,
                    Class::Zero | Class::Pos | Class::Neg => {
                        let coef = t.int.iter().chain(t.frac).map(|c| c - b'0').collect();
                        Numeric::Finite(Dec::new(t.class == Class::Neg, coef, t.frac.len()))
                    }
                })
            }
            Format::Binary => {
                let b = parse_numeric_binary(col, value)?;
                Ok(match b.class {
                    Class::NaN => Numeric::NaN,
                    Class::PosInf => Numeric::PosInf,
                    Class::NegInf => Numeric::NegInf,
                    Class::Zero | Class::Pos | Class::Neg => Numeric::Finite(binary_to_dec(&b)),
                })
            }
        }
    }

    fn encode(&self, format: Format) -> Result<Vec<u8>, Error> {
        let special = |text: &str, sign: u16| match format {
            Format::Text => text.as_bytes().to_vec(),
            Format::Binary => {
                let mut out = vec![0, 0, 0, 0];
                out.extend_from_slice(&sign.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                out
            }
        };
        Ok(match self {
            Numeric::NaN => special("NaN", NUMERIC_NAN),
            Numeric::PosInf => special("Infinity", NUMERIC_PINF),
            Numeric::NegInf => special("-Infinity", NUMERIC_NINF),
            Numeric::Finite(d) => {
                d.check_range()?;
                match format {
                    Format::Text => d.to_text().into_bytes(),
                    Format::Binary => d.to_binary()?,
                }
            }
        })
    }
}

/// Expands base-10000 digits to decimal ones down to 10^-dscale. Digits hidden by dscale are
/// dropped, as numeric_recv truncates them.
fn binary_to_dec(b: &BinNum<'_>) -> Dec {
    let ndigits = b.digits.len() / 2;
    let top = 4 * b.weight + 3;
    let bottom = -(b.dscale as i64);
    let mut coef = Vec::new();
    let mut power = top;
    while power >= bottom {
        let k = b.weight - power.div_euclid(4);
        let digit = if (0..ndigits as i64).contains(&k) {
            let d = nbase_digit(&b.digits[2 * k as usize..]);
            (d / 10u16.pow(power.rem_euclid(4) as u32) % 10) as u8
        } else {
            0
        };
        if digit != 0 || !coef.is_empty() {
            coef.push(digit);
        }
        power -= 1;
    }
    Dec::new(b.class == Class::Neg, coef, usize::from(b.dscale))
}

// ---------------------------------------------------------------------------------------------
// Sum and avg

/// Sum of partial sums (the per-shard results of sum(x)), NULL-skipping like Postgres.
#[derive(Debug, Clone)]
pub struct Sum {
    col: ColumnType,
    state: SumState,
}

#[derive(Debug, Clone)]
enum SumState {
    /// int8 partials (sum of int2/int4), added in i128 so that only the total must fit int8,
    /// as with a single server adding the rows.
    Int(Option<i128>),
    /// numeric partials, tallying specials like Postgres' NumericAggState.
    Numeric {
        nan: bool,
        pos_inf: bool,
        neg_inf: bool,
        total: Option<Dec>,
    },
    Float4(Option<f32>),
    Float8(Option<f64>),
}

impl Sum {
    /// Unsupported for types it cannot add.
    pub fn new(col: ColumnType) -> Result<Sum, Error> {
        let state = match col.oid {
            INT8 => SumState::Int(None),
            NUMERIC => SumState::Numeric {
                nan: false,
                pos_inf: false,
                neg_inf: false,
                total: None,
            },
            FLOAT4 => SumState::Float4(None),
            FLOAT8 => SumState::Float8(None),
            other => return Err(unsupported(other, "sum()")),
        };
        Ok(Sum { col, state })
    }

    /// Adds one non-NULL partial.
    pub fn add(&mut self, value: &[u8]) -> Result<(), Error> {
        let col = self.col;
        match &mut self.state {
            SumState::Int(total) => {
                let v = i128::from(decode_int(col, value)?);
                let sum = total
                    .unwrap_or(0)
                    .checked_add(v)
                    .ok_or_else(bigint_out_of_range)?;
                *total = Some(sum);
            }
            SumState::Numeric {
                nan,
                pos_inf,
                neg_inf,
                total,
            } => {
                let finite = match Numeric::decode(col, value)? {
                    Numeric::NaN => {
                        *nan = true;
                        Dec::new(false, Vec::new(), 0)
                    }
                    Numeric::PosInf => {
                        *pos_inf = true;
                        Dec::new(false, Vec::new(), 0)
                    }
                    Numeric::NegInf => {
                        *neg_inf = true;
                        Dec::new(false, Vec::new(), 0)
                    }
                    Numeric::Finite(d) => d,
                };
                *total = Some(match total.take() {
                    Some(t) => t.add(&finite),
                    None => finite,
                });
            }
            SumState::Float4(total) => {
                let v = decode_float4(col, value)?;
                *total = Some(match *total {
                    Some(t) => float_add(col, t, v, |x| x.is_infinite(), |x, y| x + y)?,
                    None => v,
                });
            }
            SumState::Float8(total) => {
                let v = decode_float(col, value)?;
                *total = Some(match *total {
                    Some(t) => float_add(col, t, v, |x| x.is_infinite(), |x, y| x + y)?,
                    None => v,
                });
            }
        }
        Ok(())
    }

    /// The total in the column's own type and format; None when no non-NULL partial was added
    /// (SQL NULL).
    pub fn finish(&self) -> Result<Option<Vec<u8>>, Error> {
        let format = self.col.format;
        match &self.state {
            SumState::Int(None)
            | SumState::Numeric { total: None, .. }
            | SumState::Float4(None)
            | SumState::Float8(None) => Ok(None),
            SumState::Int(Some(total)) => {
                let total = i64::try_from(*total).map_err(|_| bigint_out_of_range())?;
                Ok(Some(encode_int8(total, format)))
            }
            SumState::Numeric {
                nan,
                pos_inf,
                neg_inf,
                total: Some(total),
            } => {
                // Same precedence as numeric_sum: NaN wins, +Inf and -Inf together make NaN.
                let value = if *nan || (*pos_inf && *neg_inf) {
                    Numeric::NaN
                } else if *pos_inf {
                    Numeric::PosInf
                } else if *neg_inf {
                    Numeric::NegInf
                } else {
                    Numeric::Finite(total.clone())
                };
                value.encode(format).map(Some)
            }
            SumState::Float4(Some(total)) => Ok(Some(encode_float4(*total, format))),
            SumState::Float8(Some(total)) => Ok(Some(encode_float8(*total, format))),
        }
    }
}

/// What Postgres raises when sum(int2/int4) leaves the int8 range.
fn bigint_out_of_range() -> Error {
    Error::Malformed("bigint out of range (SQLSTATE 22003)".to_owned())
}

/// float4pl/float8pl: an infinite result from finite operands is an overflow error.
fn float_add<F: Copy>(
    col: ColumnType,
    a: F,
    b: F,
    is_inf: impl Fn(F) -> bool,
    add: impl Fn(F, F) -> F,
) -> Result<F, Error> {
    let sum = add(a, b);
    if is_inf(sum) && !is_inf(a) && !is_inf(b) {
        return Err(Error::Malformed(format!(
            "{} value out of range: overflow (SQLSTATE 22003)",
            type_name(col.oid)
        )));
    }
    Ok(sum)
}

/// The oid avg() returns for a partial sum of this oid (1700 or 701), or Unsupported.
pub fn avg_type(sum_oid: u32) -> Result<u32, Error> {
    match sum_oid {
        // sum(int2/int4) is int8 and sum(int8/numeric) is numeric; avg of all of them is numeric.
        INT2 | INT4 | INT8 | NUMERIC => Ok(NUMERIC),
        // avg(float4) and avg(float8) accumulate and return float8.
        FLOAT4 | FLOAT8 => Ok(FLOAT8),
        other => Err(unsupported(other, "avg()")),
    }
}

/// avg(x) from the merged sum(x) (of type `sum_col`, as encoded by Sum::finish) and the merged
/// count(x). Returns numeric (1700) for int8/numeric sums and float8 (701) for float4/float8
/// sums, in `out_format`; None when count == 0 (SQL NULL).
pub fn avg(
    sum_col: ColumnType,
    sum: &[u8],
    count: i64,
    out_format: Format,
) -> Result<Option<Vec<u8>>, Error> {
    let result_type = avg_type(sum_col.oid)?;
    if count < 0 {
        return Err(Error::Malformed(format!("negative count {count} for avg")));
    }
    if count == 0 {
        return Ok(None);
    }
    if result_type == FLOAT8 {
        // float8_avg: sumX / N in double precision.
        let total = decode_float(sum_col, sum)?;
        return Ok(Some(encode_float8(total / count as f64, out_format)));
    }
    let total = match sum_col.oid {
        NUMERIC => Numeric::decode(sum_col, sum)?,
        _ => Numeric::Finite(Dec::from_i128(i128::from(decode_int(sum_col, sum)?))),
    };
    let count = count.unsigned_abs();
    let mean = match total {
        // numeric_div of a special by a positive count keeps it.
        special @ (Numeric::NaN | Numeric::PosInf | Numeric::NegInf) => special,
        Numeric::Finite(total) => {
            let rscale = div_scale(&total, count);
            Numeric::Finite(total.div_round(count, rscale))
        }
    };
    mean.encode(out_format).map(Some)
}

/// numeric.c's select_div_scale for `dividend / count` (the count has display scale 0): at least
/// 16 significant digits, never fewer than the dividend's display scale, at most 1000.
fn div_scale(dividend: &Dec, count: u64) -> usize {
    let first = |(weight, digits): (i64, Vec<u16>)| match digits.first() {
        Some(&d) => (weight, d),
        None => (0, 0),
    };
    let (weight1, first1) = first(dividend.nbase());
    let (weight2, first2) = first(Dec::from_i128(i128::from(count)).nbase());
    let mut qweight = weight1 - weight2;
    // Equal first digits are treated as "dividend smaller", as Postgres does.
    if first1 <= first2 {
        qweight -= 1;
    }
    let rscale = (NUMERIC_MIN_SIG_DIGITS - qweight * 4)
        .max(dividend.dscale as i64)
        .clamp(0, NUMERIC_MAX_DISPLAY_SCALE);
    rscale as usize
}

// ---------------------------------------------------------------------------------------------
// Dates and times

const USECS_PER_SEC: i128 = 1_000_000;
const SECS_PER_DAY: i128 = 86_400;

/// Days since 2000-01-01; infinities map to the i64 extremes, as date's int32 ones do.
fn decode_date(col: ColumnType, value: &[u8]) -> Result<i64, Error> {
    match col.format {
        // DATEVAL_NOBEGIN/NOEND are i32::MIN/MAX, which widen to values that still sort last.
        Format::Binary => Ok(i64::from(i32::from_be_bytes(fixed(col, value)?))),
        Format::Text => {
            let s = utf8(col, value)?;
            match s {
                "infinity" => Ok(i64::MAX),
                "-infinity" => Ok(i64::MIN),
                _ => {
                    let (date, bc) = split_era(s);
                    parse_ymd(date, bc)
                        .ok_or_else(|| malformed(col, "expected YYYY-MM-DD (DateStyle ISO)"))
                }
            }
        }
    }
}

/// Microseconds since midnight.
fn decode_time(col: ColumnType, value: &[u8]) -> Result<i64, Error> {
    match col.format {
        Format::Binary => Ok(i64::from_be_bytes(fixed(col, value)?)),
        Format::Text => parse_hms(utf8(col, value)?)
            .map(|us| us as i64)
            .ok_or_else(|| malformed(col, "expected HH:MM:SS[.ffffff]")),
    }
}

/// Microseconds since 2000-01-01 00:00 (UTC for timestamptz), infinities at the extremes.
fn decode_timestamp(col: ColumnType, value: &[u8]) -> Result<i128, Error> {
    match col.format {
        // DT_NOBEGIN/DT_NOEND are i64::MIN/MAX, already the extremes.
        Format::Binary => Ok(i128::from(i64::from_be_bytes(fixed(col, value)?))),
        Format::Text => {
            let s = utf8(col, value)?;
            match s {
                "infinity" => Ok(i128::MAX),
                "-infinity" => Ok(i128::MIN),
                _ => parse_timestamp(s, col.oid == TIMESTAMPTZ).ok_or_else(|| {
                    malformed(col, "expected YYYY-MM-DD HH:MM:SS[.ffffff] (DateStyle ISO)")
                }),
            }
        }
    }
}

/// Splits the " BC" suffix ISO DateStyle prints after dates in years <= 0.
fn split_era(s: &str) -> (&str, bool) {
    match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    }
}

fn parse_digits(s: &str, min_len: usize, max_len: usize) -> Option<i64> {
    if s.len() < min_len || s.len() > max_len || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// "Y-MM-DD" (year of 1+ digits, BC when `bc`) to days since 2000-01-01, proleptic Gregorian.
fn parse_ymd(s: &str, bc: bool) -> Option<i64> {
    let mut parts = s.split('-');
    let year = parse_digits(parts.next()?, 1, 9)?;
    let month = parse_digits(parts.next()?, 1, 2)?;
    let day = parse_digits(parts.next()?, 1, 2)?;
    if parts.next().is_some() || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // There is no year 0: 1 BC is astronomical year 0.
    let year = if bc {
        if year == 0 {
            return None;
        }
        1 - year
    } else {
        year
    };
    Some(days_from_civil(year, month, day) - days_from_civil(2000, 1, 1))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// "HH:MM:SS[.f{1,6}]" to microseconds (24:00:00 is a valid time).
fn parse_hms(s: &str) -> Option<i128> {
    let (hms, frac) = match s.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (s, None),
    };
    let mut parts = hms.split(':');
    let hour = parse_digits(parts.next()?, 1, 2)?;
    let minute = parse_digits(parts.next()?, 2, 2)?;
    let second = parse_digits(parts.next()?, 2, 2)?;
    if parts.next().is_some() || hour > 24 || minute > 59 || second > 60 {
        return None;
    }
    let micros = match frac {
        None => 0,
        Some(f) => {
            let digits = parse_digits(f, 1, 6)?;
            digits * 10i64.pow(6 - f.len() as u32)
        }
    };
    Some(i128::from((hour * 60 + minute) * 60 + second) * USECS_PER_SEC + i128::from(micros))
}

/// "±HH[:MM[:SS]]" to seconds east of UTC.
fn parse_offset(s: &str) -> Option<i128> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let mut secs = 0;
    let mut unit = 3600;
    for (i, part) in rest.split(':').enumerate() {
        if i > 2 {
            return None;
        }
        let v = parse_digits(part, if i == 0 { 1 } else { 2 }, 2)?;
        if i > 0 && v > 59 {
            return None;
        }
        secs += v * unit;
        unit /= 60;
    }
    Some(i128::from(sign * secs))
}

/// ISO timestamp text: "Y-MM-DD HH:MM:SS[.f][±HH[:MM[:SS]]][ BC]". With a zone, the result is
/// the instant (local time minus the offset).
fn parse_timestamp(s: &str, with_zone: bool) -> Option<i128> {
    let (s, bc) = split_era(s);
    let (date, rest) = s.split_once(' ')?;
    let days = parse_ymd(date, bc)?;
    let (time, offset) = if with_zone {
        let at = rest.find(['+', '-'])?;
        (&rest[..at], parse_offset(&rest[at..])?)
    } else {
        (rest, 0)
    };
    let micros = parse_hms(time)?;
    Some((i128::from(days) * SECS_PER_DAY - offset) * USECS_PER_SEC + micros)
}

// ---------------------------------------------------------------------------------------------
// uuid, bytea

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The 16 bytes of a uuid; uuid_cmp orders by them (memcmp).
fn decode_uuid(col: ColumnType, value: &[u8]) -> Result<[u8; 16], Error> {
    match col.format {
        Format::Binary => fixed(col, value),
        Format::Text => {
            // uuid_out prints the canonical 8-4-4-4-12 form; braces and hyphen-free input
            // (what uuid_in also takes) are accepted too.
            let inner = value
                .strip_prefix(b"{")
                .and_then(|v| v.strip_suffix(b"}"))
                .unwrap_or(value);
            let bad = || malformed(col, "expected 32 hex digits");
            let mut out = [0u8; 16];
            let mut nibbles = inner.iter().filter(|&&c| c != b'-');
            for byte in &mut out {
                let hi = nibbles.next().and_then(|&c| hex_value(c)).ok_or_else(bad)?;
                let lo = nibbles.next().and_then(|&c| hex_value(c)).ok_or_else(bad)?;
                *byte = hi << 4 | lo;
            }
            if nibbles.next().is_some() {
                return Err(bad());
            }
            Ok(out)
        }
    }
}

/// bytea text output in either bytea_output setting: hex (`\x…`) or escape.
fn decode_bytea_text(col: ColumnType, value: &[u8]) -> Result<Vec<u8>, Error> {
    if let Some(hex) = value.strip_prefix(b"\\x") {
        if hex.len() % 2 != 0 {
            return Err(malformed(col, "odd number of hex digits"));
        }
        return hex
            .chunks_exact(2)
            .map(|p| Some(hex_value(p[0])? << 4 | hex_value(p[1])?))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| malformed(col, "invalid hex digit"));
    }
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] != b'\\' {
            out.push(value[i]);
            i += 1;
        } else if value.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let octal = value
                .get(i + 1..i + 4)
                .filter(|o| o[0] <= b'3' && o.iter().all(|c| (b'0'..=b'7').contains(c)))
                .ok_or_else(|| malformed(col, "invalid escape"))?;
            out.push(octal.iter().fold(0u8, |acc, c| acc << 3 | (c - b'0')));
            i += 4;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(oid: u32) -> ColumnType {
        ColumnType {
            oid,
            format: Format::Text,
        }
    }

    fn binary(oid: u32) -> ColumnType {
        ColumnType {
            oid,
            format: Format::Binary,
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    use Ordering::{Equal, Greater, Less};

    #[test]
    fn compare_text_values() {
        let cases: &[(u32, &str, &str, Ordering)] = &[
            (INT2, "-5", "3", Less),
            (INT4, "-2147483648", "2147483647", Less),
            (INT8, "9223372036854775807", "-9223372036854775808", Greater),
            (OID, "4294967295", "1", Greater),
            (FLOAT8, "NaN", "Infinity", Greater),
            (FLOAT8, "NaN", "NaN", Equal),
            (FLOAT8, "-Infinity", "-1.7976931348623157e+308", Less),
            (FLOAT8, "-0", "0", Equal),
            (FLOAT8, "-1.5", "-1.25", Less),
            (FLOAT8, "1e+20", "99999999999999990000", Greater),
            (FLOAT4, "1.5", "1.25", Greater),
            (FLOAT4, "NaN", "3.4e+38", Greater),
            (NUMERIC, "NaN", "Infinity", Greater),
            (NUMERIC, "-Infinity", "-99999999999999999999", Less),
            (NUMERIC, "Infinity", "99999999999999999999", Greater),
            (NUMERIC, "-10", "-9.99", Less),
            (NUMERIC, "0.00", "0", Equal),
            (NUMERIC, "-0.001", "0", Less),
            (NUMERIC, "10000", "9999.9999", Greater),
            (NUMERIC, "1.10", "1.1", Equal),
            (NUMERIC, "0.0001", "0.001", Less),
            (NUMERIC, "-0.0001", "-0.001", Greater),
            (
                NUMERIC,
                "12345678901234567890.123",
                "12345678901234567890.1229",
                Greater,
            ),
            (TEXT, "a", "b", Less),
            (TEXT, "abc", "ab", Greater),
            (TEXT, "B", "a", Less),
            (VARCHAR, "ab ", "ab", Greater),
            (BPCHAR, "ab  ", "ab", Equal),
            (BPCHAR, "ab", "ab c", Less),
            (BPCHAR, "a\t", "a", Greater),
            (NAME, "pg_class", "pg_attribute", Greater),
            (BOOL, "f", "t", Less),
            (DATE, "2024-03-01", "2024-02-29", Greater),
            (DATE, "0044-03-15 BC", "0001-01-01", Less),
            (DATE, "0002-01-01 BC", "0001-12-31 BC", Less),
            (DATE, "0001-12-31 BC", "0001-01-01", Less),
            (DATE, "infinity", "294276-12-31", Greater),
            (DATE, "-infinity", "4713-01-01 BC", Less),
            (TIME, "12:00:01.5", "12:00:01.49", Greater),
            (TIME, "24:00:00", "23:59:59.999999", Greater),
            (
                TIMESTAMP,
                "2024-03-01 12:34:56.123456",
                "2024-03-01 12:34:56.12345",
                Greater,
            ),
            (
                TIMESTAMP,
                "2024-03-01 12:34:56",
                "2024-03-01 12:34:56.000001",
                Less,
            ),
            (
                TIMESTAMP,
                "10000-01-01 00:00:00",
                "9999-12-31 23:59:59",
                Greater,
            ),
            (
                TIMESTAMP,
                "0044-03-15 12:00:00 BC",
                "0001-01-01 00:00:00",
                Less,
            ),
            (
                TIMESTAMP,
                "infinity",
                "294276-12-31 23:59:59.999999",
                Greater,
            ),
            (
                TIMESTAMPTZ,
                "2024-03-01 12:00:00+00",
                "2024-03-01 17:30:00+05:30",
                Equal,
            ),
            (
                TIMESTAMPTZ,
                "2024-03-01 12:00:00-05",
                "2024-03-01 16:59:59.999999+00",
                Greater,
            ),
            (
                TIMESTAMPTZ,
                "2024-03-01 12:00:00+01",
                "2024-03-01 11:30:00+00",
                Less,
            ),
            (
                TIMESTAMPTZ,
                "1850-01-01 00:00:00+00:19:32",
                "1849-12-31 23:40:28+00",
                Equal,
            ),
            (
                TIMESTAMPTZ,
                "0044-03-15 12:00:00+00 BC",
                "0044-03-15 12:00:00+01 BC",
                Greater,
            ),
            (TIMESTAMPTZ, "-infinity", "0001-01-01 00:00:00+00", Less),
            (
                UUID,
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
                Equal,
            ),
            (
                UUID,
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                "{a0eebc999c0b4ef8bb6d6bb9bd380a12}",
                Less,
            ),
            (BYTEA, "\\x00ff", "\\x0100", Less),
            (BYTEA, "\\xAB", "\\xab", Equal),
            (BYTEA, "\\x61", "\\x", Greater),
            (BYTEA, "a\\\\\\001", "\\x615c01", Equal),
        ];
        for &(oid, a, b, want) in cases {
            let got = compare(text(oid), a.as_bytes(), b.as_bytes());
            assert_eq!(got, Ok(want), "oid {oid}: {a:?} vs {b:?}");
            let back = compare(text(oid), b.as_bytes(), a.as_bytes());
            assert_eq!(back, Ok(want.reverse()), "oid {oid}: {b:?} vs {a:?}");
        }
    }

    #[test]
    fn compare_binary_values() {
        let ts = |us: i64| us.to_be_bytes().to_vec();
        let cases: Vec<(u32, Vec<u8>, Vec<u8>, Ordering)> = vec![
            (
                INT2,
                (-1i16).to_be_bytes().to_vec(),
                1i16.to_be_bytes().to_vec(),
                Less,
            ),
            (
                INT4,
                (-7i32).to_be_bytes().to_vec(),
                (-8i32).to_be_bytes().to_vec(),
                Greater,
            ),
            (
                INT8,
                i64::MIN.to_be_bytes().to_vec(),
                0i64.to_be_bytes().to_vec(),
                Less,
            ),
            (
                OID,
                u32::MAX.to_be_bytes().to_vec(),
                1u32.to_be_bytes().to_vec(),
                Greater,
            ),
            (
                FLOAT8,
                f64::NAN.to_be_bytes().to_vec(),
                f64::INFINITY.to_be_bytes().to_vec(),
                Greater,
            ),
            (
                FLOAT8,
                (-0.0f64).to_be_bytes().to_vec(),
                0.0f64.to_be_bytes().to_vec(),
                Equal,
            ),
            (
                FLOAT4,
                f32::NEG_INFINITY.to_be_bytes().to_vec(),
                f32::MIN.to_be_bytes().to_vec(),
                Less,
            ),
            // numeric_send bytes from Postgres 15: NaN, Infinity, -Infinity, 0, 0.00,
            // -0.001, 10000, 1e-20, -12.5, 12345678901234567890.123.
            (
                NUMERIC,
                hex("00000000c0000000"),
                hex("00000000d0000020"),
                Greater,
            ),
            (
                NUMERIC,
                hex("00000000f0000020"),
                hex("0002000040000001000c1388"),
                Less,
            ),
            (
                NUMERIC,
                hex("0000000000000000"),
                hex("0000000000000002"),
                Equal,
            ),
            (
                NUMERIC,
                hex("0001ffff40000003000a"),
                hex("0000000000000000"),
                Less,
            ),
            (
                NUMERIC,
                hex("0002000040000001000c1388"),
                hex("0001ffff40000003000a"),
                Less,
            ),
            (
                NUMERIC,
                hex("00010001000000000001"),
                hex("0001fffb000000140001"),
                Greater,
            ),
            (
                NUMERIC,
                hex("000600040000000304d2162e23340d801ed204ce"),
                hex("00010001000000000001"),
                Greater,
            ),
            // Non-canonical leading/trailing zero digits still compare by value: 1.0 == 1.
            (
                NUMERIC,
                hex("000200000000000100010000"),
                hex("00010000000000000001"),
                Equal,
            ),
            (
                NUMERIC,
                hex("000200010000000000000001"),
                hex("00010000000000000001"),
                Equal,
            ),
            (BOOL, vec![0], vec![1], Less),
            (
                DATE,
                i32::MIN.to_be_bytes().to_vec(),
                (-1_000_000i32).to_be_bytes().to_vec(),
                Less,
            ),
            (TIMESTAMPTZ, ts(i64::MAX), ts(1), Greater),
            (TIMESTAMP, ts(-1), ts(0), Less),
            (TIME, ts(1), ts(0), Greater),
            (UUID, vec![0; 16], vec![0xff; 16], Less),
            (BYTEA, vec![1, 2], vec![1, 2, 0], Less),
            (TEXT, b"b".to_vec(), b"a".to_vec(), Greater),
            (BPCHAR, b"x  ".to_vec(), b"x".to_vec(), Equal),
        ];
        for (oid, a, b, want) in cases {
            assert_eq!(
                compare(binary(oid), &a, &b),
                Ok(want),
                "oid {oid}: {a:?} vs {b:?}"
            );
            assert_eq!(
                compare(binary(oid), &b, &a),
                Ok(want.reverse()),
                "oid {oid}"
            );
        }
    }

    #[test]
    fn compare_rejects_bad_input_and_unknown_types() {
        let err = compare(text(114), b"{}", b"[]").unwrap_err();
        assert!(
            matches!(&err, Error::Unsupported(m) if m.contains("114")),
            "{err}"
        );
        let malformed: &[(ColumnType, &[u8])] = &[
            (text(INT4), b"12x"),
            (text(INT2), b"40000"),
            (binary(INT8), b"\0\0\0\x01"),
            (text(NUMERIC), b"1.2.3"),
            (text(NUMERIC), b"-"),
            (binary(NUMERIC), &[0, 1, 0, 0, 0, 0, 0, 0]),
            (binary(NUMERIC), &[0, 1, 0, 0, 0x12, 0x34, 0, 0, 0, 1]),
            (binary(NUMERIC), &[0, 1, 0, 0, 0, 0, 0, 0, 0x27, 0x10]),
            (text(DATE), b"01/03/2024"),
            (text(DATE), b"2024-13-01"),
            (text(TIMESTAMPTZ), b"2024-03-01 12:00:00"),
            (text(TIMESTAMP), b"2024-03-01 12:00:00+00"),
            (text(UUID), b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1"),
            (text(BOOL), b"maybe"),
            (text(BYTEA), b"\\x0"),
        ];
        for (col, v) in malformed {
            let got = compare(*col, v, v);
            assert!(
                matches!(got, Err(Error::Malformed(_))),
                "{col:?} {v:?}: {got:?}"
            );
        }
    }

    #[test]
    fn comparable_and_collatable() {
        for oid in [
            INT2, INT4, INT8, OID, FLOAT4, FLOAT8, NUMERIC, TEXT, VARCHAR, BPCHAR, NAME,
        ] {
            assert!(text(oid).comparable() && binary(oid).comparable(), "{oid}");
        }
        for oid in [BOOL, DATE, TIME, TIMESTAMP, TIMESTAMPTZ, UUID, BYTEA] {
            assert!(text(oid).comparable(), "{oid}");
            assert!(!text(oid).collatable(), "{oid}");
        }
        for oid in [114, 3802, 1186, 1266, 0] {
            assert!(!text(oid).comparable(), "{oid}");
        }
        for oid in [TEXT, VARCHAR, BPCHAR, NAME] {
            assert!(text(oid).collatable(), "{oid}");
        }
        assert!(!text(INT4).collatable());
    }

    /// numeric_out text and numeric_send bytes, as Postgres 15 prints them.
    const NUMERIC_WIRE: &[(&str, &str)] = &[
        ("0", "0000000000000000"),
        ("0.00", "0000000000000002"),
        ("-0.001", "0001ffff40000003000a"),
        (
            "12345678901234567890.123",
            "000600040000000304d2162e23340d801ed204ce",
        ),
        ("10000", "00010001000000000001"),
        ("0.00000000000000000001", "0001fffb000000140001"),
        ("1.5000000000000000", "000200000000001000011388"),
        ("-12.5", "0002000040000001000c1388"),
        ("NaN", "00000000c0000000"),
    ];

    #[test]
    fn numeric_text_binary_round_trip() {
        for &(txt, bin) in NUMERIC_WIRE {
            let from_text = Numeric::decode(text(NUMERIC), txt.as_bytes()).unwrap();
            let from_binary = Numeric::decode(binary(NUMERIC), &hex(bin)).unwrap();
            assert_eq!(from_text, from_binary, "{txt}");
            assert_eq!(from_text.encode(Format::Binary).unwrap(), hex(bin), "{txt}");
            assert_eq!(
                from_binary.encode(Format::Text).unwrap(),
                txt.as_bytes(),
                "{bin}"
            );
        }
        // Infinities are sent with a nonzero dscale by Postgres; the value is what matters.
        for (txt, bin) in [
            ("Infinity", "00000000d0000020"),
            ("-Infinity", "00000000f0000020"),
        ] {
            let n = Numeric::decode(binary(NUMERIC), &hex(bin)).unwrap();
            assert_eq!(n.encode(Format::Text).unwrap(), txt.as_bytes());
            let t = Numeric::decode(text(NUMERIC), txt.as_bytes()).unwrap();
            assert_eq!(n, t);
        }
        // numeric_recv drops digits hidden by dscale: 1.2345 with dscale 2 is 1.23.
        let hidden = hex("000200000000000200010929");
        let n = Numeric::decode(binary(NUMERIC), &hidden).unwrap();
        assert_eq!(n.encode(Format::Text).unwrap(), b"1.23");
    }

    #[test]
    fn sum_int8() {
        let mut s = Sum::new(text(INT8)).unwrap();
        assert_eq!(s.finish(), Ok(None));
        for v in ["40", "-2", "9223372036854775000"] {
            s.add(v.as_bytes()).unwrap();
        }
        assert_eq!(s.finish(), Ok(Some(b"9223372036854775038".to_vec())));

        let mut s = Sum::new(binary(INT8)).unwrap();
        s.add(&i64::MAX.to_be_bytes()).unwrap();
        s.add(&1i64.to_be_bytes()).unwrap();
        let err = s.finish().unwrap_err();
        assert!(err.to_string().contains("bigint out of range"), "{err}");
        // Back in range by the end is fine: only the total must fit.
        s.add(&(-10i64).to_be_bytes()).unwrap();
        assert_eq!(s.finish(), Ok(Some((i64::MAX - 9).to_be_bytes().to_vec())));
    }

    #[test]
    fn sum_numeric_is_exact() {
        let cases: &[(&[&str], Option<&str>)] = &[
            (&[], None),
            (
                &["12345678901234567890.123", "0.0000001", "-1"],
                Some("12345678901234567889.1230001"),
            ),
            (&["1.50", "-1.5"], Some("0.00")),
            (&["-0.001", "0.0005"], Some("-0.0005")),
            (&["9999.9999", "0.0001"], Some("10000.0000")),
            (
                &["99999999999999999999999999999999999999999", "1"],
                Some("100000000000000000000000000000000000000000"),
            ),
            (&["1", "NaN", "2"], Some("NaN")),
            (&["1", "Infinity"], Some("Infinity")),
            (&["-Infinity", "1"], Some("-Infinity")),
            (&["Infinity", "-Infinity"], Some("NaN")),
        ];
        for &(inputs, want) in cases {
            let mut t = Sum::new(text(NUMERIC)).unwrap();
            let mut b = Sum::new(binary(NUMERIC)).unwrap();
            for v in inputs {
                t.add(v.as_bytes()).unwrap();
                let n = Numeric::decode(text(NUMERIC), v.as_bytes()).unwrap();
                b.add(&n.encode(Format::Binary).unwrap()).unwrap();
            }
            let got = t.finish().unwrap();
            assert_eq!(got.as_deref(), want.map(str::as_bytes), "{inputs:?}");
            let got_b = b.finish().unwrap().map(|v| {
                Numeric::decode(binary(NUMERIC), &v)
                    .unwrap()
                    .encode(Format::Text)
                    .unwrap()
            });
            assert_eq!(got_b.as_deref(), want.map(str::as_bytes), "{inputs:?}");
        }
        // A zero total keeps dscale 2, as numeric_send of sum(1.50, -1.5) shows.
        let mut b2 = Sum::new(binary(NUMERIC)).unwrap();
        b2.add(
            &Numeric::decode(text(NUMERIC), b"1.50")
                .unwrap()
                .encode(Format::Binary)
                .unwrap(),
        )
        .unwrap();
        b2.add(&hex("0002000040000001000c1388")[..]).unwrap(); // -12.5
        b2.add(
            &Numeric::decode(text(NUMERIC), b"11.0")
                .unwrap()
                .encode(Format::Binary)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(b2.finish(), Ok(Some(hex("0000000000000002"))));
    }

    #[test]
    fn sum_floats() {
        let mut s = Sum::new(text(FLOAT8)).unwrap();
        s.add(b"0.1").unwrap();
        s.add(b"0.2").unwrap();
        assert_eq!(s.finish(), Ok(Some(b"0.30000000000000004".to_vec())));

        let mut s = Sum::new(binary(FLOAT8)).unwrap();
        s.add(&1.7976931348623157e308f64.to_be_bytes()).unwrap();
        let err = s.add(&1.7976931348623157e308f64.to_be_bytes()).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");

        let mut s = Sum::new(text(FLOAT4)).unwrap();
        s.add(b"1.5").unwrap();
        s.add(b"2.25").unwrap();
        assert_eq!(s.finish(), Ok(Some(b"3.75".to_vec())));
        s.add(b"Infinity").unwrap();
        s.add(b"-Infinity").unwrap();
        assert_eq!(s.finish(), Ok(Some(b"NaN".to_vec())));

        let mut s = Sum::new(binary(FLOAT4)).unwrap();
        s.add(&3.4e38f32.to_be_bytes()).unwrap();
        assert!(s.add(&3.4e38f32.to_be_bytes()).is_err());
        assert_eq!(s.finish(), Ok(Some(3.4e38f32.to_be_bytes().to_vec())));
    }

    #[test]
    fn sum_rejects_other_types() {
        for oid in [INT2, INT4, TEXT, 1186] {
            let err = Sum::new(text(oid)).unwrap_err();
            assert!(matches!(&err, Error::Unsupported(m) if m.contains(&oid.to_string())));
        }
    }

    #[test]
    fn avg_matches_postgres() {
        // Expected values are avg() outputs from Postgres 15 over the same rows.
        let cases: &[(u32, &str, i64, &str)] = &[
            (INT8, "3", 2, "1.5000000000000000"),
            (INT8, "100", 4, "25.0000000000000000"),
            (INT8, "5", 3, "1.6666666666666667"),
            (INT8, "-5", 3, "-1.6666666666666667"),
            (INT8, "-7", 3, "-2.3333333333333333"),
            (INT8, "0", 2, "0.00000000000000000000"),
            (NUMERIC, "3.75", 2, "1.8750000000000000"),
            (NUMERIC, "123456789013.5", 2, "61728394506.75000000"),
            (NUMERIC, "0.00012", 3, "0.000040000000000000000000"),
            (
                NUMERIC,
                "1",
                3_000_000_000,
                "0.0000000003333333333333333333",
            ),
            (NUMERIC, "99999", 7, "14285.571428571429"),
            (NUMERIC, "Infinity", 2, "Infinity"),
            (NUMERIC, "NaN", 2, "NaN"),
            (FLOAT8, "3.75", 2, "1.875"),
            (FLOAT4, "3.75", 2, "1.875"),
            (FLOAT8, "1", 3, "0.3333333333333333"),
        ];
        for &(oid, sum, count, want) in cases {
            let got = avg(text(oid), sum.as_bytes(), count, Format::Text).unwrap();
            assert_eq!(got.as_deref(), Some(want.as_bytes()), "{sum} / {count}");
        }
        assert_eq!(avg(text(INT8), b"3", 0, Format::Text), Ok(None));
        assert!(avg(text(INT8), b"3", -1, Format::Text).is_err());
        assert!(avg(text(TEXT), b"3", 1, Format::Text).is_err());
    }

    #[test]
    fn avg_binary() {
        // numeric_send(1.5000000000000000) from Postgres 15.
        let got = avg(binary(INT8), &3i64.to_be_bytes(), 2, Format::Binary).unwrap();
        assert_eq!(got, Some(hex("000200000000001000011388")));
        let decoded = Numeric::decode(binary(NUMERIC), &got.unwrap()).unwrap();
        assert_eq!(decoded.encode(Format::Text).unwrap(), b"1.5000000000000000");

        let sum = Numeric::decode(text(NUMERIC), b"3.75")
            .unwrap()
            .encode(Format::Binary)
            .unwrap();
        let got = avg(binary(NUMERIC), &sum, 2, Format::Text).unwrap();
        assert_eq!(got.as_deref(), Some(&b"1.8750000000000000"[..]));

        let got = avg(binary(FLOAT8), &3.0f64.to_be_bytes(), 2, Format::Binary).unwrap();
        assert_eq!(got, Some(1.5f64.to_be_bytes().to_vec()));
    }

    #[test]
    fn avg_type_by_sum_type() {
        assert_eq!(avg_type(INT8), Ok(NUMERIC));
        assert_eq!(avg_type(NUMERIC), Ok(NUMERIC));
        assert_eq!(avg_type(FLOAT4), Ok(FLOAT8));
        assert_eq!(avg_type(FLOAT8), Ok(FLOAT8));
        assert!(matches!(avg_type(1186), Err(Error::Unsupported(m)) if m.contains("1186")));
    }

    #[test]
    fn float_text_matches_postgres() {
        // float8out / float4out outputs from Postgres 15 (extra_float_digits = 1).
        let f8: &[(f64, &str)] = &[
            (1e15, "1e+15"),
            (1e16, "1e+16"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (123456789012345.6, "123456789012345.6"),
            (-0.0, "-0"),
            (0.0, "0"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
            (f64::INFINITY, "Infinity"),
            (1e20, "1e+20"),
            (-12345000000000000.0, "-1.2345e+16"),
            (1.5e-5, "1.5e-05"),
            (1e100, "1e+100"),
            (1e-100, "1e-100"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (0.1 + 0.2, "0.30000000000000004"),
            (100.0, "100"),
            // Midpoints are excluded: not the shorter -6.865968175263682e+16.
            (-68659681752636816.0, "-6.8659681752636816e+16"),
            // Exact ties on the last digit go to even.
            (181705388398854.62, "181705388398854.62"),
            (2277415065412.5312, "2277415065412.5312"),
            (9007199254740993.0, "9.007199254740992e+15"),
            (2.2250738585072014e-308, "2.2250738585072014e-308"),
            (1e-310, "1e-310"),
        ];
        for &(v, want) in f8 {
            assert_eq!(float8_text(v), want, "{v:e}");
            assert_eq!(encode_float8(v, Format::Text), want.as_bytes());
        }
        // Inputs as text: some have more digits than an f32 literal should carry.
        let f4: &[(&str, &str)] = &[
            ("1.5", "1.5"),
            ("100", "100"),
            ("100000", "100000"),
            ("1e6", "1e+06"),
            ("123456", "123456"),
            ("1234567", "1.234567e+06"),
            ("0.0001", "0.0001"),
            ("0.00001", "1e-05"),
            ("0.1", "0.1"),
            ("3.4e38", "3.4e+38"),
            ("1e-45", "1e-45"),
            // An exact tie on the last digit goes to even (Rust's formatter prints ...13).
            ("4104751.25", "4.1047512e+06"),
            // Midpoints are excluded (Rust's formatter and the ryu crate print 2.912708e+08).
            ("2.9127078e8", "2.9127078e+08"),
            ("1.21636864e8", "1.21636864e+08"),
            ("1e-40", "1e-40"),
            ("1.4e-45", "1e-45"),
            ("16777217", "1.6777216e+07"),
            ("8388608.5", "8.388608e+06"),
        ];
        for &(input, want) in f4 {
            let v: f32 = input.parse().unwrap();
            assert_eq!(float4_text(v), want, "{v:e}");
        }
    }

    #[test]
    fn counts_and_bools() {
        assert_eq!(decode_count(text(INT8), b"42"), Ok(42));
        assert_eq!(decode_count(binary(INT8), &7i64.to_be_bytes()), Ok(7));
        assert_eq!(
            decode_count(text(INT8), b"9223372036854775807"),
            Ok(i64::MAX)
        );
        assert!(matches!(
            decode_count(text(INT8), b"1.5"),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            decode_count(text(NUMERIC), b"1"),
            Err(Error::Unsupported(_))
        ));
        for v in [0, -1, i64::MIN, i64::MAX] {
            for format in [Format::Text, Format::Binary] {
                let encoded = encode_int8(v, format);
                assert_eq!(
                    decode_count(ColumnType { oid: INT8, format }, &encoded),
                    Ok(v)
                );
            }
        }
        assert_eq!(encode_int8(-12, Format::Text), b"-12");

        for v in [true, false] {
            for format in [Format::Text, Format::Binary] {
                let encoded = encode_bool(v, format);
                assert_eq!(
                    decode_bool(ColumnType { oid: BOOL, format }, &encoded),
                    Ok(v)
                );
            }
        }
        assert_eq!(encode_bool(true, Format::Text), b"t");
        assert_eq!(encode_bool(false, Format::Binary), [0]);
        assert_eq!(decode_bool(binary(BOOL), &[2]), Ok(true));
        assert!(matches!(
            decode_bool(text(INT4), b"t"),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            decode_bool(binary(BOOL), &[]),
            Err(Error::Malformed(_))
        ));
    }
}
