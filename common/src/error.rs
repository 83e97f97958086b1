//! The error type of `sangsaeng-common`. Every variant names what was wrong and
//! where (file, line, column, key) so an operator can fix it without reading code.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A configuration file (plan, roster, daemon config) is malformed or holds an impossible value.
    #[error("{file}: {message}")]
    Config { file: String, message: String },

    /// A CSV data file is unusable. `line` is 1-based and counts the header; `column` is the column name.
    #[error("{file}{}{}: {message}", .line.map(|l| format!(", line {l}")).unwrap_or_default(), .column.as_ref().map(|c| format!(", column '{c}'")).unwrap_or_default())]
    Data {
        file: String,
        line: Option<u64>,
        column: Option<String>,
        message: String,
    },

    /// The site's data does not match the training plan's schema.
    #[error("data does not match the training plan: {0}")]
    Schema(String),

    /// Certificate authority, key or certificate-request handling failed.
    #[error("PKI: {0}")]
    Pki(String),

    /// TLS configuration or peer-identity problem.
    #[error("TLS: {0}")]
    Tls(String),

    /// A model or update has the wrong shape or invalid values.
    #[error("model: {0}")]
    Model(String),

    /// Aggregation refused an update or could not complete.
    #[error("aggregation: {0}")]
    Aggregation(String),

    /// A signature could not be made, or does not verify.
    #[error("signature: {0}")]
    Signature(String),

    /// A protocol message is missing a field or holds an impossible value.
    #[error("protocol: {0}")]
    Protocol(String),

    /// A privacy parameter (noise, clip, budget) is impossible, or a privacy
    /// mechanism's input is malformed.
    #[error("privacy: {0}")]
    Privacy(String),

    /// A secure-aggregation step was refused or could not complete; the message
    /// names the round, the participant and the share concerned.
    #[error("{0}")]
    SecureAggregation(String),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn config(file: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            file: file.into(),
            message: message.into(),
        }
    }
}
