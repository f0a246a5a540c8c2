//! Bind parameter values, decoded just enough to find shard keys: text or binary format, typed
//! by the statement's parameter OIDs (int2/int4/int8/text/varchar/uuid and arrays of them).

use super::canonical_key;
use super::hash::ShardKey;

const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const TEXT: u32 = 25;
const NAME: u32 = 19;
const BPCHAR: u32 = 1042;
const VARCHAR: u32 = 1043;
const UUID: u32 = 2950;

/// One decoded key: `Some(None)` is a NULL, `None` means the value cannot be decoded.
pub type Decoded = Option<Option<ShardKey>>;

/// The parameters of one Bind.
#[derive(Debug, Default)]
pub struct Params<'a> {
    formats: Vec<i16>,
    values: Vec<Option<&'a [u8]>>,
    types: &'a [u32],
}

impl<'a> Params<'a> {
    /// No parameters (simple queries).
    pub fn none() -> Params<'static> {
        Params::default()
    }

    /// The constants of a normalized simple query, as text-format values `$1..$n`.
    pub fn from_literals(literals: &'a [String]) -> Params<'a> {
        Params {
            formats: Vec::new(),
            values: literals.iter().map(|l| Some(l.as_bytes())).collect(),
            types: &[],
        }
    }

    /// Reads the part of a Bind after the portal and statement names.
    ///
    /// # Errors
    /// A malformed Bind.
    pub fn from_bind(
        rest: &'a [u8],
        types: &'a [u32],
    ) -> Result<Params<'a>, crate::protocol::Error> {
        let bad = crate::protocol::Error::Malformed("Bind");
        let mut at = 0usize;
        let i16_at = |at: &mut usize| -> Result<i16, crate::protocol::Error> {
            let b = rest
                .get(*at..*at + 2)
                .ok_or(crate::protocol::Error::Malformed("Bind"))?;
            *at += 2;
            Ok(i16::from_be_bytes([b[0], b[1]]))
        };
        let nformats = i16_at(&mut at)?;
        if nformats < 0 {
            return Err(bad);
        }
        let mut formats = Vec::with_capacity(nformats as usize);
        for _ in 0..nformats {
            formats.push(i16_at(&mut at)?);
        }
        let nvalues = i16_at(&mut at)?;
        if nvalues < 0 {
            return Err(bad);
        }
        let mut values = Vec::with_capacity(nvalues as usize);
        for _ in 0..nvalues {
            let b = rest
                .get(at..at + 4)
                .ok_or(crate::protocol::Error::Malformed("Bind"))?;
            at += 4;
            let len = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            if len < 0 {
                values.push(None);
            } else {
                let v = rest
                    .get(at..at + len as usize)
                    .ok_or(crate::protocol::Error::Malformed("Bind"))?;
                at += len as usize;
                values.push(Some(v));
            }
        }
        Ok(Params {
            formats,
            values,
            types,
        })
    }

    fn format(&self, i: usize) -> i16 {
        match self.formats.as_slice() {
            [] => 0,
            [one] => *one,
            many => many.get(i).copied().unwrap_or(0),
        }
    }

    fn value(&self, n: usize) -> Option<(Option<&'a [u8]>, i16, u32)> {
        let i = n.checked_sub(1)?;
        let value = *self.values.get(i)?;
        Some((
            value,
            self.format(i),
            self.types.get(i).copied().unwrap_or(0),
        ))
    }

    /// The key in parameter `$n`.
    pub fn key(&self, n: usize) -> Decoded {
        let (value, format, oid) = self.value(n)?;
        let Some(bytes) = value else {
            return Some(None);
        };
        decode(bytes, format, oid).map(Some)
    }

    /// The keys in array parameter `$n` (for `key = ANY($n)`).
    pub fn array_keys(&self, n: usize) -> Option<Vec<Decoded>> {
        let (value, format, _) = self.value(n)?;
        let Some(bytes) = value else {
            return Some(Vec::new());
        };
        if format == 0 {
            text_array(std::str::from_utf8(bytes).ok()?)
        } else {
            binary_array(bytes)
        }
    }
}

fn decode(bytes: &[u8], format: i16, oid: u32) -> Option<ShardKey> {
    if format == 0 {
        return Some(canonical_key(std::str::from_utf8(bytes).ok()?));
    }
    match (oid, bytes.len()) {
        (INT8, 8) => Some(ShardKey::Int(i64::from_be_bytes(bytes.try_into().ok()?))),
        (INT4, 4) => Some(ShardKey::Int(
            i32::from_be_bytes(bytes.try_into().ok()?) as i64
        )),
        (INT2, 2) => Some(ShardKey::Int(
            i16::from_be_bytes(bytes.try_into().ok()?) as i64
        )),
        (UUID, 16) => Some(ShardKey::Uuid(bytes.try_into().ok()?)),
        (TEXT | VARCHAR | BPCHAR | NAME, _) => {
            Some(canonical_key(std::str::from_utf8(bytes).ok()?))
        }
        _ => None,
    }
}

/// `{1,2,"x y",NULL}`: one dimension, elements optionally double-quoted.
fn text_array(text: &str) -> Option<Vec<Decoded>> {
    let inner = text.trim().strip_prefix('{')?.strip_suffix('}')?;
    if inner.trim().is_empty() {
        return Some(Vec::new());
    }
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut item = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            loop {
                match chars.next()? {
                    '\\' => item.push(chars.next()?),
                    '"' => break,
                    c => item.push(c),
                }
            }
        }
        while let Some(&c) = chars.peek() {
            if c == ',' {
                break;
            }
            if c == '{' {
                return None; // nested arrays are not keys
            }
            if !quoted {
                item.push(c);
            }
            chars.next();
        }
        let item_trim = item.trim();
        if !quoted && item_trim.eq_ignore_ascii_case("null") {
            out.push(Some(None));
        } else {
            out.push(Some(Some(canonical_key(if quoted {
                &item
            } else {
                item_trim
            }))));
        }
        if chars.next().is_none() {
            return Some(out);
        }
    }
}

/// The binary array format: ndim, has-null flag, element OID, dimensions, elements.
fn binary_array(b: &[u8]) -> Option<Vec<Decoded>> {
    let i32_at = |at: usize| -> Option<i32> {
        Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let ndim = i32_at(0)?;
    let elem = i32_at(8)? as u32;
    if ndim == 0 {
        return Some(Vec::new());
    }
    if ndim != 1 {
        return None;
    }
    let count = i32_at(12)?;
    let mut at = 20;
    let mut out = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count {
        let len = i32_at(at)?;
        at += 4;
        if len < 0 {
            out.push(Some(None));
            continue;
        }
        let bytes = b.get(at..at + len as usize)?;
        at += len as usize;
        out.push(decode(bytes, 1, elem).map(Some));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(formats: &[i16], values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
        for f in formats {
            b.extend_from_slice(&f.to_be_bytes());
        }
        b.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        b
    }

    #[test]
    fn text_and_binary_forms_agree() {
        let five8 = 5i64.to_be_bytes();
        let five4 = 5i32.to_be_bytes();
        let five2 = 5i16.to_be_bytes();
        let raw = bind(
            &[0, 1, 1, 1],
            &[Some(b"5"), Some(&five8), Some(&five4), Some(&five2)],
        );
        let types = [0, INT8, INT4, INT2];
        let p = Params::from_bind(&raw, &types).expect("bind");
        for n in 1..=4 {
            assert_eq!(p.key(n), Some(Some(ShardKey::Int(5))), "param {n}");
        }
        let raw = bind(&[1], &[None]);
        let p = Params::from_bind(&raw, &[INT8]).expect("bind");
        assert_eq!(p.key(1), Some(None));
        assert_eq!(p.key(2), None);
        let raw = bind(&[1], &[Some(b"\x01\x02\x03")]);
        assert_eq!(
            Params::from_bind(&raw, &[0]).expect("bind").key(1),
            None,
            "unknown binary type"
        );
        assert!(Params::from_bind(&[0, 1], &[]).is_err());
    }

    #[test]
    fn arrays() {
        assert_eq!(
            text_array("{1, 2,NULL,\"x,y\"}"),
            Some(vec![
                Some(Some(ShardKey::Int(1))),
                Some(Some(ShardKey::Int(2))),
                Some(None),
                Some(Some(ShardKey::Text("x,y".into())))
            ])
        );
        assert_eq!(text_array("{}"), Some(vec![]));
        let mut bin = Vec::new();
        for v in [1i32, 0, INT8 as i32, 2, 1] {
            bin.extend_from_slice(&v.to_be_bytes());
        }
        for k in [7i64, 9] {
            bin.extend_from_slice(&8i32.to_be_bytes());
            bin.extend_from_slice(&k.to_be_bytes());
        }
        assert_eq!(
            binary_array(&bin),
            Some(vec![
                Some(Some(ShardKey::Int(7))),
                Some(Some(ShardKey::Int(9)))
            ])
        );
    }
}
