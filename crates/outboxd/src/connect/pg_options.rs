//! The TLS options of a PostgreSQL connection string that the driver does not parse.
//! tokio-postgres knows `sslmode` `disable`, `prefer` and `require` only, and refuses the
//! options libpq uses for certificates (`sslrootcert`, `sslcert`, `sslkey`, `sslpassword`),
//! so they are taken out of the string here, in either of libpq's two forms (a URL or
//! `key=value` pairs), before the rest goes to the driver. The values keep libpq's meaning, so
//! a connection string copied from a cloud provider's console works unchanged.

use percent_encoding::percent_decode_str;

use crate::error::{Error, Result};
use crate::secrets::Secret;

/// libpq's `sslmode`, all of it ("allow" is refused: it would try plaintext first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, plaintext otherwise (libpq's default). The certificate
    /// is checked only when a root certificate is given.
    #[default]
    Prefer,
    /// TLS or no connection. The certificate is checked only when a root certificate is given.
    Require,
    /// TLS, and the server's certificate must chain to the root certificate.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode> {
        match value {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            "allow" => Err(invalid(
                "sslmode=allow is not supported (it tries plaintext first); use prefer, require, verify-ca or verify-full",
            )),
            other => Err(invalid(&format!(
                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            ))),
        }
    }

    /// The name libpq gives it.
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS options found in a connection string.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// `sslmode` (default `prefer`, as libpq).
    pub mode: SslMode,
    /// `sslrootcert`: a file of trusted root certificates, or `system`.
    pub root_cert: Option<String>,
    /// `sslcert`: the client's certificate (chain), PEM.
    pub client_cert: Option<String>,
    /// `sslkey`: the client's private key, PEM.
    pub client_key: Option<String>,
    /// `sslpassword`: the passphrase of an encrypted `sslkey`.
    pub key_password: Option<Secret>,
}

/// Splits `text` into the part tokio-postgres parses and the TLS options it does not.
pub fn split(text: &str) -> Result<(String, TlsOptions)> {
    let trimmed = text.trim();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        split_url(trimmed)
    } else {
        split_key_values(trimmed)
    }
}

fn split_url(text: &str) -> Result<(String, TlsOptions)> {
    let Some((base, query)) = text.split_once('?') else {
        return Ok((text.to_owned(), TlsOptions::default()));
    };
    let mut options = TlsOptions::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| invalid(&format!("the value of {key} is not UTF-8")))?;
        if !take(&mut options, key, &decoded)? {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, options))
}

fn split_key_values(text: &str) -> Result<(String, TlsOptions)> {
    let mut options = TlsOptions::default();
    let mut kept = Vec::new();
    for (key, value) in key_values(text)? {
        if !take(&mut options, &key, &value)? {
            kept.push(format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            ));
        }
    }
    Ok((kept.join(" "), options))
}

/// Records `key` when it is one of the TLS options; false when it is not (the driver's).
fn take(options: &mut TlsOptions, key: &str, value: &str) -> Result<bool> {
    match key {
        "sslmode" => options.mode = SslMode::parse(value)?,
        "sslrootcert" => options.root_cert = Some(value.to_owned()),
        "sslcert" => options.client_cert = Some(value.to_owned()),
        "sslkey" => options.client_key = Some(value.to_owned()),
        "sslpassword" => options.key_password = Some(Secret::new(value.to_owned())),
        _ => return Ok(false),
    }
    Ok(true)
}

/// libpq's `key = value` pairs: values unquoted (a backslash escapes the next character) or
/// single-quoted (backslash escapes inside).
fn key_values(text: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            // The key is not named: with a mis-quoted password it could be part of the password.
            return Err(invalid(&format!(
                "expected key=value pairs, found a word without `=` after {} pair(s)",
                pairs.len()
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Err(invalid(&format!("unterminated quoted value of {key}"))),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

fn invalid(message: &str) -> Error {
    Error::Config(vec![format!("database_url: {message}")])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_loses_its_tls_options_and_keeps_the_rest() {
        let (rest, o) = split(
            "postgres://relay@db.example:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca%20one.pem&sslcert=/c.pem&sslkey=/k.pem",
        )
        .expect("split");
        assert_eq!(
            rest,
            "postgres://relay@db.example:5432/app?application_name=x"
        );
        assert_eq!(o.mode, SslMode::VerifyFull);
        assert_eq!(o.root_cert.as_deref(), Some("/etc/ca one.pem"));
        assert_eq!(o.client_cert.as_deref(), Some("/c.pem"));
        assert_eq!(o.client_key.as_deref(), Some("/k.pem"));
        let (rest, o) = split("postgresql://db/app?sslmode=require").expect("split");
        assert_eq!(rest, "postgresql://db/app");
        assert_eq!(o.mode, SslMode::Require);
    }

    #[test]
    fn key_value_pairs_lose_their_tls_options_and_keep_quoted_values() {
        let (rest, o) = split(
            r"host=db sslmode = verify-ca password='it\'s x' sslrootcert='/a b/ca.pem' user=r\ x",
        )
        .expect("split");
        assert_eq!(rest, r"host='db' password='it\'s x' user='r x'");
        assert_eq!(o.mode, SslMode::VerifyCa);
        assert_eq!(o.root_cert.as_deref(), Some("/a b/ca.pem"));
        let parsed: tokio_postgres::Config = rest.parse().expect("the driver parses the rest");
        assert_eq!(parsed.get_password(), Some(&b"it's x"[..]));
        assert_eq!(parsed.get_user(), Some("r x"));
    }

    #[test]
    fn the_default_is_prefer_and_bad_input_is_refused_by_name() {
        let e = split("host=db password='open").expect_err("unterminated");
        assert!(
            e.to_string()
                .contains("unterminated quoted value of password"),
            "{e}"
        );
        assert_eq!(split("host=db").expect("split").1.mode, SslMode::Prefer);
        let e = split("postgres://db/app?sslmode=allow").expect_err("allow");
        assert!(
            e.to_string().contains("sslmode=allow is not supported"),
            "{e}"
        );
        let e = split("host=db sslmode=verify").expect_err("typo");
        assert!(
            e.to_string().contains("sslmode=verify is not one of"),
            "{e}"
        );
    }
}
