//! Serving Prometheus metrics: the one HTTP page (`/metrics`) the coordinator
//! and the participant daemon each offer on an optional `metrics_listen`
//! address, in Prometheus's classic text format.
//!
//! Both render with the official `prometheus-client` crate and serve with
//! axum (already under tonic's dependencies). The address defaults to
//! loopback: the page is for the operator's own monitoring.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// A metrics address: `host:port`, or `:port` / `port` on loopback.
pub fn listen_address(text: &str) -> Result<SocketAddr> {
    let t = text.trim();
    let full = match t.strip_prefix(':') {
        Some(port) => format!("127.0.0.1:{port}"),
        None if t.chars().all(|c| c.is_ascii_digit()) => format!("127.0.0.1:{t}"),
        None => t.to_string(),
    };
    full.parse().map_err(|e| Error::Config {
        file: format!("metrics_listen '{text}'"),
        message: format!("{e} (expected host:port, :port or port)"),
    })
}

/// The crate writes OpenMetrics; the page is served in Prometheus's classic
/// text format (0.0.4), which every scraper and `promtool check metrics` read.
/// The two differ only in what this changes: a counter's HELP and TYPE name the
/// `_total` series it exposes, and there are no `# UNIT` or `# EOF` lines.
pub fn text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Serves `render()` on `http://addr/metrics` until `shutdown`; returns the
/// bound address. A port in use is an error naming it: a daemon does not
/// start half-monitored.
pub async fn serve(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config {
            file: format!("metrics_listen {addr}"),
            message: format!("cannot listen: {e}"),
        })?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io(std::path::Path::new("metrics listener"), e))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!("the metrics endpoint stopped: {e}");
        }
    });
    tracing::info!(addr = %bound, "Prometheus metrics on http://{bound}/metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_default_to_loopback_and_bad_ones_are_named() {
        assert_eq!(
            listen_address(":9100").unwrap().to_string(),
            "127.0.0.1:9100"
        );
        assert_eq!(
            listen_address("9100").unwrap().to_string(),
            "127.0.0.1:9100"
        );
        assert_eq!(
            listen_address("0.0.0.0:9100").unwrap().to_string(),
            "0.0.0.0:9100"
        );
        let e = listen_address("here").unwrap_err().to_string();
        assert!(e.starts_with("metrics_listen 'here': "), "{e}");
    }
}
