//! The run's summary: a human-readable block and the same as one JSON line (also written
//! to `summary.json` in the work folder), and the verdict that decides the exit code.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::checker::Findings;
use crate::operator::OperatorStats;
use crate::poison::Policy;
use crate::writers::WriterStats;

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Nothing lost, leaked, invented, reordered, misblamed, published that Kafka must
    /// refuse or published ahead of a poison message, and the run completed.
    Pass,
    /// The checker found violations, or the relays did not publish everything by
    /// themselves after the writers stopped.
    Fail,
    /// The run could not complete (see `problems`); findings may be partial.
    Incomplete,
}

/// Everything the run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The seed; `--seed` with it replays the same fault schedule.
    pub seed: u64,
    /// The verdict.
    pub verdict: Verdict,
    /// The poison topic's failure policy (unknown when rechecking an older run).
    pub poison_policy: Option<Policy>,
    /// Flags beyond the seed that changed what the run tests (`--poison-policy`, ...):
    /// part of the command that reproduces it.
    pub overrides: Vec<String>,
    /// Length of the writing phase (faults plus the quiet tail), in s.
    pub write_seconds: f64,
    /// Wall time of the whole run, in s.
    pub wall_seconds: f64,
    /// Faults carried out, per kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// The checker's findings.
    pub findings: Findings,
    /// True when the outbox emptied by itself after the writers stopped.
    pub drained: bool,
    /// What was left in the outbox when it did not drain.
    pub stuck: Vec<String>,
    /// The longest time a partition with waiting messages had no live owner (shown, not
    /// judged; `None` when rechecking or when it never happened).
    pub longest_unowned: Option<crate::ownership::Gap>,
    /// Relay exits no fault asked for (shown, not judged: the harness restarts the relay).
    pub relay_exits: Vec<String>,
    /// Lines of the relay logs that say a partition blocked or a message was moved to
    /// dead_letter (shown, not judged).
    pub relay_log_counts: BTreeMap<&'static str, usize>,
    /// Service starts that failed before a later attempt succeeded (shown, not judged).
    pub notes: Vec<String>,
    /// What the Rust writers did (their own view; not used for the verdict).
    pub rust_writers: WriterStats,
    /// What the Python writer did (its own view; not used for the verdict).
    pub python_writer: serde_json::Value,
    /// What the operator did (`None` when rechecking).
    pub operator: Option<OperatorStats>,
    /// Why the run is incomplete or suspect, besides the findings.
    pub problems: Vec<String>,
}

impl Summary {
    /// The verdict from the findings and the problems.
    pub fn decide(&mut self) {
        self.verdict = if !self.findings.clean() || !self.drained {
            Verdict::Fail
        } else if !self.problems.is_empty() {
            Verdict::Incomplete
        } else {
            Verdict::Pass
        };
    }

    /// The process exit code: 0 only for a pass.
    pub fn exit_code(&self) -> u8 {
        match self.verdict {
            Verdict::Pass => 0,
            Verdict::Fail => 1,
            Verdict::Incomplete => 2,
        }
    }

    /// The human-readable block.
    pub fn human(&self) -> String {
        let f = &self.findings;
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line("==================== chaos summary ====================".into());
        let overrides: String = self.overrides.iter().map(|o| format!(" {o}")).collect();
        line(format!(
            "seed            {} (reproduce: scripts/chaos --seconds {:.0} --seed {}{overrides})",
            self.seed, self.write_seconds, self.seed
        ));
        line(format!(
            "verdict         {}",
            match self.verdict {
                Verdict::Pass => "PASS",
                Verdict::Fail => "FAIL",
                Verdict::Incomplete => "INCOMPLETE",
            }
        ));
        line(format!(
            "duration        {:.0}s writing, {:.0}s in all",
            self.write_seconds, self.wall_seconds
        ));
        line(format!(
            "poison policy   {}",
            self.poison_policy.map_or("unknown", Policy::as_str)
        ));
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        line(format!("faults          {}", faults.join(", ")));
        line(format!(
            "committed       {} messages (database); {} records read from Kafka",
            f.committed_messages, f.records
        ));
        let mut whereabouts = Vec::new();
        if f.lost_still_in_outbox > 0 {
            whereabouts.push(format!("{} still in the outbox", f.lost_still_in_outbox));
        }
        if f.lost_in_dead_letter > 0 {
            whereabouts.push(format!("{} in dead_letter", f.lost_in_dead_letter));
        }
        line(format!(
            "lost            {}{}",
            f.lost,
            if whereabouts.is_empty() {
                String::new()
            } else {
                format!(" ({})", whereabouts.join(", "))
            }
        ));
        if !f.lost_by_writer.is_empty() {
            let by: Vec<String> = f
                .lost_by_writer
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            line(format!("  lost by writer: {}", by.join(", ")));
        }
        line(format!(
            "leaked          {} ({} with the rb flag)",
            f.leaked, f.leaked_rb_flag
        ));
        if f.erased_by_crash > 0 {
            line(format!(
                "erased          {} records of asynchronous commits a crash erased (not a violation)",
                f.erased_by_crash
            ));
        }
        line(format!(
            "reordered       {} ({} also out of order on their own topic, {} only across topics; up to {} ms late)",
            f.reordered,
            f.reordered - f.reordered_across_topics,
            f.reordered_across_topics,
            f.reorder_max_gap_ms
        ));
        if f.malformed > 0 {
            line(format!("malformed       {}", f.malformed));
        }
        let w = &self.rust_writers;
        let policies: Vec<String> = f
            .dead_letter_policies
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        line(format!(
            "poison          {} written ({} in transactions seen to commit), {} committed (database), {} of them in dead_letter; dead_letter rows by policy: {}{}",
            w.poison_written,
            w.poison_committed,
            f.poison_committed,
            f.poison_dead_lettered,
            if policies.is_empty() {
                "none".to_owned()
            } else {
                policies.join(", ")
            },
            if f.dead_letter_uncommitted > 0 {
                format!(
                    "; {} rows of no committed message (not judged)",
                    f.dead_letter_uncommitted
                )
            } else {
                String::new()
            }
        ));
        line(format!("misblamed       {}", f.misblamed));
        line(format!("poison published {}", f.poison_published));
        line(format!(
            "overtook poison {}{}{}",
            f.overtook_poison,
            f.poison_to_next_min_ms.map_or(String::new(), |ms| format!(
                " (the closest later record of an entity came {ms:.1} ms after its poison message was moved aside)"
            )),
            if f.overtook_poison_across_crash > 0 {
                format!(
                    " ({} more across a crash that erased the relay's move: not violations)",
                    f.overtook_poison_across_crash
                )
            } else {
                String::new()
            }
        ));
        line(format!("duplicates      {}", f.duplicates));
        match &f.latency_ms {
            Some(l) => line(format!(
                "commit->arrival p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} messages)",
                l.p50, l.p99, l.max, l.count
            )),
            None => line("commit->arrival (no message measured)".into()),
        }
        if !f.slowest_windows.is_empty() {
            let windows: Vec<String> = f
                .slowest_windows
                .iter()
                .map(|w| {
                    format!(
                        "+{}s: p99 {:.1} s ({} msgs)",
                        w.start_s,
                        w.p99_ms / 1000.0,
                        w.count
                    )
                })
                .collect();
            line(format!(
                "  slowest 5 s windows of commit time: {}",
                windows.join(", ")
            ));
        }
        line(format!(
            "drained         {}",
            if self.drained { "yes" } else { "NO" }
        ));
        for s in &self.stuck {
            line(format!("  stuck: {s}"));
        }
        if let Some(g) = &self.longest_unowned {
            line(format!(
                "longest unowned {:.1} s (partition {} from +{:.1}s): a partition with waiting messages and no live owner",
                g.seconds, g.partition, g.from_s
            ));
        }
        line(format!(
            "rust writers    {} tx committed ({} messages, {} asynchronously), {} rolled back, {} savepoints rolled back, {} held open, {} failed, {} unknown commits, {} short batches refused",
            w.committed_tx,
            w.committed_messages,
            w.async_commits,
            w.rolled_back_tx,
            w.savepoint_rollbacks,
            w.long_tx,
            w.failed_tx,
            w.unknown_commits,
            w.short_batch_errors
        ));
        line(format!("python writer   {}", self.python_writer));
        if !self.relay_log_counts.is_empty() {
            let counts: Vec<String> = self
                .relay_log_counts
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            line(format!("relay logs      {}", counts.join(", ")));
        }
        if let Some(op) = &self.operator {
            line(format!(
                "operator        {} skips, {} unparks, {} found nothing to do, {} failed commands, {} failed looks{}",
                op.skips,
                op.unparks,
                op.gone,
                op.command_failures,
                op.query_failures,
                op.last_failure
                    .as_ref()
                    .map_or(String::new(), |e| format!(" (last: {e})"))
            ));
        }
        for e in &self.relay_exits {
            line(format!("relay exit      {e}"));
        }
        for n in &self.notes {
            line(format!("note            {n}"));
        }
        for p in &self.problems {
            line(format!("problem         {p}"));
        }
        for e in &f.examples {
            line(format!("  {e}"));
        }
        line("=======================================================".into());
        out
    }

    /// The summary as one line of JSON.
    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}
