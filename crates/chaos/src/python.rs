//! The Python writer (`crates/chaos/python/writer.py`) as a child process: a caller of the
//! outbox's SQL API in another language. Started with the run's topics and seed, stopped
//! with SIGTERM, after which it prints its statistics as one JSON line. Its stderr goes to
//! a log file under the work folder.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};
use crate::writers::WriterConfig;

/// How to start the Python writer.
#[derive(Debug, Clone)]
pub struct PythonConfig {
    /// The interpreter of the venv that has psycopg.
    pub python: PathBuf,
    /// `writer.py`.
    pub script: PathBuf,
    /// Connections (threads) in the one process.
    pub threads: usize,
}

/// Checks that the interpreter exists and can import psycopg, with a hint when not.
pub fn preflight(config: &PythonConfig) -> Result<()> {
    let hint =
        "scripts/chaos creates the venv .local/chaos/venv with psycopg; run the harness through it";
    if !config.script.is_file() {
        return Err(Error::msg(format!("{} not found", config.script.display())));
    }
    let output = Command::new(&config.python)
        .args(["-c", "import psycopg"])
        .output()
        .context(format!("running {} ({hint})", config.python.display()))?;
    if !output.status.success() {
        return Err(Error::msg(format!(
            "{} cannot import psycopg: {}; {hint}",
            config.python.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// The running writer; dropped without [`PythonWriter::stop`] (the run failed), the
/// process is killed rather than left writing.
#[derive(Debug)]
pub struct PythonWriter {
    child: Option<Child>,
}

impl Drop for PythonWriter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl PythonWriter {
    /// Starts the writer; it gives up by itself after `max_seconds`.
    pub fn start(
        config: &PythonConfig,
        dsn: &str,
        writers: &WriterConfig,
        seed: u64,
        max_seconds: u64,
        log: &Path,
    ) -> Result<PythonWriter> {
        let log = std::fs::File::create(log).context(format!("creating {}", log.display()))?;
        let child = Command::new(&config.python)
            .arg(&config.script)
            .args(["--dsn", dsn])
            .args(["--topics", &writers.topics.join(",")])
            .args(["--entities", &writers.entities.to_string()])
            // Python's Random takes any int; keep it positive and distinct from the Rust writers'.
            .args(["--seed", &(seed % (1 << 62)).to_string()])
            .args(["--threads", &config.threads.to_string()])
            .args(["--max-seconds", &max_seconds.to_string()])
            .arg("--async-flag")
            .arg(writers.commit_mode.file())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .context(format!("starting {}", config.script.display()))?;
        Ok(PythonWriter { child: Some(child) })
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Sends SIGTERM, waits for the process to finish its transaction and exit, and returns
    /// its statistics.
    pub async fn stop(mut self) -> Result<serde_json::Value> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| Error::msg("the Python writer was stopped twice"))?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break status,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    _ => {
                        let _ = child.kill();
                        return Err(Error::msg(
                            "the Python writer did not stop within 30 s of SIGTERM",
                        ));
                    }
                }
            };
            let mut out = String::new();
            if let Some(mut stdout) = child.stdout.take() {
                stdout
                    .read_to_string(&mut out)
                    .context("reading the Python writer's output")?;
            }
            if !status.success() {
                return Err(Error::msg(format!(
                    "the Python writer exited with {status}"
                )));
            }
            let last = out.lines().last().unwrap_or_default();
            serde_json::from_str(last).context(format!(
                "the Python writer's statistics line {last:?} is not JSON"
            ))
        })
        .await
        .context("waiting for the Python writer")?
    }
}
