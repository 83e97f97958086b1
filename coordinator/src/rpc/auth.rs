//! Who is calling: the organisation id from the client certificate (validated by
//! the TLS handshake against the project CA), checked against the roster's role
//! on every RPC. Nothing in a message body is trusted as identity.

use sangsaeng_common::config::roster::Role;
use tonic::Request;

use crate::error::{CoordinatorError, Result};
use crate::state::Shared;

/// Returns the caller's organisation id if it holds `role`, or the reason it may not call.
pub fn authorize<T>(shared: &Shared, req: &Request<T>, role: Role, rpc: &str) -> Result<String> {
    let id = sangsaeng_common::identity::tls::peer_identity(req)
        .map_err(|e| CoordinatorError::Unauthenticated(e.to_string()))?;
    match shared.roster.authorize(&id, role) {
        Ok(_) => Ok(id),
        Err(why) => {
            tracing::warn!(caller = %id, rpc, "refused: {why}");
            Err(CoordinatorError::PermissionDenied(format!(
                "{rpc} refused: {why}"
            )))
        }
    }
}
