//! One statement on several shards: sending it to each, and merging their replies into the
//! one reply the client gets (concatenated, or through a [`Merger`]).

use super::*;

impl Session {
    /// Runs one statement on several shards and merges the replies. `build` writes the
    /// messages for one connection and returns the kinds of replies they expect.
    pub(super) async fn scatter(
        &mut self,
        shards: &[usize],
        plan: &Plan,
        broadcast: bool,
        build: impl FnMut(&mut Self, usize, &mut BytesMut) -> Result<Vec<Kind>, protocol::Error>,
    ) -> Result<(), End> {
        let keys: Vec<ConnKey> = shards.iter().map(|&s| self.choose(s, plan)).collect();
        if plan.writes && !broadcast && self.tx.is_none() && keys.len() > 1 {
            if self.shared.decisions.is_none() {
                return self
                    .refuse_statement(&router::Error::Unsupported(
                        "a statement that writes on several shards with two-phase commit disabled (two_phase.enabled: false)".into(),
                    ))
                    .await;
            }
            // One statement, several shards: it runs in a transaction of the proxy's own and
            // commits with two-phase commit, so it lands everywhere or nowhere.
            self.begin_implicit(shards).await?;
        }
        // A write marks each connection, so read your writes covers every shard it touched.
        let writes = plan.writes;
        let mut build = build;
        let build = move |session: &mut Self, i: usize, wire: &mut BytesMut| {
            session.conns[i].wrote |= writes;
            build(session, i, wire)
        };
        self.scatter_on(&keys, broadcast, plan.merge.clone(), build)
            .await
    }

    pub(super) async fn scatter_on(
        &mut self,
        keys: &[ConnKey],
        broadcast: bool,
        plan: Option<Arc<MergePlan>>,
        build: impl FnMut(&mut Self, usize, &mut BytesMut) -> Result<Vec<Kind>, protocol::Error>,
    ) -> Result<(), End> {
        let copy_out = self.copy_out.take();
        let Some(idx) = self.gather_start(keys, build).await? else {
            return Ok(());
        };
        let merger = plan.map(|m| {
            Merger::new(
                m.spec.clone(),
                m.limit,
                m.offset,
                idx.len(),
                self.shared.config.limits.max_merge_rows,
                self.shared.health.text_bytewise(),
            )
        });
        self.merge = Some(Merge {
            broadcast,
            merger,
            slots: idx.clone(),
            copy_out: copy_out.is_some(),
            copy_header: copy_out.is_some_and(|c| c.header),
            ..Merge::default()
        });
        self.gather_finish(&idx).await
    }

    /// Takes a connection for each key (injected messages drained, so replies start clean)
    /// and sends each the messages `build` writes. `None` if the client already got an error.
    pub(super) async fn gather_start(
        &mut self,
        keys: &[ConnKey],
        mut build: impl FnMut(&mut Self, usize, &mut BytesMut) -> Result<Vec<Kind>, protocol::Error>,
    ) -> Result<Option<Vec<ConnKey>>, End> {
        let mut idx = Vec::with_capacity(keys.len());
        for &key in keys {
            let i = match self.pin(key).await {
                Ok(i) => i,
                Err(e) => {
                    if self.tx.as_ref().is_some_and(|tx| tx.implicit) {
                        // The proxy's own transaction ends here, on the shards it reached.
                        self.settle().await?;
                        self.rollback_everywhere().await?;
                    }
                    self.refuse_request(&e).await?;
                    return Ok(None);
                }
            };
            self.drain(i).await?;
            // pin may have fallen back from a replica to the primary.
            idx.push(self.conns[i].key);
        }
        for &key in &idx {
            let i = self.index(key);
            let mut wire = BytesMut::new();
            let kinds = match build(self, i, &mut wire) {
                Ok(kinds) => kinds,
                Err(e) => return Err(self.client_error(e)),
            };
            let held = &mut self.conns[i];
            for kind in kinds {
                held.expect.push_back(Expect::Reply {
                    kind,
                    forward: true,
                });
            }
            if let Err(e) = held.conn.send(&wire).await {
                return Err(self.server_lost(i, e));
            }
        }
        Ok(Some(idx))
    }

    /// Drains the replies of a statement sent to `idx` through the merge in `self.merge`,
    /// then writes its completion (or error) and ReadyForQuery; ends the proxy's own
    /// transaction around it, if any.
    pub(super) async fn gather_finish(&mut self, idx: &[ConnKey]) -> Result<(), End> {
        let merging = self.merge.as_ref().is_some_and(|m| m.merger.is_some());
        if merging && let Err(end) = self.merge_rows(idx).await {
            self.merge = None;
            return Err(end);
        }
        for (n, &key) in idx.iter().enumerate() {
            if let Some(m) = self.merge.as_mut() {
                m.first = n == 0;
            }
            let i = self.index(key);
            let drained = self.drain(i).await;
            if let Err(end) = drained {
                self.merge = None;
                return Err(end);
            }
        }
        let mut merge = self.merge.take().unwrap_or_default();
        if !merge.error
            && let Some(merger) = merge.merger.as_mut()
        {
            match merger.finish(&mut self.out) {
                // A query's count is the merged rows; a write's (RETURNING) stays the sum.
                Ok(rows) if merge.tags.first().is_none_or(|t| t.starts_with("SELECT")) => {
                    merge.tags = vec![format!("SELECT {rows}")];
                }
                Ok(_) => {}
                Err(e) => {
                    crate::frontend::error(&mut self.out, e.sqlstate(), &e.to_string());
                    merge.error = true;
                }
            }
        }
        if merge.copy_out && !merge.error {
            build::message(&mut self.out, tag::COPY_DONE, |_| {});
        }
        if self.tx.as_ref().is_some_and(|tx| tx.implicit) {
            self.finish_implicit(&mut merge).await?;
        }
        if !merge.error {
            for tag in &merge.tags {
                build::command_complete(&mut self.out, tag);
            }
        }
        if merge.error
            && let Some(tx) = self.tx.as_mut()
        {
            tx.failed = true;
        }
        if self.tx.is_none() {
            // The connections' own ReadyForQuery did not update the session's status during
            // the merge: it is what they say now (idle after a COMMIT on several shards).
            self.status = self
                .conns
                .iter()
                .map(|h| h.conn.status)
                .find(|s| *s != TxStatus::Idle)
                .unwrap_or(TxStatus::Idle);
        }
        if !merge.no_ready {
            let status = self.client_status();
            build::ready_for_query(&mut self.out, status);
        }
        Ok(())
    }

    /// Reads the shards' rows in the order the merger asks for (the shard whose next row
    /// decides what comes next), writing merged rows as they become final. Memory stays at a
    /// few rows per shard for ORDER BY and LIMIT.
    pub(super) async fn merge_rows(&mut self, idx: &[ConnKey]) -> Result<(), End> {
        loop {
            let Some(merge) = self.merge.as_mut() else {
                return Ok(());
            };
            if merge.error {
                return Ok(());
            }
            let Some(merger) = merge.merger.as_mut() else {
                return Ok(());
            };
            if let Err(e) = merger.emit(&mut self.out) {
                self.merge_failed(&e);
                return Ok(());
            }
            let next = if merger.preamble_done() {
                merger.next_read()
            } else {
                Some(0)
            };
            let Some(slot) = next else {
                return Ok(());
            };
            merge.first = slot == 0;
            let i = self.index(idx[slot]);
            if self.conns[i].expect.is_empty() {
                // The reply ended without rows or a completion the merger saw.
                if let Some(m) = self.merge.as_mut().and_then(|m| m.merger.as_mut()) {
                    m.end(slot);
                }
                continue;
            }
            self.read_one(i).await?;
        }
    }

    /// The merge cannot go on: the client gets the error (once); the shards' remaining
    /// replies are drained and dropped.
    pub(super) fn merge_failed(&mut self, e: &merge::Error) {
        debug!(cause = %e, "merge failed");
        if let Some(m) = self.merge.as_mut()
            && !m.error
        {
            m.error = true;
            crate::frontend::error(&mut self.out, e.sqlstate(), &e.to_string());
        }
    }

    /// A merged statement's reply message from connection `i`: feeds the merger; true if the
    /// message is handled (not forwarded as is).
    pub(super) fn merge_message(&mut self, i: usize, t: u8, frame: &Frame, forward: bool) -> bool {
        let key = self.conns[i].key;
        let portal_reply = matches!(
            self.conns[i].expect.front(),
            Some(Expect::Reply {
                kind: Kind::Query { .. }
                    | Kind::Execute { .. }
                    | Kind::Describe { portal: true, .. },
                ..
            })
        );
        let Some(merge) = self.merge.as_mut() else {
            return false;
        };
        let Some(slot) = merge.slots.iter().position(|k| *k == key) else {
            return false;
        };
        let first = merge.first;
        if merge.error {
            return matches!(t, tag::ROW_DESCRIPTION | tag::DATA_ROW) && portal_reply;
        }
        let Some(merger) = merge.merger.as_mut() else {
            return false;
        };
        let result = match t {
            tag::ROW_DESCRIPTION if portal_reply => match merger.describe(frame.body()) {
                Ok(description) => {
                    if forward && first {
                        self.out.extend_from_slice(&description);
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            },
            tag::DATA_ROW if portal_reply => merger.row(slot, frame.bytes().slice(5..)),
            tag::COMMAND_COMPLETE | tag::ERROR_RESPONSE | tag::EMPTY_QUERY if portal_reply => {
                merger.end(slot);
                return false;
            }
            _ => return false,
        };
        if let Err(e) = result {
            self.merge_failed(&e);
        }
        true
    }

    /// A single statement (Parse? Bind Describe? Execute Sync) on several shards.
    pub(super) async fn scatter_batch(&mut self, batch: Vec<Frame>, plan: Plan) -> Result<(), End> {
        // A portal fetched in pieces (a row limit, or a named portal fetched later) would need
        // the merge to keep every shard's portal open: not yet.
        let partial = batch.iter().any(|f| match f.tag() {
            tag::EXECUTE => decode::cstr(f.body(), "Execute")
                .map(|(portal, rest)| {
                    !portal.is_empty() || rest.get(..4).is_some_and(|n| n != [0, 0, 0, 0])
                })
                .unwrap_or(true),
            tag::BIND => decode::bind(f.body())
                .map(|b| !b.portal.is_empty())
                .unwrap_or(true),
            _ => false,
        });
        if partial {
            return self.fail_batch("0A000", "not supported across shards: a named portal or a row-limited Execute on several shards", batch.iter().any(|f| f.tag() == tag::SYNC)).await;
        }
        if let Some(spec) = plan.copy.clone()
            && !spec.to
        {
            return self.extended_copy_in(batch, plan, spec).await;
        }
        if batch.last().map(Frame::tag) != Some(tag::SYNC) {
            return self
                .fail_batch(
                    "0A000",
                    "not supported across shards: a statement without Sync",
                    false,
                )
                .await;
        }
        if let Some((code, message)) = self.check_scatter_batch(&batch) {
            return self.fail_batch(code, &message, true).await;
        }
        let shards = self.fanout_shards(&plan.fanout);
        if let Err(e) = self.note_write(&plan, &shards) {
            self.settle().await?;
            crate::frontend::error(&mut self.out, e.sqlstate(), &e.to_string());
            if let Some(tx) = self.tx.as_mut() {
                tx.failed = true;
            }
            return self.end_failed_batch(true);
        }
        // COPY TO: every shard's data concatenated, like rows.
        self.copy_out = plan.copy.clone().filter(|c| c.to);
        let broadcast = matches!(plan.fanout, Fanout::Broadcast);
        let body: Vec<Frame> = batch[..batch.len() - 1].to_vec();
        let merge = plan.merge.clone();
        let split = plan.split.clone();
        let described = body.iter().any(|f| {
            f.tag() == tag::DESCRIBE
                && matches!(decode::target(f.body(), "Describe"), Ok((b'P', _)))
        });
        let mut nth = 0;
        self.scatter(&shards, &plan, broadcast, move |session, i, wire| {
            nth += 1;
            for frame in &body {
                if nth > 1
                    && frame.tag() == tag::PARSE
                    && let Ok(parse) = decode::parse(frame.body())
                    && !parse.name.is_empty()
                    && let Some(stmt) = session.statements.get(parse.name).cloned()
                {
                    // Registered by the first shard's pass; this shard just needs it prepared.
                    session.ensure_prepared(i, &stmt, wire);
                    continue;
                }
                let shard = session.conns[i].key.shard;
                let part = split
                    .as_ref()
                    .and_then(|parts| parts.iter().find(|p| p.0.0 == shard));
                match (&merge, part) {
                    (_, Some((_, part))) if frame.tag() == tag::BIND => {
                        session.split_bind(i, frame, part, described, wire)?;
                    }
                    (Some(m), _) if frame.tag() == tag::BIND => {
                        session.merge_bind(i, frame, m, described, wire)?;
                    }
                    _ => session.batch_message(i, frame.bytes(), wire)?,
                }
            }
            session.conns[i].wrote |= plan.writes;
            // Our own Sync per connection; the merge emits the client's ReadyForQuery.
            build::message(wire, tag::SYNC, |_| {});
            Ok(vec![Kind::Sync])
        })
        .await
    }

    /// What must fail a batch on several shards before anything is sent: an error the proxy
    /// raises midway could not stop the servers running the rest.
    pub(super) fn check_scatter_batch(&self, batch: &[Frame]) -> Option<(&'static str, String)> {
        if let Some(pos) = batch.iter().position(|f| f.tag() == tag::EXECUTE)
            && batch[pos + 1..].iter().any(|f| f.tag() != tag::SYNC)
        {
            // Their replies would overtake the merged rows.
            return Some((
                "0A000",
                "not supported across shards: messages after the Execute of a statement that spans shards, before Sync".into(),
            ));
        }
        let mut parsed: Vec<&[u8]> = Vec::new();
        for frame in batch {
            match frame.tag() {
                tag::PARSE => {
                    let Ok(parse) = decode::parse(frame.body()) else {
                        continue;
                    };
                    if !parse.name.is_empty() && self.statements.contains_key(parse.name) {
                        return Some((
                            "42P05",
                            format!(
                                "prepared statement \"{}\" already exists",
                                String::from_utf8_lossy(parse.name)
                            ),
                        ));
                    }
                    parsed.push(parse.name);
                }
                tag::BIND | tag::DESCRIBE => {
                    // (Checked here, before anything is sent: an error raised in the middle of
                    // a scatter would have no batch left to skip to its Sync.)
                    let name = match frame.tag() {
                        tag::BIND => match decode::bind(frame.body()) {
                            Ok(bind) => bind.statement,
                            Err(_) => continue,
                        },
                        _ => match decode::target(frame.body(), "Describe") {
                            Ok((b'S', name)) => name,
                            _ => continue,
                        },
                    };
                    let known = parsed.contains(&name)
                        || if name.is_empty() {
                            self.unnamed.is_some()
                        } else {
                            self.statements.contains_key(name)
                        };
                    if !known {
                        let message = if name.is_empty() {
                            "unnamed prepared statement does not exist".to_string()
                        } else {
                            format!(
                                "prepared statement \"{}\" does not exist",
                                String::from_utf8_lossy(name)
                            )
                        };
                        return Some(("26000", message));
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// The Bind of a statement whose results are merged: binds the client's values to the
    /// statement rewritten for the shards instead, asks for the extra columns in text, and
    /// describes the portal so the merger knows the column types.
    pub(super) fn merge_bind(
        &mut self,
        i: usize,
        frame: &Frame,
        m: &MergePlan,
        described: bool,
        wire: &mut BytesMut,
    ) -> Result<(), protocol::Error> {
        let bind = decode::bind(frame.body())?;
        let (params, formats) = decode::bind_result_formats(bind.rest)?;
        let types = if bind.statement.is_empty() {
            match &self.unnamed {
                Some(u) => u.types.clone(),
                None => {
                    self.synthetic_error(
                        i,
                        "26000",
                        "unnamed prepared statement does not exist",
                        wire,
                    );
                    return Ok(());
                }
            }
        } else {
            match self.lookup(i, bind.statement, wire) {
                Some(stmt) => stmt.param_types.lock().clone(),
                None => return Ok(()),
            }
        };
        let mut types = types;
        for &n in &m.dropped_params {
            // A LIMIT/OFFSET parameter the shards' statement no longer mentions: declared, so
            // the client's Bind still fits, as int8 unless the client said otherwise.
            if types.len() < n {
                types.resize(n, 0);
            }
            if types[n - 1] == 0 {
                types[n - 1] = 20;
            }
        }
        let mut encoded = Vec::with_capacity(2 + 4 * types.len());
        encoded.extend_from_slice(&(types.len() as i16).to_be_bytes());
        for &t in &types {
            encoded.extend_from_slice(&crate::server::portable_type(t).to_be_bytes());
        }
        let stmt = self.shared.statements.intern(
            &decode::Parse {
                name: b"",
                query: m.sql.as_bytes(),
                param_types: &encoded,
            },
            &self.shared.router,
        );
        self.ensure_prepared(i, &stmt, wire);
        let client = |j: usize| match formats.len() {
            0 => 0,
            1 => formats[0],
            _ => formats.get(j).copied().unwrap_or(0),
        };
        let result_formats: Vec<i16> = match m.spec.columns {
            Some(n) => {
                let visible = n - m.spec.extras;
                (0..n)
                    .map(|j| if j < visible { client(j) } else { 0 })
                    .collect()
            }
            None if formats.len() > 1 => formats
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, m.spec.extras))
                .collect(),
            None => formats,
        };
        build::message(wire, tag::BIND, |b| {
            build::cstr(b, bind.portal);
            build::cstr(b, &stmt.server_name);
            b.put_slice(params);
            b.put_i16(result_formats.len() as i16);
            for f in &result_formats {
                b.put_i16(*f);
            }
        });
        self.bind_sent(i, bind.portal, stmt.id, described, wire);
        Ok(())
    }

    /// The Bind of a multi-row INSERT split by shard: this shard's rows only, with their
    /// parameters.
    pub(super) fn split_bind(
        &mut self,
        i: usize,
        frame: &Frame,
        part: &router::rewrite::SplitInsert,
        described: bool,
        wire: &mut BytesMut,
    ) -> Result<(), protocol::Error> {
        let bind = decode::bind(frame.body())?;
        let (params, results) = decode::bind_result_formats(bind.rest)?;
        let decode::BindParams { formats, values } = decode::bind_params(params)?;
        let types = if bind.statement.is_empty() {
            self.unnamed
                .as_ref()
                .map(|u| u.types.clone())
                .unwrap_or_default()
        } else {
            match self.lookup(i, bind.statement, wire) {
                Some(stmt) => stmt.param_types.lock().clone(),
                None => return Ok(()),
            }
        };
        let mut encoded = Vec::with_capacity(2 + 4 * part.params.len());
        encoded.extend_from_slice(&(part.params.len() as i16).to_be_bytes());
        for &n in &part.params {
            let t = types.get(n - 1).copied().unwrap_or(0);
            encoded.extend_from_slice(&crate::server::portable_type(t).to_be_bytes());
        }
        let stmt = self.shared.statements.intern(
            &decode::Parse {
                name: b"",
                query: part.sql.as_bytes(),
                param_types: &encoded,
            },
            &self.shared.router,
        );
        self.ensure_prepared(i, &stmt, wire);
        let mut chosen = Vec::with_capacity(part.params.len());
        for &n in &part.params {
            chosen.push(
                *values
                    .get(n - 1)
                    .ok_or(protocol::Error::Malformed("Bind"))?,
            );
        }
        build::message(wire, tag::BIND, |b| {
            build::cstr(b, bind.portal);
            build::cstr(b, &stmt.server_name);
            if formats.len() > 1 {
                b.put_i16(part.params.len() as i16);
                for &n in &part.params {
                    b.put_i16(formats.get(n - 1).copied().unwrap_or(0));
                }
            } else {
                b.put_i16(formats.len() as i16);
                for f in &formats {
                    b.put_i16(*f);
                }
            }
            b.put_i16(chosen.len() as i16);
            for v in &chosen {
                match v {
                    Some(v) => {
                        b.put_i32(v.len() as i32);
                        b.put_slice(v);
                    }
                    None => b.put_i32(-1),
                }
            }
            b.put_i16(results.len() as i16);
            for f in &results {
                b.put_i16(*f);
            }
        });
        self.bind_sent(i, bind.portal, stmt.id, described, wire);
        Ok(())
    }

    /// After a Bind the proxy rewrote: the portal's place, the reply to expect, and a Describe
    /// of the portal if the client sent none (the merger needs the columns).
    fn bind_sent(
        &mut self,
        i: usize,
        portal: &[u8],
        stmt: u64,
        described: bool,
        wire: &mut BytesMut,
    ) {
        self.portals.insert(portal, self.conns[i].key);
        self.conns[i].expect.push_back(Expect::Reply {
            kind: Kind::Bind { stmt },
            forward: true,
        });
        if !described {
            self.describe_portal(i, portal, wire);
        }
    }

    /// A Describe of a portal the proxy sends for itself (its reply is not the client's).
    pub(super) fn describe_portal(&mut self, i: usize, portal: &[u8], wire: &mut BytesMut) {
        build::message(wire, tag::DESCRIBE, |b| {
            b.put_u8(b'P');
            build::cstr(b, portal);
        });
        self.conns[i].expect.push_back(Expect::Reply {
            kind: Kind::Describe {
                stmt: None,
                unnamed: None,
                portal: true,
            },
            forward: false,
        });
    }

    /// In a merge, which replies reach the client; CommandComplete tags are collected.
    pub(super) fn merge_allows(&mut self, i: usize, t: u8, frame: &Frame) -> bool {
        let key = self.conns[i].key;
        let Some(merge) = self.merge.as_mut() else {
            return true;
        };
        if t == tag::COPY_DATA && merge.copy_header && !merge.past_header.contains(&key) {
            // Each shard starts with the header line; the client gets the first one only.
            merge.past_header.push(key);
            return !merge.error && merge.first;
        }
        match t {
            tag::DATA_ROW => !merge.error && (merge.first || !merge.broadcast),
            tag::COPY_DATA if merge.copy_out => !merge.error,
            tag::COPY_DONE if merge.copy_out => false,
            tag::COMMAND_COMPLETE => {
                // The k-th completion of each connection adds into the k-th tag, whichever
                // connection the merge happened to read first.
                let text = decode::command_complete(frame.body()).unwrap_or_default();
                let k = match merge.completions.iter_mut().find(|(c, _)| *c == key) {
                    Some((_, n)) => {
                        *n += 1;
                        *n - 1
                    }
                    None => {
                        merge.completions.push((key, 1));
                        0
                    }
                };
                if merge.broadcast && !merge.first {
                    return false;
                }
                match merge.tags.get_mut(k) {
                    Some(tag) if !merge.broadcast => *tag = add_counts(tag, text),
                    Some(_) => {}
                    None => merge.tags.push(text.to_string()),
                }
                false
            }
            tag::READY_FOR_QUERY => false,
            tag::NOTICE_RESPONSE | tag::NOTIFICATION | tag::PARAMETER_STATUS => merge.first,
            _ => merge.first,
        }
    }
}
