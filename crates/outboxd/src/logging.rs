//! The relay's log output: human-readable text or one JSON object per line, on stderr, with
//! the records of tokio-postgres and librdkafka in the same stream; and repeated warnings
//! held back during an outage: the first line of a kind passes, the same kind within the
//! next [`REPEAT_WINDOW`] is counted instead, and a summary line gives the count.
//!
//! "The same kind" is the same place in the code and the same message text; the error text
//! may differ (sixteen partition workers failing to reconnect are one kind).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// How long repeats of one kind of warning are counted instead of logged.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(30);

/// The log format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// Installs the global subscriber: `RUST_LOG` (default `info`), `format`, repeats held back.
/// Starts the thread that writes the summary lines.
pub fn init(format: LogFormat) {
    let repeats = Arc::new(Repeats::new(REPEAT_WINDOW));
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = match format {
        LogFormat::Pretty => fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(
            layer
                .with_filter(RepeatFilter(Arc::clone(&repeats)))
                .with_filter(filter()),
        )
        .init();
    std::thread::Builder::new()
        .name("log-repeats".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(REPEAT_WINDOW);
                for (what, count) in repeats.take_counts() {
                    tracing::warn!(
                        target: "outboxd::log",
                        suppressed = count,
                        "repeated {count} more times in the last {} s: {what}",
                        REPEAT_WINDOW.as_secs()
                    );
                }
            }
        })
        .map(drop)
        .unwrap_or_else(|e| eprintln!("outboxd: cannot start the log summary thread: {e}"));
}

/// Which kinds of warnings were seen when, and how many repeats were held back.
#[derive(Debug)]
pub struct Repeats {
    window: Duration,
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Repeats {
    /// Holds back repeats for `window`.
    pub fn new(window: Duration) -> Self {
        Repeats {
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, u64)>> {
        match self.seen.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// True when a line of kind `key` should be written at `now`; false when it repeats one
    /// written less than the window ago (then it is counted).
    pub fn admit(&self, key: &str, now: Instant) -> bool {
        let mut seen = self.seen();
        match seen.get_mut(key) {
            Some((since, count)) if now.duration_since(*since) < self.window => {
                *count += 1;
                false
            }
            Some((since, _)) => {
                *since = now;
                true
            }
            None => {
                seen.insert(key.to_owned(), (now, 0));
                true
            }
        }
    }

    /// The kinds with repeats held back since the last call, with their counts (reset).
    pub fn take_counts(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (key, (_, count)) in self.seen().iter_mut() {
            if *count > 0 {
                out.push((key.clone(), *count));
                *count = 0;
            }
        }
        out.sort();
        out
    }
}

/// Holds back repeated warnings and errors (see the module docs).
struct RepeatFilter(Arc<Repeats>);

impl<S: Subscriber> Filter<S> for RepeatFilter {
    fn enabled(&self, _meta: &tracing::Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() > Level::WARN || meta.target() == "outboxd::log" {
            return true;
        }
        let mut message = MessageText(String::new());
        event.record(&mut message);
        let key = format!(
            "{} ({}:{})",
            message.0,
            meta.target(),
            meta.line().unwrap_or(0)
        );
        self.0.admit(&key, Instant::now())
    }
}

/// The `message` field of an event.
struct MessageText(String);

impl tracing::field::Visit for MessageText {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            value.clone_into(&mut self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_passes_repeats_are_counted_and_the_next_window_passes_again() {
        let repeats = Repeats::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert!(repeats.admit("cannot reach PostgreSQL", t0));
        for i in 1..=5 {
            assert!(!repeats.admit("cannot reach PostgreSQL", t0 + Duration::from_secs(i)));
        }
        assert!(repeats.admit("another kind", t0 + Duration::from_secs(2)));
        assert_eq!(
            repeats.take_counts(),
            vec![("cannot reach PostgreSQL".to_owned(), 5)]
        );
        assert_eq!(repeats.take_counts(), vec![], "counts reset");
        assert!(repeats.admit("cannot reach PostgreSQL", t0 + Duration::from_secs(31)));
    }
}
