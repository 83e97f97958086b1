//! Who is speaking: the federation's PKI, mutual TLS, signatures made with an
//! endpoint's TLS key, and the dial to the coordinator. Depends on [`crate::config`]
//! (organisation ids) only.
//!
//! - [`pki`]: the project CA, CSR enrolment, server and participant certificates.
//! - [`tls`]: rustls/tonic mutual-TLS configurations and the organisation id of a
//!   peer certificate.
//! - [`signing`]: ECDSA P-256 signatures with an endpoint's TLS key and DSSE
//!   envelopes (audit log entries, release provenance).
//! - [`channel`]: dialing the coordinator over mutual TLS with bounded timeouts.
//! - [`peer`]: verifying another participant's certificate and signature
//!   outside a handshake (secure-aggregation adverts).
//! - [`checkup`]: the checks both daemons' `doctor` share (TLS files, key
//!   mode, certificate validity) and the shape of a check's outcome.

pub mod channel;
pub mod checkup;
pub mod peer;
pub mod pki;
pub mod signing;
pub mod tls;
