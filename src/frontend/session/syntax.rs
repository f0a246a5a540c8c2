//! Statements the router cannot parse: Postgres' own syntax error when Postgres cannot parse
//! them either, rather than the router's refusal (`0A000`).

use super::*;

impl Session {
    /// Postgres' ErrorResponse for `sql` if it is a syntax error (`42601`), learned from a
    /// Parse, which runs nothing: on a connection the session holds (callers settle first, so
    /// nothing is pending there), else on one checked out from the first shard's primary.
    /// None when Postgres accepts the statement (the router's refusal stands) or cannot be
    /// asked.
    pub(super) async fn syntax_error(&mut self, sql: &str) -> Option<Bytes> {
        let verdict = match self.conns.first_mut() {
            Some(held) => {
                // The Parse replaces the connection's unnamed statement.
                held.unnamed_ready = false;
                // Held by this session: what the server says unasked is the client's.
                held.conn.parse_check(sql, &mut self.out).await
            }
            None => {
                let pool = &self.shared.shards[0].primary;
                let mut conn = match pool.try_get() {
                    Some(conn) => conn,
                    None => pool.get().await.ok()?,
                };
                conn.parse_check(sql, &mut BytesMut::new()).await
            }
        };
        let error = verdict.ok()??;
        let fields = decode::error_fields(error.get(5..)?).ok()?;
        (fields.code == "42601").then_some(error)
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
