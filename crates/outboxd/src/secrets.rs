//! Secrets: the database password and the Kafka SASL password, read from the environment or
//! from a file (never only from a flag, which the process list shows), held in a type whose
//! `Debug` prints `[REDACTED]`, and masked wherever the configuration is shown.

use std::path::Path;

use secrecy::{ExposeSecret, SecretString};

use crate::error::{Error, Result};

/// A secret value: `Debug` prints `[REDACTED]`; compared by value (configurations are).
#[derive(Clone, Debug)]
pub struct Secret(SecretString);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: String) -> Self {
        Secret(SecretString::from(value))
    }

    /// The value, for the one place that must hand it on (the driver, the producer).
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

/// Serializes a secret that is set as `[REDACTED]` (what `check-config` prints for a
/// password from the environment), never its value.
pub fn serialize_redacted<S: serde::Serializer>(
    _secret: &Option<Secret>,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.serialize_str("[REDACTED]")
}

/// librdkafka properties whose values are secrets: masked when shown.
pub const KAFKA_SECRET_KEYS: &[&str] = &[
    "sasl.password",
    "sasl.oauthbearer.client.secret",
    "ssl.key.password",
    "ssl.keystore.password",
    "ssl.truststore.password",
    "ssl.key.pem",
];

/// Reads a secret from `path`: the whole file, less one trailing newline (as `echo` or an
/// orchestrator's secret mount leaves it). The error names the file, never its content.
pub fn read_file(path: &str, what: &str) -> Result<Secret> {
    let mut text = std::fs::read_to_string(Path::new(path)).map_err(|e| Error::ConfigFile {
        path: path.to_owned(),
        message: format!("cannot read the {what}: {e}"),
    })?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(Error::ConfigFile {
            path: path.to_owned(),
            message: format!("the {what} file is empty"),
        });
    }
    Ok(Secret::new(text))
}

/// A connection string with its password replaced by `***`, in URL form
/// (`postgres://user:password@host`) or key=value form (`password=...`, quoted or not).
pub fn mask_connection_string(text: &str) -> String {
    if let Some(scheme_end) = text.find("://") {
        let rest = &text[scheme_end + 3..];
        // The userinfo ends at the last '@' before the path.
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let masked = match rest[..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &rest[..at];
                match userinfo.find(':') {
                    Some(colon) => format!("{}:***{}", &userinfo[..colon], &rest[at..]),
                    None => rest.to_owned(),
                }
            }
            None => rest.to_owned(),
        };
        // A password can also come as a query parameter.
        return format!(
            "{}{}",
            &text[..scheme_end + 3],
            mask_query_password(&masked)
        );
    }
    PASSWORD_KEYS
        .iter()
        .fold(text.to_owned(), |t, key| mask_key_value(&t, key))
}

/// The connection-string keys whose values are secrets: the password and the passphrase of
/// the client's TLS key.
const PASSWORD_KEYS: &[&str] = &["password", "sslpassword"];

fn mask_query_password(text: &str) -> String {
    let Some(q) = text.find('?') else {
        return text.to_owned();
    };
    let params: Vec<String> = text[q + 1..]
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if PASSWORD_KEYS.iter().any(|p| k.eq_ignore_ascii_case(p)) => {
                format!("{k}=***")
            }
            _ => p.to_owned(),
        })
        .collect();
    format!("{}?{}", &text[..q], params.join("&"))
}

/// Masks `key=...` in a key=value connection string (the value may be single-quoted,
/// with backslash escapes, as libpq allows).
fn mask_key_value(text: &str, key: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = find_key(rest, key) {
        out.push_str(&rest[..pos]);
        let after_key = &rest[pos + key.len()..];
        let trimmed = after_key.trim_start();
        let Some(value) = trimmed.strip_prefix('=') else {
            out.push_str(key);
            rest = after_key;
            continue;
        };
        let value = value.trim_start();
        let end = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            let mut end = quoted.len();
            for (i, c) in quoted.char_indices() {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '\'' {
                    end = i + 1;
                    break;
                }
            }
            1 + end
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        out.push_str(key);
        out.push_str("=***");
        rest = &value[end.min(value.len())..];
    }
    out.push_str(rest);
    out
}

/// The position of `key` in `text` as a whole word (at the start or after whitespace).
fn find_key(text: &str, key: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = text[from..].find(key) {
        let at = from + i;
        let before_ok = at == 0 || text[..at].ends_with(char::is_whitespace);
        let after = text[at + key.len()..].trim_start();
        if before_ok && after.starts_with('=') {
            return Some(at);
        }
        from = at + key.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_in_every_connection_string_form() {
        for (text, secret) in [
            ("postgres://relay:s3cr3t@db:5432/app", "s3cr3t"),
            ("postgres://relay:p%40ss@db/app?sslmode=require", "p%40ss"),
            (
                "postgresql://relay@db/app?password=s3cr3t&sslmode=require",
                "s3cr3t",
            ),
            ("host=db user=relay password=s3cr3t dbname=app", "s3cr3t"),
            ("host=db password = 's3 cr\\'3t' dbname=app", "cr\\'3t"),
            ("password=s3cr3t", "s3cr3t"),
            ("host=db sslkey=/k.pem sslpassword='k3y pass'", "k3y pass"),
            (
                "postgres://db/app?sslkey=/k.pem&sslpassword=k3ypass",
                "k3ypass",
            ),
        ] {
            let masked = mask_connection_string(text);
            assert!(!masked.contains(secret), "{text} -> {masked}");
            assert!(masked.contains("***"), "{text} -> {masked}");
        }
        assert_eq!(
            mask_connection_string("host=db dbname=app"),
            "host=db dbname=app"
        );
        assert_eq!(
            mask_connection_string("postgres://relay@db/app"),
            "postgres://relay@db/app"
        );
    }

    #[test]
    fn a_secret_file_loses_one_trailing_newline_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("outboxd-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("pw");
        std::fs::write(&path, "s3cr3t\n").expect("write");
        let secret = read_file(path.to_str().expect("utf-8"), "password").expect("read");
        assert_eq!(secret.expose(), "s3cr3t");
        assert!(!format!("{secret:?}").contains("s3cr3t"));
        std::fs::write(&path, "\n").expect("write");
        let err = read_file(path.to_str().expect("utf-8"), "password").expect_err("empty");
        assert!(err.to_string().contains("empty"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
