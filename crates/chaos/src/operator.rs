//! The operator, played by the harness for the whole run (faults, quiet tail and drain) with
//! the real command line, as a person on call would: under `park_entity` it unparks every
//! parked entity (`outboxd unpark ENTITY`) every few seconds; under `block` it skips
//! (`outboxd skip ID`) every poison message (payload flag `poison`; never a bystander of the
//! poison topic) it has seen waiting in `outbox.message` for [`BLOCK_WAIT`] or more, so the
//! partition really stays blocked for a while first; under
//! `dead_letter` there is nothing to do. It keeps going through PostgreSQL outages: a query
//! or a command that fails is logged, counted and tried again in the next round; that is not
//! an error of the run (if the operator never gets through, the outbox does not drain, and
//! that fails the run).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::clock::Clock;
use crate::poison::Policy;
use crate::services::Services;

/// How often the operator looks.
pub const ROUND: Duration = Duration::from_secs(2);

/// Under `block`, how long a poison message waits (as the operator sees it) before it is
/// skipped: long enough for the relay to hit it and block its partition.
pub const BLOCK_WAIT: Duration = Duration::from_secs(3);

/// The longest a command may take (it fails fast when PostgreSQL is down).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// What the operator needs.
#[derive(Debug, Clone)]
pub struct Operator {
    /// The chaos database (the operator's own view of it).
    pub services: Services,
    /// The `outboxd` binary whose `skip` / `unpark` it runs.
    pub outboxd: PathBuf,
    /// The poison topic's policy.
    pub policy: Policy,
    /// The poison topic.
    pub poison_topic: String,
    /// For log lines.
    pub clock: Clock,
}

/// What the operator did.
#[derive(Debug, Clone, Serialize)]
pub struct OperatorStats {
    /// The policy it acted for.
    pub policy: Policy,
    /// `outboxd skip` commands that moved a message.
    pub skips: u64,
    /// `outboxd unpark` commands that released an entity.
    pub unparks: u64,
    /// Commands that found nothing to do (the message or the parked entity had gone).
    pub gone: u64,
    /// Commands that failed (PostgreSQL down or recovering, ...), tried again later.
    pub command_failures: u64,
    /// Rounds whose query of the outbox failed (PostgreSQL down), tried again later.
    pub query_failures: u64,
    /// The last failure, for the summary.
    pub last_failure: Option<String>,
}

/// How one command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Done,
    /// `outboxd` answered that there is no such waiting message or parked entity.
    NothingThere,
    Failed(String),
}

/// Starts the operator; it acts until `stop` turns true and returns what it did.
pub fn spawn(
    op: Operator,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<OperatorStats> {
    tokio::spawn(async move {
        let mut stats = OperatorStats {
            policy: op.policy,
            skips: 0,
            unparks: 0,
            gone: 0,
            command_failures: 0,
            query_failures: 0,
            last_failure: None,
        };
        // Under block: when the operator first saw each poison message waiting.
        let mut first_seen: HashMap<i64, Instant> = HashMap::new();
        let mut client: Option<Client> = None;
        while !*stop.borrow() {
            let _ = tokio::time::timeout(ROUND, stop.changed()).await;
            if *stop.borrow() || op.policy == Policy::DeadLetter {
                continue;
            }
            if client.as_ref().is_none_or(Client::is_closed) {
                client = op.services.connect().await.ok();
            }
            let Some(c) = client.as_ref() else {
                stats.query_failures += 1;
                continue;
            };
            let found = match op.policy {
                Policy::Block => waiting_poison(c, &op.poison_topic, &mut first_seen).await,
                Policy::ParkEntity => parked_entities(c).await,
                Policy::DeadLetter => Ok(Vec::new()),
            };
            let due = match found {
                Ok(due) => due,
                Err(e) => {
                    stats.query_failures += 1;
                    op.clock.say(format!(
                        "operator: reading the outbox failed ({e}); next round"
                    ));
                    client = None;
                    continue;
                }
            };
            for target in due {
                let (verb, done) = match op.policy {
                    Policy::Block => ("skip", &mut stats.skips),
                    _ => ("unpark", &mut stats.unparks),
                };
                match op.command(verb, &target).await {
                    Outcome::Done => {
                        *done += 1;
                        op.clock.say(format!("operator: outboxd {verb} {target}"));
                        if let Ok(id) = target.parse::<i64>() {
                            first_seen.remove(&id);
                        }
                    }
                    Outcome::NothingThere => {
                        stats.gone += 1;
                        op.clock
                            .say(format!("operator: outboxd {verb} {target}: nothing there"));
                    }
                    Outcome::Failed(e) => {
                        stats.command_failures += 1;
                        op.clock.say(format!(
                            "operator: outboxd {verb} {target} failed, next round: {e}"
                        ));
                        stats.last_failure = Some(format!("outboxd {verb} {target}: {e}"));
                    }
                }
            }
        }
        stats
    })
}

/// Under `block`: the ids of poison messages waiting for [`BLOCK_WAIT`] or more since the
/// operator first saw them (`first_seen` is updated and forgets messages that went). Only
/// poison messages: a bystander that waits because its partition is blocked is not the
/// operator's to skip (if the relay blocked on one, the outbox does not drain).
async fn waiting_poison(
    client: &Client,
    topic: &str,
    first_seen: &mut HashMap<i64, Instant>,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id FROM outbox.message
              WHERE topic = $1
                AND (convert_from(payload, 'UTF8')::jsonb ->> 'poison') = 'true'
              ORDER BY id",
            &[&topic],
        )
        .await?;
    let now = Instant::now();
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    first_seen.retain(|id, _| ids.contains(id));
    Ok(ids
        .into_iter()
        .filter(|id| now - *first_seen.entry(*id).or_insert(now) >= BLOCK_WAIT)
        .map(|id| id.to_string())
        .collect())
}

/// Under `park_entity`: every parked entity.
async fn parked_entities(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT entity_key FROM outbox.parked_entity ORDER BY entity_key",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

impl Operator {
    /// Runs `outboxd VERB TARGET` against the chaos database and schema `outbox`, as
    /// `outboxd migrate` is run at the start.
    async fn command(&self, verb: &'static str, target: &str) -> Outcome {
        let mut command = Command::new(&self.outboxd);
        command
            .args([verb, target])
            .args(["--database-url", &self.services.database_url])
            .args(["--schema", "outbox"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if verb == "skip" {
            command.args([
                "--reason",
                "chaos operator: poison message blocking its partition",
            ]);
        }
        tokio::task::spawn_blocking(move || run(command))
            .await
            .unwrap_or_else(|e| Outcome::Failed(format!("waiting for the command: {e}")))
    }
}

/// Runs `command` to its end (killed after [`COMMAND_TIMEOUT`]).
fn run(mut command: Command) -> Outcome {
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("cannot start it: {e}")),
    };
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Outcome::Failed(format!("no answer within {COMMAND_TIMEOUT:?}"));
            }
            Err(e) => return Outcome::Failed(format!("waiting for it: {e}")),
        }
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    classify(status.success(), &stderr)
}

/// What `outboxd skip` / `unpark` said: success, "nothing to do", or a failure (its last
/// stderr line).
fn classify(success: bool, stderr: &str) -> Outcome {
    if success {
        return Outcome::Done;
    }
    let last = stderr.lines().last().unwrap_or_default().trim();
    if last.contains("no waiting message with id") || last.contains("is not parked") {
        Outcome::NothingThere
    } else {
        Outcome::Failed(last.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_answers_are_told_apart() {
        assert_eq!(classify(true, ""), Outcome::Done);
        assert_eq!(
            classify(false, "outboxd: not found: no waiting message with id 42\n"),
            Outcome::NothingThere
        );
        assert_eq!(
            classify(false, "outboxd: entity \"e007\" is not parked\n"),
            Outcome::NothingThere
        );
        assert_eq!(
            classify(false, "outboxd: postgres: connecting: connection refused\n"),
            Outcome::Failed("outboxd: postgres: connecting: connection refused".into())
        );
    }
}
