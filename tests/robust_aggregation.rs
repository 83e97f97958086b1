//! Robust aggregation against a hostile supplier, with a real coordinator and
//! four real participant daemons over mutual TLS on loopback, and a fifth
//! participant scripted in the test that sends what a broken export or an
//! attacker would: every value of its delta +3 (the honest ones are below
//! 0.1), claiming 10,000 examples.
//!
//! Plain FedAvg is pulled away by it; `norm-bound` refuses it as it streams
//! in, `multi-krum` leaves it out, and both give exactly FedAvg of the four
//! honest updates; `median` and `trimmed-mean` give exactly their
//! coordinate-wise rule over all five. Each exclusion is named, with its
//! reason, in metrics.jsonl and the audit log.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use sangsaeng::localnet::{self, Pki};
use sangsaeng_common::aggregation::fedavg::Accumulator;
use sangsaeng_common::aggregation::robust;
use sangsaeng_common::config::aggregation::{AggregationConfig, RobustRule};
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::transfer::digest::{self, DigestAlgorithm};
use sangsaeng_common::transfer::encoding::{self, UpdateEncoding};
use sangsaeng_common::transfer::wire::{UpdateUpload, upload_messages};
use sangsaeng_coordinator::durable::audit;
use sangsaeng_proto::v1 as pb;
use sangsaeng_proto::v1::federation_client::FederationClient;
use tokio_util::sync::CancellationToken;

const HONEST: [&str; 4] = ["site-a", "site-b", "site-c", "site-d"];
const HOSTILE_VALUE: f32 = 3.0;
const HOSTILE_EXAMPLES: u64 = 10_000;

fn plan_with(robust: RobustRule) -> TrainingPlan {
    // Multi-Krum with f = 1 needs five updates; under a norm bound the hostile
    // one is refused, and the round goes on with the other four.
    let min = match robust {
        RobustRule::NormBound => 4,
        _ => 5,
    };
    let mut plan = support::plan(1, min);
    plan.training.evaluate = false;
    plan.aggregation = Some(AggregationConfig {
        robust,
        max_update_norm: (robust == RobustRule::NormBound).then_some(10.0),
        ..Default::default()
    });
    plan.validate().unwrap();
    plan
}

/// What the hostile site's upload was answered with.
type Answer = Result<pb::UploadReceipt, tonic::Status>;

/// The hostile site: answers the statistics plausibly (one row), then
/// uploads its delta of +3 everywhere for round 1.
async fn hostile(pki: Pki, url: String, features: usize) -> Answer {
    let tls = pki.material("site-e");
    let ch = sangsaeng_common::identity::channel::connect(&url, &tls, "localhost")
        .await
        .unwrap();
    let mut client = FederationClient::new(ch);
    let mut tasks = client
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    loop {
        let task = tokio::time::timeout(Duration::from_secs(120), tasks.message())
            .await
            .expect("a task within two minutes")
            .unwrap()
            .expect("the task stream is open");
        match task.kind {
            Some(pb::task::Kind::Stats(_)) => {
                // It declares the rows it will claim (an update's count must
                // equal them): a liar consistent from the start.
                let _ = client
                    .submit_stats(pb::StatsReport {
                        training_id: task.training_id.clone(),
                        count: HOSTILE_EXAMPLES,
                        sum: vec![0.0; features],
                        sum_sq: vec![HOSTILE_EXAMPLES as f64; features],
                    })
                    .await;
            }
            Some(pb::task::Kind::Train(ref t)) => {
                let info = t.model.clone().unwrap();
                return upload_constant(&mut client, &task, &info).await;
            }
            _ => {}
        }
    }
}

async fn upload_constant(
    client: &mut FederationClient<tonic::transport::Channel>,
    task: &pb::Task,
    info: &pb::ModelInfo,
) -> Answer {
    let values = vec![HOSTILE_VALUE; info.num_params as usize];
    let chunks = encoding::encode_chunks(&values, UpdateEncoding::Float32, 1 << 16).unwrap();
    let mut h = digest::Hasher::new(DigestAlgorithm::Sha256);
    for c in &chunks {
        h.update(c);
    }
    let u = UpdateUpload {
        training_id: task.training_id.clone(),
        round: task.round,
        base_model_sha256: info.sha256.clone(),
        num_params: info.num_params,
        encoding: UpdateEncoding::Float32,
        chunks: chunks.into_iter().map(bytes::Bytes::from).collect(),
        delta_digest: h.finalize_id(),
        num_examples: HOSTILE_EXAMPLES,
        train_loss: 0.0,
        first_chunk: 0,
        dp: None,
        masked: None,
    };
    let stream = tokio_stream::iter(upload_messages(u).unwrap());
    client.upload_update(stream).await.map(|r| r.into_inner())
}

/// One round of four honest daemons and the hostile site under `plan`.
struct Attacked {
    _dir: tempfile::TempDir,
    run: PathBuf,
    runs: PathBuf,
    /// Each honest site's recorded delta and example count.
    honest: Vec<(Vec<f32>, u64)>,
    answer: Answer,
}

async fn attacked_round(plan: &TrainingPlan) -> Attacked {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let roster = support::roster(&["site-d", "site-e"]);
    let pki = support::pki(dir.path(), &roster);
    let runs = dir.path().join("runs");
    // The plan starts once all five are connected, so every one is selected.
    let coord = localnet::start_coordinator(&pki, roster, None, &runs, Default::default())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let (handles, records) =
        support::spawn_recording_sites(&pki, &coord.url, dir.path(), &HONEST, &stop);
    let hostile = tokio::spawn(hostile(
        pki.clone(),
        coord.url.clone(),
        plan.schema.feature_columns.len(),
    ));
    support::start_when_connected(&pki, &coord.url, HONEST.len() + 1, plan).await;
    let answer = hostile.await.unwrap();
    let s = support::training_ended(&coord.url, &pki.material("ops-admin")).await;
    let t = s.training.unwrap();
    assert_eq!(t.phase, "completed", "{}", t.error);
    stop.cancel();
    for h in handles {
        let _ = h.await;
    }
    coord.stop().await.unwrap();
    Attacked {
        run: runs.join(&t.training_id),
        honest: records
            .iter()
            .map(|r| support::recorded_delta(plan, r))
            .collect(),
        runs,
        answer,
        _dir: dir,
    }
}

fn fedavg_of(init: &[f32], updates: &[(Vec<f32>, u64)]) -> Vec<f32> {
    let mut acc = Accumulator::new(init.len());
    for (d, n) in updates {
        acc.add(d, *n).unwrap();
    }
    acc.apply_to(init).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn metrics_line(run: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

fn round_entry(runs: &Path) -> serde_json::Value {
    audit::read_unverified(&runs.join(audit::FILE_NAME))
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "round_completed")
        .unwrap()
        .data
}

fn contributors(entry: &serde_json::Value) -> Vec<String> {
    entry["contributions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["org"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plain_fedavg_is_pulled_away_by_one_hostile_update() {
    let plan = plan_with(RobustRule::None);
    let a = attacked_round(&plan).await;
    a.answer.expect("plain FedAvg takes any plausible update");
    let (init, got) = (
        support::model(&plan, &a.run, 0),
        support::model(&plan, &a.run, 1),
    );
    let honest = fedavg_of(&init, &a.honest);
    let moved = got
        .iter()
        .zip(&honest)
        .map(|(g, h)| (g - h).abs())
        .fold(0f32, f32::max);
    // Its claimed 10,000 examples outweigh the honest sites' few hundred.
    assert!(moved > 2.0, "the attack moved the model by only {moved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn norm_bound_refuses_the_hostile_update_as_it_streams_in() {
    let plan = plan_with(RobustRule::NormBound);
    let a = attacked_round(&plan).await;
    let refused = a.answer.expect_err("the update is far above the bound");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("max_update_norm"), "{refused:?}");
    let init = support::model(&plan, &a.run, 0);
    assert_eq!(
        bits(&support::model(&plan, &a.run, 1)),
        bits(&fedavg_of(&init, &a.honest)),
        "the round is not exactly FedAvg of the four honest updates"
    );
    let line = metrics_line(&a.run);
    assert_eq!(line["robust"]["rule"], "norm-bound", "{line}");
    let why = line["refused"]["site-e"].as_str().unwrap_or_default();
    assert!(why.contains("max_update_norm"), "{line}");
    let entry = round_entry(&a.runs);
    assert!(
        entry["refused"]["site-e"]
            .as_str()
            .unwrap_or_default()
            .contains("max_update_norm"),
        "{entry}"
    );
    assert_eq!(contributors(&entry), HONEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_krum_leaves_the_hostile_update_out_exactly() {
    let plan = plan_with(RobustRule::MultiKrum);
    let a = attacked_round(&plan).await;
    a.answer
        .expect("accepted on arrival: Multi-Krum decides at aggregation");
    let init = support::model(&plan, &a.run, 0);
    assert_eq!(
        bits(&support::model(&plan, &a.run, 1)),
        bits(&fedavg_of(&init, &a.honest)),
        "the round is not exactly FedAvg of the four kept updates"
    );
    let line = metrics_line(&a.run);
    let excluded = line["robust"]["excluded"].as_object().unwrap();
    assert_eq!(
        excluded.keys().collect::<Vec<_>>(),
        vec!["site-e"],
        "{line}"
    );
    assert!(
        excluded["site-e"].as_str().unwrap().contains("multi-krum"),
        "{line}"
    );
    // The update left out is not counted as a contribution (release rules).
    let entry = round_entry(&a.runs);
    assert_eq!(contributors(&entry), HONEST);
    assert!(entry["robust"]["excluded"]["site-e"].is_string(), "{entry}");
}

/// The coordinate-wise rule over all five updates (the hostile one included),
/// applied as the coordinator applies it: `x + d` in f64, rounded once.
fn coordinate_wise(init: &[f32], a: &Attacked, rule: RobustRule) -> Vec<f32> {
    let hostile = vec![HOSTILE_VALUE; init.len()];
    let mut columns: Vec<&[f32]> = a.honest.iter().map(|(d, _)| d.as_slice()).collect();
    columns.push(&hostile);
    let mut d = vec![0f64; init.len()];
    match rule {
        RobustRule::Median => robust::median_window(&columns, &mut d).unwrap(),
        _ => robust::trimmed_mean_window(&columns, 0.2, &mut d).unwrap(),
    }
    init.iter()
        .zip(&d)
        .map(|(&x, &d)| (x as f64 + d) as f32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn median_and_trimmed_mean_hold_against_the_hostile_update() {
    for rule in [RobustRule::Median, RobustRule::TrimmedMean] {
        let plan = plan_with(rule);
        let a = attacked_round(&plan).await;
        a.answer
            .as_ref()
            .expect("coordinate-wise rules take every update");
        let (init, got) = (
            support::model(&plan, &a.run, 0),
            support::model(&plan, &a.run, 1),
        );
        assert_eq!(
            bits(&got),
            bits(&coordinate_wise(&init, &a, rule)),
            "{}: the model is not the rule's aggregate",
            rule.name()
        );
        let honest = fedavg_of(&init, &a.honest);
        let off = got
            .iter()
            .zip(&honest)
            .map(|(g, h)| (g - h).abs())
            .fold(0f32, f32::max);
        assert!(
            off < 0.5,
            "{}: {off} away from the honest mean",
            rule.name()
        );
        let line = metrics_line(&a.run);
        assert_eq!(line["robust"]["rule"], rule.name(), "{line}");
        assert_eq!(line["robust"]["updates"], 5, "{line}");
        if rule == RobustRule::TrimmedMean {
            assert_eq!(line["robust"]["trimmed_per_side"], 1, "{line}");
        }
        // Its spills were kept only until the round was committed (removed
        // off the runtime just after).
        let spills = a.run.join("updates");
        let left = || {
            std::fs::read_dir(&spills)
                .map(|r| r.flatten().count())
                .unwrap_or(0)
        };
        for _ in 0..50 {
            if left() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(left(), 0, "{}: spill folders left behind", rule.name());
    }
}

/// `[aggregation] max_weight_share`: the hostile site's 10,000 declared rows
/// fold with the capped weight (computed from every site's declared rows),
/// exactly, and the audit entry names the weight folded and the rows claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_weight_share_caps_the_hostile_weight_in_the_fold_exactly() {
    use sangsaeng_common::aggregation::weight_cap::{capped, weight_cap};
    let mut plan = plan_with(RobustRule::None);
    plan.aggregation.as_mut().unwrap().max_weight_share = Some(0.25);
    plan.validate().unwrap();
    let a = attacked_round(&plan).await;
    a.answer.expect("a capped update is taken");
    let mut rows: Vec<u64> = a.honest.iter().map(|(_, n)| *n).collect();
    rows.push(HOSTILE_EXAMPLES);
    let cap = weight_cap(&rows, 0.25).expect("10,000 rows against a few hundred");
    let init = support::model(&plan, &a.run, 0);
    let mut updates: Vec<(Vec<f32>, u64)> = a
        .honest
        .iter()
        .map(|(d, n)| (d.clone(), capped(*n, Some(cap))))
        .collect();
    updates.push((vec![HOSTILE_VALUE; init.len()], cap));
    assert_eq!(
        bits(&support::model(&plan, &a.run, 1)),
        bits(&fedavg_of(&init, &updates)),
        "the round is not exactly FedAvg with the capped weights"
    );
    let total: u64 = updates.iter().map(|(_, w)| w).sum();
    assert!(cap as f64 <= 0.25 * total as f64, "cap {cap} of {total}");
    let entry = round_entry(&a.runs);
    let hostile = entry["contributions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["org"] == "site-e")
        .unwrap()
        .clone();
    assert_eq!(hostile["weight"], cap, "{entry}");
    assert_eq!(hostile["examples"], HOSTILE_EXAMPLES, "{entry}");
}
