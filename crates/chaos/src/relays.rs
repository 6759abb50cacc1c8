//! The relay processes under test: several `outboxd run` instances against the chaos
//! services, configured so that the sticky-mapping cleanup races the writers
//! (`--mapping-cleanup-interval-ms 200 --mapping-ttl-s 0`) and retries stay short, with a
//! configuration file that sets the poison topic's failure policy (poison.rs). Each has
//! its own log file (`relay-N.log`, one marker line per start). Faults kill them with
//! SIGKILL, pause them with SIGSTOP / SIGCONT, or stop them with SIGTERM, and start them
//! again; a relay that exits when no fault asked it to is recorded
//! and restarted by [`Relays::supervise`]. Their pids are kept in `relays.pid`, so relays
//! left behind by an interrupted run are stopped by the next one.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::error::{Context, Error, Result};

/// How to start a relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The `outboxd` binary.
    pub binary: PathBuf,
    /// The chaos database.
    pub database_url: String,
    /// The chaos broker.
    pub brokers: String,
    /// Where the logs and the pid file go.
    pub work_dir: PathBuf,
    /// The configuration file (`--config`), written by the run before the first start.
    pub config_file: PathBuf,
}

/// One relay's state.
#[derive(Debug, Default)]
struct Slot {
    child: Option<Child>,
    /// True while a fault keeps it down (the supervisor leaves it alone).
    held_down: bool,
    starts: u32,
}

/// The relay processes, shared by the fault tasks and the supervisor.
#[derive(Debug, Clone)]
pub struct Relays {
    config: RelayConfig,
    clock: Clock,
    slots: Arc<Mutex<Vec<Slot>>>,
    /// Exits no fault asked for: "relay-1 exited with ... at +12.3s".
    unexpected: Arc<Mutex<Vec<String>>>,
}

impl Relays {
    /// `count` relays, none started yet; stops relays an earlier run left running.
    pub fn new(config: RelayConfig, count: usize, clock: Clock) -> Result<Relays> {
        if !config.binary.is_file() {
            return Err(Error::msg(format!(
                "{} not found: cargo build -p outboxd (scripts/chaos does)",
                config.binary.display()
            )));
        }
        let relays = Relays {
            config,
            clock,
            slots: Arc::new(Mutex::new((0..count).map(|_| Slot::default()).collect())),
            unexpected: Arc::new(Mutex::new(Vec::new())),
        };
        relays.stop_leftovers();
        for i in 0..count {
            // A fresh log per run.
            std::fs::write(relays.log_path(i), b"").context("creating a relay log")?;
        }
        Ok(relays)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Slot>> {
        match self.slots.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.config.work_dir.join(format!("relay-{i}.log"))
    }

    fn pid_file(&self) -> PathBuf {
        self.config.work_dir.join("relays.pid")
    }

    /// Kills the relays listed in the pid file that are still `outboxd` processes.
    fn stop_leftovers(&self) {
        let Ok(pids) = std::fs::read_to_string(self.pid_file()) else {
            return;
        };
        for pid in pids.split_whitespace() {
            let is_relay = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("outboxd"));
            if is_relay {
                eprintln!("[chaos] stopping relay {pid} left by an earlier run");
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = std::fs::remove_file(self.pid_file());
    }

    fn write_pid_file(&self, slots: &[Slot]) {
        let pids: Vec<String> = slots
            .iter()
            .filter_map(|s| s.child.as_ref().map(|c| c.id().to_string()))
            .collect();
        let _ = std::fs::write(self.pid_file(), pids.join("\n"));
    }

    /// Starts relay `i` (a no-op when it runs).
    pub fn start(&self, i: usize) -> Result<()> {
        let mut slots = self.lock();
        let slot = slots
            .get_mut(i)
            .ok_or_else(|| Error::msg(format!("no relay {i}")))?;
        slot.held_down = false;
        if slot
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        {
            return Ok(());
        }
        slot.starts += 1;
        let path = self.log_path(i);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .context(format!("opening {}", path.display()))?;
        let _ = writeln!(
            log,
            "=== chaos: start #{} of relay-{i} at +{:.1}s ===",
            slot.starts,
            self.clock.elapsed().as_secs_f64()
        );
        let child = Command::new(&self.config.binary)
            .arg("run")
            .arg("--config")
            .arg(&self.config.config_file)
            .args(["--database-url", &self.config.database_url])
            .args(["--brokers", &self.config.brokers])
            .args([
                "--mapping-cleanup-interval-ms",
                "200",
                "--mapping-ttl-s",
                "0",
            ])
            .args(["--retry-initial-ms", "50", "--retry-max-ms", "1000"])
            .args(["--batch-size", "100", "--shutdown-timeout-ms", "5000"])
            // Short leases, so that a paused relay's partitions move within the run.
            .args(["--lease-ttl-ms", "3000"])
            .env("RUST_LOG", "info")
            // Plain text logs: they are files, read by people and grep.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context(format!("starting {}", self.config.binary.display()))?;
        slot.child = Some(child);
        self.write_pid_file(&slots);
        Ok(())
    }

    /// Starts every relay.
    pub fn start_all(&self) -> Result<()> {
        (0..self.count()).try_for_each(|i| self.start(i))
    }

    /// How many relays there are.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Fault: `kill -9` relay `i` and keep it down until [`Relays::start`].
    pub fn kill(&self, i: usize) -> Result<()> {
        let mut slots = self.lock();
        let slot = slots
            .get_mut(i)
            .ok_or_else(|| Error::msg(format!("no relay {i}")))?;
        slot.held_down = true;
        if let Some(mut child) = slot.child.take() {
            // SIGKILL; an error means it had exited already, which supervise reports.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.write_pid_file(&slots);
        Ok(())
    }

    /// Fault: sends `signal` (`-STOP`, `-CONT`) to relay `i`.
    pub fn signal(&self, i: usize, signal: &str) -> Result<()> {
        let slots = self.lock();
        let child = slots
            .get(i)
            .and_then(|s| s.child.as_ref())
            .ok_or_else(|| Error::msg(format!("relay {i} is not running")))?;
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .context("kill")?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::msg(format!("kill {signal} relay-{i} failed")))
        }
    }

    /// Fault: stops relay `i` gracefully (SIGTERM, up to `grace`, then SIGKILL) and keeps it
    /// down until [`Relays::start`].
    pub fn stop_one(&self, i: usize, grace: Duration) -> Result<()> {
        let child = {
            let mut slots = self.lock();
            let slot = slots
                .get_mut(i)
                .ok_or_else(|| Error::msg(format!("no relay {i}")))?;
            slot.held_down = true;
            slot.child.take()
        };
        if let Some(mut child) = child {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + grace;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.write_pid_file(&self.lock());
        Ok(())
    }

    /// Records relays that exited although no fault held them down, and starts them again.
    pub fn supervise(&self) {
        let exited: Vec<usize> = {
            let mut slots = self.lock();
            let mut exited = Vec::new();
            for (i, slot) in slots.iter_mut().enumerate() {
                if slot.held_down {
                    continue;
                }
                let status = match slot.child.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => status,
                    _ => continue,
                };
                {
                    let last = std::fs::read_to_string(self.log_path(i))
                        .ok()
                        .and_then(|t| t.lines().last().map(str::to_owned))
                        .unwrap_or_default();
                    let line = format!(
                        "relay-{i} exited with {status} at +{:.1}s: {last}",
                        self.clock.elapsed().as_secs_f64()
                    );
                    self.clock.say(&line);
                    if let Ok(mut u) = self.unexpected.lock() {
                        u.push(line);
                    }
                    slot.child = None;
                    exited.push(i);
                }
            }
            exited
        };
        for i in exited {
            if let Err(e) = self.start(i) {
                self.clock.say(format!("restarting relay-{i}: {e}"));
            }
        }
    }

    /// Exits no fault asked for, so far.
    pub fn unexpected_exits(&self) -> Vec<String> {
        self.unexpected
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default()
    }

    /// Stops every relay: SIGTERM, up to `grace` to drain, then SIGKILL.
    pub fn stop_all(&self, grace: Duration) {
        let mut slots = self.lock();
        for slot in slots.iter_mut() {
            slot.held_down = true;
            if let Some(child) = &slot.child {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
        }
        let deadline = Instant::now() + grace;
        for slot in slots.iter_mut() {
            if let Some(mut child) = slot.child.take() {
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.write_pid_file(&slots);
    }

    /// How many lines of all relay logs contain `needle` (shown, not judged: what the relays
    /// say they did, e.g. how often they met a poison message).
    pub fn log_lines_with(&self, needle: &str) -> usize {
        (0..self.count())
            .map(|i| {
                std::fs::read_to_string(self.log_path(i))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    }

    /// The last `lines` lines of each relay's log, for a report of what is stuck.
    pub fn log_tails(&self, lines: usize) -> Vec<String> {
        (0..self.count())
            .map(|i| {
                let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(lines).collect();
                format!(
                    "relay-{i}.log:\n  {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
                )
            })
            .collect()
    }
}
