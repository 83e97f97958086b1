//! Dialing the coordinator: one place that builds a mutual-TLS gRPC channel with
//! bounded connect timeouts and keepalives, used by participants and admin tools.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::identity::tls::{TlsMaterial, client_tls_config};
use crate::{Error, Result};

/// A dial that takes longer than this is treated as a failure and retried by the
/// caller's backoff, instead of hanging on an unreachable host.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Detects a dead coordinator on an idle connection (e.g. during long local training).
const KEEPALIVE: Duration = Duration::from_secs(20);
/// Largest HTTP/2 frame a participant accepts, so the coordinator sends each
/// 1 MiB model chunk as one DATA frame rather than 64 of the default 16 KiB
/// (the coordinator accepts frames of one chunk for uploads; see its
/// `Limits::http2_max_frame`).
const HTTP2_MAX_FRAME: u32 = 1 << 20;

/// Connects to `url` (e.g. `https://coordinator.example:7443`) presenting the site's
/// certificate; `server_name` is the name in the coordinator's certificate.
pub async fn connect(url: &str, tls: &TlsMaterial, server_name: &str) -> Result<Channel> {
    // The process may link several rustls users; one provider must be installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| Error::Tls(format!("coordinator address '{url}': {e}")))?
        .tls_config(client_tls_config(tls, server_name)?)
        .map_err(|e| Error::Tls(format!("TLS configuration: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE)
        .keep_alive_while_idle(true)
        .max_frame_size(HTTP2_MAX_FRAME);
    endpoint.connect().await.map_err(|e| {
        Error::Tls(format!(
            "cannot connect to the coordinator at {url}: {}",
            error_chain(&e)
        ))
    })
}

/// Flattens an error's source chain into one line (tonic hides the TLS cause two levels down).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
