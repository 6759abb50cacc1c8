//! `Schema`: a validated schema name. It is spliced into SQL text (identifiers cannot be
//! bound as parameters), so only plain lower-case identifiers are accepted.

use crate::error::{Error, Result};

/// The name of the PostgreSQL schema that holds the outbox tables. Default: `outbox`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Schema(String);

impl Schema {
    /// Validates `name`: 1 to 63 characters of `[a-z0-9_]`, not starting with a digit, and not
    /// a system schema (`pg_*`, `information_schema`).
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= 63
            && !name.as_bytes()[0].is_ascii_digit()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !name.starts_with("pg_")
            && name != "information_schema";
        if valid {
            Ok(Schema(name))
        } else {
            Err(Error::InvalidSchemaName(name))
        }
    }

    /// The schema name, safe to splice into SQL.
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Default for Schema {
    fn default() -> Self {
        Schema("outbox".to_owned())
    }
}

impl std::fmt::Display for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Schema {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Schema::new(s)
    }
}
