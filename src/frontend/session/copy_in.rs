//! COPY FROM STDIN across shards: every shard enters COPY mode, the client's rows are cut out
//! of its CopyData stream and sent to the shard that owns each.

use super::*;

/// A COPY FROM STDIN spread over several shards: the client's rows are cut out of its
/// CopyData stream and each is sent to the shard that owns it.
pub(super) struct CopyIn {
    rows: copy::Rows,
    spec: Arc<CopySpec>,
    /// The connections, in shard order (`conns[shard]`).
    conns: Vec<ConnKey>,
    /// Data waiting to be sent to each shard.
    pending: Vec<BytesMut>,
    /// The next row is the CSV header: every shard gets it.
    header: bool,
    /// Why the copy was abandoned (the shards got CopyFail): the client's error.
    failed: Option<(&'static str, String)>,
    /// Started through the extended protocol: the client's next Sync gets the ReadyForQuery.
    extended: bool,
}

impl Session {
    /// Starts a COPY FROM STDIN on every shard it writes to (in a transaction, the proxy's
    /// own if the client has none, so the copy lands everywhere or nowhere).
    pub(super) async fn start_copy_in(
        &mut self,
        plan: &Plan,
        spec: Arc<CopySpec>,
        frame: Frame,
    ) -> Result<(), End> {
        let shards = self.fanout_shards(&plan.fanout);
        if let Err(e) = self.note_write(plan, &shards) {
            return self.refuse_statement(&e).await;
        }
        if self.tx.is_none() {
            if self.shared.decisions.is_none() {
                return self
                    .refuse_statement(&router::Error::Unsupported(
                        "a COPY that writes on several shards with two-phase commit disabled (two_phase.enabled: false)".into(),
                    ))
                    .await;
            }
            self.begin_implicit(&shards).await?;
        }
        let keys: Vec<ConnKey> = shards.iter().map(|&s| self.choose(s, plan)).collect();
        let statement = frame.into_bytes();
        let Some(idx) = self
            .gather_start(&keys, |session, i, wire| {
                session.conns[i].wrote = true;
                wire.extend_from_slice(&statement);
                Ok(vec![Kind::Query {
                    changes: Vec::new(),
                    appended: 0,
                }])
            })
            .await?
        else {
            return Ok(());
        };
        self.merge = Some(Merge {
            broadcast: matches!(plan.fanout, Fanout::Broadcast),
            slots: idx.clone(),
            ..Merge::default()
        });
        // Every shard must reach COPY mode; the first one's CopyInResponse is the client's.
        for (n, &key) in idx.iter().enumerate() {
            if let Some(m) = self.merge.as_mut() {
                m.first = n == 0;
            }
            let i = self.index(key);
            while !self.conns[i].copy_in && !self.conns[i].expect.is_empty() {
                self.read_one(i).await?;
            }
        }
        if self.merge.as_ref().is_some_and(|m| m.error) {
            self.abandon_copy(&idx, "a shard refused the COPY").await?;
            return self.gather_finish(&idx).await;
        }
        self.copy_in = Some(CopyIn {
            rows: copy::Rows::new(spec.clone()),
            header: spec.header,
            spec,
            pending: vec![BytesMut::new(); idx.len()],
            conns: idx,
            failed: None,
            extended: false,
        });
        Ok(())
    }

    /// A COPY FROM STDIN across shards through the extended protocol (Bind, Execute, Sync, as
    /// drivers send it): the shards run it as a simple query; the client gets the replies of
    /// the extended protocol, its ReadyForQuery after the Sync that follows CopyDone.
    pub(super) async fn extended_copy_in(
        &mut self,
        batch: Vec<Frame>,
        plan: Plan,
        spec: Arc<CopySpec>,
    ) -> Result<(), End> {
        self.settle().await?;
        let has_sync = batch.iter().any(|f| f.tag() == tag::SYNC);
        let mut sql = None;
        for frame in &batch {
            match frame.tag() {
                tag::PARSE => {
                    let parse = decode::parse(frame.body()).map_err(|e| self.client_error(e))?;
                    sql = Some(String::from_utf8_lossy(parse.query).into_owned());
                    self.local_parse(frame)?;
                }
                tag::BIND => {
                    let bind = decode::bind(frame.body()).map_err(|e| self.client_error(e))?;
                    let parse = if bind.statement.is_empty() {
                        self.unnamed.as_ref().map(|u| u.parse.clone())
                    } else {
                        self.statements.get(bind.statement).map(|s| s.parse.clone())
                    };
                    if let Some(p) = parse
                        && let Some(Ok(p)) = p.get(5..).map(decode::parse)
                    {
                        sql = Some(String::from_utf8_lossy(p.query).into_owned());
                    }
                    build::message(&mut self.out, b'2', |_| {});
                }
                tag::DESCRIBE => {
                    if let Ok((b'S', _)) = decode::target(frame.body(), "Describe") {
                        build::message(&mut self.out, b't', |b| b.put_i16(0));
                    }
                    build::message(&mut self.out, b'n', |_| {});
                }
                tag::EXECUTE => {
                    let Some(sql) = sql.take() else {
                        crate::frontend::error(
                            &mut self.out,
                            "26000",
                            "the COPY statement to execute is unknown",
                        );
                        return self.end_failed_batch(has_sync);
                    };
                    let mut query = BytesMut::new();
                    build::query(&mut query, &sql);
                    let started = self
                        .start_copy_in(&plan, spec.clone(), Frame::from_bytes(query.freeze()))
                        .await;
                    if let Some(c) = self.copy_in.as_mut() {
                        // The client's Sync in this batch is consumed by the COPY, as on
                        // Postgres; the one after CopyDone gets the ReadyForQuery.
                        c.extended = true;
                    }
                    return started;
                }
                _ => {}
            }
        }
        if has_sync {
            let status = self.client_status();
            build::ready_for_query(&mut self.out, status);
        }
        Ok(())
    }

    /// CopyFail to every shard still copying: each ends its COPY with an error.
    pub(super) async fn abandon_copy(&mut self, idx: &[ConnKey], why: &str) -> Result<(), End> {
        let mut fail = BytesMut::new();
        build::message(&mut fail, tag::COPY_FAIL, |b| {
            build::cstr(b, why.as_bytes())
        });
        for &key in idx {
            let i = self.index(key);
            if self.conns[i].copy_in {
                self.conns[i].copy_in = false;
                if let Err(e) = self.conns[i].conn.send(&fail).await {
                    return Err(self.server_lost(i, e));
                }
            }
        }
        Ok(())
    }

    /// The client's CopyData, CopyDone or CopyFail during a COPY spread over shards.
    pub(super) async fn on_copy_in(&mut self, frame: Frame) -> Result<(), End> {
        let Some(mut c) = self.copy_in.take() else {
            return Ok(());
        };
        match frame.tag() {
            tag::COPY_DATA => {
                if c.failed.is_none() {
                    c.rows.push(frame.body());
                    while let Some(row) = c.rows.next_row() {
                        self.route_copy_row(&mut c, row);
                    }
                    self.send_copy_data(&mut c, 64 * 1024).await?;
                    self.copy_failed(&c).await?;
                }
                self.copy_in = Some(c);
                Ok(())
            }
            tag::COPY_DONE => {
                if c.failed.is_none() {
                    if let Some(row) = c.rows.rest() {
                        self.route_copy_row(&mut c, row);
                    }
                    self.send_copy_data(&mut c, 0).await?;
                    self.copy_failed(&c).await?;
                }
                if c.failed.is_some() {
                    if let Some(m) = self.merge.as_mut() {
                        m.no_ready = c.extended;
                    }
                } else {
                    let mut done = BytesMut::new();
                    build::message(&mut done, tag::COPY_DONE, |_| {});
                    if let Some(m) = self.merge.as_mut() {
                        m.no_ready = c.extended;
                    }
                    for &key in &c.conns {
                        let i = self.index(key);
                        self.conns[i].copy_in = false;
                        if let Err(e) = self.conns[i].conn.send(&done).await {
                            return Err(self.server_lost(i, e));
                        }
                    }
                }
                Box::pin(self.gather_finish(&c.conns)).await
            }
            _ => {
                // CopyFail: every shard fails the COPY with the client's message.
                if let Some(m) = self.merge.as_mut() {
                    m.no_ready = c.extended;
                }
                for &key in &c.conns {
                    let i = self.index(key);
                    if self.conns[i].copy_in {
                        self.conns[i].copy_in = false;
                        if let Err(e) = self.conns[i].conn.send(frame.bytes()).await {
                            return Err(self.server_lost(i, e));
                        }
                    }
                }
                Box::pin(self.gather_finish(&c.conns)).await
            }
        }
    }

    /// A row could not be routed: the client gets the error now (once) and every shard
    /// abandons the COPY; the shards' own errors about it are not the client's.
    pub(super) async fn copy_failed(&mut self, c: &CopyIn) -> Result<(), End> {
        let Some((code, message)) = &c.failed else {
            return Ok(());
        };
        if let Some(m) = self.merge.as_mut()
            && !m.error
        {
            m.error = true;
            crate::frontend::error(&mut self.out, code, message);
            self.abandon_copy(&c.conns, "the proxy could not route a row")
                .await?;
        }
        Ok(())
    }

    /// Queues one row for the shard that owns it (every shard for a header, the end marker,
    /// or a table copied on every shard).
    pub(super) fn route_copy_row(&mut self, c: &mut CopyIn, row: Bytes) {
        let everywhere = std::mem::take(&mut c.header) || copy::is_end_marker(&row);
        let shard = match c.spec.key {
            Some(_) if everywhere => None,
            None => None,
            Some(index) => match copy::key_field(&c.spec, &row, index) {
                Ok(Some(key)) => {
                    match self
                        .shared
                        .router
                        .shard_of(&router::canonical_key(&key), &c.spec.table)
                    {
                        Ok(shard) => Some(shard),
                        Err(e) => {
                            c.failed.get_or_insert((e.sqlstate(), e.to_string()));
                            return;
                        }
                    }
                }
                Ok(None) => {
                    c.failed.get_or_insert((
                        "23502",
                        format!(
                            "null value in the shard key of \"{}\" in a COPY row",
                            c.spec.table
                        ),
                    ));
                    return;
                }
                Err(e) => {
                    c.failed.get_or_insert(("22P04", e));
                    return;
                }
            },
        };
        match shard {
            Some(s) => match c.conns.iter().position(|k| k.shard == s) {
                Some(slot) => c.pending[slot].extend_from_slice(&row),
                None => {
                    c.failed.get_or_insert((
                        "XX000",
                        format!("no connection to shard {s} for a COPY row"),
                    ));
                }
            },
            None => {
                for p in &mut c.pending {
                    p.extend_from_slice(&row);
                }
            }
        }
    }

    /// Sends each shard its queued rows as CopyData once more than `min` bytes wait.
    pub(super) async fn send_copy_data(&mut self, c: &mut CopyIn, min: usize) -> Result<(), End> {
        for (slot, &key) in c.conns.iter().enumerate() {
            if c.pending[slot].is_empty() || c.pending[slot].len() < min {
                continue;
            }
            let data = c.pending[slot].split();
            let mut msg = BytesMut::with_capacity(data.len() + 5);
            build::message(&mut msg, tag::COPY_DATA, |b| b.extend_from_slice(&data));
            let i = self.index(key);
            if let Err(e) = self.conns[i].conn.send(&msg).await {
                return Err(self.server_lost(i, e));
            }
        }
        Ok(())
    }
}
