//! A partition worker's batch loop, while it holds the lease: take what the poller left,
//! retire what came back acknowledged, read the next batch when there is work, room in
//! flight and rows in the instance's budget, and send it (joining the batches in flight, or
//! alone once they came back); otherwise wait for acknowledgements, a window, the retire
//! clock or shutdown. How it ends is an [`Exit`] for the lifecycle in `worker`.

use super::*;

impl Worker<'_> {
    pub(super) async fn work(
        &mut self,
        first: Checkout,
        reader: &mut PartitionReader,
        mailbox: &Mailbox,
        pulse: &PollerPulse,
    ) -> Exit {
        // The poller counts as stalled when it missed many ticks; then this worker opens
        // its own windows every poll interval.
        let stall = self.ctx.config.poll_interval() + self.ctx.config.wakeup_interval() * 20;
        // The message that blocked this partition, tried alone first on the next attempt.
        let mut blocked: Option<i64> = None;
        // The claim's session, for the first read. A worker holds a session only for one
        // statement and never waits for another one while holding it: with more partitions
        // than sessions, workers that each held one while waiting for a second (to retire
        // with) would wait for ever.
        let mut session = Some(first);
        // At most a full batch's worth of rows in flight (or one row per batch of the depth,
        // whichever is more): small batches pipeline, a backlog goes a batch at a time.
        let config = &self.ctx.config;
        let mut flights = InFlight::new(
            config.batches_in_flight,
            config.batch_size.max(config.batches_in_flight),
        );
        loop {
            if self.stopping() {
                self.retire_on_stop(&mut flights, reader).await;
                return Exit::Stop;
            }
            self.ctx.faults.before_batch(self.partition);
            if !self.ctx.ownership.is_valid(self.partition, self.epoch) {
                return Exit::Fenced("the lease was not renewed within its TTL");
            }
            if !self.ctx.ownership.is_mine(self.partition) {
                // Let the batches in flight come back and retire what Kafka acknowledged,
                // so that the next owner starts where this one stopped.
                drop(session.take());
                return match self.drain(&mut flights, reader, &mut blocked).await {
                    Ok(Step::Exit(exit)) => exit,
                    Ok(_) => Exit::Release,
                    Err(e) => Exit::Reconnect(e),
                };
            }
            if let Some(t) = self.parked_at {
                reader.refuse_fresh_read_before(t);
            }
            let delivered = mailbox.take();
            if delivered.reset {
                reader.reread();
            }
            if let Some(window) = delivered.window
                && !reader.offer_fresh(window, delivered.fresh)
            {
                tracing::debug!(
                    partition = self.partition,
                    "window from another incarnation of the database dropped (this worker rereads)"
                );
            }
            // Retire the batches Kafka has already acknowledged, oldest first.
            match self.retire_acknowledged(&mut flights, reader).await {
                Ok(Step::Exit(exit)) => return exit,
                // (Retiring acknowledged batches never blocks.)
                Ok(Step::Next | Step::Blocked) => {}
                Err(e) => return Exit::Reconnect(e),
            }
            let retire_at = self.retire_due_at(&flights);
            // The next read's share of the instance's row budget: waited for only with
            // nothing of this partition in flight (a partition with batches on their way
            // waits for them instead, so no two partitions wait for each other's rows).
            let mut budget = None;
            if reader.has_work() && flights.has_room() {
                let want = u32::try_from(self.ctx.config.batch_size).unwrap_or(u32::MAX);
                let budget_pool = Arc::clone(&self.ctx.row_budget);
                budget = if flights.is_empty() {
                    drop(session.take()); // never wait for rows while holding a session
                    tokio::select! {
                        p = budget_pool.acquire_many_owned(want) => p.ok(),
                        () = self.shutdown.requested() => continue,
                    }
                } else {
                    budget_pool.try_acquire_many_owned(want).ok()
                };
            }
            if budget.is_none() {
                // Nothing to read now: the session goes back to the pool.
                drop(session.take());
                if flights.is_empty() {
                    // Caught up.
                    self.metrics.oldest_age.set(0.0);
                    if !self.ctx.ownership.is_below_count(self.partition) {
                        // Delete what was acknowledged before letting go, or the next
                        // owner would find it and publish it again.
                        return match self.retire_held(&mut flights, reader).await {
                            Ok(Step::Exit(exit)) => exit,
                            Ok(_) => Exit::Drained,
                            Err(e) => Exit::Reconnect(e),
                        };
                    }
                    // Wait for the poller to hand over a window.
                    tokio::select! {
                        _ = mailbox.wait() => {}
                        () = tokio::time::sleep_until(retire_at) => {}
                        _ = tokio::time::sleep(self.ctx.config.poll_interval()) => {
                            if pulse.is_stale(stall) {
                                reader.open_own_window();
                            }
                        }
                        () = self.shutdown.requested() => {}
                    }
                    continue;
                }
                // Wait for the oldest batch's acknowledgements, or for a window to read
                // while it is on its way.
                let room = flights.has_room();
                let report_at = slow_acks_report_at(&flights);
                let woke = tokio::select! {
                    done = flights.next_done() => done,
                    _ = mailbox.wait(), if room => None,
                    () = tokio::time::sleep_until(retire_at) => None,
                    () = tokio::time::sleep_until(report_at) => {
                        self.report_slow_acks(&flights);
                        None
                    }
                    () = self.shutdown.requested() => None,
                };
                let step = match woke {
                    Some((flight, acks)) => {
                        self.landed(flight, acks, &mut flights, reader, &mut blocked)
                            .await
                    }
                    None => Ok(Step::Next),
                };
                match self.after(step, reader).await {
                    Some(exit) => return exit,
                    None => continue,
                }
            }
            let s = match session.take() {
                Some(s) => s,
                None => match self.checkout_or_stop().await {
                    Some(Ok(s)) => s,
                    Some(Err(e)) => return Exit::Reconnect(e),
                    None => return Exit::Stop,
                },
            };
            if s.incarnation != *reader.incarnation() {
                // This session talks to another life of the database (it crashed or failed
                // over since the reader's windows were taken): they mean nothing here. The
                // batches in flight come back first, so that nothing is read twice while
                // on its way.
                drop(s);
                let step = self.drain(&mut flights, reader, &mut blocked).await;
                if let Some(exit) = self.after(step, reader).await {
                    return exit;
                }
                tracing::info!(
                    partition = self.partition,
                    "the database restarted from a crash or failed over: the partition is reread from its start"
                );
                let Some(s) = (match self.checkout_or_stop().await {
                    Some(Ok(s)) => Some(s),
                    Some(Err(e)) => return Exit::Reconnect(e),
                    None => None,
                }) else {
                    return Exit::Stop;
                };
                reader.reset(s.incarnation.clone());
                drop(s);
                continue;
            }
            let batch = match reader
                .next_batch(&PgReadStore::new(&s.client, &self.ctx.sql, &s.read))
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    // The session's state is unknown: close it, claim again and reread.
                    s.discard();
                    return Exit::Reconnect(e);
                }
            };
            drop(s);
            if batch.is_empty() {
                continue;
            }
            // Keep only the rows read of the budget taken for a full batch.
            if let Some(b) = budget.as_mut() {
                drop(b.split(b.num_permits().saturating_sub(batch.len())));
            }
            let read_at = Instant::now();
            tracing::debug!(
                partition = self.partition,
                messages = batch.len(),
                first_id = batch[0].id,
                "batch read"
            );
            self.metrics
                .oldest_age
                .set((now_epoch() - batch[0].created_at_epoch).max(0.0));
            let publisher = &self.ctx.publisher;
            if flights.admits(&batch, blocked, |row| publisher.known_to_exist(row)) {
                let refs: Vec<&OutboxRow> = batch.iter().collect();
                if let Ok(sending) = publisher.start(&refs, flights.producer()).await {
                    drop(refs);
                    let (producer, whole) = (sending.producer(), sending.fully_enqueued());
                    flights.push(
                        batch,
                        read_at,
                        producer,
                        whole,
                        Box::pin(publisher.finish(sending)),
                    );
                    if let Some(b) = budget.take() {
                        flights.attach_budget(b);
                    }
                    continue;
                }
                // The producer was replaced since the batches in flight were sent: this
                // batch waits until they came back.
            }
            // The batch cannot join the ones in flight: it goes alone, round by round,
            // once they came back.
            let mut step = self.drain(&mut flights, reader, &mut blocked).await;
            if matches!(step, Ok(Step::Next)) {
                step = self
                    .deliver_and_retire(batch, &mut blocked, Refusals::new(), read_at, reader)
                    .await;
            } else {
                // The pipeline's own failure path decided (blocked, fenced, ...): this batch
                // is read again.
                reader.settle(batch.iter().map(|r| r.id));
            }
            if let Some(exit) = self.after(step, reader).await {
                return exit;
            }
        }
    }

    /// Turns a step into the worker's next move: `None` to go on, or why the hold ends.
    pub(super) async fn after(
        &mut self,
        step: Result<Step>,
        reader: &mut PartitionReader,
    ) -> Option<Exit> {
        match step {
            Ok(Step::Next) => None,
            Ok(Step::Exit(exit)) => Some(exit),
            Err(e) => Some(Exit::Reconnect(e)),
            Ok(Step::Blocked) => {
                // Reread from the database on the next try: an operator may have moved the
                // message aside (`outboxd skip`) or fixed its cause meanwhile.
                let incarnation = reader.incarnation().clone();
                reader.reset(incarnation);
                if self.sleep_or_stop(self.ctx.config.retry_max()).await {
                    return Some(Exit::Stop);
                }
                None
            }
        }
    }

    /// Shows the partition as retrying while the oldest batch in flight waits for its
    /// acknowledgements (Kafka unreachable or slow; the producer keeps trying).
    pub(super) fn report_slow_acks(&self, flights: &InFlight<'_>) {
        let Some((first, read_at)) = flights.oldest() else {
            return;
        };
        let last = self
            .ctx
            .publisher
            .events()
            .last_error()
            .map_or_else(String::new, |(_, e)| format!("; last client error: {e}"));
        let error = format!(
            "no acknowledgement from Kafka for {} s{last}",
            read_at.elapsed().as_secs()
        );
        tracing::warn!(partition = self.partition, message_id = first.id, %error, "waiting for Kafka");
        self.set_state(PartitionState::Retrying {
            message_id: first.id,
            error,
        });
    }
}

/// When to show the partition as retrying next: each time the oldest batch in flight has
/// waited another `ACK_WAIT_BEFORE_RETRYING` for its acknowledgements.
fn slow_acks_report_at(flights: &InFlight<'_>) -> tokio::time::Instant {
    let Some((_, read_at)) = flights.oldest() else {
        // Nothing in flight: far away (the other branches wake the worker).
        return tokio::time::Instant::now() + Duration::from_secs(3600);
    };
    let periods = read_at.elapsed().as_secs() / ACK_WAIT_BEFORE_RETRYING.as_secs() + 1;
    let due = ACK_WAIT_BEFORE_RETRYING * u32::try_from(periods).unwrap_or(u32::MAX);
    tokio::time::Instant::from_std(read_at + due)
}
