//! What the proxy answers itself in a session: `SELECT tessera_next_id()`.

use super::*;

/// Whether a batch is about `tessera_next_id()`, which the proxy answers itself.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Local {
    None,
    All,
    Mixed,
}

/// If `sql` is `SELECT tessera_next_id() [AS name]`, the column name it returns.
pub(super) fn next_id_call(sql: &[u8]) -> Option<String> {
    // Every query comes through here: the start of the one shape answered rules the others out
    // before any scan or UTF-8 check.
    let (word, rest) = lex::lead_word(sql);
    let called = sql.len() <= 128
        && lex::word_is(word, b"select")
        && lex::skip_space(rest)
            .get(..15)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"tessera_next_id"));
    if !called {
        return None;
    }
    let sql = std::str::from_utf8(sql).ok()?;
    let text = sql.trim().trim_end_matches(';').trim().to_ascii_lowercase();
    let words: Vec<&str> = text.split_whitespace().collect();
    let call = |w: &str| w == "tessera_next_id()";
    match words.as_slice() {
        ["select", f] if call(f) => Some("tessera_next_id".into()),
        ["select", f, "as", name] | ["select", f, name]
            if call(f) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            Some((*name).to_string())
        }
        _ => None,
    }
}

/// Whether a Parse (a whole message) is of a `DEALLOCATE`: a look at the start of its text
/// only, past the statement's name.
fn parse_deallocates(parse: &[u8]) -> bool {
    let body = parse.get(5..).unwrap_or_default();
    let Some(name_end) = memchr::memchr(0, body) else {
        return false;
    };
    let text = lex::skip_space(&body[name_end + 1..]);
    text.get(..10)
        .is_some_and(|w| w.eq_ignore_ascii_case(b"deallocate"))
        && !text.get(10).is_some_and(u8::is_ascii_alphanumeric)
}

pub(super) fn mentions_next_id(text: &[u8]) -> bool {
    const NAME: &[u8] = b"tessera_next_id";
    // Every query is scanned, so the scan is anchored on the name's rarest letter, the `x` at
    // offset 10, which SIMD finds (or rules out) several bytes at a time.
    const X: usize = 10;
    memchr::memchr2_iter(b'x', b'X', text).any(|i| {
        i >= X
            && text
                .get(i - X..i - X + NAME.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(NAME))
    })
}

/// The RowDescription of `SELECT tessera_next_id()`: one bigint column.
pub(super) fn next_id_description(out: &mut BytesMut, column: &str, format: i16) {
    build::message(out, tag::ROW_DESCRIPTION, |b| {
        b.put_i16(1);
        build::cstr(b, column.as_bytes());
        b.put_u32(0);
        b.put_i16(0);
        b.put_u32(20);
        b.put_i16(8);
        b.put_i32(-1);
        b.put_i16(format);
    });
}

pub(super) fn next_id_row(out: &mut BytesMut, id: i64, format: i16) {
    let value = if format == 1 {
        id.to_be_bytes().to_vec()
    } else {
        id.to_string().into_bytes()
    };
    build::message(out, tag::DATA_ROW, |b| {
        b.put_i16(1);
        b.put_i32(value.len() as i32);
        b.put_slice(&value);
    });
}

impl Session {
    /// Whether the proxy might answer this Parse (a whole message) itself: its text mentions
    /// `tessera_next_id`, or is a `DEALLOCATE`. The unnamed statement the session already sent
    /// to a server with the same bytes is known not to be (drivers send it again and again), so
    /// it is not scanned.
    pub(super) fn may_answer(&self, parse: &[u8]) -> bool {
        let known = self
            .unnamed
            .as_ref()
            .is_some_and(|u| !u.local && u.parse[..] == parse[..]);
        !known && (mentions_next_id(parse.get(5..).unwrap_or_default()) || parse_deallocates(parse))
    }

    /// A batch that is one `DEALLOCATE` (Parse, Bind, maybe Describe, Execute, Sync), and the
    /// SQL of it. Statements prepared through the protocol live on the servers under the
    /// proxy's names, so the proxy answers such a DEALLOCATE itself, as in a simple Query.
    pub(super) fn deallocate_batch(&self, batch: &[Frame]) -> Option<String> {
        let first = batch.first()?;
        // Every batch with a Parse comes through here: one look at the leading word first.
        if first.tag() != tag::PARSE || !parse_deallocates(first.bytes()) {
            return None;
        }
        one_statement(batch)?;
        let parse = decode::parse(first.body()).ok()?;
        Some(String::from_utf8_lossy(parse.query).into_owned())
    }

    /// Whether the client has statements or portals the proxy answers itself.
    pub(super) fn holds_local(&self) -> bool {
        !self.local_statements.is_empty() || !self.local_portals.is_empty()
    }

    /// The batch only prepares, binds, describes and runs `SELECT tessera_next_id()`: the
    /// proxy answers it without a server.
    pub(super) fn answers_locally(&self, batch: &[Frame]) -> Local {
        // The common case costs one scan of each Parse for the function's name.
        if !self.holds_local()
            && !batch
                .iter()
                .any(|f| f.tag() == tag::PARSE && self.may_answer(f.bytes()))
        {
            return Local::None;
        }
        let mut statements: HashMap<&[u8], bool> = HashMap::new();
        let mut portals: HashMap<&[u8], bool> = HashMap::new();
        let (mut any, mut other) = (false, false);
        let statement_local = |name: &[u8], seen: &HashMap<&[u8], bool>| {
            seen.get(name)
                .copied()
                .unwrap_or_else(|| self.local_statements.contains_key(name))
        };
        for frame in batch {
            let body = frame.body();
            let local = match frame.tag() {
                tag::PARSE => match decode::parse(body) {
                    Ok(p) => {
                        let local = next_id_call(p.query).is_some();
                        statements.insert(p.name, local);
                        local
                    }
                    Err(_) => false,
                },
                tag::BIND => match decode::bind(body) {
                    Ok(b) => {
                        let local = statement_local(b.statement, &statements);
                        portals.insert(b.portal, local);
                        local
                    }
                    Err(_) => false,
                },
                tag::DESCRIBE | tag::CLOSE => match decode::target(body, "Describe") {
                    Ok((b'S', name)) => statement_local(name, &statements),
                    Ok((_, name)) => portals
                        .get(name)
                        .copied()
                        .unwrap_or_else(|| self.local_portals.contains_key(name)),
                    Err(_) => false,
                },
                tag::EXECUTE => match decode::cstr(body, "Execute") {
                    Ok((name, _)) => portals
                        .get(name)
                        .copied()
                        .unwrap_or_else(|| self.local_portals.contains_key(name)),
                    Err(_) => false,
                },
                _ => continue,
            };
            any |= local;
            other |= !local;
        }
        match (any, other) {
            (true, false) => Local::All,
            (true, true) => Local::Mixed,
            _ => Local::None,
        }
    }

    /// Answers a batch [`Session::answers_locally`] accepted, message by message.
    pub(super) async fn run_local_batch(&mut self, batch: Vec<Frame>) -> Result<(), End> {
        self.settle().await?;
        if batch.iter().any(|f| f.tag() == tag::SYNC) {
            self.end_implicit_all().await?;
        }
        for frame in batch {
            let body = frame.body();
            match frame.tag() {
                tag::PARSE => {
                    let p = decode::parse(body).map_err(|e| self.client_error(e))?;
                    let column =
                        next_id_call(p.query).expect("invariant: checked by answers_locally");
                    self.local_statements
                        .insert(Bytes::copy_from_slice(p.name), column);
                    build::parse_complete(&mut self.out);
                }
                tag::BIND => {
                    let b = decode::bind(body).map_err(|e| self.client_error(e))?;
                    let (_, formats) =
                        decode::bind_result_formats(b.rest).map_err(|e| self.client_error(e))?;
                    let column = self
                        .local_statements
                        .get(b.statement)
                        .cloned()
                        .unwrap_or_default();
                    let portal = LocalPortal {
                        column,
                        format: formats.first().copied().unwrap_or(0),
                        depth: self.tx.as_ref().map_or(0, |tx| tx.savepoints.len()),
                    };
                    self.local_portals
                        .insert(Bytes::copy_from_slice(b.portal), portal);
                    build::message(&mut self.out, b'2', |_| {});
                }
                tag::DESCRIBE => {
                    let (kind, name) =
                        decode::target(body, "Describe").map_err(|e| self.client_error(e))?;
                    if kind == b'S' {
                        let column = self.local_statements.get(name).cloned().unwrap_or_default();
                        build::message(&mut self.out, b't', |b| b.put_i16(0));
                        next_id_description(&mut self.out, &column, 0);
                    } else {
                        let portal = self.local_portals.get(name).cloned().unwrap_or_default();
                        next_id_description(&mut self.out, &portal.column, portal.format);
                    }
                }
                tag::EXECUTE => {
                    let (name, _) =
                        decode::cstr(body, "Execute").map_err(|e| self.client_error(e))?;
                    let format = self.local_portals.get(name).map_or(0, |p| p.format);
                    let id = self.shared.ids.next();
                    next_id_row(&mut self.out, id, format);
                    build::command_complete(&mut self.out, "SELECT 1");
                }
                tag::CLOSE => {
                    let (kind, name) =
                        decode::target(body, "Close").map_err(|e| self.client_error(e))?;
                    if kind == b'S' {
                        self.local_statements.remove(name);
                    } else {
                        self.local_portals.remove(name);
                    }
                    build::close_complete(&mut self.out);
                }
                tag::SYNC => {
                    self.skip_until_sync = false;
                    let status = self.client_status();
                    if status == TxStatus::Idle {
                        // The implicit transaction ends here, and its portals with it.
                        self.local_portals.clear();
                    }
                    build::ready_for_query(&mut self.out, status);
                }
                _ => {} // Flush: the replies go out with the next flush of the relay loop
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_function_name_in_any_case_and_place() {
        for yes in [
            "tessera_next_id",
            "SELECT tessera_next_id()",
            "select TESSERA_Next_Id() as id",
            "SELECT 'x', max(x) FROM t; SELECT tessera_next_id()",
        ] {
            assert!(mentions_next_id(yes.as_bytes()), "{yes}");
        }
        for no in [
            "",
            "x",
            "SELECT max(x) FROM tessera_next",
            "tessera_next_i",
            "essera_next_id()",
            "SELECT next_id() FROM xx",
        ] {
            assert!(!mentions_next_id(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn only_a_lone_call_is_answered_locally() {
        assert_eq!(
            next_id_call(b"SELECT tessera_next_id();").as_deref(),
            Some("tessera_next_id")
        );
        assert_eq!(
            next_id_call(b"select TESSERA_NEXT_ID() AS order_id").as_deref(),
            Some("order_id")
        );
        assert_eq!(next_id_call(b"SELECT tessera_next_id() + 1"), None);
        assert_eq!(next_id_call(b"SELECT abalance FROM t WHERE aid = 1"), None);
        assert_eq!(
            next_id_call(b"  SELECT\n\ttessera_next_id()").as_deref(),
            Some("tessera_next_id")
        );
        assert_eq!(next_id_call(b"SELECT tessera_next_id"), None);
        assert_eq!(next_id_call("SELECT é".as_bytes()), None);
        assert_eq!(
            next_id_call(b"\x0bSELECT\x0btessera_next_id()").as_deref(),
            Some("tessera_next_id")
        );
    }
}
