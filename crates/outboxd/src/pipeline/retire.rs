//! Retiring (deleting) published messages for all the partitions of this instance in as
//! few statements as possible: group commit. A worker that wants its acknowledged ids
//! deleted queues them; whoever finds no retirement statement running becomes the leader
//! and runs one statement for everything queued, every partition's ids with its lease
//! check, then hands each worker its answer. Workers that arrive meanwhile queue up and go
//! together in the next statement. With the workers' periodic retirements on one shared
//! clock (see [`RetireClock`]), the partitions of an instance retire together: one or two
//! statements per `retire_interval_ms` instead of one per partition.
//!
//! There is no task to supervise: the leader is a worker that waits for its own answer
//! anyway. Should a leader's future be dropped mid-statement (its worker stopped), the
//! others' answers are dropped with it and they see an error, as for a failed session: they
//! reread and publish again (duplicates, never a loss). A request whose worker stopped
//! waiting before its statement ran is dropped, so a partition's ids only ever go with the
//! epoch of a worker that still waits for them.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::sessions::SessionPool;

/// One worker's request: delete `ids` of `partition` if its lease still carries `epoch`.
struct Request {
    partition: i32,
    epoch: i64,
    ids: Vec<i64>,
    answer: oneshot::Sender<std::result::Result<bool, String>>,
}

/// The queue of retirements and the one statement that may run at a time.
#[derive(Default)]
pub struct Retirements {
    queued: Mutex<Vec<Request>>,
    leader: tokio::sync::Mutex<()>,
}

impl Retirements {
    fn queued(&self) -> std::sync::MutexGuard<'_, Vec<Request>> {
        match self.queued.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Takes everything queued that a worker still waits for. A request nobody waits for
    /// any more (its worker stopped) is left out: its ids are retired by the partition's
    /// next owner, under its own epoch, or published again; never retired under an epoch
    /// that may have moved on.
    fn take_batch(&self) -> Vec<Request> {
        let mut batch = std::mem::take(&mut *self.queued());
        batch.retain(|r| !r.answer.is_closed());
        batch
    }

    /// Deletes `ids` of `partition`, only while this instance's lease of it carries
    /// `epoch` (fencing, see `Statements::retire`); false when it was fenced (nothing of
    /// it deleted). An error means the statement failed (its session was closed).
    pub async fn retire(
        &self,
        sessions: &std::sync::Arc<SessionPool>,
        instance: &str,
        partition: i32,
        epoch: i64,
        ids: Vec<i64>,
    ) -> Result<bool> {
        let (answer, mut answered) = oneshot::channel();
        self.queued().push(Request {
            partition,
            epoch,
            ids,
            answer,
        });
        loop {
            tokio::select! {
                biased;
                got = &mut answered => {
                    return match got {
                        Ok(Ok(held)) => Ok(held),
                        Ok(Err(e)) => Err(Error::Retirement(e)),
                        Err(_) => Err(Error::Retirement(
                            "the worker running the statement stopped".to_owned(),
                        )),
                    };
                }
                turn = self.leader.lock() => {
                    // Workers woken by the same tick of the retire clock queue their ids
                    // in the next moments: let them, so one statement takes them all.
                    tokio::task::yield_now().await;
                    let batch = self.take_batch();
                    if !batch.is_empty() {
                        run(sessions, instance, batch).await;
                    }
                    drop(turn);
                }
            }
        }
    }
}

/// Runs one retirement statement for `batch` and answers every request.
async fn run(sessions: &std::sync::Arc<SessionPool>, instance: &str, batch: Vec<Request>) {
    let mut partitions = Vec::with_capacity(batch.len());
    let mut epochs = Vec::with_capacity(batch.len());
    let mut id_partitions = Vec::new();
    let mut ids = Vec::new();
    for r in &batch {
        partitions.push(r.partition);
        epochs.push(r.epoch);
        id_partitions.extend(std::iter::repeat_n(r.partition, r.ids.len()));
        ids.extend_from_slice(&r.ids);
    }
    let outcome = match sessions.checkout().await {
        Ok(s) => {
            let result = s
                .client
                .query_one(
                    &s.retire,
                    &[&partitions, &epochs, &instance, &id_partitions, &ids],
                )
                .await
                .and_then(|row| row.try_get::<_, Vec<i32>>(0));
            if result.is_err() {
                s.discard();
            }
            result.map_err(|e| outbox::describe_pg_error(&e))
        }
        Err(e) => Err(e.to_string()),
    };
    for r in batch {
        let answer = match &outcome {
            Ok(held) => Ok(held.contains(&r.partition)),
            Err(e) => Err(e.clone()),
        };
        // A worker that stopped waiting no longer needs its answer.
        let _ = r.answer.send(answer);
    }
}

/// The clock every worker's periodic retirement follows: due times fall on multiples of
/// the retire interval since the relay started, so the partitions' retirements meet in
/// one statement (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct RetireClock {
    origin: std::time::Instant,
}

impl Default for RetireClock {
    fn default() -> Self {
        RetireClock {
            origin: std::time::Instant::now(),
        }
    }
}

impl RetireClock {
    /// The first tick after `since`, with ticks `interval` apart: acknowledged ids held
    /// since then wait at most `interval`.
    pub fn next_tick(&self, since: std::time::Instant, interval: Duration) -> std::time::Instant {
        let Some(elapsed) = since.checked_duration_since(self.origin) else {
            return since + interval;
        };
        if interval.is_zero() {
            return since;
        }
        let n = elapsed.as_nanos() / interval.as_nanos() + 1;
        let offset = interval.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX));
        self.origin + offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_nobody_waits_for_is_not_retired() {
        let r = Retirements::default();
        let (gone, dropped) = oneshot::channel();
        drop(dropped);
        let (waiting, _kept) = oneshot::channel();
        for (partition, answer) in [(1, gone), (2, waiting)] {
            r.queued().push(Request {
                partition,
                epoch: 1,
                ids: vec![10],
                answer,
            });
        }
        let batch = r.take_batch();
        assert_eq!(
            batch.iter().map(|q| q.partition).collect::<Vec<_>>(),
            vec![2]
        );
        assert!(r.take_batch().is_empty(), "taken once");
    }

    #[test]
    fn ticks_are_shared_and_never_further_than_an_interval() {
        let clock = RetireClock::default();
        let interval = Duration::from_millis(100);
        let a = clock.origin + Duration::from_millis(130);
        let b = clock.origin + Duration::from_millis(199);
        assert_eq!(
            clock.next_tick(a, interval),
            clock.origin + Duration::from_millis(200)
        );
        assert_eq!(clock.next_tick(b, interval), clock.next_tick(a, interval));
        let on_tick = clock.origin + Duration::from_millis(300);
        assert_eq!(
            clock.next_tick(on_tick, interval),
            clock.origin + Duration::from_millis(400)
        );
        assert_eq!(clock.next_tick(a, Duration::ZERO), a, "0: at once");
    }
}
