//! Committing a round: the new global model written and fsynced, the store's
//! commit point, publication for download, and the removal of the round's spill
//! files once they are no longer needed.

use std::collections::HashMap;
use std::sync::Arc;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::learning::model::TensorSpec;
use sangsaeng_common::transfer::weights;

use crate::durable::store::{RECORD_VERSION, StoredModel, TrainingRecord};
use crate::error::{CoordinatorError, Result};
use crate::state::Shared;
use crate::transfer::{ModelDigests, PublishedModel};

pub(super) fn model_metadata(plan: &TrainingPlan, round: u32) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), "sangsaeng-mlp-v1".to_string()),
        ("round".to_string(), round.to_string()),
        ("plan_toml".to_string(), plan.to_toml()),
    ])
}

/// [`commit_model`] on a blocking thread: hashing, writing and fsyncing a model
/// (4 GB at P = 1e9, many seconds) would otherwise hold one of the runtime's
/// workers, which also serve every transfer, subscription and keepalive.
pub(super) async fn commit_model_off_runtime(
    shared: &Arc<Shared>,
    plan: &TrainingPlan,
    layout: &[TensorSpec],
    rec: &TrainingRecord,
    params: Vec<f32>,
) -> Result<Arc<PublishedModel>> {
    let (shared, plan, layout, rec) = (shared.clone(), plan.clone(), layout.to_vec(), rec.clone());
    tokio::task::spawn_blocking(move || commit_model(&shared, &plan, &layout, &rec, params))
        .await
        .map_err(|e| CoordinatorError::Store(format!("committing the round's model: {e}")))?
}

/// Makes a round's model the committed one: its file written and fsynced, then
/// the store's commit point 2 (round counter, model digest, contributions
/// dropped), then published for download.
pub(super) fn commit_model(
    shared: &Shared,
    plan: &TrainingPlan,
    layout: &[TensorSpec],
    rec: &TrainingRecord,
    params: Vec<f32>,
) -> Result<Arc<PublishedModel>> {
    let started = std::time::Instant::now();
    let round = rec.completed_round;
    let file =
        std::path::Path::new(&rec.output_dir).join(format!("model-round-{round:04}.safetensors"));
    // The digests (SHA-256, BLAKE3, per chunk) on a second thread while this one
    // writes and fsyncs the file: both lie between the round's last update and
    // the next round's opening, with the cores otherwise idle (at P = 1e7 about
    // 57 ms of hashing beside 40-120 ms of writing).
    let chunk_bytes = shared.config.limits.max_chunk_bytes;
    let (digests, saved) = std::thread::scope(|s| {
        let digests = s.spawn(|| ModelDigests::of(&params, chunk_bytes));
        let saved = weights::save_safetensors(&file, layout, &params, model_metadata(plan, round));
        (
            digests.join().expect("hashing a model does not panic"),
            saved,
        )
    });
    saved?;
    let model = PublishedModel::with_digests(round, params, chunk_bytes, digests);
    shared.store.complete_round(
        rec,
        &StoredModel {
            version: RECORD_VERSION,
            round,
            sha256: model.sha256.clone(),
            file: file.display().to_string(),
        },
    )?;
    shared
        .metrics
        .store_commit_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(publish(shared, model))
}

/// Offers a committed model for download (only the current round's model is kept).
pub(super) fn publish(shared: &Shared, model: PublishedModel) -> Arc<PublishedModel> {
    let round = model.round;
    let published = Arc::new(model);
    let mut guard = shared.training();
    let t = guard.as_mut().expect("training");
    t.models.clear();
    t.models.insert(round, published.clone());
    published
}

/// Deletes a committed round's spill files on a blocking thread, off the round
/// loop: unlinking a round's updates (1.28 GB at P = 1e7, K = 32) took 0.2 s,
/// which sat between the round's commit and the next round's opening. A crash
/// before it is done leaves them to [`remove_stale_spills`] at the next start.
pub(super) fn remove_spills_later(out_dir: &std::path::Path, round: u32) {
    let out_dir = out_dir.to_path_buf();
    tokio::task::spawn_blocking(move || remove_spills(&out_dir, round));
}

/// Deletes the spill directories of rounds before `first_round`, all committed:
/// left behind by a crash between a round's commit and their removal.
pub(super) fn remove_stale_spills(out_dir: &std::path::Path, first_round: u32) {
    let Ok(entries) = std::fs::read_dir(out_dir.join("updates")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let stale = name
            .to_str()
            .and_then(|n| n.strip_prefix("round-"))
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|r| r < first_round);
        if stale {
            tracing::info!(dir = %e.path().display(), "deleting the spilled updates of a committed round");
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(dir = %e.path().display(), "could not delete spilled updates: {err}");
            }
        }
    }
}

/// Deletes the spill files of a round once it no longer needs them.
pub(super) fn remove_spills(out_dir: &std::path::Path, round: u32) {
    let dir = crate::transfer::spill::spill_dir(out_dir, round);
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), "could not delete spilled updates: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_spills_of_committed_rounds_are_deleted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        for round in [1, 2, 3] {
            let d = crate::transfer::spill::spill_dir(dir.path(), round);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("a-1.bin"), b"x").unwrap();
        }
        let other = dir.path().join("updates").join("notes");
        std::fs::create_dir_all(&other).unwrap();
        // Rounds 1 and 2 are committed; round 3 is the one to resume, with its
        // spilled updates still needed.
        remove_stale_spills(dir.path(), 3);
        assert!(!crate::transfer::spill::spill_dir(dir.path(), 1).exists());
        assert!(!crate::transfer::spill::spill_dir(dir.path(), 2).exists());
        assert!(
            crate::transfer::spill::spill_dir(dir.path(), 3)
                .join("a-1.bin")
                .exists()
        );
        assert!(other.exists(), "only round-NNNN folders are touched");
        // A coordinator that never spilled anything has no folder to read.
        remove_stale_spills(&dir.path().join("nowhere"), 5);
    }
}
