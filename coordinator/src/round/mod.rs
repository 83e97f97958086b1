//! A training's rounds, step by step. The driver ([`driver`]) runs the steps in
//! this order; each lives in its own module:
//!
//! 1. [`lifecycle`]: start, resume after a restart, or abandon a training, and
//!    spawn its driver task.
//! 2. [`statistics`]: collect each site's feature statistics once and merge them
//!    into one global scaling.
//! 3. per round, in [`driver`]: open the round ([`phase`] sends the task to the
//!    selected participants), collect their updates ([`upload`]: checked, spilled
//!    and folded into the exact accumulator as they arrive), close it (undo what
//!    is unfinished), re-run it if too few updates came;
//! 4. [`aggregate`]: the round's aggregate delta (the exact mean, or a robust
//!    rule's, read back from the spills window by window) stepped into the
//!    model by the server optimiser, whose state is saved with the round; then
//!    [`commit`] it (model file fsynced, store commit point, published for download);
//! 5. [`evaluate`] it on every site's validation split;
//! 6. [`record`] it: `metrics.jsonl`, the audit entry, the log line, with
//!    [`outliers`]: evaluations that lie far from the other sites' reports.
//!
//! [`privacy`] holds the differential-privacy checks of these steps: every
//! site's budget after the statistics, each update's reported spend as it
//! arrives, and the ε the committed round spent.
//!
//! [`secure`] holds the secure-aggregation steps around collecting updates:
//! the key exchange after opening the round, and unmasking the sum after
//! closing it (`crate::secure` keeps the attempt's bookkeeping).
//!
//! New round steps plug in here: metering after evaluate.

pub mod aggregate;
pub mod commit;
pub mod driver;
pub mod evaluate;
pub mod lifecycle;
pub mod outliers;
pub mod phase;
pub mod privacy;
pub mod record;
pub mod secure;
pub mod statistics;
pub mod upload;

pub use lifecycle::{abandon, resume, start};
pub use record::{RoundRecord, Timings};
