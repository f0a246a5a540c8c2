//! RESET on a pooled connection. On Postgres, `RESET`, `RESET ALL`, `SET ... TO DEFAULT` and
//! `DISCARD ALL` take a setting back to the value the session started with (its startup packet
//! and `options`). A server connection's own session started with the proxy's startup packet,
//! so there they reach the server's defaults: the proxy sets the client's startup values
//! again right behind them, and the client hears of the values Postgres would report.

use super::*;

/// The statement and portal of the proxy's own restore in an extended-protocol batch. The
/// proxy's prefix: clients' statement names never reach a server as they are.
const RESTORE_NAME: &[u8] = b"__tessera_restore";

impl Session {
    /// The client's Query (`frame`, whose text is `text`), with the statements that set back
    /// the startup values of what it resets appended to its text. At the end, so they run in
    /// the query's implicit transaction (none runs if the query fails) and Postgres reports
    /// the settings as they end up, once, before the ReadyForQuery. Returns the message and how
    /// many statements were appended. (A statement after the RESET in the same text still
    /// sees the server's default.)
    pub(super) fn with_restore(
        &self,
        frame: Frame,
        text: &[u8],
        changes: &[Change],
    ) -> (Bytes, usize) {
        // DISCARD ALL cannot run in a text of several statements: see `restore_after_discard`.
        if changes.is_empty() || changes.contains(&Change::DiscardAll) {
            return (frame.into_bytes(), 0);
        }
        let statements = self.settings.restore_statements(changes);
        let Some(last) = statements.last() else {
            return (frame.into_bytes(), 0);
        };
        // A newline ends a `--` comment the text may end in.
        let mut sql = text.to_vec();
        sql.extend_from_slice(b"\n;");
        sql.extend_from_slice(statements.join(";").as_bytes());
        // A text that ends inside a quote or a comment would swallow them: it is a syntax error
        // as it is, which resets nothing.
        let whole = decode::text(&sql);
        if lex::statements(&whole).last().map(|s| s.trim()) != Some(last.as_str()) {
            return (frame.into_bytes(), 0);
        }
        let mut message = BytesMut::with_capacity(sql.len() + 6);
        build::message(&mut message, tag::QUERY, |b| build::cstr(b, &sql));
        (message.freeze(), statements.len())
    }

    /// After a DISCARD ALL (alone in its text, outside a transaction block: anywhere else it
    /// fails) sent on connection `i`: the startup values set again in a Query of the proxy's.
    /// The client hears of them from [`Session::report_discarded`].
    pub(super) fn restore_after_discard(&mut self, i: usize) {
        let statements = self.settings.restore_statements(&[Change::DiscardAll]);
        if statements.is_empty() {
            return;
        }
        let mut wire = BytesMut::new();
        build::query(&mut wire, &statements.join(";"));
        let held = &mut self.conns[i];
        // As the read-your-writes probe: a socket that cannot take it now loses the connection
        // rather than its settings.
        if held
            .conn
            .writer
            .try_write(&wire)
            .is_ok_and(|n| n == wire.len())
        {
            held.expect.push_back(Expect::Reply {
                kind: Kind::Query {
                    changes: Vec::new(),
                    appended: 0,
                },
                forward: false,
            });
        } else {
            held.conn.broken = true;
        }
    }

    /// After the client's Execute of a statement that resets startup settings: the statement
    /// that sets them back (`sql`, from `Settings::restore_select`), as a Parse, Bind and
    /// Execute of the proxy's own (then closed) in the same batch. The server skips them if the Execute fails, and runs them in
    /// its transaction otherwise; the values Postgres reports at the Sync are then the
    /// client's.
    pub(super) fn restore_after(&mut self, i: usize, sql: &str, wire: &mut BytesMut) {
        build::message(wire, tag::PARSE, |b| {
            build::cstr(b, RESTORE_NAME);
            build::cstr(b, sql.as_bytes());
            b.put_i16(0);
        });
        build::message(wire, tag::BIND, |b| {
            build::cstr(b, RESTORE_NAME);
            build::cstr(b, RESTORE_NAME);
            b.put_slice(&[0, 0, 0, 0, 0, 0]); // no formats, no parameters, text results
        });
        build::message(wire, tag::EXECUTE, |b| {
            build::cstr(b, RESTORE_NAME);
            b.put_i32(0);
        });
        for kind in [b'P', b'S'] {
            build::message(wire, tag::CLOSE, |b| {
                b.put_u8(kind);
                build::cstr(b, RESTORE_NAME);
            });
        }
        let replies = [
            tag::PARSE_COMPLETE,
            tag::BIND_COMPLETE,
            tag::COMMAND_COMPLETE,
            tag::CLOSE_COMPLETE,
            tag::CLOSE_COMPLETE,
        ];
        let held = &mut self.conns[i];
        for reply in replies {
            held.expect.push_back(Expect::Reply {
                kind: Kind::Restore(reply),
                forward: false,
            });
        }
    }

    /// A message of the reply to a Query the proxy appended statements to (see
    /// [`Session::with_restore`]): the CommandCompletes are held back until the next message
    /// shows whose they are, and at the ReadyForQuery the last `appended` of them are the
    /// proxy's (the query did not fail: an error would have come first and released them).
    /// True if the message was taken.
    pub(super) fn withhold(&mut self, i: usize, t: u8, frame: &Frame) -> bool {
        let held = &mut self.conns[i];
        let Some(Expect::Reply {
            kind: Kind::Query { appended, .. },
            forward: true,
        }) = held.expect.front()
        else {
            return false;
        };
        let appended = *appended;
        if appended == 0 {
            return false;
        }
        match t {
            tag::COMMAND_COMPLETE => {
                held.withheld.push(frame.bytes().clone());
                if held.withheld.len() > appended {
                    let first = held.withheld.remove(0);
                    note_command(&mut held.last_tag, &first[5..]);
                    self.out.extend_from_slice(&first);
                }
                true
            }
            // Reported at the end, whoever changed the setting.
            tag::PARAMETER_STATUS => false,
            tag::READY_FOR_QUERY => {
                held.withheld.clear();
                false
            }
            _ => {
                for complete in held.withheld.drain(..) {
                    note_command(&mut held.last_tag, &complete[5..]);
                    self.out.extend_from_slice(&complete);
                }
                false
            }
        }
    }

    /// A ParameterStatus for the client (`frame`, from connection `i`). During the reply to a
    /// DISCARD ALL, the server reports its defaults for the client's startup settings, which
    /// the proxy sets back: [`Session::report_discarded`] reports those instead.
    pub(super) fn relay_status(&mut self, i: usize, frame: &Frame) {
        let Ok((name, value)) = decode::parameter_status(frame.body()) else {
            // Not the proxy's to judge: the client gets it as it came.
            self.out.extend_from_slice(frame.bytes());
            return;
        };
        if self.replying_to_discard(i) && self.settings.is_startup(&name) {
            return;
        }
        self.out.extend_from_slice(frame.bytes());
        self.note_reported(name, value);
    }

    /// Before the ReadyForQuery of a DISCARD ALL on connection `i` that succeeded: the client's
    /// startup settings are back at their session-start values, as the proxy's restore (sent
    /// behind the DISCARD ALL) makes them; the client is told of those that changed, as
    /// Postgres tells it.
    pub(super) fn report_discarded(&mut self, i: usize) {
        if !self.replying_to_discard(i) || self.conns[i].query_failed {
            return;
        }
        let started: Vec<(String, String)> = self
            .started
            .iter()
            .filter(|(name, _)| self.settings.is_startup(name))
            .cloned()
            .collect();
        for (name, value) in started {
            let told = self
                .reported
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case(&name) && *v == value);
            if !told {
                build::parameter_status(&mut self.out, &name, &value);
                self.note_reported(name, value);
            }
        }
    }

    fn replying_to_discard(&self, i: usize) -> bool {
        matches!(
            self.conns[i].expect.front(),
            Some(Expect::Reply {
                kind: Kind::Query { changes, .. },
                forward: true,
            }) if changes.contains(&Change::DiscardAll)
        )
    }

    fn note_reported(&mut self, name: String, value: String) {
        match self
            .reported
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(&name))
        {
            Some((_, v)) => *v = value,
            None => self.reported.push((name, value)),
        }
    }
}
