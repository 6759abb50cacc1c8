//! The OpenSSL connector for PostgreSQL sessions, from libpq's TLS options: which
//! certificates are trusted, whether the host name is checked, and the client's certificate.
//! OpenSSL, not rustls, because librdkafka needs it for Kafka anyway (one TLS library to
//! patch, the distribution's), and because libpq uses it too: the same PEM files, key
//! formats and verification rules as `psql`. See docs/security.md.

use std::path::{Path, PathBuf};

use openssl::pkey::PKey;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::X509;
use openssl::x509::store::X509StoreBuilder;
use postgres_openssl::MakeTlsConnector;

use super::pg_options::{SslMode, TlsOptions};
use crate::error::{Error, Result};

/// Which certificates a session trusts.
enum Roots {
    /// None checked: `prefer` and `require` without a root certificate, as libpq.
    Unchecked,
    /// Those of a file (`sslrootcert`, or `~/.postgresql/root.crt` as libpq).
    File(PathBuf),
    /// The system's (`sslrootcert=system`).
    System,
}

/// Builds the connector for `options`.
pub fn connector(options: &TlsOptions) -> Result<MakeTlsConnector> {
    let roots = roots(options)?;
    let mut builder = SslConnector::builder(SslMethod::tls_client())
        .map_err(|e| tls_error("setting up OpenSSL", &e))?;
    match &roots {
        Roots::Unchecked => builder.set_verify(SslVerifyMode::NONE),
        Roots::File(path) => {
            // A store of exactly these roots: the connector's default store also trusts the
            // system's, which verify-ca with a private root must not.
            let pem = read(path, "sslrootcert")?;
            let certificates = X509::stack_from_pem(&pem)
                .map_err(|e| tls_error(&format!("sslrootcert {}", path.display()), &e))?;
            if certificates.is_empty() {
                return Err(refused(&format!(
                    "sslrootcert {} holds no PEM certificate",
                    path.display()
                )));
            }
            let mut store = X509StoreBuilder::new().map_err(|e| tls_error("a store", &e))?;
            for certificate in certificates {
                store
                    .add_cert(certificate)
                    .map_err(|e| tls_error(&format!("sslrootcert {}", path.display()), &e))?;
            }
            builder.set_cert_store(store.build());
            builder.set_verify(SslVerifyMode::PEER);
        }
        Roots::System => builder.set_verify(SslVerifyMode::PEER),
    }
    match (&options.client_cert, &options.client_key) {
        (Some(cert), Some(key)) => {
            builder
                .set_certificate_chain_file(cert)
                .map_err(|e| tls_error(&format!("sslcert {cert}"), &e))?;
            let pem = read(Path::new(key), "sslkey")?;
            let key_pair = match &options.key_password {
                Some(password) => {
                    PKey::private_key_from_pem_passphrase(&pem, password.expose().as_bytes())
                }
                // Never OpenSSL's default passphrase prompt on the terminal.
                None => PKey::private_key_from_pem_callback(&pem, |_| Ok(0)),
            }
            .map_err(|e| {
                tls_error(
                    &format!("sslkey {key} (an encrypted key needs sslpassword)"),
                    &e,
                )
            })?;
            builder
                .set_private_key(&key_pair)
                .map_err(|e| tls_error(&format!("sslkey {key}"), &e))?;
            builder.check_private_key().map_err(|e| {
                tls_error(&format!("sslkey {key} does not match sslcert {cert}"), &e)
            })?;
        }
        (None, None) => {}
        _ => {
            return Err(refused(
                "sslcert and sslkey go together: give both or neither",
            ));
        }
    }
    let mut connector = MakeTlsConnector::new(builder.build());
    if options.mode != SslMode::VerifyFull {
        // Only verify-full checks that the certificate names the host (libpq's rule).
        connector.set_callback(|config, _| {
            config.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok(connector)
}

fn roots(options: &TlsOptions) -> Result<Roots> {
    let verify = matches!(options.mode, SslMode::VerifyCa | SslMode::VerifyFull);
    match options.root_cert.as_deref() {
        Some("system") if options.mode != SslMode::VerifyFull => Err(refused(&format!(
            "sslrootcert=system needs sslmode=verify-full (not {}): any certificate a public authority signs would pass otherwise",
            options.mode.name()
        ))),
        Some("system") => Ok(Roots::System),
        Some(path) => Ok(Roots::File(PathBuf::from(path))),
        None => {
            // libpq's default root file, when it exists.
            let default = std::env::var_os("HOME")
                .map(|home| Path::new(&home).join(".postgresql/root.crt"))
                .filter(|p| p.is_file());
            match default {
                Some(path) => Ok(Roots::File(path)),
                None if verify => Err(refused(&format!(
                    "sslmode={} needs a root certificate: add sslrootcert=<file of the CA's certificates> (or sslrootcert=system for the system's)",
                    options.mode.name()
                ))),
                None => Ok(Roots::Unchecked),
            }
        }
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| refused(&format!("cannot read {what} {}: {e}", path.display())))
}

fn tls_error(what: &str, error: &dyn std::fmt::Display) -> Error {
    refused(&format!("{what}: {error}"))
}

fn refused(message: &str) -> Error {
    Error::Config(vec![format!("database_url: {message}")])
}
