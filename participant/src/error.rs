//! The participant daemon's error enum. Messages name the file, column, RPC or
//! setting at fault so a supplier's operator can act without reading code.

pub type Result<T, E = ParticipantError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    /// The daemon's configuration is unusable; it does not start.
    #[error("configuration: {0}")]
    Config(String),
    /// Data, schema, PKI or model problem from the shared library.
    #[error(transparent)]
    Common(#[from] sangsaeng_common::Error),
    /// The coordinator refused or failed a call.
    #[error("{rpc} failed: {code:?}: {message}")]
    Rpc {
        rpc: &'static str,
        code: tonic::Code,
        message: String,
    },
    /// A transfer was corrupted or cut (digest mismatch, missing chunk).
    #[error("transfer: {0}")]
    Transfer(String),
    /// This site refused a step the coordinator asked for: a secure-aggregation
    /// request that would reveal more than the protocol allows, or a peer's key
    /// that does not verify. The round goes on without this site's answer; the
    /// training is not declined.
    #[error("refused: {0}")]
    Refused(String),
    /// Shutdown was requested while work was in progress.
    #[error("shutting down")]
    Shutdown,
}

impl ParticipantError {
    pub fn rpc(rpc: &'static str, s: tonic::Status) -> Self {
        ParticipantError::Rpc {
            rpc,
            code: s.code(),
            message: s.message().to_string(),
        }
    }

    /// Whether retrying after reconnecting may help (network trouble), as opposed
    /// to a refusal that will repeat (bad data, wrong certificate, permission).
    pub fn is_transient(&self) -> bool {
        match self {
            ParticipantError::Rpc { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::Aborted
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::Cancelled
            ),
            ParticipantError::Transfer(_) => true,
            ParticipantError::Common(sangsaeng_common::Error::Tls(_)) => true,
            _ => false,
        }
    }
}
