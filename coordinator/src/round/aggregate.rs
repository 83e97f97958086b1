//! Aggregation: how a closed round's updates become the next global model.
//!
//! 1. Client-level DP noise, if the plan has it, goes into the exact sum.
//! 2. The round's aggregate delta, window by window of parameters:
//!    - `robust = "none"` or `"norm-bound"` (the bound was enforced as updates
//!      streamed in, `transfer/delta.rs`): the accumulator's exact FedAvg mean;
//!    - `"median"`, `"trimmed-mean"`: the coordinate-wise rule over every
//!      accepted update, read back from its spill file one window at a time
//!      ([`SpilledValues`]): K windows in memory, never K models;
//!    - `"multi-krum"`: a first pass over the spills sums the pairwise squared
//!      distances; the f updates Multi-Krum does not keep are taken out of the
//!      accumulator again (exactly, as an undo), and the mean of the kept ones
//!      is the exact accumulator's.
//! 3. The server optimiser's step with that delta
//!    ([`sangsaeng_common::aggregation::server`]); plain FedAvg (rate 1) adds it
//!    as it is, the same bits as before there were optimisers.
//! 4. SCAFFOLD: the server control variate moves by the exact mean of the
//!    sites' control-variate changes (the second half of every update, in the
//!    same accumulator, so it is as order-independent as the model).
//!
//! The optimiser's state (its moments) is part of the round's record: it is
//! written, fsynced, as `server-optimizer-round-NNNN.safetensors` before the
//! round is committed, and a resumed coordinator loads the state of the last
//! committed round, so kill -9 still ends with the model an uninterrupted run
//! gives. The file of the round before is removed once the next one is
//! committed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use sangsaeng_common::aggregation::fedavg::Accumulator;
use sangsaeng_common::aggregation::robust;
use sangsaeng_common::aggregation::server::ServerOptimizer;
use sangsaeng_common::config::aggregation::{AggregationConfig, RobustRule};
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::learning::model::TensorSpec;
use sangsaeng_common::privacy::dp::client_noise;
use sangsaeng_common::transfer::weights;

use crate::error::{CoordinatorError, Result};
use crate::state::Shared;
use crate::transfer::PublishedModel;
use crate::transfer::spill::{SpilledUpdate, SpilledValues};

/// Parameters per window of the robust rules and the optimiser's step: 256 KiB
/// of f32 per update, so K = 32 updates hold 8 MiB, whatever the model's size.
const WINDOW: usize = 1 << 16;

/// Threads a coordinate-wise rule uses at most: the round is closed and the
/// coordinator has nothing else to do, but it shares its machine.
const MAX_RULE_THREADS: usize = 4;

/// The plan's per-update L2 bound, enforced on each upload as it streams in,
/// with the key that sets it: `aggregation.max_update_norm` (norm-bound), or
/// under client-level DP `privacy.dp.clip_norm` (the sites clip, and the
/// coordinator checks it, so the noise is calibrated to a bound that holds,
/// not to a claim). The smaller when both apply.
pub fn norm_bound(plan: &TrainingPlan) -> Option<(f64, &'static str)> {
    let a = plan.aggregation();
    let robust = match a.robust {
        RobustRule::NormBound => a
            .max_update_norm
            .map(|b| (b, "aggregation.max_update_norm")),
        _ => None,
    };
    let clip = plan.client_dp().map(|dp| {
        (
            client_noise::accepted_norm(dp.clip()),
            "privacy.dp.clip_norm",
        )
    });
    match (robust, clip) {
        (Some(r), Some(c)) => Some(if c.0 < r.0 { c } else { r }),
        (r, c) => r.or(c),
    }
}

/// Whether the plan's rule reads the round's updates back from their spill
/// files (kept until the round is committed, even without `durable_updates`).
pub fn keeps_spills(plan: &TrainingPlan) -> bool {
    plan.aggregation().robust.needs_individual_updates()
}

/// What a robust rule did in a round: in `metrics.jsonl` and the audit entry.
#[derive(Debug, Clone, Serialize)]
pub struct RobustRecord {
    pub rule: &'static str,
    /// Updates the rule looked at.
    pub updates: usize,
    /// Values dropped at each end of every coordinate (trimmed mean).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trimmed_per_side: Option<usize>,
    /// Updates left out of the model, with the reason (Multi-Krum).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub excluded: BTreeMap<String, String>,
}

/// The server optimiser of a training, as a resumed driver finds it: fresh
/// before round 1, else the state saved with the last committed round.
pub fn load_optimizer(
    plan: &TrainingPlan,
    out_dir: &Path,
    num_params: usize,
    completed_round: u32,
) -> Result<ServerOptimizer> {
    let settings = plan.aggregation().server();
    let fresh = ServerOptimizer::new(settings, num_params);
    if !fresh.has_state() || completed_round == 0 {
        return Ok(fresh);
    }
    let path = optimizer_path(out_dir, completed_round);
    let (m, v) = fresh.moments();
    let (m_len, v_len) = (m.len(), v.len());
    let values = weights::load_safetensors(&path, &optimizer_layout(m_len, v_len)).map_err(|e| {
        CoordinatorError::Store(format!(
            "the {} state of round {completed_round} cannot be read ({e}); without it the training cannot resume to the model an uninterrupted run gives",
            settings.strategy.name()
        ))
    })?;
    let (m, v) = values.split_at(m_len);
    ServerOptimizer::restore(settings, m.to_vec(), v.to_vec()).map_err(Into::into)
}

fn optimizer_path(out_dir: &Path, round: u32) -> PathBuf {
    out_dir.join(format!("server-optimizer-round-{round:04}.safetensors"))
}

fn optimizer_layout(m: usize, v: usize) -> Vec<TensorSpec> {
    let mut layout = vec![TensorSpec {
        name: "m".into(),
        shape: vec![m],
    }];
    if v > 0 {
        layout.push(TensorSpec {
            name: "v".into(),
            shape: vec![v],
        });
    }
    layout
}

/// Writes (fsynced) the optimiser's state after `round`'s step: before the
/// round is committed, so a committed round always has its state on disk.
pub fn save_optimizer(opt: &ServerOptimizer, out_dir: &Path, round: u32) -> Result<()> {
    if !opt.has_state() {
        return Ok(());
    }
    let (m, v) = opt.moments();
    let mut values = Vec::with_capacity(m.len() + v.len());
    values.extend_from_slice(m);
    values.extend_from_slice(v);
    let meta = HashMap::from([
        (
            "strategy".to_string(),
            opt.settings().strategy.name().to_string(),
        ),
        ("round".to_string(), round.to_string()),
    ]);
    weights::save_safetensors(
        &optimizer_path(out_dir, round),
        &optimizer_layout(m.len(), v.len()),
        &values,
        meta,
    )?;
    Ok(())
}

/// Once `round` is committed, the state of the round before is not needed.
pub fn remove_older_optimizer_state(out_dir: &Path, round: u32) {
    if round > 1 {
        let _ = std::fs::remove_file(optimizer_path(out_dir, round - 1));
    }
}

/// The round's inputs to aggregation.
pub struct RoundInputs {
    pub accumulator: Accumulator,
    /// Every accepted update's spill (only when the plan's rule reads them).
    pub spilled: Vec<SpilledUpdate>,
}

/// What aggregation hands back to the driver.
pub struct Aggregated {
    pub global: Vec<f32>,
    pub robust: Option<RobustRecord>,
}

/// Applies the round's aggregate (after any client-level noise, through any
/// robust rule) with the server optimiser's step, and keeps the accumulator's
/// memory for the next round. Off the runtime: at P = 1e7 this is seconds.
pub async fn aggregate(
    shared: &Shared,
    plan: &TrainingPlan,
    published: Arc<PublishedModel>,
    inputs: RoundInputs,
    optimizer: &mut Option<ServerOptimizer>,
) -> Result<Aggregated> {
    // In place when no download still holds the old model: at 1e9 parameters a
    // second copy would be another 4 GB of coordinator memory.
    shared.training().as_mut().expect("training").models.clear();
    let global = match Arc::try_unwrap(published) {
        Ok(m) => m.into_params(),
        Err(shared_model) => shared_model.params.clone(),
    };
    let plan = plan.clone();
    let federation_weight = federation_weight(shared);
    let mut opt = optimizer.take().expect("the driver holds the optimiser");
    let (acc, opt, outcome) = tokio::task::spawn_blocking(move || {
        let mut acc = inputs.accumulator;
        let mut global = global;
        let outcome = step_model(&plan, &mut acc, &inputs.spilled, &mut opt, &mut global).and_then(
            |robust| {
                step_control(&acc, &mut opt, global.len(), federation_weight)?;
                Ok(Aggregated { global, robust })
            },
        );
        (acc, opt, outcome)
    })
    .await
    .map_err(|e| CoordinatorError::Store(format!("aggregating the round: {e}")))?;
    *optimizer = Some(opt);
    shared
        .training()
        .as_mut()
        .expect("training")
        .spare_accumulator = Some(acc);
    outcome
}

/// The fold weight of every site of the training (declared rows, or a late
/// joiner's first claim): SCAFFOLD's |S|/N, by weight.
fn federation_weight(shared: &Shared) -> u64 {
    let guard = shared.training();
    let t = guard.as_ref().expect("training");
    t.declared_rows
        .iter()
        .chain(
            t.claimed_rows
                .iter()
                .filter(|(o, _)| !t.declared_rows.contains_key(*o)),
        )
        .map(|(_, rows)| t.fold_weight(*rows))
        .sum()
}

/// SCAFFOLD (step 4): the server control variate moves by the round's mean
/// control-variate change, the accumulator's values after the model's, times
/// the round's share of the federation's weight.
fn step_control(
    acc: &Accumulator,
    opt: &mut ServerOptimizer,
    model_params: usize,
    federation_weight: u64,
) -> Result<()> {
    if opt.control().is_empty() {
        return Ok(());
    }
    let share = match federation_weight {
        0 => 1.0,
        w => (acc.total_weight() as f64 / w as f64).min(1.0),
    };
    let mut changes = vec![0f64; WINDOW.min(model_params)];
    for start in (0..model_params).step_by(WINDOW) {
        let d = &mut changes[..WINDOW.min(model_params - start)];
        acc.mean_window(model_params + start, d)?;
        opt.control_window(start, d, share)?;
    }
    Ok(())
}

/// Steps 1 to 3 of the module's list, on a blocking thread.
fn step_model(
    plan: &TrainingPlan,
    acc: &mut Accumulator,
    spilled: &[SpilledUpdate],
    opt: &mut ServerOptimizer,
    global: &mut [f32],
) -> Result<Option<RobustRecord>> {
    super::privacy::add_aggregate_noise(plan, acc)?;
    let a = plan.aggregation();
    let record = match a.robust {
        RobustRule::None => None,
        RobustRule::NormBound => Some(RobustRecord::new(&a, spilled.len(), None)),
        RobustRule::MultiKrum => Some(exclude_by_multi_krum(&a, acc, spilled)?),
        RobustRule::Median | RobustRule::TrimmedMean => {
            return coordinate_wise(&a, spilled, opt, global).map(Some);
        }
    };
    let mut delta = vec![0f64; WINDOW.min(global.len())];
    for (w, g) in global.chunks_mut(WINDOW).enumerate() {
        let d = &mut delta[..g.len()];
        acc.mean_window(w * WINDOW, d)?;
        opt.step_window(w * WINDOW, d, g)?;
    }
    Ok(record)
}

impl RobustRecord {
    fn new(a: &AggregationConfig, updates: usize, trimmed: Option<usize>) -> Self {
        RobustRecord {
            rule: a.robust.name(),
            updates,
            trimmed_per_side: trimmed,
            excluded: BTreeMap::new(),
        }
    }
}

/// Opens every update's spill for reading window by window.
fn open_all(spilled: &[SpilledUpdate]) -> Result<Vec<SpilledValues>> {
    spilled
        .iter()
        .map(|s| SpilledValues::open(&s.path, s.encoding))
        .collect()
}

/// Reads the next window of every update into `bufs`.
fn next_window(readers: &mut [SpilledValues], n: usize, bufs: &mut [Vec<f32>]) -> Result<()> {
    for (r, b) in readers.iter_mut().zip(bufs.iter_mut()) {
        r.take(n, b)?;
    }
    Ok(())
}

/// Median or trimmed mean: the aggregate delta of each window from every
/// update's values there, each update weighing the same.
fn coordinate_wise(
    a: &AggregationConfig,
    spilled: &[SpilledUpdate],
    opt: &mut ServerOptimizer,
    global: &mut [f32],
) -> Result<RobustRecord> {
    let mut readers = open_all(spilled)?;
    let mut bufs = vec![Vec::with_capacity(WINDOW); spilled.len()];
    let mut delta = vec![0f64; WINDOW.min(global.len())];
    for (w, g) in global.chunks_mut(WINDOW).enumerate() {
        next_window(&mut readers, g.len(), &mut bufs)?;
        let d = &mut delta[..g.len()];
        coordinate_wise_window(a, &bufs, d)?;
        opt.step_window(w * WINDOW, d, g)?;
    }
    let trimmed = (a.robust == RobustRule::TrimmedMean)
        .then(|| robust::trimmed(spilled.len(), a.trim_fraction()));
    Ok(RobustRecord::new(a, spilled.len(), trimmed))
}

/// One window of the coordinate-wise rule, split across the machine's cores:
/// each coordinate's value depends only on that coordinate's K values, so the
/// split changes nothing in the result, only the time (sorting K values per
/// coordinate is most of a robust round at K = 32).
fn coordinate_wise_window(a: &AggregationConfig, bufs: &[Vec<f32>], out: &mut [f64]) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_RULE_THREADS);
    let part = out.len().div_ceil(threads).max(1);
    let rule = |start: usize, o: &mut [f64]| {
        let columns: Vec<&[f32]> = bufs.iter().map(|b| &b[start..start + o.len()]).collect();
        match a.robust {
            RobustRule::Median => robust::median_window(&columns, o),
            _ => robust::trimmed_mean_window(&columns, a.trim_fraction(), o),
        }
    };
    if threads == 1 {
        return Ok(rule(0, out)?);
    }
    let parts: sangsaeng_common::Result<()> = std::thread::scope(|scope| {
        let handles: Vec<_> = out
            .chunks_mut(part)
            .enumerate()
            .map(|(i, o)| scope.spawn(move || rule(i * part, o)))
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("a robust-rule thread panicked"))
    });
    Ok(parts?)
}

/// Multi-Krum: which updates to keep, from every pair's squared distance
/// (one pass over the spills), and the others taken out of the accumulator.
fn exclude_by_multi_krum(
    a: &AggregationConfig,
    acc: &mut Accumulator,
    spilled: &[SpilledUpdate],
) -> Result<RobustRecord> {
    let k = spilled.len();
    let n = acc.num_params();
    let mut readers = open_all(spilled)?;
    let mut bufs = vec![Vec::with_capacity(WINDOW); k];
    let mut dist = vec![0f64; k * k];
    for start in (0..n).step_by(WINDOW) {
        next_window(&mut readers, WINDOW.min(n - start), &mut bufs)?;
        let columns: Vec<&[f32]> = bufs.iter().map(Vec::as_slice).collect();
        robust::add_squared_distances(&columns, &mut dist)?;
    }
    let f = a.krum_byzantine() as usize;
    let keep = robust::multi_krum_keep(&dist, k, f)?;
    let scores = robust::krum_scores(&dist, k, f)?;
    let mut record = RobustRecord::new(a, k, None);
    for (i, s) in spilled
        .iter()
        .enumerate()
        .filter(|(i, _)| !keep.contains(i))
    {
        take_out(acc, s)?;
        record.excluded.insert(
            s.org_id.clone(),
            format!(
                "multi-krum (f = {f}): among the {f} updates farthest from their {} nearest others (score {:.6e})",
                k - f - 2,
                scores[i]
            ),
        );
    }
    Ok(record)
}

/// Subtracts one accepted update from the accumulator again, exactly.
fn take_out(acc: &mut Accumulator, s: &SpilledUpdate) -> Result<()> {
    let n = acc.num_params();
    let mut reader = SpilledValues::open(&s.path, s.encoding)?;
    let mut buf = Vec::with_capacity(WINDOW);
    for start in (0..n).step_by(WINDOW) {
        reader.take(WINDOW.min(n - start), &mut buf)?;
        acc.unfold(start, &buf, s.weight);
    }
    acc.withdraw(s.weight);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sangsaeng_common::config::aggregation::Strategy;

    fn plan(strategy: Strategy) -> TrainingPlan {
        let mut plan = TrainingPlan::from_toml(
            "[schema]\nfeature_columns = [\"a\"]\nlabel_column = \"y\"\nclasses = [\"0\", \"1\"]\n\
             [model]\nhidden_layers = [2]\n[training]\nrounds = 3\nlearning_rate = 0.1\nmin_participants = 1\n",
            "test",
        )
        .unwrap();
        plan.aggregation = Some(AggregationConfig {
            strategy,
            ..Default::default()
        });
        plan
    }

    #[test]
    fn the_saved_state_is_what_a_resumed_driver_loads() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan(Strategy::FedAdam);
        let mut opt = load_optimizer(&plan, dir.path(), 4, 0).unwrap();
        let mut g = vec![0.5f32; 4];
        opt.step_window(0, &[0.1, -0.2, 0.3, 1e-7], &mut g).unwrap();
        save_optimizer(&opt, dir.path(), 1).unwrap();
        let back = load_optimizer(&plan, dir.path(), 4, 1).unwrap();
        assert_eq!(back, opt);
        // The next step from the loaded state is the uninterrupted one, bit for bit.
        let (mut a, mut b) = (g.clone(), g);
        let mut resumed = back;
        opt.step_window(0, &[0.2; 4], &mut a).unwrap();
        resumed.step_window(0, &[0.2; 4], &mut b).unwrap();
        assert_eq!(a, b);
        remove_older_optimizer_state(dir.path(), 2);
        assert!(!optimizer_path(dir.path(), 1).exists());
    }

    #[test]
    fn a_missing_or_mismatched_state_stops_the_resume_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let adam = plan(Strategy::FedAdam);
        let e = load_optimizer(&adam, dir.path(), 4, 2).unwrap_err();
        assert!(
            e.to_string().contains("state of round 2 cannot be read"),
            "{e}"
        );
        // A FedAvgM state (one moment) where FedAdam needs two.
        let m = load_optimizer(&plan(Strategy::FedAvgM), dir.path(), 4, 0).unwrap();
        save_optimizer(&m, dir.path(), 2).unwrap();
        assert!(load_optimizer(&adam, dir.path(), 4, 2).is_err());
        // A model of another size.
        let e = load_optimizer(&plan(Strategy::FedAvgM), dir.path(), 5, 2).unwrap_err();
        assert!(e.to_string().contains("fedavgm"), "{e}");
        // Plain FedAvg keeps no state: nothing to read.
        assert!(load_optimizer(&plan(Strategy::FedAvg), dir.path(), 4, 7).is_ok());
    }
}
