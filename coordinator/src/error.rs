//! The coordinator's error enum and the one place errors become gRPC statuses.
//!
//! Messages are written for the operator at the other end (a supplier's IT
//! staff): they say what was refused and what to do about it.

use tonic::{Code, Status};

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The configuration is unusable; the coordinator does not start.
    #[error("configuration: {0}")]
    Config(String),
    /// No usable client certificate identity.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but not allowed to do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request itself is malformed (wrong length, bad digest, NaN, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is well-formed but does not fit the current state (stale round, wrong phase).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
    /// A duplicate submission.
    #[error("{0}")]
    AlreadyExists(String),
    /// A resource bound was hit (concurrent uploads, chunk size).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A stream went quiet for too long or ended early.
    #[error("{0}")]
    Aborted(String),
    /// A shared-library error (bad plan, bad update, file I/O).
    #[error(transparent)]
    Common(#[from] sangsaeng_common::Error),
    /// The audit log cannot be written, or does not verify.
    #[error("audit log: {0}")]
    Audit(String),
    /// The registry refused or could not be reached during a release.
    #[error("registry: {0}")]
    Registry(String),
    /// The durable state store failed or holds damaged records.
    #[error("state store: {0}")]
    Store(String),
    /// The gRPC server failed.
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl CoordinatorError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CoordinatorError::Io {
            context: context.into(),
            source,
        }
    }
}

impl CoordinatorError {
    /// True when the coordinator's own disk is full (a spill, the store or the
    /// audit log could not be written): a condition of this server, not of the
    /// request, which clears when an operator frees space.
    fn is_disk_full(&self) -> bool {
        use sangsaeng_common::Error as C;
        let source = match self {
            CoordinatorError::Io { source, .. }
            | CoordinatorError::Common(C::Io { source, .. }) => source,
            _ => return false,
        };
        matches!(
            source.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        )
    }
}

impl CoordinatorError {
    /// The gRPC status code this error is answered with: the one mapping, used
    /// for the status itself and for the metrics' refusal reasons.
    pub fn code(&self) -> Code {
        use sangsaeng_common::Error as C;
        if self.is_disk_full() {
            return Code::ResourceExhausted;
        }
        match self {
            CoordinatorError::Unauthenticated(_) => Code::Unauthenticated,
            CoordinatorError::PermissionDenied(_) => Code::PermissionDenied,
            CoordinatorError::InvalidArgument(_) => Code::InvalidArgument,
            CoordinatorError::FailedPrecondition(_) => Code::FailedPrecondition,
            CoordinatorError::NotFound(_) => Code::NotFound,
            CoordinatorError::AlreadyExists(_) => Code::AlreadyExists,
            CoordinatorError::ResourceExhausted(_) => Code::ResourceExhausted,
            CoordinatorError::Aborted(_) => Code::Aborted,
            CoordinatorError::Common(C::Tls(_)) => Code::Unauthenticated,
            CoordinatorError::Common(
                C::Aggregation(_)
                | C::Protocol(_)
                | C::Model(_)
                | C::Config { .. }
                | C::Schema(_)
                | C::Privacy(_)
                | C::SecureAggregation(_)
                | C::Data { .. },
            ) => Code::InvalidArgument,
            CoordinatorError::Config(_) => Code::InvalidArgument,
            CoordinatorError::Common(C::Signature(_)) | CoordinatorError::Audit(_) => {
                Code::FailedPrecondition
            }
            CoordinatorError::Registry(_) => Code::Unavailable,
            CoordinatorError::Common(_)
            | CoordinatorError::Transport(_)
            | CoordinatorError::Io { .. }
            | CoordinatorError::Store(_) => Code::Internal,
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        if e.is_disk_full() {
            // RESOURCE_EXHAUSTED, which participants retry with backoff, rather
            // than INTERNAL: the update was fine, and nothing was kept of it.
            tracing::error!(error = %e, "the coordinator's disk is full; free space in its output folder");
            return Status::resource_exhausted(
                "the coordinator's disk is full; the update was not kept, retry later",
            );
        }
        let code = e.code();
        // Internal details stay in the coordinator's log; the caller gets a pointer to it.
        let message = if code == Code::Internal {
            tracing::error!(error = %e, "internal error while serving a request");
            "internal error at the coordinator; its log has the details".to_string()
        } else {
            e.to_string()
        };
        Status::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_kind_of_problem() {
        let s: Status = CoordinatorError::FailedPrecondition("round 2 is closed".into()).into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(s.message(), "round 2 is closed");
        let s: Status =
            CoordinatorError::Common(sangsaeng_common::Error::Aggregation("NaN".into())).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        let s: Status = CoordinatorError::io("writing x", std::io::Error::other("disk")).into();
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("disk"));
    }

    #[test]
    fn a_full_disk_is_resource_exhausted_not_internal() {
        let full = || std::io::Error::from(std::io::ErrorKind::StorageFull);
        for e in [
            CoordinatorError::io("writing /out/updates/u.bin", full()),
            CoordinatorError::Common(sangsaeng_common::Error::io("/out/state.redb", full())),
        ] {
            let s: Status = e.into();
            assert_eq!(s.code(), Code::ResourceExhausted);
            assert!(s.message().contains("disk is full"), "{}", s.message());
            assert!(!s.message().contains("/out"), "{}", s.message());
        }
        let s: Status = CoordinatorError::io("x", std::io::Error::from_raw_os_error(28)).into();
        assert_eq!(s.code(), Code::ResourceExhausted, "ENOSPC from the OS");
    }
}
