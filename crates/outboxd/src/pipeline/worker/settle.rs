//! What happens to a partition worker's batches once they come back or must: retiring
//! (deleting) what Kafka acknowledged, together with the other partitions (`retire`), only
//! under the worker's epoch; the failure path (wait for every batch in flight, retire what
//! was acknowledged, deliver the rest in read order, round by round); draining before a
//! hand-over, a drain or a reread; retiring on shutdown.

use super::*;

impl Worker<'_> {
    /// Waits until every batch in flight came back, retiring them in order (and delivering
    /// what failed, round by round).
    pub(super) async fn drain(
        &mut self,
        flights: &mut InFlight<'_>,
        reader: &mut PartitionReader,
        blocked: &mut Option<i64>,
    ) -> Result<Step> {
        while let Some((flight, acks)) = flights.next_done().await {
            match self.landed(flight, acks, flights, reader, blocked).await? {
                Step::Next => {}
                other => return Ok(other),
            }
        }
        self.retire_held(flights, reader).await
    }

    /// On shutdown: waits for the batches in flight (the relay bounds the wait with
    /// `shutdown_timeout_ms`) and retires what Kafka acknowledged, so that a restart does
    /// not publish it again. What failed stays in the table for the next start.
    pub(super) async fn retire_on_stop(
        &mut self,
        flights: &mut InFlight<'_>,
        reader: &mut PartitionReader,
    ) {
        if let Err(e) = self.retire_held(flights, reader).await {
            tracing::debug!(partition = self.partition, error = %e,
                "could not retire on shutdown; the batch is published again after a restart");
            return;
        }
        while let Some((flight, acks)) = flights.next_done().await {
            let acked: Vec<&OutboxRow> = flight
                .rows
                .iter()
                .zip(&acks)
                .filter(|(_, a)| matches!(a, Sent::Acked))
                .map(|(r, _)| r)
                .collect();
            if acked.is_empty() {
                continue;
            }
            match self.retire_now(&acked).await {
                Ok(true) => reader.settle(acked.iter().map(|r| r.id)),
                Ok(false) => return,
                Err(e) => {
                    tracing::debug!(partition = self.partition, error = %e,
                        "could not retire on shutdown; the batch is published again after a restart");
                    return;
                }
            }
        }
    }

    /// Retires the oldest batches in flight that Kafka has acknowledged whole, in one
    /// statement.
    pub(super) async fn retire_acknowledged(
        &mut self,
        flights: &mut InFlight<'_>,
        reader: &mut PartitionReader,
    ) -> Result<Step> {
        let mut landed = Vec::new();
        while let Some((flight, _)) = flights.take_if_acked() {
            landed.push(flight);
        }
        self.retire_flights(landed, flights, reader).await
    }

    /// When the acknowledged messages held must be deleted (far away when none are held).
    pub(super) fn retire_due_at(&self, flights: &InFlight<'_>) -> tokio::time::Instant {
        let config = &self.ctx.config;
        flights
            .retire_due_at(
                &self.ctx.retire_clock,
                config.retire_interval(),
                config.batch_size,
            )
            .map_or_else(
                || tokio::time::Instant::now() + Duration::from_secs(3600),
                tokio::time::Instant::from_std,
            )
    }

    /// Deletes the acknowledged messages held, in one statement.
    pub(super) async fn retire_held(
        &mut self,
        flights: &mut InFlight<'_>,
        reader: &mut PartitionReader,
    ) -> Result<Step> {
        let ids = flights.take_acked();
        if ids.is_empty() {
            return Ok(Step::Next);
        }
        if !self.retire_ids(&ids).await? {
            return Ok(self.fenced_at_retire());
        }
        reader.settle(ids);
        Ok(Step::Next)
    }

    /// The oldest batch in flight came back with `acks`. Acknowledged whole, it is retired
    /// (with the batches behind it that are also acknowledged). Otherwise every batch in
    /// flight is waited for, what Kafka acknowledged is retired, and the rest, in read
    /// order, is delivered round by round as one batch, with the refusals already known:
    /// nothing of it is in flight any more, so retries in place and the topics' policies
    /// act as they do for a batch sent alone.
    pub(super) async fn landed<'f>(
        &mut self,
        flight: Flight<'f>,
        acks: Vec<Sent>,
        flights: &mut InFlight<'f>,
        reader: &mut PartitionReader,
        blocked: &mut Option<i64>,
    ) -> Result<Step> {
        if acks.iter().all(|a| matches!(a, Sent::Acked)) {
            let mut landed = vec![flight];
            while let Some((next, _)) = flights.take_if_acked() {
                landed.push(next);
            }
            return self.retire_flights(landed, flights, reader).await;
        }
        let mut returned = vec![(flight, acks)];
        while let Some(next) = flights.next_done().await {
            returned.push(next);
        }
        let read_at = returned[0].0.read_at;
        let mut acked = Vec::new();
        let mut rest = Vec::new();
        let mut refusals = Refusals::new();
        for (flight, acks) in returned {
            for (row, sent) in flight.rows.into_iter().zip(acks) {
                match sent {
                    Sent::Acked => acked.push(row),
                    Sent::Failed(f) => {
                        if f.kind == Refusal::Retriable {
                            self.metrics.retriable_errors.increment(1);
                        } else {
                            refusals.insert(row.id, f);
                        }
                        rest.push(row);
                    }
                    Sent::NotSent => rest.push(row),
                }
            }
        }
        tracing::debug!(
            partition = self.partition,
            acknowledged = acked.len(),
            failed = rest.len(),
            "a batch in flight failed: the rest goes round by round"
        );
        // A refusal in a Kafka partition is fatal for the gap-less producer; the first worker
        // to notice replaces it.
        self.ctx.publisher.recover_if_fatal()?;
        if let Step::Exit(exit) = self.retire_held(flights, reader).await? {
            return Ok(Step::Exit(exit));
        }
        if !acked.is_empty() {
            let refs: Vec<&OutboxRow> = acked.iter().collect();
            if !self.retire_now(&refs).await? {
                return Ok(self.fenced_at_retire());
            }
            reader.settle(acked.iter().map(|r| r.id));
        }
        self.deliver_and_retire(rest, blocked, refusals, read_at, reader)
            .await
    }

    /// Retires batches Kafka acknowledged whole, in one statement.
    pub(super) async fn retire_flights(
        &mut self,
        landed: Vec<Flight<'_>>,
        flights: &mut InFlight<'_>,
        reader: &mut PartitionReader,
    ) -> Result<Step> {
        if !landed.is_empty() {
            let rows: Vec<&OutboxRow> = landed.iter().flat_map(|f| f.rows.iter()).collect();
            self.acknowledged(&rows);
            flights.hold_acked(rows.iter().map(|r| r.id));
            for flight in &landed {
                self.metrics.batches.increment(1);
                self.metrics
                    .batch_duration
                    .record(flight.read_at.elapsed().as_secs_f64());
                self.metrics.batch_size.record(flight.rows.len() as f64);
            }
            self.set_state(PartitionState::Relaying);
        }
        if self.retire_due_at(flights) <= tokio::time::Instant::now() {
            return self.retire_held(flights, reader).await;
        }
        Ok(Step::Next)
    }

    pub(super) fn fenced_at_retire(&self) -> Step {
        self.ctx.ownership.fencing_rejection();
        Step::Exit(Exit::Fenced(
            "another instance took the lease over: the batch was not retired (its new owner publishes it again)",
        ))
    }

    /// Counts `rows` as published (Kafka acknowledged them) and notes that their topics
    /// exist.
    pub(super) fn acknowledged(&self, rows: &[&OutboxRow]) {
        self.ctx.publisher.note_acknowledged(rows.iter().copied());
        let now = now_epoch();
        for row in rows {
            self.metrics
                .commit_to_ack
                .record((now - row.created_at_epoch).max(0.0));
        }
        self.metrics.published.increment(rows.len() as u64);
    }

    /// Deletes messages Kafka acknowledged, only while this worker's lease holds, in one
    /// statement with whatever other partitions retire at the same moment (see `retire`);
    /// false when it was fenced (nothing deleted). An error means the statement failed.
    pub(super) async fn retire_ids(&self, ids: &[i64]) -> Result<bool> {
        self.ctx.faults.before_write(self.partition).await;
        self.ctx
            .retirements
            .retire(
                &self.ctx.sessions,
                self.ctx.ownership.instance(),
                self.partition,
                self.epoch,
                ids.to_vec(),
            )
            .await
    }

    /// Counts `rows` as published and deletes them at once (see `retire_ids`).
    pub(super) async fn retire_now(&self, rows: &[&OutboxRow]) -> Result<bool> {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let held = self.retire_ids(&ids).await?;
        if held {
            self.acknowledged(rows);
        }
        Ok(held)
    }

    /// Delivers `batch` alone, round by round (nothing else of this partition is in flight),
    /// and retires what Kafka acknowledged, on a session of the pool; an error means a
    /// session failed (it was closed; the caller claims again and rereads).
    pub(super) async fn deliver_and_retire(
        &mut self,
        batch: Vec<OutboxRow>,
        blocked: &mut Option<i64>,
        refusals: Refusals,
        read_at: Instant,
        reader: &mut PartitionReader,
    ) -> Result<Step> {
        let Some(first) = batch.first() else {
            return Ok(Step::Next);
        };
        tracing::debug!(
            partition = self.partition,
            messages = batch.len(),
            first_id = first.id,
            "batch delivered round by round"
        );
        let (acked, outcome) = self.deliver(&batch, *blocked, refusals).await?;
        if !acked.is_empty() && !self.retire_now(&acked).await? {
            return Ok(self.fenced_at_retire());
        }
        match outcome {
            Outcome::Done => {
                // Acknowledged, moved aside, or held back with a parked entity (which reads
                // leave out).
                reader.settle(batch.iter().map(|r| r.id));
                *blocked = None;
                self.metrics.batches.increment(1);
                self.metrics
                    .batch_duration
                    .record(read_at.elapsed().as_secs_f64());
                self.metrics.batch_size.record(batch.len() as f64);
                self.set_state(PartitionState::Relaying);
                Ok(Step::Next)
            }
            Outcome::Stopped => Ok(Step::Exit(Exit::Stop)),
            Outcome::Fenced => {
                self.ctx.ownership.fencing_rejection();
                Ok(Step::Exit(Exit::Fenced(
                    "another instance took the lease over: the refused message was not moved aside",
                )))
            }
            Outcome::Blocked { message_id } => {
                *blocked = Some(message_id);
                Ok(Step::Blocked)
            }
        }
    }
}
