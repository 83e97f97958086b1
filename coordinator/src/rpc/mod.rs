//! The coordinator's gRPC surface: who may call, and the two services.
//!
//! Handlers are thin: they authorise, check a request against the state and hand
//! round work to [`crate::round`]. Errors become gRPC statuses in one place,
//! [`crate::error`].
//!
//! - [`auth`]: caller identity from the client certificate, checked against the
//!   roster on every RPC.
//! - [`federation`]: the participants' `Federation` service (subscribe,
//!   statistics, model download, update upload, evaluation, leave).
//! - [`admin`]: the administrators' `Admin` service (status, start, release).
//! - [`incoming`]: accepting TCP connections under `limits.max_connections`.

pub mod admin;
pub mod auth;
pub mod federation;
pub mod incoming;
