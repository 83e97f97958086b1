//! What the daemons do at process level: log set-up, turning SIGINT/SIGTERM into
//! one cancellation that everything else watches, allocator tuning, and the
//! calling thread's CPU time (for timings that preemption must not inflate), and
//! telling systemd when a daemon is ready or stopping.

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

/// Makes glibc's malloc serve every thread from one arena. By default it keeps up
/// to eight per core, and a coordinator serving hundreds of connections from a
/// few threads then holds freed transfer buffers spread over several of them:
/// measured at 256 participants, 97 MiB peak with the default and 87 MiB with one
/// arena, at the same speed (its threads move bulk data, not many small
/// allocations; `docs/BENCHMARKS.md`). Call it first in `main`, before the
/// runtime's threads start. A no-op with other C libraries.
pub fn single_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tuning parameter; M_ARENA_MAX accepts
    // any positive count and is documented as settable at any time.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// CPU time the calling thread has used so far. Differences of it time work on a
/// busy machine without the time the thread waited to be scheduled, which a
/// wall clock would count (the coordinator's fold shares two cores with its
/// participants in the benchmark). Falls back to zero where the clock is missing.
pub fn thread_cpu_time() -> std::time::Duration {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        }
    }
    std::time::Duration::ZERO
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

/// Tells systemd the daemon is ready (`Type=notify` units in `packaging/systemd`);
/// without `NOTIFY_SOCKET` (not started by systemd) nothing happens.
pub fn notify_ready(status: &str) {
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// Tells systemd a graceful stop has begun.
pub fn notify_stopping() {
    notify(&[sd_notify::NotifyState::Stopping]);
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    // A lost notice is logged, not fatal: systemd then times the start out and
    // says so, which points the operator here.
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("could not notify systemd: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_time_counts_work_not_sleep() {
        let t0 = thread_cpu_time();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let slept = thread_cpu_time() - t0;
        let (t1, wall) = (thread_cpu_time(), std::time::Instant::now());
        let mut x = 0u64;
        while thread_cpu_time() - t1 < std::time::Duration::from_millis(20)
            && wall.elapsed() < std::time::Duration::from_secs(5)
        {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(
            slept < std::time::Duration::from_millis(20),
            "{slept:?} of CPU while asleep"
        );
        assert!(thread_cpu_time() - t1 >= std::time::Duration::from_millis(20));
    }
}
