//! Progress of the long work at a site: local training (steps and loss),
//! the model download and the delta upload (chunks).
//!
//! On a terminal these are indicatif bars on stderr, stacked when several
//! run at once (the example runs four sites in one process). Off a terminal
//! (a service's journal, a test) there are no bars: a log line at most every
//! [`LOG_EVERY`] and one when the work ends, so service logs stay readable.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// The longest a long piece of work goes without a log line off a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// One place for every bar of the process, so concurrent ones stack.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// The progress of one piece of work.
pub struct Progress {
    what: String,
    total: u64,
    done: u64,
    started: Instant,
    shown: Shown,
}

enum Shown {
    Bar(ProgressBar),
    Log { last: Instant },
}

impl Progress {
    /// `what` names the work in the bar or the log line; `unit` its steps.
    pub fn new(what: impl Into<String>, total: u64, unit: &str) -> Progress {
        let what = what.into();
        let shown = if std::io::stderr().is_terminal() {
            let bar = bars().add(ProgressBar::new(total));
            let template = format!(
                "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} ({{elapsed}}, eta {{eta}})"
            );
            bar.set_style(
                ProgressStyle::with_template(&template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(what.clone());
            Shown::Bar(bar)
        } else {
            Shown::Log {
                last: Instant::now(),
            }
        };
        Progress {
            what,
            total,
            done: 0,
            started: Instant::now(),
            shown,
        }
    }

    /// `done` of the total are done; `note` (e.g. the loss) goes beside it.
    pub fn set(&mut self, done: u64, note: impl FnOnce() -> String) {
        self.done = done;
        match &mut self.shown {
            Shown::Bar(bar) => {
                bar.set_position(done);
                bar.set_message(note());
            }
            Shown::Log { last } if last.elapsed() >= LOG_EVERY => {
                *last = Instant::now();
                tracing::info!("{}: {done}/{} {}", self.what, self.total, note());
            }
            Shown::Log { .. } => {}
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let secs = self.started.elapsed().as_secs_f64();
        match &self.shown {
            Shown::Bar(bar) => {
                bar.finish_and_clear();
                bars().remove(bar);
            }
            // Work that took long enough to be logged on the way is logged at its end.
            Shown::Log { .. } if secs >= LOG_EVERY.as_secs_f64() => {
                tracing::info!("{}: {}/{} in {secs:.1}s", self.what, self.done, self.total);
            }
            Shown::Log { .. } => {}
        }
    }
}
