//! Differential privacy over real mutual TLS: sites train with DP-SGD, the
//! coordinator checks what each reports and records the ε spent round by round,
//! and the release rules decide on that record; a site declines a plan above
//! its own limit, and a budget that cannot last the plan's rounds stops the
//! training before any round is trained.

mod support;

use sangsaeng::localnet;
use sangsaeng_common::config::privacy::{DpConfig, DpLevel, PrivacyConfig};
use sangsaeng_coordinator::client::AdminClient;
use sangsaeng_coordinator::durable::audit;
use sangsaeng_coordinator::release;
use sangsaeng_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

const DP_POLICY: &str = r#"
[rules]
require_consent = false
min_contributors = 3
max_weight_share = 0.9
min_rounds = 2
min_macro_f1 = 0.0
require_differential_privacy = true
max_epsilon = 8.0
max_delta = 1e-5
dp_level = "record"

[disclosure]
contributors = "count"

[licence]
id = "Apache-2.0"
terms = "Test."
"#;

fn dp_plan(
    rounds: u32,
    noise_multiplier: Option<f64>,
) -> sangsaeng_common::config::plan::TrainingPlan {
    dp_plan_at(DpLevel::Record, rounds, noise_multiplier)
}

/// The test plan with a DP budget of ε = 8 at δ = 1e-5 and a clip of 1 at `level`.
fn dp_plan_at(
    level: DpLevel,
    rounds: u32,
    noise_multiplier: Option<f64>,
) -> sangsaeng_common::config::plan::TrainingPlan {
    let mut plan = support::plan(rounds, 3);
    let (max_grad_norm, clip_norm) = match level {
        DpLevel::Record => (Some(1.0), None),
        DpLevel::Client => (None, Some(1.0)),
    };
    plan.privacy = Some(PrivacyConfig {
        dp: Some(DpConfig {
            level,
            target_epsilon: 8.0,
            delta: 1e-5,
            noise_multiplier,
            max_grad_norm,
            clip_norm,
        }),
        ..Default::default()
    });
    plan.validate().unwrap();
    plan
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dp_training_records_epsilon_and_a_dp_policy_releases_it() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let roster = support::roster(&["site-d"]);
    let pki = support::pki(dir.path(), &roster);
    let runs = dir.path().join("runs");
    let coord = localnet::start_coordinator(
        &pki,
        roster,
        Some(dp_plan(2, None)),
        &runs,
        Default::default(),
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let files = support::site_files(dir.path(), 4);
    let mut handles = support::spawn_sites(&pki, &coord.url, files[..3].to_vec(), &stop);
    // A fourth site whose own limit is below the plan's target declines it.
    let mut strict = localnet::participant_config(
        &pki,
        &coord.url,
        "site-d",
        vec![files[3].clone()],
        "fault",
        None,
    );
    strict.privacy.max_epsilon = Some(1.0);
    strict.exit_after_training = false;
    let strict_stop = CancellationToken::new();
    handles.push(localnet::spawn_participant(strict, strict_stop.clone()));

    let admin_tls = pki.material("ops-admin");
    let s = support::training_ended(&coord.url, &admin_tls).await;
    let t = s.training.as_ref().unwrap();
    assert_eq!(t.phase, "completed", "{}", t.error);
    let declined = s
        .participants
        .iter()
        .find(|p| p.org_id == "site-d")
        .unwrap();
    assert!(
        declined.last_error.contains("privacy.max_epsilon = 1"),
        "site-d declined naming its limit: {declined:?}"
    );
    strict_stop.cancel();

    // metrics.jsonl: every round says what it spent, growing, within the target.
    let training = t.training_id.clone();
    let metrics = std::fs::read_to_string(runs.join(&training).join("metrics.jsonl")).unwrap();
    let spent: Vec<f64> = metrics
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["privacy"]["sites"].as_object().unwrap().len(), 3, "{v}");
            v["privacy"]["model_epsilon"].as_f64().unwrap()
        })
        .collect();
    assert_eq!(spent.len(), 2);
    assert!(
        spent[0] > 0.0 && spent[0] < spent[1] && spent[1] <= 8.0,
        "{spent:?}"
    );

    // The audit log's round entries carry it, per site.
    let entries = audit::read_unverified(&runs.join(audit::FILE_NAME)).unwrap();
    let rounds = release::rounds_from_audit(&entries, &training);
    assert_eq!(
        rounds.iter().map(|r| r.dp_epsilon).collect::<Vec<_>>(),
        vec![Some(spent[0]), Some(spent[1])]
    );

    // A policy that requires DP within ε ≤ 8 releases it; the provenance says how.
    let mut admin = AdminClient::connect(&coord.url, &admin_tls, "localhost")
        .await
        .unwrap();
    let req = |policy: &str| pb::ReleaseRequest {
        training_id: training.clone(),
        policy_toml: policy.into(),
        tag: "dp".into(),
        ..Default::default()
    };
    let tight = DP_POLICY.replace("max_epsilon = 8.0", "max_epsilon = 0.5");
    let r = admin.release(req(&tight)).await.unwrap();
    assert!(!r.released, "ε above the policy's limit is refused");
    let rule = r
        .rules
        .iter()
        .find(|x| x.rule == "require_differential_privacy")
        .unwrap();
    assert!(
        !rule.passed && rule.actual.contains("record level"),
        "{rule:?}"
    );
    let r = admin.release(req(DP_POLICY)).await.unwrap();
    assert!(r.released, "{:?}", r.rules);
    let layout = runs.join(release::LAYOUT_DIR);
    let pulled = release::oci::pull(&release::oci::Source::Layout(layout), "dp")
        .await
        .unwrap();
    let out = dir.path().join("pulled");
    release::oci::save(&pulled, &out).unwrap();
    let card = std::fs::read_to_string(out.join(release::artifact::CARD_FILE)).unwrap();
    assert!(
        card.contains("Trained with differential privacy at record level"),
        "{card}"
    );
    let statement = std::fs::read_to_string(out.join(release::artifact::PROVENANCE_FILE)).unwrap();
    assert!(
        statement.contains("differential_privacy") && statement.contains("DP-SGD"),
        "{statement}"
    );

    stop.cancel();
    for h in handles {
        let _ = h.await.unwrap();
    }
    coord.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_that_cannot_last_the_rounds_stops_the_training_before_round_one() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let roster = support::roster(&[]);
    let pki = support::pki(dir.path(), &roster);
    let runs = dir.path().join("runs");
    // σ = 0.3 spends far more than ε = 8 per round at these sites' sizes.
    let coord = localnet::start_coordinator(
        &pki,
        roster,
        Some(dp_plan(3, Some(0.3))),
        &runs,
        Default::default(),
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let handles = support::spawn_sites(&pki, &coord.url, support::site_files(dir.path(), 3), &stop);
    let s = support::training_ended(&coord.url, &pki.material("ops-admin")).await;
    let t = s.training.unwrap();
    assert_eq!(t.phase, "failed");
    assert!(
        t.error.contains("privacy budget: round 1 would take")
            && t.error.contains("target_epsilon = 8"),
        "{}",
        t.error
    );
    let metrics = runs.join(&t.training_id).join("metrics.jsonl");
    assert!(!metrics.exists(), "no round was trained");
    stop.cancel();
    for h in handles {
        let _ = h.await.unwrap();
    }
    coord.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_level_dp_noises_the_sum_and_a_client_level_policy_releases_it() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let roster = support::roster(&[]);
    let pki = support::pki(dir.path(), &roster);
    let runs = dir.path().join("runs");
    let plan = dp_plan_at(DpLevel::Client, 3, None);
    let coord = localnet::start_coordinator(&pki, roster, Some(plan), &runs, Default::default())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let handles = support::spawn_sites(&pki, &coord.url, support::site_files(dir.path(), 3), &stop);
    let admin_tls = pki.material("ops-admin");
    let s = support::training_ended(&coord.url, &admin_tls).await;
    let t = s.training.unwrap();
    assert_eq!(t.phase, "completed", "{}", t.error);
    let metrics = std::fs::read_to_string(runs.join(&t.training_id).join("metrics.jsonl")).unwrap();
    let spent: Vec<f64> = metrics
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["privacy"]["level"], "client", "{v}");
            v["privacy"]["model_epsilon"].as_f64().unwrap()
        })
        .collect();
    assert_eq!(spent.len(), 3);
    assert!(
        spent.windows(2).all(|w| w[0] < w[1]) && spent[2] <= 8.0 && spent[2] > 7.9,
        "{spent:?}"
    );
    let mut admin = AdminClient::connect(&coord.url, &admin_tls, "localhost")
        .await
        .unwrap();
    let req = |policy: &str| pb::ReleaseRequest {
        training_id: t.training_id.clone(),
        policy_toml: policy.into(),
        tag: "client".into(),
        ..Default::default()
    };
    let record_only = DP_POLICY.replace("min_rounds = 2", "min_rounds = 3");
    let r = admin.release(req(&record_only)).await.unwrap();
    assert!(
        !r.released,
        "a record-level policy refuses a client-level model"
    );
    let client = record_only.replace("dp_level = \"record\"", "dp_level = \"client\"");
    let r = admin.release(req(&client)).await.unwrap();
    assert!(r.released, "{:?}", r.rules);
    stop.cancel();
    for h in handles {
        let _ = h.await.unwrap();
    }
    coord.stop().await.unwrap();
}

/// One round of client-level DP with three recording sites; returns the
/// observed variance of (model − the noiseless FedAvg of the sites' own
/// clipped deltas) per parameter, and the variance the plan's noise gives.
async fn client_noise_variance(secure: bool) -> (f64, f64) {
    use sangsaeng_common::aggregation::fedavg::Accumulator;
    use sangsaeng_common::privacy::dp::budget::plan_budget;
    use sangsaeng_common::privacy::dp::client_noise::sensitivity_units;
    let dir = tempfile::tempdir().unwrap();
    let roster = support::roster(&[]);
    let pki = support::pki(dir.path(), &roster);
    let runs = dir.path().join("runs");
    let mut plan = dp_plan_at(DpLevel::Client, 1, None);
    plan.privacy.as_mut().unwrap().secure_aggregation = secure;
    plan.validate().unwrap();
    let coord =
        localnet::start_coordinator(&pki, roster, Some(plan.clone()), &runs, Default::default())
            .await
            .unwrap();
    let stop = CancellationToken::new();
    let (handles, records) =
        support::spawn_recording_sites(&pki, &coord.url, dir.path(), support::SITES, &stop);
    let s = support::training_ended(&coord.url, &pki.material("ops-admin")).await;
    let t = s.training.unwrap();
    assert_eq!(t.phase, "completed", "{}", t.error);
    let run = runs.join(&t.training_id);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let by = if secure { "sites" } else { "coordinator" };
    assert_eq!(v["privacy"]["noise_added_by"], by, "{v}");
    stop.cancel();
    for h in handles {
        let _ = h.await.unwrap();
    }
    coord.stop().await.unwrap();

    let mut noiseless = support::model(&plan, &run, 0);
    let mut acc = Accumulator::new(noiseless.len());
    for record in &records {
        let (delta, _) = support::recorded_delta(&plan, record);
        let norm = delta
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            norm <= 1.0 + 1e-6,
            "the site sent its clipped delta: {norm}"
        );
        acc.reserve(1).unwrap();
        acc.fold(0, &delta, 1).unwrap();
        acc.commit();
    }
    acc.apply_in_place(&mut noiseless).unwrap();
    let noisy = support::model(&plan, &run, 1);
    let residual: Vec<f64> = noisy
        .iter()
        .zip(&noiseless)
        .map(|(a, b)| f64::from(*a) - f64::from(*b))
        .collect();
    let n = residual.len() as f64;
    let observed = residual.iter().map(|r| r * r).sum::<f64>() / n;
    let sigma = plan_budget(&plan, None).unwrap().noise_multiplier;
    let unit = f64::from(1u32 << sangsaeng_common::aggregation::fedavg::FRACTION_BITS);
    let k = records.len() as f64;
    let want = (sigma * sensitivity_units(1.0, residual.len()) / unit / k).powi(2);
    (observed, want)
}

/// The noise of a client-level round is added exactly once, whoever adds it:
/// the coordinator on a plain round, the sites (each a third, before masking)
/// on a secure one. Over the test model's 916 parameters the mean square of
/// the residual has a relative standard error of sqrt(2/916) = 4.7 %; the
/// tolerance is 5 of them, and both "no noise" and "noise twice" are 100 % off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_level_noise_is_added_once_by_the_coordinator_or_by_the_sites_under_secure_aggregation()
 {
    support::init_tracing();
    for secure in [false, true] {
        let (observed, want) = client_noise_variance(secure).await;
        assert!(
            (observed / want - 1.0).abs() < 0.235,
            "secure = {secure}: residual variance {observed:e}, the plan's noise gives {want:e}"
        );
    }
}
