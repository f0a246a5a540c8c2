//! A small SQL lexer: splits a query string into statements and reads leading keywords, cheaply
//! and without the full parser. Knows Postgres quoting: '..', E'..', "..", $tag$..$tag$,
//! -- and nested /* */ comments.

/// Splits `sql` at top-level semicolons. Empty statements (only whitespace/comments) are dropped.
/// Each returned slice excludes the semicolon.
pub fn statements(sql: &str) -> Vec<&str> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b';' => {
                push_nonempty(&mut out, &sql[start..i]);
                start = i + 1;
                i += 1;
            }
            _ => i = skip_token(bytes, i),
        }
    }
    push_nonempty(&mut out, &sql[start..]);
    out
}

fn push_nonempty<'a>(out: &mut Vec<&'a str>, stmt: &'a str) {
    if first_word_at(stmt.as_bytes(), 0).is_some() {
        out.push(stmt);
    }
}

/// Advances past one lexical unit starting at `i` (a quoted string, comment, or one byte).
fn skip_token(b: &[u8], i: usize) -> usize {
    match b[i] {
        b'\'' => skip_quoted(b, i, b'\''),
        b'"' => skip_quoted(b, i, b'"'),
        b'-' if b.get(i + 1) == Some(&b'-') => b[i..]
            .iter()
            .position(|&c| c == b'\n')
            .map_or(b.len(), |p| i + p + 1),
        b'/' if b.get(i + 1) == Some(&b'*') => skip_block_comment(b, i),
        b'$' => skip_dollar(b, i),
        _ => i + 1,
    }
}

fn skip_quoted(b: &[u8], i: usize, q: u8) -> usize {
    // E'..' strings allow backslash escapes; a plain '' doubles the quote. Treating backslash as
    // an escape only after E is what standard_conforming_strings=on (the default) means.
    let escapes =
        q == b'\'' && i > 0 && matches!(b[i - 1], b'e' | b'E') && (i < 2 || !is_ident(b[i - 2]));
    let mut j = i + 1;
    while j < b.len() {
        if escapes && b[j] == b'\\' {
            j += 2;
            continue;
        }
        if b[j] == q {
            if b.get(j + 1) == Some(&q) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    b.len()
}

fn skip_block_comment(b: &[u8], i: usize) -> usize {
    let mut depth = 0;
    let mut j = i;
    while j + 1 < b.len() {
        if b[j] == b'/' && b[j + 1] == b'*' {
            depth += 1;
            j += 2;
        } else if b[j] == b'*' && b[j + 1] == b'/' {
            depth -= 1;
            j += 2;
            if depth == 0 {
                return j;
            }
        } else {
            j += 1;
        }
    }
    b.len()
}

fn skip_dollar(b: &[u8], i: usize) -> usize {
    // $n is a parameter, $tag$ or $$ opens a dollar-quoted string.
    if i > 0 && is_ident(b[i - 1]) {
        return i + 1;
    }
    let mut j = i + 1;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
        if j == i + 1 && b[j].is_ascii_digit() {
            return i + 1;
        }
        j += 1;
    }
    if b.get(j) != Some(&b'$') {
        return i + 1;
    }
    let tag = &b[i..=j];
    let body = j + 1;
    b[body..]
        .windows(tag.len())
        .position(|w| w == tag)
        .map_or(b.len(), |p| body + p + tag.len())
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// The first word at or after `i`, skipping whitespace and comments: (start, end).
fn first_word_at(b: &[u8], mut i: usize) -> Option<(usize, usize)> {
    loop {
        // Postgres' whitespace: vertical tab too (PostgreSQL 16 accepts it).
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b'\x0b') {
            i += 1;
        }
        if i >= b.len() {
            return None;
        }
        if (b[i] == b'-' && b.get(i + 1) == Some(&b'-'))
            || (b[i] == b'/' && b.get(i + 1) == Some(&b'*'))
        {
            i = skip_token(b, i);
            continue;
        }
        let start = i;
        if is_ident(b[i]) {
            while i < b.len() && (is_ident(b[i]) || b[i] == b'$') {
                i += 1;
            }
        } else {
            i = skip_token(b, i);
        }
        return Some((start, i));
    }
}

/// Iterates over the tokens of a statement (words, quoted strings, single punctuation),
/// skipping whitespace and comments.
pub struct Tokens<'a> {
    sql: &'a str,
    pos: usize,
}

impl<'a> Tokens<'a> {
    pub fn new(sql: &'a str) -> Self {
        Tokens { sql, pos: 0 }
    }

    /// The unread remainder of the statement, trimmed.
    pub fn rest(&self) -> &'a str {
        self.sql[self.pos..].trim()
    }
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let (start, end) = first_word_at(self.sql.as_bytes(), self.pos)?;
        self.pos = end;
        Some(&self.sql[start..end])
    }
}

/// Replaces the constants of a simple-protocol query with `$1..$n` so statements that differ
/// only in their constants share one analysis (`WHERE id = 5` and `WHERE id = 6`). Returns the
/// normalized text and the constants (string contents unescaped), or `None` when the query
/// already has `$` (parameters, dollar quotes) and is left as it is.
///
/// Only constants in value positions are replaced (after `(`, `,`, an operator, or at the start
/// of a statement), so typed literals (`DATE '...'`), LIMIT counts and identifiers stay put.
pub fn normalize(sql: &str) -> Option<(String, Vec<String>)> {
    let b = sql.as_bytes();
    if b.contains(&b'$') {
        return None;
    }
    if !b.contains(&b'\'') && !b.iter().any(u8::is_ascii_digit) {
        return Some((sql.to_string(), Vec::new()));
    }
    let mut out = String::with_capacity(sql.len());
    let mut literals = Vec::new();
    let mut i = 0;
    let mut copied = 0;
    // The last significant byte before `i` (not whitespace, not inside a comment).
    let mut prev: u8 = b'(';
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        match c {
            b'$' => return None,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = skip_token(b, i);
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = skip_token(b, i);
                continue;
            }
            b'"' => {
                i = skip_quoted(b, i, b'"');
                prev = b'"';
                continue;
            }
            b'\'' => {
                let end = skip_quoted(b, i, b'\'');
                let escapes = i > 0
                    && matches!(
                        b[i - 1],
                        b'e' | b'E' | b'b' | b'B' | b'x' | b'X' | b'n' | b'N' | b'&'
                    );
                if value_position(prev)
                    && !escapes
                    && end <= b.len()
                    && end > i + 1
                    && b[end - 1] == b'\''
                {
                    let content = sql[i + 1..end - 1].replace("''", "'");
                    out.push_str(&sql[copied..i]);
                    literals.push(content);
                    out.push('$');
                    out.push_str(&literals.len().to_string());
                    copied = end;
                }
                i = end;
                prev = b'\'';
                continue;
            }
            b'0'..=b'9' | b'.' if c != b'.' || b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                let start = i;
                let mut j = i;
                while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.') {
                    j += 1;
                }
                if j < b.len() && matches!(b[j], b'e' | b'E') {
                    let mut k = j + 1;
                    if k < b.len() && matches!(b[k], b'+' | b'-') {
                        k += 1;
                    }
                    if k < b.len() && b[k].is_ascii_digit() {
                        while k < b.len() && b[k].is_ascii_digit() {
                            k += 1;
                        }
                        j = k;
                    }
                }
                let glued = j < b.len() && (b[j].is_ascii_alphabetic() || b[j] == b'_');
                // A minus in front of a number in value position belongs to the constant.
                let (from, before) = if prev == b'-' {
                    let minus = sql[..start].trim_end().len() - 1;
                    let before_minus = sql[..minus]
                        .trim_end()
                        .as_bytes()
                        .last()
                        .copied()
                        .unwrap_or(b'(');
                    if value_position(before_minus) && minus >= copied {
                        (minus, before_minus)
                    } else {
                        (start, prev)
                    }
                } else {
                    (start, prev)
                };
                if value_position(before) && !glued {
                    out.push_str(&sql[copied..from]);
                    literals.push(sql[from..j].split_whitespace().collect::<String>());
                    out.push('$');
                    out.push_str(&literals.len().to_string());
                    copied = j;
                }
                i = j;
                prev = b'0';
                continue;
            }
            _ if is_ident(c) => {
                while i < b.len() && (is_ident(b[i]) || b[i] == b'$') {
                    if b[i] == b'$' {
                        return None;
                    }
                    i += 1;
                }
                prev = b'a';
                continue;
            }
            _ => {
                prev = c;
                i += 1;
            }
        }
    }
    out.push_str(&sql[copied..]);
    Some((out, literals))
}

/// After these bytes a constant is a value, not part of a name or a typed literal.
fn value_position(prev: u8) -> bool {
    matches!(
        prev,
        b'(' | b',' | b'=' | b'<' | b'>' | b'+' | b'-' | b'*' | b'/' | b'|' | b'!' | b';'
    )
}

/// A query's leading word as the cheap first looks read it, and the text after it: the ASCII
/// letters past Postgres' whitespace. Empty when the text starts with anything else (a comment,
/// a parenthesis), which those looks treat on their own.
pub fn lead_word(sql: &[u8]) -> (&[u8], &[u8]) {
    let sql = skip_space(sql);
    let n = sql
        .iter()
        .position(|c| !c.is_ascii_alphabetic())
        .unwrap_or(sql.len());
    sql.split_at(n)
}

/// Whether `word`, ASCII letters as `lead_word` gives them, is the lowercase keyword `lower` in
/// any case: setting bit 5 lowercases a letter, so there is no case table to go through.
pub fn word_is(word: &[u8], lower: &[u8]) -> bool {
    debug_assert!(
        lower.iter().all(u8::is_ascii_lowercase),
        "a lowercase keyword"
    );
    word.len() == lower.len() && word.iter().zip(lower).all(|(a, b)| a | 0x20 == *b)
}

/// `sql` past its leading whitespace, as Postgres' scanner counts it (vertical tab included,
/// which PostgreSQL 16 accepts).
pub fn skip_space(sql: &[u8]) -> &[u8] {
    let n = sql
        .iter()
        .position(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c'))
        .unwrap_or(sql.len());
    &sql[n..]
}

/// The first keyword of a statement, lowercased (empty if there is none).
pub fn first_keyword(stmt: &str) -> String {
    Tokens::new(stmt)
        .next()
        .map(str::to_ascii_lowercase)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lead_word_reads_letters_past_whitespace() {
        assert_eq!(lead_word(b" \x0b\tSELECT 1"), (&b"SELECT"[..], &b" 1"[..]));
        assert_eq!(lead_word(b"set"), (&b"set"[..], &b""[..]));
        assert_eq!(lead_word(b"/* c */ SET"), (&b""[..], &b"/* c */ SET"[..]));
        assert_eq!(lead_word(b""), (&b""[..], &b""[..]));
        assert!(word_is(b"SeLeCt", b"select"));
        assert!(!word_is(b"selects", b"select"));
        assert!(!word_is(b"reset", b"set"));
        assert!(!word_is(b"", b"set"));
    }

    #[test]
    fn splits_outside_quotes_and_comments() {
        let sql = "SELECT ';' ; SELECT $$a;b$$; -- c;\n SELECT \"x;y\" /* ; /* ; */ */; ;";
        let stmts = statements(sql);
        assert_eq!(stmts.len(), 3, "{stmts:?}");
        assert_eq!(stmts[0].trim(), "SELECT ';'");
        assert!(stmts[2].contains("\"x;y\""));
        assert_eq!(statements("  ; -- only a comment").len(), 0);
        assert_eq!(statements("select E'a\\';b'; select 1").len(), 2);
        assert_eq!(statements("select $1; select $tag$ ; $tag$").len(), 2);
    }

    #[test]
    fn constants_are_normalized() {
        let (text, lits) =
            normalize("SELECT abalance FROM t WHERE aid = 12345;").expect("normalized");
        assert_eq!(text, "SELECT abalance FROM t WHERE aid = $1;");
        assert_eq!(lits, vec!["12345"]);
        let (text, lits) =
            normalize("INSERT INTO t (a, b) VALUES (-5, 'it''s'), (2.5e3, 'x')").expect("n");
        assert_eq!(text, "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)");
        assert_eq!(lits, vec!["-5", "it's", "2.5e3", "x"]);
        let (text, lits) =
            normalize("SELECT * FROM t1 WHERE d = DATE '2020-01-01' AND x = E'a\\'b' LIMIT 10")
                .expect("n");
        assert_eq!(
            text,
            "SELECT * FROM t1 WHERE d = DATE '2020-01-01' AND x = E'a\\'b' LIMIT 10"
        );
        assert!(lits.is_empty());
        let (text, _) =
            normalize("SELECT a-1, b - 2 FROM t -- 5\n WHERE c = 'q' /* 'z' */").expect("n");
        assert_eq!(
            text,
            "SELECT a-$1, b - $2 FROM t -- 5\n WHERE c = $3 /* 'z' */"
        );
        assert_eq!(normalize("SELECT $1"), None);
        assert_eq!(normalize("SELECT $$x$$"), None);
    }

    #[test]
    fn tokens_skip_comments() {
        let words: Vec<_> = Tokens::new("/* hi */ SET -- x\n search_path TO 'a b'").collect();
        assert_eq!(words, vec!["SET", "search_path", "TO", "'a b'"]);
        assert_eq!(first_keyword("  -- c\n begin"), "begin");
        assert_eq!(first_keyword(""), "");
    }
}
