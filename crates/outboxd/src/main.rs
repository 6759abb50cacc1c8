//! The `outboxd` binary: parses flags, loads and validates the configuration, installs the
//! log subscriber and signal handlers, and hands over to the library (`outboxd::relay`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outboxd::{Config, Error};

/// Relay for the transactional outbox: publishes messages committed in PostgreSQL to
/// Apache Kafka, in commit order per entity.
///
/// Settings come from the TOML file given by --config, then environment variables, then
/// flags (each flag names its variable). See docs/configuration.md for every setting.
#[derive(Debug, Parser)]
#[command(name = "outboxd", version)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "OUTBOXD_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// PostgreSQL connection string, e.g. postgres://user@127.0.0.1:5432/db.
    #[arg(
        long,
        env = "OUTBOXD_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "OUTBOXD_BROKERS", global = true)]
    brokers: Option<String>,
    /// Schema holding the outbox tables [default: outbox].
    #[arg(long, env = "OUTBOXD_SCHEMA", global = true)]
    schema: Option<String>,
    /// Most messages per batch and partition [default: 1000].
    #[arg(long, env = "OUTBOXD_BATCH_SIZE", global = true)]
    batch_size: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Relay messages to Kafka until SIGTERM or SIGINT (a second signal exits at once).
    Run,
    /// Create or upgrade the outbox schema (idempotent; safe to run from several processes).
    Migrate,
    /// Validate the configuration and print it (the database URL's password masked).
    CheckConfig,
    /// Print every SQL statement the relay sends.
    PrintSql,
}

impl Cli {
    /// File first, then environment and flags (clap already merged those two).
    fn load_config(&self) -> Result<Config, Error> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = &self.database_url {
            config.database_url = v.clone();
        }
        if let Some(v) = &self.brokers {
            config.brokers = v.clone();
        }
        if let Some(v) = &self.schema {
            config.schema = v.clone();
        }
        if let Some(v) = self.batch_size {
            config.batch_size = v;
        }
        Ok(config)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outboxd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outboxd: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> Result<(), Error> {
    let mut config = cli.load_config()?;
    match cli.command {
        Command::Run => outboxd::relay::run(config, shutdown_signal()).await,
        Command::Migrate => {
            // Only the database is needed here.
            if config.brokers.is_empty() {
                config.brokers = "unused".to_owned();
            }
            config.validate()?;
            let (client, connection) =
                tokio_postgres::connect(&config.database_url, tokio_postgres::NoTls)
                    .await
                    .map_err(|source| Error::Postgres {
                        context: "connecting",
                        source,
                    })?;
            tokio::spawn(connection);
            let schema = config.schema()?;
            outbox::migrate_schema(&client, &schema).await?;
            println!("schema {schema} is at version {}", outbox::SCHEMA_VERSION);
            Ok(())
        }
        Command::CheckConfig => {
            config.validate()?;
            let mut shown = config.clone();
            shown.database_url = mask_password(&shown.database_url);
            println!("{shown:#?}");
            Ok(())
        }
        Command::PrintSql => {
            let schema = config.schema()?;
            for (name, sql) in outboxd::sql::Statements::new(&schema).all() {
                println!("-- {name}\n{sql};\n");
            }
            Ok(())
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits the process at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("signal received; a second signal exits immediately");
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, ctrl-c is the only way to stop gracefully.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Replaces the password in a `postgres://user:password@host` URL with `***`.
fn mask_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
