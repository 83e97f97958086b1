//! What both daemons do the same way at process level: log set-up and turning
//! SIGINT/SIGTERM into one cancellation that everything else watches.

use tokio_util::sync::CancellationToken;

/// Logs to stderr (stdout stays free for command output), `RUST_LOG` filters,
/// colours only on a terminal.
pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Cancels `token` on the first SIGINT or SIGTERM, logging `what` happens next.
pub fn cancel_on_signal(token: CancellationToken, what: &'static str) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot watch SIGTERM ({e}); only Ctrl-C stops this process cleanly"
                    );
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested; {what}");
        token.cancel();
    });
}
