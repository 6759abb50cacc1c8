//! The harness's one error type: a message that says what the harness was doing and, where
//! it can, what to run to fix it. The harness never carries on past a missing service or
//! tool: it stops with such a message instead of reporting a vacuous pass.

use std::fmt;

/// A failure of the harness itself (not a finding about the relay), with its context.
#[derive(Debug)]
pub struct Error(String);

/// A specialized `Result` for the harness.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with this message.
    pub fn msg(message: impl Into<String>) -> Self {
        Error(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// Adds what the harness was doing to any displayable error.
pub trait Context<T> {
    /// Wraps the error as `"{what}: {error}"`.
    fn context(self, what: impl fmt::Display) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error(format!("{what}: {e}")))
    }
}
