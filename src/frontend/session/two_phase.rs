//! Two-phase commit in the session: PREPARE TRANSACTION on every shard a transaction wrote
//! to, the decision made durable, COMMIT PREPARED; and the proxy's own transaction around one
//! statement that writes on several shards.

use super::*;

/// A two-phase transaction a session is committing (registered in [`Shared::in_flight`]).
pub(super) struct GidInFlight {
    shared: Arc<Shared>,
    gid: String,
}

impl GidInFlight {
    pub(super) fn new(shared: &Arc<Shared>, gid: &str) -> GidInFlight {
        shared.in_flight.lock().insert(gid.to_string());
        GidInFlight {
            shared: shared.clone(),
            gid: gid.to_string(),
        }
    }
}

impl Drop for GidInFlight {
    fn drop(&mut self) {
        self.shared.in_flight.lock().remove(&self.gid);
    }
}

impl Session {
    /// Runs one statement the proxy makes on each listed connection, in parallel, and returns
    /// each one's error (the ErrorResponse message) if it failed.
    pub(super) async fn run_injected(
        &mut self,
        jobs: &[(ConnKey, String)],
    ) -> Result<Vec<Option<Bytes>>, End> {
        for (key, sql) in jobs {
            let i = self.index(*key);
            let mut msg = BytesMut::new();
            build::query(&mut msg, sql);
            let held = &mut self.conns[i];
            held.injected_error = None;
            held.expect.push_back(Expect::Reply {
                kind: Kind::Query {
                    changes: Vec::new(),
                    appended: 0,
                },
                forward: false,
            });
            if let Err(e) = held.conn.send(&msg).await {
                return Err(self.server_lost(i, e));
            }
        }
        let mut errors = Vec::with_capacity(jobs.len());
        for (key, _) in jobs {
            let i = self.index(*key);
            self.drain(i).await?;
            errors.push(self.conns[i].injected_error.take());
        }
        Ok(errors)
    }

    /// COMMIT of a transaction that wrote on several shards: PREPARE TRANSACTION on each, the
    /// decision made durable in the log, then COMMIT PREPARED on each. A shard that cannot
    /// prepare rolls the transaction back everywhere and the client gets its error.
    pub(super) async fn commit_two_phase(&mut self) -> Result<(), End> {
        self.settle().await?;
        match self.two_phase().await? {
            None => build::command_complete(&mut self.out, "COMMIT"),
            Some(error) => self.out.extend_from_slice(&error),
        }
        build::ready_for_query(&mut self.out, TxStatus::Idle);
        Ok(())
    }

    /// ROLLBACK on every connection of the transaction; it is over.
    pub(super) async fn rollback_everywhere(&mut self) -> Result<(), End> {
        let jobs: Vec<(ConnKey, String)> = self
            .conns
            .iter()
            .filter(|h| h.begun)
            .map(|h| (h.key, "ROLLBACK".to_string()))
            .collect();
        self.run_injected(&jobs).await?;
        self.end_two_phase("ROLLBACK");
        Ok(())
    }

    /// The end of the proxy's own transaction around one multi-shard write: two-phase commit
    /// if the statement succeeded everywhere, else rollback everywhere.
    pub(super) async fn finish_implicit(&mut self, merge: &mut Merge) -> Result<(), End> {
        if merge.error {
            return self.rollback_everywhere().await;
        }
        if let Some(error) = self.two_phase().await? {
            self.out.extend_from_slice(&error);
            merge.error = true;
        }
        Ok(())
    }

    /// Two-phase commit of the session's transaction; `Some(ErrorResponse)` if it rolled back.
    pub(super) async fn two_phase(&mut self) -> Result<Option<Bytes>, End> {
        let Some(log) = self.shared.decisions.clone() else {
            let mut msg = BytesMut::new();
            crate::frontend::error(
                &mut msg,
                "0A000",
                "not supported across shards: a transaction that writes to more than one shard with two-phase commit disabled",
            );
            return Ok(Some(msg.freeze()));
        };
        let written = self
            .tx
            .as_ref()
            .map(|tx| tx.written.clone())
            .unwrap_or_default();
        let gid = self.shared.new_gid();
        // Until this function returns, the background resolver leaves the gid alone; if the
        // session dies midway (a shard connection lost), the resolver finishes it.
        let _in_flight = GidInFlight::new(&self.shared, &gid);
        // Shards the transaction only read from just commit; those it wrote to prepare.
        let jobs: Vec<(ConnKey, String)> = self
            .conns
            .iter()
            .filter(|h| h.begun)
            .map(|h| {
                let sql = if written.contains(&h.key.shard) {
                    format!("PREPARE TRANSACTION '{gid}'")
                } else {
                    "COMMIT".to_string()
                };
                (h.key, sql)
            })
            .collect();
        debug!(%gid, shards = ?written, "two-phase commit: prepare");
        let mut results = self.run_injected(&jobs).await?;
        // A shard whose transaction was already aborted answers PREPARE (or COMMIT) with a
        // ROLLBACK and no error: that is a failure too, never a vote to commit.
        for ((key, sql), result) in jobs.iter().zip(results.iter_mut()) {
            let want = if sql.starts_with("PREPARE") {
                "PREPARE TRANSACTION"
            } else {
                "COMMIT"
            };
            if result.is_none() && self.conns[self.index(*key)].last_tag != want.as_bytes() {
                let mut msg = BytesMut::new();
                crate::frontend::error(
                    &mut msg,
                    "25P02",
                    &format!(
                        "the transaction was aborted on shard {}; it is rolled back on every shard",
                        key.shard
                    ),
                );
                *result = Some(msg.freeze());
            }
        }
        let prepared: Vec<ConnKey> = jobs
            .iter()
            .zip(&results)
            .filter(|((key, sql), _)| {
                sql.starts_with("PREPARE")
                    && self.conns[self.index(*key)].last_tag == b"PREPARE TRANSACTION"
            })
            .map(|((key, _), _)| *key)
            .collect();
        let failure = results.iter().flatten().next().cloned();
        crate::twopc::failpoint("after-prepare");
        let decided = match failure {
            Some(_) => Err(None),
            None => {
                // An fsync: off the async worker, which serves other clients meanwhile.
                let (log, decided) = (log.clone(), gid.clone());
                let path = log.path().to_path_buf();
                tokio::task::spawn_blocking(move || log.record_commit(&decided))
                    .await
                    .unwrap_or_else(|e| {
                        Err(crate::twopc::Error::Write {
                            path,
                            source: std::io::Error::other(e.to_string()),
                        })
                    })
                    .map_err(Some)
            }
        };
        if let Err(log_error) = decided {
            let undo: Vec<(ConnKey, String)> = prepared
                .iter()
                .map(|k| (*k, format!("ROLLBACK PREPARED '{gid}'")))
                .collect();
            self.run_injected(&undo).await?;
            self.end_two_phase("ROLLBACK");
            let mut msg = BytesMut::new();
            match (failure, log_error) {
                (Some(frame), _) => msg.extend_from_slice(&frame),
                (None, Some(e)) => crate::frontend::error(&mut msg, e.sqlstate(), &e.to_string()),
                (None, None) => {
                    crate::frontend::error(&mut msg, "XX000", "two-phase commit failed")
                }
            }
            return Ok(Some(msg.freeze()));
        }
        crate::twopc::failpoint("after-decision");
        let commit: Vec<(ConnKey, String)> = prepared
            .iter()
            .map(|k| (*k, format!("COMMIT PREPARED '{gid}'")))
            .collect();
        let results = self.run_injected(&commit).await?;
        if results.iter().all(Option::is_none) {
            if let Err(e) = log.record_done(&gid) {
                warn!(cause = %e, %gid, "could not mark a two-phase commit done");
            }
        } else {
            // The decision is durable: the resolver (or the next start) finishes the shards
            // that did not commit yet; the transaction is committed.
            warn!(%gid, "COMMIT PREPARED failed on a shard; the resolver will finish it");
            build::error_response(
                &mut self.out,
                build::Severity::Warning,
                "01000",
                &format!(
                    "transaction {gid} is committed but not yet on every shard; Tessera finishes it shortly"
                ),
            );
        }
        self.end_two_phase("COMMIT");
        Ok(None)
    }

    /// After a two-phase commit or its rollback: every connection is idle and the session's
    /// transaction is over.
    pub(super) fn end_two_phase(&mut self, outcome: &str) {
        self.tx = None;
        // Portals end with their transaction (also when no server connection took part).
        self.local_portals.clear();
        for i in 0..self.conns.len() {
            self.conns[i].last_tag = outcome.as_bytes().to_vec();
            self.ready(i);
        }
    }

    /// Answers an extended-protocol batch whose statement the proxy ran itself (COMMIT or
    /// ROLLBACK of a transaction on several shards): its tag, or the error.
    pub(super) fn answer_tx_batch(
        &mut self,
        batch: &[Frame],
        outcome: Result<&str, Bytes>,
    ) -> Result<(), End> {
        let mut failed = false;
        for frame in batch {
            match frame.tag() {
                _ if failed && frame.tag() != tag::SYNC => {}
                tag::PARSE => self.local_parse(frame)?,
                tag::BIND => build::message(&mut self.out, b'2', |_| {}),
                tag::DESCRIBE => {
                    if let Ok((b'S', _)) = decode::target(frame.body(), "Describe") {
                        build::message(&mut self.out, b't', |b| b.put_i16(0));
                    }
                    build::message(&mut self.out, b'n', |_| {});
                }
                tag::EXECUTE => match &outcome {
                    Ok(word) => build::command_complete(&mut self.out, word),
                    Err(error) => {
                        self.out.extend_from_slice(error);
                        failed = true;
                    }
                },
                tag::CLOSE => build::close_complete(&mut self.out),
                tag::SYNC => {
                    self.skip_until_sync = false;
                    let status = self.client_status();
                    build::ready_for_query(&mut self.out, status);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A Parse the proxy answers itself: the statement is registered for the client (and
    /// prepared on a server when it is first bound there).
    pub(super) fn local_parse(&mut self, frame: &Frame) -> Result<(), End> {
        let parse = decode::parse(frame.body()).map_err(|e| self.client_error(e))?;
        let sql = String::from_utf8_lossy(parse.query).into_owned();
        if parse.name.is_empty() {
            let effects = crate::frontend::settings::effects(&sql);
            self.unnamed = Some(Arc::new(Unnamed {
                parse: frame.bytes().clone(),
                analysis: Some(self.shared.router.analyze(&sql)),
                types: crate::server::parse_param_types(parse.param_types),
                changes: effects.changes,
                drops_all: effects.drops_all,
                local: true,
            }));
            for held in &mut self.conns {
                held.unnamed_ready = false;
            }
        } else {
            let stmt = self.shared.statements.intern(&parse, &self.shared.router);
            self.statements
                .insert(Bytes::copy_from_slice(parse.name), stmt);
        }
        build::parse_complete(&mut self.out);
        Ok(())
    }

    /// The proxy's own transaction around one statement that writes on several shards.
    pub(super) async fn begin_implicit(&mut self, shards: &[usize]) -> Result<(), End> {
        self.settle().await?;
        let mut begin = BytesMut::new();
        build::query(&mut begin, "BEGIN");
        self.tx = Some(Tx {
            begin: begin.freeze(),
            read_only: false,
            failed: false,
            written: shards.iter().copied().collect(),
            savepoints: Vec::new(),
            implicit: true,
        });
        Ok(())
    }
}
