//! The harness's own PostgreSQL and Kafka, reached through `scripts/services` (the one
//! implementation of starting, crashing and killing them) with the environment
//! `scripts/chaos` sets. Before anything runs, [`Services::check_isolated`] refuses to go on
//! unless the script, the database URL and the brokers all point at the chaos instances:
//! the harness crashes what it runs, and must never crash the shared services other tests use.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::error::{Context, Error, Result};

/// The shared services' ports (scripts/services defaults), which the harness must not use.
const SHARED_PG_PORT: u16 = 55432;
const SHARED_KAFKA_PORTS: [u16; 2] = [39092, 39093];

/// How the harness reaches and disturbs its services.
#[derive(Debug, Clone)]
pub struct Services {
    /// `scripts/services`, called with the chaos environment for every fault.
    pub script: PathBuf,
    /// The chaos database.
    pub database_url: String,
    /// The chaos broker.
    pub brokers: String,
}

impl Services {
    /// Refuses to run unless the chaos services are separate from the shared ones and the
    /// script's environment names the same ports as the URL and the brokers.
    pub fn check_isolated(&self) -> Result<()> {
        let hint =
            "run the harness through scripts/chaos, which starts and selects its own services";
        let local = std::env::var("OUTBOX_LOCAL_DIR").unwrap_or_default();
        // Unset, or the default folder itself: scripts/services would act on the shared
        // services.
        if local.is_empty() || local.trim_end_matches('/').ends_with("/.local") {
            return Err(Error::msg(format!(
                "OUTBOX_LOCAL_DIR ({local:?}) does not select a separate instance, so scripts/services would crash the shared services; {hint}"
            )));
        }
        let config: tokio_postgres::Config = self
            .database_url
            .parse()
            .context(format!("parsing the database URL {:?}", self.database_url))?;
        let pg_port = config.get_ports().first().copied().unwrap_or(5432);
        let kafka_ports: Vec<u16> = self
            .brokers
            .split(',')
            .filter_map(|b| b.rsplit_once(':').and_then(|(_, p)| p.trim().parse().ok()))
            .collect();
        if pg_port == SHARED_PG_PORT || kafka_ports.iter().any(|p| SHARED_KAFKA_PORTS.contains(p)) {
            return Err(Error::msg(format!(
                "the database URL or brokers point at the shared services (PostgreSQL {SHARED_PG_PORT}, Kafka {}); {hint}",
                SHARED_KAFKA_PORTS[0]
            )));
        }
        let env_port = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u16>().ok());
        if env_port("OUTBOX_PG_PORT") != Some(pg_port) {
            return Err(Error::msg(format!(
                "OUTBOX_PG_PORT does not match the database URL's port {pg_port}: faults would hit another cluster; {hint}"
            )));
        }
        if kafka_ports.len() != 1 || env_port("OUTBOX_KAFKA_PORT") != kafka_ports.first().copied() {
            return Err(Error::msg(format!(
                "OUTBOX_KAFKA_PORT does not match the one broker in {:?}: faults would hit another broker; {hint}",
                self.brokers
            )));
        }
        if !self.script.is_file() {
            return Err(Error::msg(format!(
                "{} not found; pass --services",
                self.script.display()
            )));
        }
        Ok(())
    }

    /// Runs `scripts/services <command>` (e.g. `pg-crash`) and waits for it; the error
    /// carries the script's last output lines.
    pub async fn run(&self, command: &'static str) -> Result<()> {
        let script = self.script.clone();
        let output =
            tokio::task::spawn_blocking(move || Command::new(&script).arg(command).output())
                .await
                .context(format!("waiting for scripts/services {command}"))?
                .context(format!("running scripts/services {command}"))?;
        if output.status.success() {
            return Ok(());
        }
        // The cause is usually the first exception or error line; the last line says
        // what the script gave up on.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let mut lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("Exception") || l.contains("ERROR") || l.contains("FATAL"))
            .take(3)
            .collect();
        lines.extend(stderr.lines().last());
        Err(Error::msg(format!(
            "scripts/services {command} failed ({}): {}",
            output.status,
            lines.join(" | ")
        )))
    }

    /// [`Services::run`], tried up to three times: a broker killed with SIGKILL does not
    /// always start at the first attempt. Each failed attempt is returned as a note.
    pub async fn run_retrying(&self, command: &'static str) -> (Result<()>, Vec<String>) {
        let mut notes = Vec::new();
        for attempt in 1..=3 {
            match self.run(command).await {
                Ok(()) => return (Ok(()), notes),
                Err(e) if attempt == 3 => return (Err(e), notes),
                Err(e) => notes.push(format!("attempt {attempt}: {e}")),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        (Err(Error::msg("unreachable")), notes)
    }

    /// A new session on the chaos database (with a connect timeout, so a crashed server
    /// fails fast instead of hanging).
    pub async fn connect(&self) -> Result<Client> {
        let mut config: tokio_postgres::Config = self
            .database_url
            .parse()
            .context("parsing the database URL")?;
        config.connect_timeout(Duration::from_secs(5));
        config.application_name("outbox-chaos");
        let (client, connection) = config
            .connect(NoTls)
            .await
            .context(format!("connecting to {}", self.database_url))?;
        tokio::spawn(async move {
            // The connection ends when the server goes away; the client then reports
            // is_closed() and its owner reconnects.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// True when the database accepts a query now.
    pub async fn pg_ready(&self) -> bool {
        match self.connect().await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }
}
