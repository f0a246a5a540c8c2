//! Statements the router cannot parse: Postgres' own syntax error when Postgres cannot parse
//! them either, rather than the router's refusal (`0A000`).

use super::*;

impl Session {
    /// Postgres' ErrorResponse for `sql` if it is a syntax error (`42601`), learned from a
    /// Parse on a connection of the first shard's primary, with the session's settings, in a
    /// transaction rolled back at once ([`ServerConn::parse_check`]): nothing runs, nothing
    /// stays locked. Never on a connection the session holds, whose transaction (explicit, or
    /// implicit after a Flush) is the client's; and while the session holds any, only an idle
    /// or a new one, so it never waits on a pool it may itself be keeping busy. None when
    /// Postgres accepts the statement (the router's refusal stands) or cannot be asked.
    ///
    /// [`ServerConn::parse_check`]: crate::backend::ServerConn::parse_check
    pub(super) async fn syntax_error(&mut self, sql: &str) -> Option<Bytes> {
        let pool = &self.shared.shards[0].primary;
        let mut conn = if self.conns.is_empty() {
            pool.get().await.ok()?
        } else {
            pool.get_unless_full().await?.ok()?
        };
        let error = conn
            .parse_check(sql, &self.settings.replay_sql())
            .await
            .ok()??;
        let fields = decode::error_fields(error.get(5..)?).ok()?;
        // A Parse takes one statement, where a simple Query takes several: Postgres counting
        // more than the proxy did is not the client's syntax error.
        let several = fields.message.contains("multiple commands");
        (fields.code == "42601" && !several).then_some(error)
    }

    /// A Bind the router cannot plan (`error`), at `n` in the batch: where Postgres would fail
    /// (the Parse earlier in the batch, for a syntax error) and the error to answer there
    /// (Postgres' own for a syntax error).
    pub(super) async fn unplanned(
        &mut self,
        bind: &Frame,
        error: &router::Error,
        overlay: &HashMap<Bytes, (Arc<Analysis>, Vec<u32>, Bytes)>,
        parsed_at: &HashMap<Bytes, usize>,
        n: usize,
    ) -> (usize, Bytes) {
        if let Some(syntax) = self.bind_syntax_error(bind, overlay).await {
            let at = decode::bind(bind.body())
                .ok()
                .and_then(|b| parsed_at.get(b.statement).copied())
                .unwrap_or(n);
            return (at, syntax);
        }
        let mut out = BytesMut::new();
        crate::frontend::error(&mut out, error.sqlstate(), &error.to_string());
        (n, out.freeze())
    }

    /// [`Session::syntax_error`] for the statement a Bind refused by the router uses, when it
    /// was Parsed in the same batch: that Parse never reached a server, and on Postgres it is
    /// the Parse that fails.
    pub(super) async fn bind_syntax_error(
        &mut self,
        bind: &Frame,
        overlay: &HashMap<Bytes, (Arc<Analysis>, Vec<u32>, Bytes)>,
    ) -> Option<Bytes> {
        let name = decode::bind(bind.body()).ok()?.statement;
        let (analysis, _, parse) = overlay.get(name)?;
        if analysis.parsed {
            return None;
        }
        let sql = decode::text(decode::parse(parse.get(5..)?).ok()?.query).into_owned();
        self.syntax_error(&sql).await
    }
}
