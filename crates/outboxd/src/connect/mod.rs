//! Where the relay's connections are made: every PostgreSQL session (workers, poller, lease
//! task, mapping cleanup, control, the operator commands, `migrate`) is opened through
//! [`Database`], with the TLS the connection string asks for and the password from a file or
//! the environment. Kafka's producers get their TLS and SASL settings in `publisher.rs` from
//! the same configuration.

mod pg_options;
mod pg_tls;

pub use pg_options::SslMode;

use postgres_openssl::MakeTlsConnector;
use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::secrets::Secret;

/// How long a connection attempt may take unless `connect_timeout` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How to open a PostgreSQL session: the driver's settings, the TLS connector, and the mode
/// they came from. Cheap to clone (the connector is shared).
#[derive(Clone)]
pub struct Database {
    config: tokio_postgres::Config,
    tls: MakeTlsConnector,
    mode: SslMode,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio-postgres's own Debug redacts the password.
        f.debug_struct("Database")
            .field("config", &self.config)
            .field("sslmode", &self.mode.name())
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Parses `url` (a libpq URL or key=value string, with libpq's `sslmode`, `sslrootcert`,
    /// `sslcert`, `sslkey` and `sslpassword`) and sets `password` when one is given.
    pub fn new(url: &str, password: Option<&Secret>) -> Result<Database> {
        let (rest, options) = pg_options::split(url)?;
        let mut config: tokio_postgres::Config =
            rest.parse().map_err(Error::pg("parsing database_url"))?;
        if let Some(password) = password {
            config.password(password.expose());
        }
        // A host that drops packets would otherwise hold a connection attempt for minutes
        // (TCP's retries), and every loop waiting on it.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        config.ssl_mode(match options.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        let tls = pg_tls::connector(&options)?;
        Ok(Database {
            config,
            tls,
            mode: options.mode,
        })
    }

    /// The `sslmode` asked for.
    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// The driver's settings (host, user, database; the password is redacted by its Debug).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// Opens a session and drives its connection in the background; `role` names the session
    /// in the log line when the connection ends.
    pub async fn connect(&self, role: &'static str) -> Result<Client> {
        let (client, connection) =
            self.config
                .connect(self.tls.clone())
                .await
                .map_err(|source| {
                    // OpenSSL's words ("self-signed certificate in certificate chain") do not say
                    // which setting to look at.
                    let context = if source.to_string().contains("certificate verify failed") {
                        "connecting (the server's TLS certificate was refused: check sslrootcert, \
                     and with verify-full the host name)"
                    } else {
                        "connecting"
                    };
                    Error::Postgres { context, source }
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, session = role, "connection ended");
            }
        });
        Ok(client)
    }
}

/// Whether `client`'s session is encrypted (`pg_stat_ssl`), for the start-up log and health:
/// with `sslmode=prefer` a server without TLS gets a plaintext session without an error.
pub async fn session_is_encrypted(client: &Client) -> Result<bool> {
    client
        .query_one(
            "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
            &[],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(Error::pg("reading pg_stat_ssl"))
}
