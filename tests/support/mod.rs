//! Shared helpers of the integration tests: a small Tennessee Eastman plan and
//! per-site CSV files cut from the committed subset, a roster, a federation
//! launcher on loopback, and waiting for a training to end.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use sangsaeng::localnet::{self, Pki};
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::roster::Roster;
use sangsaeng_common::identity::tls::TlsMaterial;
use sangsaeng_common::learning::data::{self, Dataset};
use sangsaeng_proto::v1::StatusResponse;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const SITES: &[&str] = &["site-a", "site-b", "site-c"];

pub fn te_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/tennessee-eastman")
}

pub fn columns() -> Vec<String> {
    (1..=41)
        .map(|i| format!("xmeas_{i}"))
        .chain((1..=11).map(|i| format!("xmv_{i}")))
        .collect()
}

/// A small plan on the Tennessee Eastman columns: 4 classes, one hidden layer.
pub fn plan(rounds: u32, min_participants: usize) -> TrainingPlan {
    let features = columns()
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    TrainingPlan::from_toml(
        &format!(
            r#"
[schema]
feature_columns = [{features}]
label_column = "fault"
classes = ["0", "1", "2", "4"]
[model]
hidden_layers = [16]
[training]
rounds = {rounds}
local_epochs = 1
batch_size = 32
learning_rate = 0.01
min_participants = {min_participants}
round_deadline_secs = 60
seed = 3
"#
        ),
        "test plan",
    )
    .unwrap()
}

pub fn plan_toml(rounds: u32, min_participants: usize) -> String {
    plan(rounds, min_participants).to_toml()
}

pub fn roster(extra_participants: &[&str]) -> Roster {
    let mut text = String::new();
    for id in SITES.iter().chain(extra_participants) {
        text.push_str(&format!(
            "[[organisation]]\nid = \"{id}\"\nname = \"{id}\"\ntier = \"tier-1\"\nrole = \"participant\"\n\n"
        ));
    }
    text.push_str("[[organisation]]\nid = \"ops-admin\"\nname = \"Ops\"\ntier = \"anchor\"\nrole = \"admin\"\n");
    Roster::from_toml(&text, "test roster").unwrap()
}

/// Writes `n` sites' CSV files from the committed training subset (classes of the test
/// plan only), each with a different share of rows so FedAvg weights differ.
pub fn site_files(dir: &Path, n: usize) -> Vec<PathBuf> {
    let plan = plan(1, 1);
    let all = full_subset(&plan);
    (0..n)
        .map(|s| {
            // Site s gets every (s+2)-th row starting at s: different sizes, all classes.
            let mut ds = Dataset {
                features: vec![],
                labels: vec![],
                n_features: all.n_features,
                ..Default::default()
            };
            for i in (s..all.len()).step_by(s + 3) {
                ds.features.extend_from_slice(all.row(i));
                ds.labels.push(all.labels[i]);
            }
            let p = dir.join(format!("site-{s}.csv"));
            data::write_csv(&p, &ds, &plan.schema).unwrap();
            p
        })
        .collect()
}

/// The committed training rows restricted to the test plan's classes.
fn full_subset(plan: &TrainingPlan) -> Dataset {
    // Rows of other classes are filtered by writing a reduced CSV first.
    let src = std::fs::read_to_string(te_dir().join("train.csv")).unwrap();
    let mut lines = src.lines();
    let header = lines.next().unwrap();
    let label_at = header.split(',').position(|c| c == "fault").unwrap();
    let keep: String = lines
        .filter(|l| {
            let v = l.split(',').nth(label_at).unwrap().trim();
            let v = v.trim_end_matches(".0");
            plan.schema.classes.iter().any(|c| c == v)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), format!("{header}\n{keep}")).unwrap();
    data::load_csvs(&[tmp.path().to_path_buf()], &plan.schema).unwrap()
}

pub fn pki(dir: &Path, roster: &Roster) -> Pki {
    localnet::write_pki(&dir.join("pki"), roster).unwrap()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Waits for the training to end, completed or failed, and returns the status
/// that showed it; panics if it has not ended within five minutes (a test's
/// federation of three sites takes seconds; five minutes leaves room for a
/// loaded CI machine).
pub async fn training_ended(url: &str, admin: &TlsMaterial) -> StatusResponse {
    localnet::wait_for_status(url, admin, Duration::from_secs(300), |s| {
        s.training
            .as_ref()
            .is_some_and(|t| t.phase == "completed" || t.phase == "failed")
    })
    .await
    .expect("the training ended within five minutes")
}

/// A participant daemon per site of [`SITES`], site i reading `files[i]` (label
/// column `fault`), all stopped by `stop`.
pub fn spawn_sites(
    pki: &Pki,
    url: &str,
    files: Vec<PathBuf>,
    stop: &CancellationToken,
) -> Vec<JoinHandle<sangsaeng_participant::Result<()>>> {
    SITES
        .iter()
        .zip(files)
        .map(|(org, f)| {
            let cfg = localnet::participant_config(pki, url, org, vec![f], "fault", None);
            localnet::spawn_participant(cfg, stop.clone())
        })
        .collect()
}

/// Participant daemons for `orgs`, each on its own share of the test data
/// and keeping its own copy of what it sent (`record_dir`, read back by
/// [`recorded_delta`]); returns their handles and record folders.
pub fn spawn_recording_sites(
    pki: &Pki,
    url: &str,
    dir: &Path,
    orgs: &[&str],
    stop: &CancellationToken,
) -> (
    Vec<JoinHandle<sangsaeng_participant::Result<()>>>,
    Vec<PathBuf>,
) {
    site_files(dir, orgs.len())
        .into_iter()
        .zip(orgs)
        .map(|(f, org)| {
            let record = dir.join(format!("record-{org}"));
            let cfg =
                localnet::participant_config(pki, url, org, vec![f], "fault", Some(record.clone()));
            (localnet::spawn_participant(cfg, stop.clone()), record)
        })
        .unzip()
}

/// The global model a run folder holds after `round` (0: the initial one).
pub fn model(plan: &TrainingPlan, run: &Path, round: u32) -> Vec<f32> {
    let layout = sangsaeng_common::learning::model::ModelSpec::from_plan(plan).layout();
    sangsaeng_common::transfer::weights::load_safetensors(
        &run.join(format!("model-round-{round:04}.safetensors")),
        &layout,
    )
    .unwrap()
}

/// A site's own copy of its round-1 delta (its `record_dir`) and example count.
pub fn recorded_delta(plan: &TrainingPlan, record: &Path) -> (Vec<f32>, u64) {
    use sangsaeng_common::transfer::weights;
    let layout = sangsaeng_common::learning::model::ModelSpec::from_plan(plan).layout();
    let file = std::fs::read_dir(record)
        .unwrap()
        .flatten()
        .next()
        .expect("the site recorded its training")
        .path()
        .join("delta-round-0001.safetensors");
    let values = weights::load_safetensors(&file, &layout).unwrap();
    let meta = weights::safetensors_metadata(&file).unwrap();
    (values, meta["num_examples"].parse().unwrap())
}

/// Starts `plan` on a coordinator started without one, once `n` participants
/// are connected, so that every one of them is selected for the first round
/// (a plan given at start opens as soon as `min_participants` are there, and
/// who else is selected then depends on timing).
pub async fn start_when_connected(pki: &Pki, url: &str, n: usize, plan: &TrainingPlan) {
    let admin = pki.material("ops-admin");
    localnet::wait_for_status(url, &admin, Duration::from_secs(60), |s| {
        s.participants.iter().filter(|p| p.connected).count() == n
    })
    .await
    .unwrap_or_else(|| panic!("all {n} connect"));
    let ch = sangsaeng_common::identity::channel::connect(url, &admin, "localhost")
        .await
        .unwrap();
    sangsaeng_proto::v1::admin_client::AdminClient::new(ch)
        .start_training(sangsaeng_proto::v1::StartTrainingRequest {
            plan_toml: plan.to_toml(),
        })
        .await
        .unwrap();
}
