//! The `outboxd` binary: parses flags, loads and validates the configuration, installs the
//! log subscriber and signal handlers, and hands over to the library (`outboxd::relay`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

use cli::dead_letters::DeadLetterAction;
use cli::output::{print_json, print_migrations};
use cli::partitions::PartitionAction;
use outboxd::{Config, Error};

/// Relay for the transactional outbox: publishes messages committed in PostgreSQL to
/// Apache Kafka, in commit order per entity.
///
/// Settings come from the defaults, the TOML file given by --config, environment variables
/// (OUTBOXD_<KEY>; OUTBOXD_KAFKA__<PROPERTY>; OUTBOXD_TOPICS__<TOPIC>__ON_ERROR), then flags.
/// See docs/configuration.md for every setting.
#[derive(Debug, Parser)]
#[command(name = "outboxd", version)]
struct Cli {
    /// Log lines as readable text (pretty) or one JSON object per line (json), on stderr.
    /// Filter with RUST_LOG (default info).
    #[arg(
        long,
        env = "OUTBOXD_LOG_FORMAT",
        global = true,
        value_enum,
        default_value_t
    )]
    log_format: outboxd::logging::LogFormat,
    /// Print the command's result as JSON instead of readable text.
    #[arg(long, global = true)]
    json: bool,
    /// TOML configuration file.
    #[arg(long, env = "OUTBOXD_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: outboxd::layers::SettingFlags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Relay messages to Kafka until SIGTERM or SIGINT (a second signal exits at once).
    Run,
    /// Create or upgrade the outbox schema (idempotent; safe to run from several processes).
    Migrate {
        /// Only show which migrations are applied and which are pending; change nothing.
        #[arg(long)]
        status: bool,
    },
    /// Show the relays and every partition: backlog, oldest message, owner, state (relaying,
    /// retrying, blocked with the message and error, unowned, idle), dead letters, parked
    /// entities. Reads the database only.
    Status,
    /// Validate the configuration and print the effective one as TOML (or JSON with
    /// --json), every secret masked.
    CheckConfig,
    /// Messages moved aside (dead_letter and park_entity policies, skip): list, show, retry
    /// (back in order for its entity, or refused with the reason), drop.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Virtual partitions: change their count, or pause and resume one on purpose.
    Partitions {
        #[command(subcommand)]
        action: PartitionAction,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout, e.g. `outboxd man > outboxd.1`.
    Man,
    /// Print every SQL statement the relay sends.
    PrintSql,
    /// Move one message to the dead_letter table (e.g. the one a `block` policy stopped at).
    Skip {
        /// The message id (the `outbox-id` header; logged when the partition blocked).
        id: i64,
        /// Why, recorded in dead_letter.error.
        #[arg(long, default_value = "skipped by an operator")]
        reason: String,
    },
    /// Release an entity held back by the `park_entity` policy; its messages flow again.
    Unpark {
        /// The entity key.
        entity_key: String,
    },
}

impl Cli {
    /// File first, then environment and flags (clap already merged those two).
    fn load_config(&self) -> Result<Config, Error> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        outboxd::layers::load(self.config.as_deref(), &vars, &self.settings)
    }
}

fn main() -> ExitCode {
    // `--help` shows each setting's variable and default from the one source of both.
    let matches = outboxd::layers::annotate(<Cli as clap::CommandFactory>::command()).get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    outboxd::logging::init(cli.log_format);
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
    let json = cli.json;
    match cli.command {
        Command::Run => run(config).await,
        Command::Migrate { status: false } => {
            let client = connect_db(&mut config).await?;
            let schema = config.schema()?;
            outbox::migrate_schema(&client, &schema).await?;
            if json {
                print_json(&serde_json::json!({
                    "schema": schema.name(), "version": outbox::SCHEMA_VERSION,
                }));
            } else {
                println!("schema {schema} is at version {}", outbox::SCHEMA_VERSION);
            }
            Ok(())
        }
        Command::Migrate { status: true } => {
            let client = connect_db(&mut config).await?;
            let schema = config.schema()?;
            let migrations = outbox::migration_status(&client, &schema).await?;
            print_migrations(&schema, &migrations, json);
            Ok(())
        }
        Command::Status => {
            let client = connect_db(&mut config).await?;
            let status = outboxd::status::read(&client, &config.schema()?).await?;
            if json {
                print_json(&status);
            } else {
                print!("{}", status.to_table());
            }
            Ok(())
        }
        Command::DeadLetters { action } => cli::dead_letters::run(&mut config, action, json).await,
        Command::Partitions { action } => cli::partitions::run(&mut config, action, json).await,
        Command::Completions { shell } => {
            let mut command = outboxd::layers::annotate(<Cli as clap::CommandFactory>::command());
            clap_complete::generate(shell, &mut command, "outboxd", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            let command = outboxd::layers::annotate(<Cli as clap::CommandFactory>::command());
            clap_mangen::Man::new(command)
                .render(&mut std::io::stdout())
                .map_err(|source| Error::Io {
                    context: "writing the man page",
                    source,
                })
        }
        Command::Skip { id, reason } => {
            let moved = run_operator_statement(
                &mut config,
                "moving the message aside",
                |s| &s.skip_message,
                &[&id, &reason],
            )
            .await?;
            if !moved {
                return Err(Error::NotFound(format!("no waiting message with id {id}")));
            }
            if json {
                print_json(&serde_json::json!({ "moved_to_dead_letter": id }));
            } else {
                println!("message {id} moved to dead_letter");
            }
            Ok(())
        }
        Command::Unpark { entity_key } => {
            let released = run_operator_statement(
                &mut config,
                "unparking",
                |s| &s.unpark_entity,
                &[&entity_key],
            )
            .await?;
            if !released {
                return Err(Error::NotFound(format!(
                    "entity {entity_key:?} is not parked"
                )));
            }
            if json {
                print_json(&serde_json::json!({ "unparked": entity_key }));
            } else {
                println!("entity {entity_key:?} released; relays reread its partition");
            }
            Ok(())
        }
        Command::CheckConfig => {
            config.validate()?;
            // Every password masked (see `Config::masked`); the environment's secrets
            // serialize as `[REDACTED]`.
            let shown = config.masked();
            if json {
                print_json(&shown);
            } else {
                let text = toml::to_string(&shown).map_err(|e| {
                    Error::Config(vec![format!("cannot print the configuration: {e}")])
                })?;
                print!("{text}");
            }
            Ok(())
        }
        Command::PrintSql => {
            let schema = config.schema()?;
            let statements = outboxd::sql::Statements::new(&schema);
            if json {
                let all: serde_json::Map<String, serde_json::Value> = statements
                    .all()
                    .into_iter()
                    .map(|(name, sql)| (name.to_owned(), serde_json::json!(sql)))
                    .collect();
                print_json(&all);
            } else {
                for (name, sql) in statements.all() {
                    println!("-- {name}\n{sql};\n");
                }
            }
            Ok(())
        }
    }
}

/// Runs the relay, with the Prometheus recorder and the HTTP endpoint when `http_listen`
/// is set.
async fn run(config: Config) -> Result<(), Error> {
    let listen = config.http_listen.clone();
    let relay = outboxd::Relay::new(config)?;
    let stop_http = outboxd::shutdown::Shutdown::new();
    if !listen.is_empty() {
        let handle = outboxd::metrics::prometheus_builder()
            .and_then(|b| b.install_recorder())
            .map_err(|e| {
                Error::Config(vec![format!("cannot install the metrics recorder: {e}")])
            })?;
        let addr = listen
            .parse()
            .map_err(|_| Error::Config(vec![format!("http_listen {listen:?} is not host:port")]))?;
        let render: outboxd::http::RenderMetrics = std::sync::Arc::new(move || handle.render());
        let (bound, _task) =
            outboxd::http::serve(addr, relay.health(), render, stop_http.clone()).await?;
        tracing::info!(%bound, "serving /healthz, /readyz, /health and /metrics");
    }
    let result = relay.run(shutdown_signal()).await;
    stop_http.request();
    result
}

/// Runs one of the operator statements (`skip`, `unpark`); false when it matched nothing.
async fn run_operator_statement(
    config: &mut Config,
    context: &'static str,
    statement: fn(&outboxd::sql::Statements) -> &String,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<bool, Error> {
    let client = connect_db(config).await?;
    let sql = outboxd::sql::Statements::new(&config.schema()?);
    let rows = client
        .query(statement(&sql), params)
        .await
        .map_err(|source| Error::Postgres { context, source })?;
    Ok(!rows.is_empty())
}

/// Connects for the one-shot commands, which need only the database.
pub(crate) async fn connect_db(config: &mut Config) -> Result<tokio_postgres::Client, Error> {
    if config.brokers.is_empty() {
        config.brokers = "unused".to_owned();
    }
    config.validate()?;
    config.database()?.connect("operator command").await
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
