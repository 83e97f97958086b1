//! End-to-end federation over mutual TLS on loopback: a real coordinator and real
//! participant daemons (in this process) train on Tennessee Eastman data.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use sangsaeng::localnet;
use sangsaeng_common::encoding::UpdateEncoding;
use sangsaeng_common::model::ModelSpec;
use sangsaeng_common::weights;

/// Runs a training to completion and returns its output folder.
async fn run_federation(dir: &Path, rounds: u32, files: Vec<PathBuf>, record: bool) -> PathBuf {
    run_federation_with(dir, support::plan(rounds, 3), files, record).await
}

async fn run_federation_with(
    dir: &Path,
    plan: sangsaeng_common::plan::TrainingPlan,
    files: Vec<PathBuf>,
    record: bool,
) -> PathBuf {
    let roster = support::roster(&[]);
    let pki = support::pki(dir, &roster);
    let coord = localnet::start_coordinator(
        &pki,
        roster,
        Some(plan),
        &dir.join("runs"),
        Default::default(),
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let handles: Vec<_> = support::SITES
        .iter()
        .zip(files)
        .map(|(org, f)| {
            let rec = record.then(|| dir.join("sent").join(org));
            let cfg = localnet::participant_config(&pki, &coord.url, org, vec![f], "fault", rec);
            localnet::spawn_participant(cfg, stop.clone())
        })
        .collect();
    let admin = pki.material("ops-admin");
    let s = localnet::wait_for_status(&coord.url, &admin, Duration::from_secs(300), |s| {
        s.training
            .as_ref()
            .is_some_and(|t| t.phase == "completed" || t.phase == "failed")
    })
    .await
    .expect("training finished in time");
    let t = s.training.unwrap();
    assert_eq!(t.phase, "completed", "{}", t.error);
    for h in handles {
        h.await.unwrap().unwrap();
    }
    coord.stop().await.unwrap();
    PathBuf::from(t.output_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn global_model_is_the_example_weighted_mean_of_the_deltas_sent() {
    weighted_mean_of_the_deltas_sent(UpdateEncoding::Float32).await;
}

/// With int8 deltas the global model is the weighted mean of the *dequantised*
/// deltas (what each site records as sent), so quantisation happens once, at the site.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn int8_deltas_are_averaged_as_the_sites_sent_them() {
    weighted_mean_of_the_deltas_sent(UpdateEncoding::Int8).await;
}

async fn weighted_mean_of_the_deltas_sent(encoding: UpdateEncoding) {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let files = support::site_files(dir.path(), 3);
    let mut plan = support::plan(3, 3);
    plan.training.update_encoding = encoding;
    let out = run_federation_with(dir.path(), plan, files, true).await;

    let plan = sangsaeng_common::plan::TrainingPlan::from_file(&out.join("plan.toml")).unwrap();
    let layout = ModelSpec::from_plan(&plan).layout();
    let training_id = out.file_name().unwrap().to_str().unwrap().to_string();
    let mut previous =
        weights::load_safetensors(&out.join("model-round-0000.safetensors"), &layout).unwrap();
    for round in 1..=3u32 {
        // Independent computation in f64 from the deltas each site recorded as sent.
        let mut sum = vec![0f64; previous.len()];
        let mut total = 0f64;
        for org in support::SITES {
            let f = dir
                .path()
                .join("sent")
                .join(org)
                .join(&training_id)
                .join(format!("delta-round-{round:04}.safetensors"));
            let delta = weights::load_safetensors(&f, &layout).unwrap();
            let meta = weights::safetensors_metadata(&f).unwrap();
            let n: f64 = meta["num_examples"].parse().unwrap();
            assert_eq!(meta["encoding"], encoding.name());
            for (s, d) in sum.iter_mut().zip(&delta) {
                *s += n * *d as f64;
            }
            total += n;
        }
        let global = weights::load_safetensors(
            &out.join(format!("model-round-{round:04}.safetensors")),
            &layout,
        )
        .unwrap();
        let mut worst = 0f64;
        for j in 0..global.len() {
            let expected = previous[j] as f64 + sum[j] / total;
            worst = worst.max((global[j] as f64 - expected).abs());
        }
        assert!(worst <= 1e-6, "round {round}: max deviation {worst}");
        // The delta actually moved the model.
        assert!(global.iter().zip(&previous).any(|(a, b)| a != b));
        previous = global;
    }
    let final_model = weights::load_safetensors(&out.join("global.safetensors"), &layout).unwrap();
    assert_eq!(final_model, previous);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn federated_loss_decreases_over_rounds_on_tennessee_eastman() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let files = support::site_files(dir.path(), 3);
    let out = run_federation(dir.path(), 4, files, false).await;
    let records: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 4);
    let eval_loss: Vec<f64> = records
        .iter()
        .map(|r| r["eval_loss"].as_f64().unwrap())
        .collect();
    let train_loss: Vec<f64> = records
        .iter()
        .map(|r| r["train_loss"].as_f64().unwrap())
        .collect();
    assert!(
        eval_loss[3] < eval_loss[0],
        "validation loss did not decrease: {eval_loss:?}"
    );
    assert!(
        train_loss[3] < train_loss[0],
        "training loss did not decrease: {train_loss:?}"
    );
    for r in &records {
        assert_eq!(r["participants"].as_array().unwrap().len(), 3);
        assert_eq!(r["evaluations"].as_array().unwrap().len(), 3);
        let f1 = r["eval_macro_f1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&f1));
    }
    let last = records.last().unwrap()["eval_accuracy"].as_f64().unwrap();
    assert!(last > 0.5, "accuracy after 4 rounds is only {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_shuts_down_promptly_with_participants_connected() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let files = support::site_files(dir.path(), 2);
    let roster = support::roster(&[]);
    let pki = support::pki(dir.path(), &roster);
    let coord = localnet::start_coordinator(
        &pki,
        roster,
        None,
        &dir.path().join("runs"),
        Default::default(),
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let handles: Vec<_> = support::SITES
        .iter()
        .zip(files)
        .map(|(org, f)| {
            let mut cfg =
                localnet::participant_config(&pki, &coord.url, org, vec![f], "fault", None);
            cfg.exit_after_training = false;
            localnet::spawn_participant(cfg, stop.clone())
        })
        .collect();
    let admin = pki.material("ops-admin");
    localnet::wait_for_status(&coord.url, &admin, Duration::from_secs(30), |s| {
        s.participants.iter().filter(|p| p.connected).count() == 2
    })
    .await
    .expect("both participants connected");
    // Open subscription streams must not hold the shutdown up.
    tokio::time::timeout(Duration::from_secs(10), coord.stop())
        .await
        .expect("coordinator stopped within 10 s")
        .unwrap();
    // The participants ride it out (reconnecting with backoff) until told to stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(handles.iter().all(|h| !h.is_finished()));
    stop.cancel();
    for h in handles {
        tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
