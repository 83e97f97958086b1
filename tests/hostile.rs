//! A catalogue of hostile or broken inputs, each sent to a real coordinator over
//! mutual TLS on loopback.
//!
//! Most tests drive participants by hand ("raw sites": a `FederationClient` with a
//! roster organisation's certificate) so they can step inside a round and send what
//! no honest daemon would: malformed uploads, wrong digests, NaN, stale rounds,
//! out-of-phase statistics and evaluations, undecodable protobuf. A raw site sends
//! known deltas, so every test can check afterwards that the round's global model is
//! exactly the FedAvg of the updates that were accepted: the refused input left no
//! trace. Each test asserts the gRPC code, that the message names what was wrong, and
//! that the coordinator keeps serving (admin `Status`, and a round that completes).
//!
//! Certificates are made with rcgen directly where the test PKI cannot make them
//! (expired, not yet valid, naming two organisations). Two tests run real in-process
//! participant daemons (a CSV with a bad cell; a NaN update beside honest ones).
//!
//! Not repeated here: a participant certificate calling admin RPCs gets
//! PERMISSION_DENIED (tests/security.rs, `roles_are_enforced_per_service`), as do a
//! certificate from another CA and one not on the roster (same file).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

use sangsaeng::localnet::{self, Pki, RunningCoordinator};
use sangsaeng_common::aggregation::fedavg::Accumulator;
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::identity::pki::CaBundle;
use sangsaeng_common::identity::tls::TlsMaterial;
use sangsaeng_common::learning::data::{Dataset, FeatureStats};
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::transfer::digest::{self, DigestAlgorithm};
use sangsaeng_common::transfer::weights;
use sangsaeng_coordinator::config::Limits;
use sangsaeng_proto::v1 as pb;
use sangsaeng_proto::v1::admin_client::AdminClient;
use sangsaeng_proto::v1::federation_client::FederationClient;
use sangsaeng_proto::v1::update_message::Part;

/// Upper bound for anything a test waits for (tasks, phases).
const WAIT: Duration = Duration::from_secs(60);
/// The coordinator's `limits.max_chunk_bytes` in these tests (the smallest allowed).
const MAX_CHUNK: usize = 4096;
/// Chunk size the raw sites upload with.
const UPLOAD_CHUNK: usize = 1024;

// ---------------------------------------------------------------------------
// A coordinator and hand-driven participants
// ---------------------------------------------------------------------------

fn limits() -> Limits {
    Limits {
        max_chunk_bytes: MAX_CHUNK,
        ..Limits::default()
    }
}

/// The test plan with a wider hidden layer (3,652 parameters), so models and deltas
/// span several chunks, and a short deadline so a stuck round ends a test quickly.
fn raw_plan(rounds: u32, min_participants: usize) -> String {
    raw_plan_with_deadline(rounds, min_participants, 30)
}

/// [`raw_plan`] with another round deadline, for tests of what a deadline does.
fn raw_plan_with_deadline(rounds: u32, min_participants: usize, deadline_secs: u64) -> String {
    let mut p = support::plan(rounds, min_participants);
    p.model.hidden_layers = vec![64];
    p.training.round_deadline_secs = deadline_secs;
    p.to_toml()
}

/// A coordinator (no training yet) and an admin connection to it.
struct Fed {
    dir: tempfile::TempDir,
    pki: Pki,
    coord: RunningCoordinator,
    admin: AdminClient<Channel>,
}

impl Fed {
    async fn start(limits: Limits) -> Fed {
        let roster = support::roster(&[]);
        Fed::start_with(&roster, roster.clone(), limits).await
    }

    /// Issues certificates for everyone on `pki_roster`, but the coordinator only
    /// knows `roster`.
    async fn start_with(
        pki_roster: &sangsaeng_common::config::roster::Roster,
        roster: sangsaeng_common::config::roster::Roster,
        limits: Limits,
    ) -> Fed {
        support::init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let pki = support::pki(dir.path(), pki_roster);
        let coord =
            localnet::start_coordinator(&pki, roster, None, &dir.path().join("runs"), limits)
                .await
                .unwrap();
        localnet::wait_for_status(&coord.url, &pki.material("ops-admin"), WAIT, |_| true)
            .await
            .expect("coordinator up");
        let ch = sangsaeng_common::identity::channel::connect(
            &coord.url,
            &pki.material("ops-admin"),
            "localhost",
        )
        .await
        .unwrap();
        Fed {
            dir,
            pki,
            coord,
            admin: AdminClient::new(ch),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Admin `Status`: also the proof that the coordinator still serves others.
    async fn status(&mut self) -> pb::StatusResponse {
        self.admin
            .status(pb::StatusRequest {})
            .await
            .expect("the coordinator still answers an admin Status")
            .into_inner()
    }

    async fn training(&mut self) -> pb::TrainingStatus {
        self.status().await.training.expect("a training")
    }

    async fn participant(&mut self, org: &str) -> pb::ParticipantStatus {
        self.status()
            .await
            .participants
            .into_iter()
            .find(|p| p.org_id == org)
            .expect("organisation on the roster")
    }

    async fn start_training(&mut self, plan_toml: String) -> String {
        self.admin
            .start_training(pb::StartTrainingRequest { plan_toml })
            .await
            .expect("training started")
            .into_inner()
            .training_id
    }

    async fn wait(
        &self,
        what: &str,
        done: impl FnMut(&pb::StatusResponse) -> bool,
    ) -> pb::StatusResponse {
        localnet::wait_for_status(&self.coord.url, &self.pki.material("ops-admin"), WAIT, done)
            .await
            .unwrap_or_else(|| panic!("timed out waiting for {what}"))
    }

    async fn wait_connected(&self, orgs: &[&str]) {
        self.wait("participants to connect", |s| {
            orgs.iter()
                .all(|o| s.participants.iter().any(|p| p.org_id == *o && p.connected))
        })
        .await;
    }

    /// Waits for the training to end and returns its output folder; it must have completed.
    async fn completed(&self) -> PathBuf {
        let s = self
            .wait("the training to end", |s| {
                s.training
                    .as_ref()
                    .is_some_and(|t| t.phase == "completed" || t.phase == "failed")
            })
            .await;
        let t = s.training.unwrap();
        assert_eq!(t.phase, "completed", "{}", t.error);
        PathBuf::from(t.output_dir)
    }

    /// Status after a refusal: still served, the refusal recorded for operators
    /// (`last_error`), nothing accepted in the round, and the refused site either
    /// still waited for (it may send a correct update) or not (its update was refused
    /// for this round).
    async fn after_refusal(&mut self, org: &str, needle: &str, then: Then) {
        let p = self.participant(org).await;
        assert!(
            p.last_error.contains(needle),
            "{org}'s last_error should record the refusal ('{needle}'): {}",
            p.last_error
        );
        let t = self.training().await;
        assert_eq!(t.phase, "training", "the round goes on");
        assert!(
            t.contributed.is_empty(),
            "nothing was accepted: {:?}",
            t.contributed
        );
        assert_eq!(
            t.waiting_for.iter().any(|o| o == org),
            then == Then::StillWaitedFor,
            "{then:?}: waiting for {:?}",
            t.waiting_for
        );
    }

    async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(20), self.coord.stop())
            .await
            .expect("coordinator stopped in time")
            .unwrap();
    }
}

/// A participant driven by hand over its own mTLS connection.
struct Site {
    org: String,
    channel: Channel,
    client: FederationClient<Channel>,
    tasks: tonic::Streaming<pb::Task>,
}

/// The round a site was asked to train, and the global model it starts from.
#[derive(Clone)]
struct Round {
    tid: String,
    round: u32,
    info: pb::ModelInfo,
    base: Vec<f32>,
}

impl Round {
    fn n(&self) -> usize {
        self.base.len()
    }
}

impl Site {
    async fn join(fed: &Fed, org: &str) -> Site {
        let channel = sangsaeng_common::identity::channel::connect(
            &fed.coord.url,
            &fed.pki.material(org),
            "localhost",
        )
        .await
        .unwrap();
        let mut client = FederationClient::new(channel.clone());
        let tasks = client
            .subscribe(pb::SubscribeRequest {
                software_version: "tests/hostile.rs".into(),
            })
            .await
            .unwrap()
            .into_inner();
        Site {
            org: org.to_string(),
            channel,
            client,
            tasks,
        }
    }

    async fn task(&mut self) -> pb::Task {
        tokio::time::timeout(WAIT, self.tasks.message())
            .await
            .unwrap_or_else(|_| panic!("{}: no task in time", self.org))
            .expect("task stream ok")
            .expect("task stream open")
    }

    /// Answers the statistics task with valid statistics.
    async fn answer_stats(&mut self, seed: u64) -> FeatureStats {
        let t = self.task().await;
        assert!(
            matches!(t.kind, Some(pb::task::Kind::Stats(_))),
            "{}: expected a statistics task, got {t:?}",
            self.org
        );
        let stats = site_stats_of(&self.org, seed);
        self.client
            .submit_stats(stats_report(&t.training_id, &stats))
            .await
            .expect("valid statistics accepted");
        stats
    }

    /// Waits for a training task and downloads its model (with the daemon's own checked download).
    async fn expect_train(&mut self) -> Round {
        let t = self.task().await;
        let Some(pb::task::Kind::Train(train)) = t.kind else {
            panic!("{}: expected a training task, got {t:?}", self.org)
        };
        let info = train.model.unwrap();
        let base =
            sangsaeng_participant::session::download(&mut self.client, &t.training_id, &info)
                .await
                .unwrap();
        Round {
            tid: t.training_id,
            round: t.round,
            info,
            base,
        }
    }

    async fn upload(&mut self, parts: Vec<Part>) -> Result<pb::UploadReceipt, Status> {
        self.upload_messages(
            parts
                .into_iter()
                .map(|p| pb::UpdateMessage { part: Some(p) })
                .collect(),
        )
        .await
    }

    async fn upload_messages(
        &mut self,
        messages: Vec<pb::UpdateMessage>,
    ) -> Result<pb::UploadReceipt, Status> {
        self.client
            .upload_update(tokio_stream::iter(messages))
            .await
            .map(|r| r.into_inner())
    }

    /// Starts an upload whose messages the test sends one by one.
    fn upload_by_hand(
        &self,
    ) -> (
        mpsc::Sender<pb::UpdateMessage>,
        tokio::task::JoinHandle<Result<pb::UploadReceipt, Status>>,
    ) {
        let (tx, rx) = mpsc::channel(64);
        let mut client = self.client.clone();
        let call = tokio::spawn(async move {
            client
                .upload_update(ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner())
        });
        (tx, call)
    }

    /// Answers the evaluation task of the round that just closed with valid metrics.
    async fn evaluate(&mut self) {
        let t = self.task().await;
        let Some(pb::task::Kind::Evaluate(e)) = t.kind else {
            panic!("{}: expected an evaluation task, got {t:?}", self.org)
        };
        self.client
            .submit_evaluation(evaluation(&t.training_id, e.model.unwrap().round))
            .await
            .expect("valid evaluation accepted");
    }
}

/// Every site answers the evaluation of the round that just closed.
async fn evaluate_all(sites: &mut [&mut Site]) {
    for s in sites.iter_mut() {
        s.evaluate().await;
    }
}

/// Subscribes the sites, starts a training and answers its statistics phase;
/// returns round 1 as the sites received it.
async fn open_round(fed: &mut Fed, sites: &mut [&mut Site], plan_toml: String) -> Round {
    let orgs: Vec<&str> = sites.iter().map(|s| s.org.as_str()).collect();
    fed.wait_connected(&orgs).await;
    fed.start_training(plan_toml).await;
    for (i, s) in sites.iter_mut().enumerate() {
        s.answer_stats(i as u64).await;
    }
    let mut round = None;
    for s in sites.iter_mut() {
        round = Some(s.expect_train().await);
    }
    round.unwrap()
}

/// Two raw sites, site-a and site-b, inside round 1 of a training that needs one update.
async fn two_sites_in_round(limits: Limits, rounds: u32) -> (Fed, Site, Site, Round) {
    two_sites_in_round_of(limits, raw_plan(rounds, 1)).await
}

/// Two raw sites, site-a and site-b, inside round 1 of a training with this plan.
async fn two_sites_in_round_of(limits: Limits, plan_toml: String) -> (Fed, Site, Site, Round) {
    let mut fed = Fed::start(limits).await;
    let mut a = Site::join(&fed, "site-a").await;
    let mut b = Site::join(&fed, "site-b").await;
    let r = open_round(&mut fed, &mut [&mut a, &mut b], plan_toml).await;
    (fed, a, b, r)
}

// ---------------------------------------------------------------------------
// Messages, valid and otherwise
// ---------------------------------------------------------------------------

/// The training rows each raw site declares in its statistics, and so the
/// example count its updates must claim (the coordinator binds the two).
fn declared_rows(org: &str) -> usize {
    match org {
        "site-a" => 300,
        "site-b" => 500,
        "site-c" => 400,
        _ => 20,
    }
}

/// [`site_stats`] with the rows `org` declares.
fn site_stats_of(org: &str, seed: u64) -> FeatureStats {
    site_stats_rows(declared_rows(org), seed)
}

/// Statistics of a small synthetic dataset with the plan's 52 features.
fn site_stats(seed: u64) -> FeatureStats {
    site_stats_rows(20, seed)
}

fn site_stats_rows(rows: usize, seed: u64) -> FeatureStats {
    let n_features = support::columns().len();
    let features = (0..rows * n_features)
        .map(|i| ((i as u64 * 37 + seed * 11) % 101) as f32 * 0.1)
        .collect();
    FeatureStats::of(&Dataset {
        features,
        labels: vec![0; rows],
        n_features,
        ..Default::default()
    })
}

fn stats_report(training_id: &str, s: &FeatureStats) -> pb::StatsReport {
    pb::StatsReport {
        training_id: training_id.into(),
        count: s.count,
        sum: s.sum.clone(),
        sum_sq: s.sum_sq.clone(),
    }
}

fn evaluation(training_id: &str, model_round: u32) -> pb::EvaluationReport {
    pb::EvaluationReport {
        training_id: training_id.into(),
        model_round,
        num_examples: 40,
        loss: 1.25,
        accuracy: 0.5,
        macro_f1: 0.4,
        regression: None,
    }
}

/// A plausible delta: small values, different per seed.
fn delta(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (x % 20_001) as f32 * 1e-6 - 0.01
        })
        .collect()
}

fn header(r: &Round, num_params: usize, num_examples: u64) -> pb::UpdateHeader {
    pb::UpdateHeader {
        training_id: r.tid.clone(),
        round: r.round,
        base_model_sha256: r.info.sha256.clone(),
        num_params: num_params as u64,
        num_examples,
        train_loss: 0.5,
        ..Default::default()
    }
}

/// Ends a one-round test: site-b sends its delta (seed 22, 500 examples), both
/// sites evaluate, and the round's model must be exactly the aggregate of
/// site-b's update and `site_a`'s (its delta and examples), if site-a's counted.
async fn finish_with_site_b(
    fed: Fed,
    mut a: Site,
    mut b: Site,
    r: &Round,
    site_a: Option<(&[f32], u64)>,
) {
    let db = delta(r.n(), 22);
    b.upload(parts(r, &db, 500)).await.unwrap();
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    // check_round compares bits.
    let mut accepted = vec![];
    if let Some((da, n)) = site_a {
        accepted.push(("site-a", da, n));
    }
    accepted.push(("site-b", &db[..], 500));
    check_round(&out, 1, &accepted);
    drop((a, b));
    fed.stop().await;
}

/// Sends `parts` on an upload stream opened with `upload_by_hand`, in order.
async fn send_parts(tx: &mpsc::Sender<pb::UpdateMessage>, parts: &[Part]) {
    for part in parts {
        tx.send(pb::UpdateMessage {
            part: Some(part.clone()),
        })
        .await
        .unwrap();
    }
}

/// `data` with byte `at` XORed with `mask` (a chunk's payload is immutable).
fn flip(data: &mut prost::bytes::Bytes, at: usize, mask: u8) {
    let mut v = data.to_vec();
    v[at] ^= mask;
    *data = v.into();
}

fn chunk(index: u32, data: &[u8]) -> pb::UpdateChunk {
    pb::UpdateChunk {
        index,
        data: data.to_vec().into(),
        sha256: weights::sha256_hex(data),
        ..Default::default()
    }
}

fn chunks(bytes: &[u8], size: usize) -> Vec<Part> {
    bytes
        .chunks(size)
        .enumerate()
        .map(|(i, c)| Part::Chunk(chunk(i as u32, c)))
        .collect()
}

fn trailer(bytes: &[u8]) -> Part {
    Part::Trailer(pb::UpdateTrailer {
        sha256: weights::sha256_hex(bytes),
        ..Default::default()
    })
}

/// A correct upload of `delta` with its digests in hex (`sha256` fields), the
/// protocol's first form, which coordinators keep accepting; [`raw_parts`] is
/// the form the participant daemon sends.
fn parts(r: &Round, delta: &[f32], num_examples: u64) -> Vec<Part> {
    let bytes = weights::to_le_bytes(delta);
    let mut v = vec![Part::Header(header(r, delta.len(), num_examples))];
    v.extend(chunks(&bytes, UPLOAD_CHUNK));
    v.push(trailer(&bytes));
    v
}

/// A correct upload of `delta` exactly as the participant daemon sends it
/// (`wire::upload_messages`: raw 32-byte digests, the whole digest declared in
/// the header and left implicit in the trailer, each chunk checked by CRC-32C),
/// with a SHA-256 whole-delta digest, as daemons that predate BLAKE3 did.
fn raw_parts(r: &Round, delta: &[f32], num_examples: u64) -> Vec<Part> {
    raw_parts_hashed(r, delta, num_examples, DigestAlgorithm::Sha256)
}

/// [`raw_parts`] with the whole-delta digest of `algorithm` (the daemon uses
/// BLAKE3 where the round's model info announces it, as this coordinator's does).
fn raw_parts_hashed(
    r: &Round,
    delta: &[f32],
    num_examples: u64,
    algorithm: DigestAlgorithm,
) -> Vec<Part> {
    let chunks = sangsaeng_common::transfer::encoding::encode_chunks(
        delta,
        sangsaeng_common::transfer::encoding::UpdateEncoding::Float32,
        UPLOAD_CHUNK,
    )
    .unwrap();
    let upload = sangsaeng_common::transfer::wire::UpdateUpload {
        training_id: r.tid.clone(),
        round: r.round,
        base_model_sha256: r.info.sha256.clone(),
        num_params: delta.len() as u64,
        encoding: sangsaeng_common::transfer::encoding::UpdateEncoding::Float32,
        delta_digest: algorithm.id(&digest::digest(algorithm, &chunks.concat())),
        chunks: chunks.into_iter().map(prost::bytes::Bytes::from).collect(),
        num_examples,
        train_loss: 0.5,
        first_chunk: 0,
        dp: None,
        masked: None,
    };
    sangsaeng_common::transfer::wire::upload_messages(upload)
        .unwrap()
        .map(|m| m.part.unwrap())
        .collect()
}

/// A correct upload (delta 1, 300 examples) made by `make` (`parts` or
/// `raw_parts`), with one edit to its header: the shape of most header refusals.
fn edited<R>(
    make: fn(&Round, &[f32], u64) -> Vec<Part>,
    edit: impl FnOnce(&Round, &mut pb::UpdateHeader) -> R,
) -> impl FnOnce(&Round) -> Vec<Part> {
    move |r| {
        let mut p = make(r, &delta(r.n(), 1), 300);
        edit(r, header_mut(&mut p));
        p
    }
}

/// A correct upload of `delta` except that element `at` is `value` (digests match the data).
fn parts_with(r: &Round, at: usize, value: f32) -> Vec<Part> {
    let mut d = delta(r.n(), 1);
    d[at] = value;
    parts(r, &d, 300)
}

fn header_mut(parts: &mut [Part]) -> &mut pb::UpdateHeader {
    match &mut parts[0] {
        Part::Header(h) => h,
        _ => panic!("the first part is not a header"),
    }
}

fn chunk_mut(parts: &mut [Part], index: usize) -> &mut pb::UpdateChunk {
    match &mut parts[1 + index] {
        Part::Chunk(c) => c,
        _ => panic!("part {} is not a chunk", 1 + index),
    }
}

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, needle: &str) -> Status {
    let s = match r {
        Err(s) => s,
        Ok(v) => panic!("expected {code:?} ('{needle}'), but it was accepted: {v:?}"),
    };
    assert_eq!(s.code(), code, "wrong code; message: {}", s.message());
    assert!(
        s.message().contains(needle),
        "the message should name the problem ('{needle}'): {}",
        s.message()
    );
    s
}

// ---------------------------------------------------------------------------
// Reading back what the coordinator wrote
// ---------------------------------------------------------------------------

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn layout(out: &Path) -> Vec<sangsaeng_common::learning::model::TensorSpec> {
    let plan = TrainingPlan::from_file(&out.join("plan.toml")).unwrap();
    ModelSpec::from_plan(&plan).layout()
}

fn model(out: &Path, round: u32) -> Vec<f32> {
    weights::load_safetensors(
        &out.join(format!("model-round-{round:04}.safetensors")),
        &layout(out),
    )
    .unwrap()
}

/// Checks round `round` of the training in `out`: `metrics.jsonl` lists exactly the
/// `accepted` updates (organisation, digest, weight), and the round's global model is
/// the previous one plus their example-weighted mean, computed here in f64.
fn check_round(out: &Path, round: u32, accepted: &[(&str, &[f32], u64)]) {
    let records = metrics(out);
    let rec = records
        .iter()
        .find(|r| r["round"] == round)
        .unwrap_or_else(|| panic!("no metrics for round {round}"));
    let mut listed: Vec<(String, String, u64)> = rec["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["org_id"].as_str().unwrap().to_string(),
                p["sha256"].as_str().unwrap().to_string(),
                p["num_examples"].as_u64().unwrap(),
            )
        })
        .collect();
    listed.sort();
    // Each digest in the algorithm its id names (SHA-256 hex, or `blake3:` hex).
    let mut expected: Vec<(String, String, u64)> = accepted
        .iter()
        .map(|(org, d, n)| {
            let algorithm = listed
                .iter()
                .find(|l| l.0 == *org)
                .map_or(DigestAlgorithm::Sha256, |l| DigestAlgorithm::of_id(&l.1));
            let raw = digest::digest(algorithm, &weights::to_le_bytes(d));
            (org.to_string(), algorithm.id(&raw), *n)
        })
        .collect();
    expected.sort();
    assert_eq!(
        listed, expected,
        "round {round}: accepted updates in metrics.jsonl"
    );

    let previous = model(out, round - 1);
    let global = model(out, round);
    let total: f64 = accepted.iter().map(|a| a.2 as f64).sum();
    let mut worst = 0f64;
    for j in 0..global.len() {
        let mean: f64 = accepted
            .iter()
            .map(|(_, d, n)| d[j] as f64 * *n as f64)
            .sum::<f64>()
            / total;
        worst = worst.max((global[j] as f64 - (previous[j] as f64 + mean)).abs());
    }
    assert!(
        worst <= 1e-6,
        "round {round}: the global model deviates from the FedAvg of the accepted updates by {worst}"
    );
    // Bit for bit what an accumulator that only ever saw the accepted updates gives:
    // a refused update leaves no trace, even one whose first chunks were folded in.
    let mut acc = Accumulator::new(global.len());
    for (_, d, n) in accepted {
        acc.add(d, *n).unwrap();
    }
    let exact = acc.apply_to(&previous).unwrap();
    let differing = exact
        .iter()
        .zip(&global)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(
        differing, 0,
        "round {round}: {differing} values differ from the accepted updates' exact aggregate"
    );
    assert_eq!(rec["model_sha256"], weights::digest(&global));
}

// ---------------------------------------------------------------------------
// Malformed uploads
// ---------------------------------------------------------------------------

/// What a refusal means for the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Refused from the header alone: the site may still send a correct update.
    StillWaitedFor,
    /// The update itself was bad: refused for this round, the round does not wait for it.
    NotWaitedFor,
}

/// One malformed upload from site-a inside round 1, then the round completes with the
/// correct updates (site-b's, and site-a's second try when the round still waits for
/// it), and the published model is exactly their FedAvg.
async fn refused_upload(
    limits: Limits,
    bad: impl FnOnce(&Round) -> Vec<Part>,
    code: Code,
    needle: &str,
    then: Then,
) {
    let (mut fed, mut a, mut b, r) = two_sites_in_round(limits, 1).await;
    assert_refused(a.upload(bad(&r)).await, code, needle);
    fed.after_refusal("site-a", needle, then).await;

    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    let mut accepted: Vec<(&str, &[f32], u64)> = vec![];
    if then == Then::StillWaitedFor {
        a.upload(parts(&r, &da, 300))
            .await
            .expect("a correct update after a refused header is accepted");
        accepted.push(("site-a", &da, 300));
    }
    b.upload(parts(&r, &db, 500))
        .await
        .expect("another participant's update is accepted");
    accepted.push(("site-b", &db, 500));
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &accepted);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_declaring_the_wrong_number_of_values_is_invalid_argument() {
    refused_upload(
        limits(),
        edited(parts, |r, h| h.num_params = r.n() as u64 + 1),
        Code::InvalidArgument,
        "the update declares 3653 values, the model has 3652",
        Then::StillWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_shorter_than_the_model_is_invalid_argument() {
    // A delta of the wrong length with a header that lies about it: the chunks and
    // the trailer describe 3,651 values, the header the model's 3,652.
    refused_upload(
        limits(),
        |r| {
            let d = delta(r.n() - 1, 1);
            let mut p = parts(r, &d, 300);
            header_mut(&mut p).num_params = r.n() as u64;
            p
        },
        Code::InvalidArgument,
        "the delta ended after 3651 of 3652 values",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_longer_than_the_model_is_invalid_argument() {
    refused_upload(
        limits(),
        |r| {
            let d = delta(r.n() + 1, 1);
            let mut p = parts(r, &d, 300);
            header_mut(&mut p).num_params = r.n() as u64;
            p
        },
        Code::InvalidArgument,
        "takes the delta beyond the model's 3652 values",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_cut_before_its_last_chunk_and_trailer_is_invalid_argument_truncated() {
    refused_upload(
        limits(),
        |r| {
            let mut p = parts(r, &delta(r.n(), 1), 300);
            p.truncate(p.len() - 2); // no last chunk, no trailer: the stream just ends
            p
        },
        Code::InvalidArgument,
        "upload stream ended before its trailer (truncated)",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_upload_stream_is_invalid_argument_truncated() {
    refused_upload(
        limits(),
        |_| vec![],
        Code::InvalidArgument,
        "truncated",
        Then::StillWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_in_a_delta_is_invalid_argument_naming_the_element() {
    refused_upload(
        limits(),
        |r| parts_with(r, 1234, f32::NAN),
        Code::InvalidArgument,
        "delta value #1234 is NaN",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinity_in_a_delta_is_invalid_argument_naming_the_element() {
    refused_upload(
        limits(),
        |r| parts_with(r, 7, f32::INFINITY),
        Code::InvalidArgument,
        "delta value #7 is infinite",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_delta_value_is_refused_as_beyond_the_plausibility_bound() {
    refused_upload(
        limits(),
        |r| parts_with(r, 500, 1e6),
        Code::InvalidArgument,
        "delta value #500 is 1000000, beyond the ±1024 plausibility bound",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_whose_data_does_not_match_its_digest_is_invalid_argument() {
    refused_upload(
        limits(),
        |r| {
            let mut p = parts(r, &delta(r.n(), 1), 300);
            flip(&mut chunk_mut(&mut p, 1).data, 17, 0x40); // a bit flipped in transit
            p
        },
        Code::InvalidArgument,
        "chunk 1 digest mismatch",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailer_with_the_wrong_whole_delta_digest_is_invalid_argument() {
    refused_upload(
        limits(),
        |r| {
            let mut p = parts(r, &delta(r.n(), 1), 300);
            let last = p.len() - 1;
            p[last] = trailer(b"something else");
            p
        },
        Code::InvalidArgument,
        "whole-delta digest mismatch",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_with_raw_or_hex_digests_are_both_accepted_under_the_same_digest() {
    let (fed, mut a, mut b, r) = two_sites_in_round(limits(), 1).await;
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    // The daemon's form: raw digests in the header, chunks checked by CRC-32C alone.
    let p = raw_parts(&r, &da, 300);
    assert!(matches!(&p[1], Part::Chunk(c)
        if c.sha256.is_empty() && c.digest.is_empty() && c.crc32c.is_some()));
    let receipt = a.upload(p).await.expect("the daemon's raw-digest form");
    assert_eq!(receipt.sha256, weights::digest(&da));
    let receipt = b.upload(parts(&r, &db, 500)).await.expect("the hex form");
    assert_eq!(receipt.sha256, weights::digest(&db));
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_whose_data_does_not_match_its_raw_digest_is_invalid_argument() {
    refused_upload(
        limits(),
        |r| {
            let mut p = raw_parts(r, &delta(r.n(), 1), 300);
            let c = chunk_mut(&mut p, 1);
            c.digest = <sha2::Sha256 as sha2::Digest>::digest(&c.data).to_vec();
            c.crc32c = None;
            flip(&mut c.data, 17, 0x40);
            p
        },
        Code::InvalidArgument,
        "chunk 1 digest mismatch",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_whose_data_does_not_match_its_crc_is_invalid_argument() {
    refused_upload(
        limits(),
        |r| {
            let mut p = raw_parts(r, &delta(r.n(), 1), 300);
            flip(&mut chunk_mut(&mut p, 2).data, 5, 0x01);
            p
        },
        Code::InvalidArgument,
        "chunk 2 checksum mismatch",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_whose_crc_checked_chunks_add_up_to_another_delta_is_refused_and_undone() {
    // Each chunk's CRC matches its (altered) data, so the chunks are folded in;
    // the whole-delta SHA-256 declared in the header catches the change at the
    // end, and the folded chunks are taken out again.
    refused_upload(
        limits(),
        |r| {
            let mut p = raw_parts(r, &delta(r.n(), 1), 300);
            let c = chunk_mut(&mut p, 1);
            flip(&mut c.data, 17, 0x40);
            c.crc32c = Some(crc32c::crc32c(&c.data));
            p
        },
        Code::InvalidArgument,
        "whole-delta digest mismatch",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_without_any_digest_is_invalid_argument() {
    refused_upload(
        limits(),
        |r| {
            let mut p = raw_parts(r, &delta(r.n(), 1), 300);
            chunk_mut(&mut p, 2).crc32c = None;
            p
        },
        Code::InvalidArgument,
        "chunk 2 carries no digest (sha256 or digest) and no crc32c",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_base_model_digest_of_the_wrong_length_is_invalid_argument() {
    refused_upload(
        limits(),
        edited(raw_parts, |_, h| h.base_model_digest.pop()),
        Code::InvalidArgument,
        "base_model_digest must be the 32 bytes of a SHA-256 digest, not 31",
        Then::StillWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_and_hex_forms_of_a_digest_that_disagree_are_invalid_argument() {
    refused_upload(
        limits(),
        edited(raw_parts, |_, h| h.delta_sha256 = "0".repeat(64)),
        Code::InvalidArgument,
        "disagrees with its hex form",
        Then::StillWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_delta_digest_that_does_not_match_the_data_is_invalid_argument() {
    // The trailer leaves the digest to the header, which declared a wrong one.
    refused_upload(
        limits(),
        edited(raw_parts, |_, h| h.delta_digest = vec![7; 32]),
        Code::InvalidArgument,
        "whole-delta digest mismatch: declared 0707",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_with_blake3_or_sha256_delta_digests_are_both_accepted_and_recorded_as_such() {
    let (fed, mut a, mut b, r) = two_sites_in_round(limits(), 1).await;
    // The round's model is announced with its BLAKE3 too (what tells a
    // participant the coordinator takes BLAKE3 delta digests).
    let announced = digest::digest(DigestAlgorithm::Blake3, &weights::to_le_bytes(&r.base));
    assert_eq!(r.info.blake3, announced);
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    let p = raw_parts_hashed(&r, &da, 300, DigestAlgorithm::Blake3);
    assert_eq!(
        header_mut(&mut p.clone()).delta_digest_algorithm,
        pb::DigestAlgorithm::Blake3 as i32
    );
    let receipt = a.upload(p).await.expect("a BLAKE3 whole-delta digest");
    let b3 = digest::digest(DigestAlgorithm::Blake3, &weights::to_le_bytes(&da));
    assert_eq!(receipt.sha256, format!("blake3:{}", hex::encode(b3)));
    let receipt = b
        .upload(raw_parts(&r, &db, 500))
        .await
        .expect("a SHA-256 one");
    assert_eq!(receipt.sha256, weights::digest(&db));
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sha256_delta_digest_declared_as_blake3_is_invalid_argument() {
    refused_upload(
        limits(),
        edited(raw_parts, |_, h| {
            h.delta_digest_algorithm = pb::DigestAlgorithm::Blake3 as i32
        }),
        Code::InvalidArgument,
        "whole-delta digest mismatch: declared blake3:",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_delta_digest_algorithm_is_invalid_argument() {
    refused_upload(
        limits(),
        edited(raw_parts, |_, h| h.delta_digest_algorithm = 7),
        Code::InvalidArgument,
        "delta_digest_algorithm 7 is not one this coordinator knows",
        Then::StillWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_that_declares_no_whole_digest_anywhere_is_invalid_argument() {
    refused_upload(
        limits(),
        edited(raw_parts, |_, h| h.delta_digest.clear()),
        Code::InvalidArgument,
        "declared no whole-delta digest",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_above_max_chunk_bytes_is_resource_exhausted() {
    refused_upload(
        limits(),
        |r| {
            let bytes = weights::to_le_bytes(&delta(r.n(), 1));
            let mut p = vec![Part::Header(header(r, r.n(), 300))];
            p.extend(chunks(&bytes, 2 * MAX_CHUNK));
            p.push(trailer(&bytes));
            p
        },
        Code::ResourceExhausted,
        "chunk 0 is 8192 bytes, above the limit of 4096",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_above_the_grpc_size_limit_is_resource_exhausted() {
    // Above limits.max_message_bytes (max_chunk_bytes + 64 KiB): tonic's decoder
    // refuses it before the service sees a chunk.
    refused_upload(
        limits(),
        |r| {
            let mut p = parts(r, &delta(r.n(), 1), 300);
            chunk_mut(&mut p, 0).data = vec![0; 100_000].into();
            p
        },
        Code::ResourceExhausted,
        "too large",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_out_of_order_are_invalid_argument() {
    refused_upload(
        limits(),
        |r| {
            let mut p = parts(r, &delta(r.n(), 1), 300);
            p.swap(1, 2); // chunk 1 first
            p
        },
        Code::InvalidArgument,
        "chunk 1 arrived where chunk 0 was expected",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_that_is_not_whole_float32_values_is_invalid_argument() {
    refused_upload(
        limits(),
        |r| {
            let mut p = parts(r, &delta(r.n(), 1), 300);
            *chunk_mut(&mut p, 0) = chunk(0, &[1, 2, 3, 4, 5, 6]);
            p
        },
        Code::InvalidArgument,
        "chunk 0: 6 bytes are not a positive whole number of float32 values",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_encoded_otherwise_than_the_plan_is_invalid_argument() {
    refused_upload(
        limits(),
        edited(parts, |_, h| h.encoding = "int8".into()),
        Code::InvalidArgument,
        "the update is encoded as int8, the plan asks for float32",
        Then::StillWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_with_an_unknown_encoding_is_invalid_argument() {
    refused_upload(
        limits(),
        edited(parts, |_, h| h.encoding = "bfloat16".into()),
        Code::InvalidArgument,
        "unknown update encoding 'bfloat16'",
        Then::StillWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_for_a_future_round_is_failed_precondition() {
    refused_upload(
        limits(),
        edited(parts, |_, h| h.round = 2),
        Code::FailedPrecondition,
        "update for future round 2; round 1 is in progress",
        Then::StillWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_from_another_base_model_is_failed_precondition() {
    refused_upload(
        limits(),
        edited(parts, |_, h| {
            h.base_model_sha256 = weights::digest(&[1.0, 2.0])
        }),
        Code::FailedPrecondition,
        "the update starts from model",
        Then::StillWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_for_an_unknown_training_is_not_found() {
    refused_upload(
        limits(),
        edited(parts, |_, h| h.training_id = "t-nope".into()),
        Code::NotFound,
        "unknown training 't-nope'",
        Then::StillWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_over_zero_examples_is_invalid_argument() {
    refused_upload(
        limits(),
        edited(parts, |_, h| h.num_examples = 0),
        Code::InvalidArgument,
        "num_examples 0 is outside 1..=50000000",
        Then::StillWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_claiming_more_examples_than_the_limit_is_invalid_argument() {
    refused_upload(
        limits(),
        edited(parts, |_, h| h.num_examples = u64::MAX),
        Code::InvalidArgument,
        "num_examples 18446744073709551615 is outside 1..=50000000",
        Then::StillWaitedFor,
    )
    .await;
}

/// Issue 21 (d): FedAvg weighs an update by its example count, so a site that
/// claims 100x the training rows its statistics declared is refused at the
/// header, named in metrics.jsonl; its honest retry and the other site make
/// the round, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_claiming_more_examples_than_its_declared_rows_is_invalid_argument() {
    refused_upload(
        limits(),
        edited(parts, |_, h| h.num_examples = 30_000),
        Code::InvalidArgument,
        "num_examples 30000 differs from the 300 training rows this site declared in the statistics phase",
        Then::StillWaitedFor,
    )
    .await;
}

/// A site that connects after the statistics phase declared no rows: it is
/// selected from the next round, the count its first update claims is
/// recorded, and a later update claiming another is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_is_bound_to_the_count_of_its_first_update() {
    let (fed, mut a, mut b, r1) = two_sites_in_round(limits(), 3).await;
    let mut c = Site::join(&fed, "site-c").await;
    fed.wait_connected(&["site-a", "site-b", "site-c"]).await;
    a.upload(parts(&r1, &delta(r1.n(), 11), 300)).await.unwrap();
    b.upload(parts(&r1, &delta(r1.n(), 22), 500)).await.unwrap();
    evaluate_all(&mut [&mut a, &mut b, &mut c]).await;
    let r2 = a.expect_train().await;
    b.expect_train().await;
    c.expect_train().await;
    for (s, seed, n) in [(&mut a, 12, 300), (&mut b, 23, 500), (&mut c, 34, 40)] {
        s.upload(parts(&r2, &delta(r2.n(), seed), n)).await.unwrap();
    }
    evaluate_all(&mut [&mut a, &mut b, &mut c]).await;
    let r3 = a.expect_train().await;
    b.expect_train().await;
    c.expect_train().await;
    assert_refused(
        c.upload(parts(&r3, &delta(r3.n(), 35), 4_000)).await,
        Code::InvalidArgument,
        "num_examples 4000 differs from the 40 examples this site claimed with its first update",
    );
    drop((a, b, c));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_without_a_header_is_invalid_argument() {
    refused_upload(
        limits(),
        |r| {
            let mut p = parts(r, &delta(r.n(), 1), 300);
            p.remove(0);
            p
        },
        Code::InvalidArgument,
        "an upload must start with its header",
        Then::StillWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_header_in_one_upload_is_invalid_argument() {
    refused_upload(
        limits(),
        |r| {
            let mut p = parts(r, &delta(r.n(), 1), 300);
            let h = p[0].clone();
            p.insert(2, h);
            p
        },
        Code::InvalidArgument,
        "a second header arrived in the same upload",
        Then::NotWaitedFor,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_message_with_no_part_set_is_invalid_argument() {
    let (mut fed, mut a, mut b, r) = two_sites_in_round(limits(), 1).await;
    let mut messages = vec![pb::UpdateMessage { part: None }];
    messages.extend(
        parts(&r, &delta(r.n(), 1), 300)
            .into_iter()
            .map(|p| pb::UpdateMessage { part: Some(p) }),
    );
    assert_refused(
        a.upload_messages(messages).await,
        Code::InvalidArgument,
        "upload message with no part set",
    );
    fed.after_refusal("site-a", "no part set", Then::StillWaitedFor)
        .await;
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    a.upload(parts(&r, &da, 300)).await.unwrap();
    b.upload(parts(&r, &db, 500)).await.unwrap();
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_with_no_part_set_inside_an_upload_is_invalid_argument() {
    let (mut fed, mut a, b, r) = two_sites_in_round(limits(), 1).await;
    let mut messages: Vec<pb::UpdateMessage> = parts(&r, &delta(r.n(), 1), 300)
        .into_iter()
        .map(|p| pb::UpdateMessage { part: Some(p) })
        .collect();
    messages.insert(3, pb::UpdateMessage { part: None });
    assert_refused(
        a.upload_messages(messages).await,
        Code::InvalidArgument,
        "upload message with no part set",
    );
    fed.after_refusal("site-a", "no part set", Then::NotWaitedFor)
        .await;
    finish_with_site_b(fed, a, b, &r, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_update_may_be_followed_by_a_correct_one_in_the_same_round() {
    // Refused for the round means "not waited for", not "banned": a site whose upload
    // was corrupted in transit may send it again while the round is open.
    let (mut fed, mut a, b, r) = two_sites_in_round(limits(), 1).await;
    let da = delta(r.n(), 11);
    let mut corrupted = parts(&r, &da, 300);
    flip(&mut chunk_mut(&mut corrupted, 2).data, 0, 1);
    assert_refused(
        a.upload(corrupted).await,
        Code::InvalidArgument,
        "chunk 2 digest mismatch",
    );
    fed.after_refusal("site-a", "digest mismatch", Then::NotWaitedFor)
        .await;
    let receipt = a.upload(parts(&r, &da, 300)).await.unwrap();
    assert_eq!(receipt.sha256, weights::digest(&da));
    assert_eq!(receipt.accepted_in_round, 1);
    finish_with_site_b(fed, a, b, &r, Some((&da, 300))).await;
}

// ---------------------------------------------------------------------------
// Duplicates, rounds and phases
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_update_for_the_same_round_is_already_exists_and_counted_once() {
    let (fed, mut a, mut b, r) = two_sites_in_round(limits(), 1).await;
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    let receipt = a.upload(parts(&r, &da, 300)).await.unwrap();
    assert_eq!(receipt.accepted_in_round, 1);
    // Again, with the same or another delta: refused, the first one stands.
    for d in [&da, &delta(r.n(), 33)] {
        assert_refused(
            a.upload(parts(&r, d, 300)).await,
            Code::AlreadyExists,
            "an update for round 1 was already received from this organisation",
        );
    }

    // Two uploads of site-b at once: while the first is still streaming, the second
    // is refused. (Were the second processed first, it would be the one accepted; the
    // deltas are the same so the round's outcome does not depend on the race.)
    let bytes = weights::to_le_bytes(&db);
    let first: Vec<Part> = parts(&r, &db, 500);
    let (tx, pending) = b.upload_by_hand();
    send_parts(&tx, &first[..3]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = b.upload(parts(&r, &db, 500)).await;
    send_parts(&tx, &first[3..]).await;
    drop(tx);
    let first = pending.await.unwrap();
    let (ok, refused) = match (first, second) {
        (Ok(ok), Err(s)) | (Err(s), Ok(ok)) => (ok, s),
        other => panic!("exactly one of two concurrent uploads must be accepted: {other:?}"),
    };
    assert_eq!(ok.sha256, weights::sha256_hex(&bytes));
    assert_eq!(ok.accepted_in_round, 2);
    assert_refused::<()>(Err(refused), Code::AlreadyExists, "already received");

    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_for_a_closed_round_or_outside_training_is_failed_precondition() {
    let (mut fed, mut a, mut b, r1) = two_sites_in_round(limits(), 2).await;
    let (da1, db1) = (delta(r1.n(), 11), delta(r1.n(), 22));
    a.upload(parts(&r1, &da1, 300)).await.unwrap();
    b.upload(parts(&r1, &db1, 500)).await.unwrap();

    // Round 1 closed; its model is being evaluated: no updates now.
    let t = a.task().await;
    let Some(pb::task::Kind::Evaluate(_)) = t.kind else {
        panic!("expected an evaluation task, got {t:?}")
    };
    assert_refused(
        a.upload(parts(&r1, &da1, 300)).await,
        Code::FailedPrecondition,
        "is not collecting updates (phase: evaluating)",
    );
    a.client
        .submit_evaluation(evaluation(&r1.tid, 1))
        .await
        .unwrap();
    b.evaluate().await;

    // Round 2: a late update for round 1 (say, a retry after a network cut) is refused.
    let r2 = a.expect_train().await;
    b.expect_train().await;
    assert_eq!(r2.round, 2);
    assert_refused(
        a.upload(parts(&r1, &delta(r1.n(), 44), 300)).await,
        Code::FailedPrecondition,
        "update for closed round 1; round 2 is in progress",
    );
    fed.after_refusal("site-a", "closed round 1", Then::StillWaitedFor)
        .await;
    let (da2, db2) = (delta(r2.n(), 55), delta(r2.n(), 66));
    a.upload(parts(&r2, &da2, 300)).await.unwrap();
    b.upload(parts(&r2, &db2, 500)).await.unwrap();
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da1, 300), ("site-b", &db1, 500)]);
    check_round(&out, 2, &[("site-a", &da2, 300), ("site-b", &db2, 500)]);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_from_a_site_not_selected_for_the_round_is_failed_precondition() {
    let (fed, mut a, mut b, r) = two_sites_in_round(limits(), 1).await;
    // site-c connects after the round opened: it was not asked, its update is not wanted.
    let mut c = Site::join(&fed, "site-c").await;
    assert_refused(
        c.upload(parts(&r, &delta(r.n(), 3), 300)).await,
        Code::FailedPrecondition,
        "this organisation was not selected for round 1",
    );
    assert_refused(
        c.client
            .submit_stats(stats_report(&r.tid, &site_stats(3)))
            .await,
        Code::FailedPrecondition,
        "is not collecting statistics (phase: training)",
    );
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    a.upload(parts(&r, &da, 300)).await.unwrap();
    b.upload(parts(&r, &db, 500)).await.unwrap();
    // site-c is connected now, so it is asked to evaluate the new model.
    evaluate_all(&mut [&mut a, &mut b, &mut c]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    drop((a, b, c));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upload_is_aborted_after_the_idle_limit_and_may_be_retried() {
    let limits = Limits {
        transfer_idle_secs: 1,
        ..limits()
    };
    let (mut fed, mut a, b, r) = two_sites_in_round(limits, 1).await;
    let da = delta(r.n(), 11);
    let p = parts(&r, &da, 300);
    let (tx, pending) = a.upload_by_hand();
    send_parts(&tx, &p[..2]).await;
    // ... and nothing more, with the stream left open.
    let r_stalled = tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .expect("a stalled upload is cut, not waited for forever")
        .unwrap();
    assert_refused(r_stalled, Code::Aborted, "upload idle for more than 1s");
    drop(tx);
    // A broken transfer is not held against the site: it is still waited for, and
    // its in-progress mark is gone so the retry is not taken for a duplicate.
    fed.after_refusal("site-a", "idle", Then::StillWaitedFor)
        .await;
    a.upload(p).await.expect("the retry is accepted");
    finish_with_site_b(fed, a, b, &r, Some((&da, 300))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_off_upload_replaced_by_a_new_one_leaves_no_trace_in_the_aggregate() {
    let limits = Limits {
        transfer_idle_secs: 1,
        ..limits()
    };
    let (fed, mut a, b, r) = two_sites_in_round(limits, 1).await;
    // Three chunks of a first delta are folded in, then the connection is cut...
    let first = delta(r.n(), 5);
    let mut p = parts(&r, &first, 300);
    header_mut(&mut p).delta_sha256 = weights::sha256_hex(&weights::to_le_bytes(&first));
    let (tx, pending) = a.upload_by_hand();
    send_parts(&tx, &p[..4]).await;
    let cut = tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .unwrap()
        .unwrap();
    assert_refused(cut, Code::Aborted, "idle");
    drop(tx);
    // ...and the site sends a different delta from chunk 0 (at its declared
    // weight, the only one the coordinator takes).
    let da = delta(r.n(), 11);
    a.upload(parts(&r, &da, 300))
        .await
        .expect("a new upload replaces the kept part");
    finish_with_site_b(fed, a, b, &r, Some((&da, 300))).await;
}

/// The participant cancels its upload call after three chunks were folded in
/// (tonic resets the stream). The upload ends as a broken stream does: its
/// chunks kept for resumption, then replaced by the site's new upload and taken
/// out exactly. (A connection closed mid-upload, where hyper may drop the
/// handler outright, is `tests/federation.rs::uploads_whose_connections_close_as_they_start_leave_no_trace_in_the_model`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cancelled_by_its_caller_leaves_no_trace_in_the_aggregate() {
    let (fed, mut a, b, r) = two_sites_in_round(limits(), 1).await;
    let first = delta(r.n(), 5);
    let mut p = parts(&r, &first, 300);
    header_mut(&mut p).delta_sha256 = weights::sha256_hex(&weights::to_le_bytes(&first));
    let (tx, pending) = a.upload_by_hand();
    send_parts(&tx, &p[..4]).await;
    // Long enough for the three chunks to be folded (each folds in well under a
    // millisecond); then the call is dropped, which resets the stream.
    tokio::time::sleep(Duration::from_millis(500)).await;
    pending.abort();
    let _ = pending.await;
    drop(tx);
    // The site sends a different delta from chunk 0 (its first attempt may
    // find the cancelled one still being wound up).
    let da = delta(r.n(), 11);
    let mut accepted = false;
    for _ in 0..50 {
        match a.upload(parts(&r, &da, 300)).await {
            Ok(_) => {
                accepted = true;
                break;
            }
            Err(s) if s.code() == Code::AlreadyExists => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("the new upload was refused: {s:?}"),
        }
    }
    assert!(accepted, "the cancelled upload was never wound up");
    finish_with_site_b(fed, a, b, &r, Some((&da, 300))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_off_upload_resumes_from_the_last_good_chunk() {
    resume_from_the_last_good_chunk(DigestAlgorithm::Sha256).await;
}

/// The same with a BLAKE3 whole-delta digest: the kept part is found by its
/// `blake3:` id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_off_upload_with_a_blake3_digest_resumes_from_the_last_good_chunk() {
    resume_from_the_last_good_chunk(DigestAlgorithm::Blake3).await;
}

/// An upload (hex digests, the whole one declared in the header) cut after two
/// chunks, asked about, resumed wrongly and then rightly.
async fn resume_from_the_last_good_chunk(algorithm: DigestAlgorithm) {
    let limits = Limits {
        transfer_idle_secs: 1,
        ..limits()
    };
    let (fed, mut a, b, r) = two_sites_in_round(limits, 1).await;
    let da = delta(r.n(), 11);
    let bytes = weights::to_le_bytes(&da);
    let raw = digest::digest(algorithm, &bytes);
    let digest = algorithm.id(&raw);
    let mut p = parts(&r, &da, 300);
    header_mut(&mut p).delta_sha256 = hex::encode(raw);
    header_mut(&mut p).delta_digest_algorithm = algorithm.to_wire() as i32;
    // The trailer leaves the whole digest to the header.
    let last = p.len() - 1;
    p[last] = Part::Trailer(pb::UpdateTrailer::default());
    assert!(p.len() >= 5, "the delta must span several chunks");
    // Header and two chunks, then the connection goes quiet and is cut.
    let (tx, pending) = a.upload_by_hand();
    send_parts(&tx, &p[..3]).await;
    let cut = tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .unwrap()
        .unwrap();
    assert_refused(cut, Code::Aborted, "idle");
    drop(tx);
    let client = a.client.clone();
    let progress = |sha: String| {
        let mut c = client.clone();
        let req = pb::UploadProgressRequest {
            training_id: r.tid.clone(),
            round: r.round,
            delta_sha256: sha,
            reserve_slot: false,
        };
        async move {
            c.upload_progress(req)
                .await
                .unwrap()
                .into_inner()
                .next_chunk
        }
    };
    assert_eq!(
        progress(digest.clone()).await,
        2,
        "the two good chunks are kept"
    );
    assert_eq!(
        progress("0".repeat(64)).await,
        0,
        "another delta has nothing kept"
    );
    // Resuming from the wrong chunk is refused and does not lose what was kept.
    let mut wrong = vec![p[0].clone()];
    header_mut(&mut wrong).first_chunk = 3;
    wrong.extend(p[4..].iter().cloned());
    assert_refused(
        a.upload(wrong).await,
        Code::FailedPrecondition,
        "nothing kept to resume from chunk 3",
    );
    assert_eq!(progress(digest.clone()).await, 2);
    // The right resume sends only the missing chunks.
    let mut rest = vec![p[0].clone()];
    header_mut(&mut rest).first_chunk = 2;
    rest.extend(p[3..].iter().cloned());
    let receipt = a
        .upload(rest)
        .await
        .expect("the resumed upload is accepted");
    assert_eq!(receipt.sha256, digest);
    finish_with_site_b(fed, a, b, &r, Some((&da, 300))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_never_send_a_header_do_not_hold_the_upload_slots() {
    // site-c (on the roster, not in the round) opens as many uploads as there are
    // upload slots and sends nothing. The honest sites' uploads must still go through.
    let limits = Limits {
        max_concurrent_uploads: 2,
        transfer_idle_secs: 3,
        ..limits()
    };
    let (fed, mut a, mut b, r) = two_sites_in_round(limits, 1).await;
    let c = Site::join(&fed, "site-c").await;
    let stalled: Vec<_> = (0..2).map(|_| c.upload_by_hand()).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    let started = std::time::Instant::now();
    a.upload(parts(&r, &da, 300))
        .await
        .expect("an honest upload is not starved by header-less uploads");
    b.upload(parts(&r, &db, 500)).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the honest uploads waited {:?} for a slot",
        started.elapsed()
    );
    for (tx, pending) in stalled {
        let r = tokio::time::timeout(Duration::from_secs(20), pending)
            .await
            .expect("a header-less upload is cut after the idle limit")
            .unwrap();
        assert_refused(r, Code::Aborted, "idle");
        drop(tx);
    }
    let mut c = c;
    evaluate_all(&mut [&mut a, &mut b, &mut c]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    drop((a, b, c));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_uploads_at_once_get_resource_exhausted() {
    // One upload slot: while site-a's upload trickles in (within the idle limit),
    // site-b waits for the slot up to the idle limit and is then told to retry.
    let limits = Limits {
        max_concurrent_uploads: 1,
        transfer_idle_secs: 2,
        ..limits()
    };
    let (fed, mut a, mut b, r) = two_sites_in_round(limits, 1).await;
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    let slow = parts(&r, &da, 300);
    let (tx, pending) = a.upload_by_hand();
    tx.send(pb::UpdateMessage {
        part: Some(slow[0].clone()),
    })
    .await
    .unwrap();
    let trickle = tokio::spawn(async move {
        for p in &slow[1..] {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.send(pb::UpdateMessage {
                part: Some(p.clone()),
            })
            .await
            .unwrap();
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_refused(
        b.upload(parts(&r, &db, 500)).await,
        Code::ResourceExhausted,
        "1 uploads are already in progress; retry shortly",
    );
    trickle.await.unwrap();
    pending.await.unwrap().expect("the slow upload completes");
    // The refusal was transient: site-b retries and is accepted.
    b.upload(parts(&r, &db, 500)).await.unwrap();
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_off_by_a_rerun_of_its_round_does_not_clear_the_next_uploads_mark() {
    // Round 1 needs both sites within 4 s. site-a's first upload stalls and outlives
    // the round, which is re-run; site-a's second upload (of the re-run) stalls too.
    // When the first one is cut (idle, at 6 s, before the re-run's own deadline at
    // 8 s), the second is still in progress: a third upload from site-a must still
    // be refused, not run beside it.
    let limits = Limits {
        transfer_idle_secs: 6,
        ..limits()
    };
    let (fed, mut a, mut b, r) =
        two_sites_in_round_of(limits, raw_plan_with_deadline(1, 2, 4)).await;
    let d = delta(r.n(), 11);
    let p = parts(&r, &d, 300);
    let stall = |site: &Site| {
        let (tx, pending) = site.upload_by_hand();
        let first = p[..2].to_vec();
        async move {
            for part in first {
                tx.send(pb::UpdateMessage { part: Some(part) })
                    .await
                    .unwrap();
            }
            (tx, pending)
        }
    };
    let (tx1, first) = stall(&a).await;
    // The deadline passes with no update: the round is re-run and asks again.
    let rerun = tokio::time::timeout(Duration::from_secs(20), a.expect_train())
        .await
        .expect("the round is re-run after its deadline");
    assert_eq!((rerun.round, &rerun.info.sha256), (r.round, &r.info.sha256));
    b.expect_train().await;
    let (tx2, second) = stall(&a).await;
    let cut = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("the first upload is cut after the idle limit")
        .unwrap();
    assert!(cut.is_err(), "the first upload outlived its round: {cut:?}");
    drop(tx1);
    assert!(!second.is_finished(), "the second upload ended early");
    assert_refused(
        a.upload(p.clone()).await,
        Code::AlreadyExists,
        "already received from this organisation",
    );
    drop((tx2, second, a, b));
    fed.stop().await;
}

/// Asks for an upload slot for round `r` (UploadProgress with `reserve_slot`).
async fn reserve_slot(
    mut c: FederationClient<Channel>,
    r: &Round,
) -> Result<pb::UploadProgressResponse, Status> {
    c.upload_progress(pb::UploadProgressRequest {
        training_id: r.tid.clone(),
        round: r.round,
        delta_sha256: String::new(),
        reserve_slot: true,
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_slots_are_reserved_in_turn_and_an_unused_reservation_expires() {
    // One upload slot. site-a reserves it; site-b's reservation waits (holding no
    // upload stream) until site-a's upload has used and released it.
    let limits = Limits {
        max_concurrent_uploads: 1,
        transfer_idle_secs: 2,
        ..limits()
    };
    let (fed, mut a, mut b, r) = two_sites_in_round(limits, 1).await;
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    let held = reserve_slot(a.client.clone(), &r)
        .await
        .expect("a free slot is reserved");
    assert_eq!((held.next_chunk, held.slot_secs), (0, 2));
    // A second reservation by the holder is the same slot, not another one.
    reserve_slot(a.client.clone(), &r)
        .await
        .expect("reserving again is idempotent");
    let waiting = {
        let (c, r) = (b.client.clone(), r.clone());
        tokio::spawn(async move { reserve_slot(c, &r).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "site-b got a slot while site-a held the only one"
    );
    a.upload(parts(&r, &da, 300))
        .await
        .expect("the holder's upload uses its reserved slot");
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the slot passes to site-b once site-a's upload is done")
        .unwrap();
    assert_eq!(got.expect("site-b's reservation").slot_secs, 2);
    // The holder of an accepted update cannot reserve another slot in this round.
    assert_refused(
        reserve_slot(a.client.clone(), &r).await,
        Code::AlreadyExists,
        "already received",
    );
    // site-b never uploads: its reservation lapses after the idle time, and a
    // new reservation is then served rather than refused after waiting.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let started = std::time::Instant::now();
    reserve_slot(b.client.clone(), &r)
        .await
        .expect("the lapsed slot is free again");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the lapsed reservation still held the slot ({:?})",
        started.elapsed()
    );
    b.upload(parts(&r, &db, 500)).await.unwrap();
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_leaves_frees_the_upload_slot_it_reserved() {
    // The reservation would otherwise hold the only slot for its whole
    // time-to-live (30 s here) while site-b waits.
    let limits = Limits {
        max_concurrent_uploads: 1,
        transfer_idle_secs: 30,
        ..limits()
    };
    let (fed, a, mut b, r) = two_sites_in_round(limits, 1).await;
    let db = delta(r.n(), 22);
    reserve_slot(a.client.clone(), &r)
        .await
        .expect("a free slot is reserved");
    let waiting = {
        let (c, r) = (b.client.clone(), r.clone());
        tokio::spawn(async move { reserve_slot(c, &r).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "site-a's reservation was not held");
    a.client
        .clone()
        .leave(pb::LeaveRequest {
            reason: "shutdown".into(),
        })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the slot passes to site-b as soon as site-a leaves")
        .unwrap()
        .expect("site-b's reservation");
    b.upload(parts(&r, &db, 500)).await.unwrap();
    evaluate_all(&mut [&mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-b", &db, 500)]);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_unused_when_its_round_closes_does_not_hold_the_next_rounds_slot() {
    // One upload slot. site-a reserves it in round 1 and never uploads; the round
    // closes at its deadline. Without the release at round close, site-b's
    // reservation in round 2 would wait for site-a's to lapse (30 s here).
    let limits = Limits {
        max_concurrent_uploads: 1,
        transfer_idle_secs: 30,
        ..limits()
    };
    let (fed, mut a, mut b, r1) =
        two_sites_in_round_of(limits, raw_plan_with_deadline(2, 1, 3)).await;
    let db1 = delta(r1.n(), 22);
    reserve_slot(b.client.clone(), &r1)
        .await
        .expect("a free slot is reserved");
    b.upload(parts(&r1, &db1, 500)).await.unwrap();
    reserve_slot(a.client.clone(), &r1)
        .await
        .expect("the slot site-b used is free again");
    // Round 1 closes at its deadline with site-b's update alone.
    evaluate_all(&mut [&mut a, &mut b]).await;
    let r2 = b.expect_train().await;
    a.expect_train().await;
    assert_eq!(r2.round, 2);
    tokio::time::timeout(Duration::from_secs(5), reserve_slot(b.client.clone(), &r2))
        .await
        .expect("the slot reserved in round 1 is free in round 2")
        .expect("site-b's reservation");
    let (da2, db2) = (delta(r2.n(), 55), delta(r2.n(), 66));
    b.upload(parts(&r2, &db2, 500)).await.unwrap();
    a.upload(parts(&r2, &da2, 300)).await.unwrap();
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-b", &db1, 500)]);
    check_round(&out, 2, &[("site-a", &da2, 300), ("site-b", &db2, 500)]);
    drop((a, b));
    fed.stop().await;
}

// ---------------------------------------------------------------------------
// Statistics, evaluations, downloads, problem reports
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_statistics_are_refused_and_the_global_scaling_uses_only_valid_ones() {
    let mut fed = Fed::start(limits()).await;
    let mut a = Site::join(&fed, "site-a").await;
    let mut b = Site::join(&fed, "site-b").await;
    fed.wait_connected(&["site-a", "site-b"]).await;
    let tid = fed.start_training(raw_plan(1, 1)).await;
    let t = a.task().await;
    assert!(matches!(t.kind, Some(pb::task::Kind::Stats(_))));

    let good = site_stats_of("site-a", 0);
    let short = FeatureStats {
        sum: good.sum[..51].to_vec(),
        sum_sq: good.sum_sq[..51].to_vec(),
        ..good.clone()
    };
    let mut nan = good.clone();
    nan.sum[2] = f64::NAN;
    let mut inf = good.clone();
    inf.sum_sq[4] = f64::INFINITY;
    let mut negative = good.clone();
    negative.sum_sq[0] = -1.0;
    let zero_rows = FeatureStats {
        count: 0,
        ..good.clone()
    };
    for (bad, needle) in [
        (
            &short,
            "expected 52 sums and sums of squares, got 51 and 51",
        ),
        (&nan, "sum of feature 3 is not finite"),
        (
            &inf,
            "sum of squares of feature 5 is negative or not finite",
        ),
        (
            &negative,
            "sum of squares of feature 1 is negative or not finite",
        ),
        (&zero_rows, "computed over zero rows"),
    ] {
        assert_refused(
            a.client.submit_stats(stats_report(&tid, bad)).await,
            Code::InvalidArgument,
            needle,
        );
        assert_eq!(fed.training().await.phase, "collecting-statistics");
    }
    assert_refused(
        a.client.submit_stats(stats_report("t-nope", &good)).await,
        Code::NotFound,
        "unknown training 't-nope'",
    );
    a.client
        .submit_stats(stats_report(&tid, &good))
        .await
        .expect("valid statistics after refused ones are accepted");
    assert_refused(
        a.client
            .submit_stats(stats_report(&tid, &site_stats(9)))
            .await,
        Code::AlreadyExists,
        "statistics for this training were already received",
    );
    let b_stats = b.answer_stats(1).await;

    // The scaling every site receives is that of the two valid reports only.
    let mut merged = FeatureStats::empty(52);
    merged.merge(&good).unwrap();
    merged.merge(&b_stats).unwrap();
    let want = merged.to_scaling(false).unwrap();
    let r = a.expect_train().await;
    b.expect_train().await;
    let plan =
        TrainingPlan::from_file(&PathBuf::from(fed.training().await.output_dir).join("plan.toml"))
            .unwrap();
    let got = plan.scaling.expect("scaling in the published plan");
    for (g, w) in got
        .mean
        .iter()
        .chain(&got.std)
        .zip(want.mean.iter().chain(&want.std))
    {
        assert!((g - w).abs() <= 1e-9 * w.abs().max(1.0), "{g} vs {w}");
    }

    assert_refused(
        a.client.submit_stats(stats_report(&tid, &good)).await,
        Code::FailedPrecondition,
        "is not collecting statistics (phase: training)",
    );
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    a.upload(parts(&r, &da, 300)).await.unwrap();
    b.upload(parts(&r, &db, 500)).await.unwrap();
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_that_would_break_the_merge_are_refused_and_the_training_goes_on() {
    // Each report is valid on its own, but a row count near u64::MAX overflows the sum
    // of counts, and sums near f64::MAX add up to infinity: accepted, they would fail
    // the whole training when the coordinator merges the sites' statistics.
    let mut fed = Fed::start(limits()).await;
    let mut a = Site::join(&fed, "site-a").await;
    let mut b = Site::join(&fed, "site-b").await;
    fed.wait_connected(&["site-a", "site-b"]).await;
    let tid = fed.start_training(raw_plan(1, 2)).await;
    for s in [&mut a, &mut b] {
        let t = s.task().await;
        assert!(matches!(t.kind, Some(pb::task::Kind::Stats(_))));
    }
    let huge_count = FeatureStats {
        count: u64::MAX,
        ..site_stats(0)
    };
    let mut huge_sum = site_stats(0);
    huge_sum.sum[6] = 1e308;
    let mut huge_sum_sq = site_stats(0);
    huge_sum_sq.sum_sq[6] = 1e308;
    for (bad, needle) in [
        (&huge_count, "rows"),
        (&huge_sum, "feature 7"),
        (&huge_sum_sq, "feature 7"),
    ] {
        assert_refused(
            a.client.submit_stats(stats_report(&tid, bad)).await,
            Code::InvalidArgument,
            needle,
        );
    }
    a.client
        .submit_stats(stats_report(&tid, &site_stats_of("site-a", 0)))
        .await
        .unwrap();
    b.client
        .submit_stats(stats_report(&tid, &site_stats_of("site-b", 1)))
        .await
        .unwrap();
    let r = a.expect_train().await;
    b.expect_train().await;
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    a.upload(parts(&r, &da, 300)).await.unwrap();
    b.upload(parts(&r, &db, 500)).await.unwrap();
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_evaluations_are_refused_and_the_metrics_use_only_valid_ones() {
    let (mut fed, mut a, mut b, r) = two_sites_in_round(limits(), 1).await;
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    assert_refused(
        a.client.submit_evaluation(evaluation(&r.tid, 1)).await,
        Code::FailedPrecondition,
        "no evaluation of round 1 is being collected (phase: training, round 1)",
    );
    a.upload(parts(&r, &da, 300)).await.unwrap();
    b.upload(parts(&r, &db, 500)).await.unwrap();
    let t = a.task().await;
    assert!(matches!(t.kind, Some(pb::task::Kind::Evaluate(_))));

    let good = evaluation(&r.tid, 1);
    let bad_range = "evaluation metrics must be finite, accuracy and macro-F1 in [0, 1]";
    for (bad, code, needle) in [
        (
            pb::EvaluationReport {
                accuracy: 1.5,
                ..good.clone()
            },
            Code::InvalidArgument,
            bad_range,
        ),
        (
            pb::EvaluationReport {
                accuracy: f64::NAN,
                ..good.clone()
            },
            Code::InvalidArgument,
            bad_range,
        ),
        (
            pb::EvaluationReport {
                loss: f64::INFINITY,
                ..good.clone()
            },
            Code::InvalidArgument,
            bad_range,
        ),
        (
            pb::EvaluationReport {
                macro_f1: -0.1,
                ..good.clone()
            },
            Code::InvalidArgument,
            bad_range,
        ),
        (
            pb::EvaluationReport {
                num_examples: 0,
                ..good.clone()
            },
            Code::InvalidArgument,
            "at least one",
        ),
        (
            // Summed with the other sites' counts this would overflow.
            pb::EvaluationReport {
                num_examples: u64::MAX,
                ..good.clone()
            },
            Code::InvalidArgument,
            "at most 50000000 examples",
        ),
        (
            pb::EvaluationReport {
                model_round: 0,
                ..good.clone()
            },
            Code::FailedPrecondition,
            "no evaluation of round 0 is being collected",
        ),
        (
            pb::EvaluationReport {
                training_id: "t-nope".into(),
                ..good.clone()
            },
            Code::NotFound,
            "unknown training 't-nope'",
        ),
    ] {
        assert_refused(a.client.submit_evaluation(bad).await, code, needle);
        assert_eq!(fed.training().await.phase, "evaluating");
    }
    let accepted = pb::EvaluationReport {
        num_examples: 60,
        loss: 0.75,
        accuracy: 0.9,
        macro_f1: 0.8,
        ..good.clone()
    };
    a.client.submit_evaluation(accepted.clone()).await.unwrap();
    assert_refused(
        a.client.submit_evaluation(good.clone()).await,
        Code::AlreadyExists,
        "an evaluation of round 1 was already received",
    );
    b.evaluate().await; // 40 rows, loss 1.25, accuracy 0.5, macro-F1 0.4
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    let rec = &metrics(&out)[0];
    let evals = rec["evaluations"].as_array().unwrap();
    assert_eq!(evals.len(), 2);
    let ea = evals.iter().find(|e| e["org_id"] == "site-a").unwrap();
    assert_eq!(ea["num_examples"], 60);
    assert_eq!(ea["accuracy"], 0.9);
    let close = |k: &str, want: f64| {
        let got = rec[k].as_f64().unwrap();
        assert!((got - want).abs() < 1e-12, "{k}: {got} vs {want}");
    };
    close("eval_accuracy", (60.0 * 0.9 + 40.0 * 0.5) / 100.0);
    close("eval_loss", (60.0 * 0.75 + 40.0 * 1.25) / 100.0);
    close("eval_macro_f1", (60.0 * 0.8 + 40.0 * 0.4) / 100.0);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_of_missing_rounds_or_chunks_are_refused_and_resume_works() {
    let (fed, mut a, mut b, r) = two_sites_in_round(limits(), 1).await;
    let total = (r.n() * 4).div_ceil(MAX_CHUNK) as u32;
    assert_eq!(total, 4, "the test model spans several chunks");
    let request = |model_round, start_chunk| pb::DownloadRequest {
        training_id: r.tid.clone(),
        model_round,
        start_chunk,
        control_variate: false,
    };
    assert_refused(
        a.client
            .download_model(pb::DownloadRequest {
                control_variate: true,
                ..request(0, 0)
            })
            .await,
        Code::NotFound,
        "the SCAFFOLD control variate of round 0 is not available (current round: 1; the plan has no SCAFFOLD)",
    );
    assert_refused(
        a.client.download_model(request(7, 0)).await,
        Code::NotFound,
        "the global model of round 7 is not available (current round: 1)",
    );
    assert_refused(
        a.client.download_model(request(1, 0)).await,
        Code::NotFound,
        "the global model of round 1 is not available",
    );
    assert_refused(
        a.client.download_model(request(0, total + 1)).await,
        Code::InvalidArgument,
        "start_chunk 5 is beyond the model's 4 chunks",
    );
    assert_refused(
        a.client
            .download_model(pb::DownloadRequest {
                training_id: "t-nope".into(),
                ..request(0, 0)
            })
            .await,
        Code::NotFound,
        "unknown training 't-nope'",
    );
    // Resuming at the very end yields nothing; resuming at chunk 2 yields the rest,
    // which completes the first two chunks to the model.
    let mut s = a
        .client
        .download_model(request(0, total))
        .await
        .unwrap()
        .into_inner();
    assert!(s.message().await.unwrap().is_none());
    let mut bytes = vec![];
    for start in [0, 2] {
        let mut s = a
            .client
            .download_model(request(0, start))
            .await
            .unwrap()
            .into_inner();
        let mut i = start;
        while let Some(c) = s.message().await.unwrap() {
            assert_eq!((c.index, c.total_chunks), (i, total));
            assert_eq!(weights::sha256_hex(&c.data), c.sha256);
            assert_eq!(c.crc32c, Some(crc32c::crc32c(&c.data)));
            assert_eq!(c.model_sha256, r.info.sha256);
            if start == 0 && i >= 2 {
                break;
            }
            bytes.extend(c.data);
            i += 1;
        }
    }
    assert_eq!(weights::sha256_hex(&bytes), r.info.sha256);
    assert_eq!(weights::from_le_bytes(&bytes).unwrap(), r.base);

    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    a.upload(parts(&r, &da, 300)).await.unwrap();
    b.upload(parts(&r, &db, 500)).await.unwrap();
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_problem_reports_are_truncated_or_refused() {
    let mut fed = Fed::start(limits()).await;
    let mut a = Site::join(&fed, "site-a").await;
    let ack = a
        .client
        .report_problem(pb::ProblemReport {
            training_id: "t-nope".into(),
            round: 0,
            message: "é".repeat(30_000),
        })
        .await
        .expect("a long report within the message limit is accepted");
    assert!(ack.into_inner().message.contains("recorded"));
    let p = fed.participant("site-a").await;
    assert_eq!(
        p.last_error.chars().count(),
        2000,
        "kept to 2,000 characters"
    );
    // Beyond the gRPC message limit the call is refused by the transport...
    let s = a
        .client
        .report_problem(pb::ProblemReport {
            training_id: "t-nope".into(),
            round: 0,
            message: "x".repeat(200_000),
        })
        .await
        .expect_err("a report above the message limit is refused");
    assert!(
        s.message().contains("too large"),
        "{:?} {}",
        s.code(),
        s.message()
    );
    // ... and the coordinator and this participant's connection keep working.
    assert!(fed.participant("site-a").await.connected);
    a.client
        .leave(pb::LeaveRequest {
            reason: "test".into(),
        })
        .await
        .unwrap();
    drop(a);
    fed.stop().await;
}

// ---------------------------------------------------------------------------
// Undecodable protobuf
// ---------------------------------------------------------------------------

/// Encodes like `UpdateMessage` for its header (field 1), but puts a varint in field 2
/// where `UpdateMessage` has the `chunk` submessage: the coordinator cannot decode it.
#[derive(Clone, PartialEq, prost::Message)]
struct Clashing {
    #[prost(message, optional, tag = "1")]
    header: Option<pb::UpdateHeader>,
    #[prost(uint64, optional, tag = "2")]
    chunk_as_varint: Option<u64>,
}

/// Field 1 as a varint where `StatsReport` has its `training_id` string.
#[derive(Clone, PartialEq, prost::Message)]
struct ClashingStats {
    #[prost(uint64, tag = "1")]
    training_id_as_varint: u64,
}

/// Calls a client-streaming method with hand-made messages.
async fn raw_upload(ch: Channel, messages: Vec<Clashing>) -> Result<pb::UploadReceipt, Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    grpc.client_streaming(
        tonic::Request::new(tokio_stream::iter(messages)),
        tonic::codegen::http::uri::PathAndQuery::from_static(
            "/sangsaeng.v1.Federation/UploadUpdate",
        ),
        tonic_prost::ProstCodec::<Clashing, pb::UploadReceipt>::default(),
    )
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_protobuf_is_refused_and_leaves_the_round_intact() {
    let (mut fed, a, b, r) = two_sites_in_round(limits(), 1).await;
    let clash = Clashing {
        header: None,
        chunk_as_varint: Some(5),
    };

    // A unary call: tonic's decoder refuses the request before the service runs
    // (INTERNAL, as gRPC specifies for parse errors).
    let mut grpc = tonic::client::Grpc::new(a.channel.clone());
    grpc.ready().await.unwrap();
    let s = grpc
        .unary(
            tonic::Request::new(ClashingStats {
                training_id_as_varint: 7,
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/sangsaeng.v1.Federation/SubmitStats",
            ),
            tonic_prost::ProstCodec::<ClashingStats, pb::Ack>::default(),
        )
        .await
        .expect_err("undecodable statistics are refused");
    assert_eq!(s.code(), Code::Internal, "{}", s.message());
    assert!(s.message().contains("decode"), "{}", s.message());

    // An upload whose first message cannot be decoded: refused, nothing started, the
    // site may still send its update.
    assert_refused(
        raw_upload(a.channel.clone(), vec![clash.clone()]).await,
        Code::InvalidArgument,
        "failed to decode",
    );
    fed.after_refusal("site-a", "decode", Then::StillWaitedFor)
        .await;

    // A valid header, then an undecodable message: the update is refused for the round.
    let header = Clashing {
        header: Some(header(&r, r.n(), 300)),
        chunk_as_varint: None,
    };
    assert_refused(
        raw_upload(a.channel.clone(), vec![header, clash]).await,
        Code::InvalidArgument,
        "failed to decode",
    );
    fed.after_refusal("site-a", "decode", Then::NotWaitedFor)
        .await;

    finish_with_site_b(fed, a, b, &r, None).await;
}

// ---------------------------------------------------------------------------
// Identity: certificates and the roster
// ---------------------------------------------------------------------------

/// A client certificate made like the project's (CN and URI SAN of each `orgs`,
/// EKU clientAuth, signed by `ca`), valid from `not_before` to `not_after`.
fn client_cert(
    ca: &CaBundle,
    orgs: &[&str],
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> (String, String) {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, orgs[0].to_string());
    params.subject_alt_names = orgs
        .iter()
        .map(|o| SanType::URI(format!("sangsaeng://org/{o}").try_into().unwrap()))
        .collect();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert_pem, KeyPair::from_pem(&ca.key_pem).unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn material(pki: &Pki, (cert_pem, key_pem): (String, String)) -> TlsMaterial {
    TlsMaterial {
        ca_pem: pki.ca.cert_pem.clone(),
        cert_pem,
        key_pem,
    }
}

/// Dials with plain tonic TLS, without the client-side checks of
/// `sangsaeng_common::identity::channel::connect` (which refuses to present an expired certificate).
async fn dial_unchecked(url: &str, tls: &TlsMaterial) -> Result<Channel, String> {
    sangsaeng_common::identity::tls::install_crypto_provider();
    let cfg = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &tls.cert_pem,
            &tls.key_pem,
        ))
        .domain_name("localhost");
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(cfg)
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| sangsaeng_common::identity::channel::error_chain(&e))
}

/// Dials and subscribes; the error, whether from the handshake or the first RPC.
async fn subscribe_unchecked(url: &str, tls: &TlsMaterial) -> Result<(), String> {
    let ch = dial_unchecked(url, tls).await?;
    FederationClient::new(ch)
        .subscribe(pb::SubscribeRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| {
            format!(
                "{:?}: {}",
                s.code(),
                sangsaeng_common::identity::channel::error_chain(&s)
            )
        })
}

async fn certificate_outside_its_validity_fails_the_handshake(
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) {
    let mut fed = Fed::start(limits()).await;
    let tls = material(
        &fed.pki,
        client_cert(&fed.pki.ca, &["site-a"], not_before, not_after),
    );
    // The project's own dialer does not even try with such a certificate.
    let local = sangsaeng_common::identity::channel::connect(&fed.coord.url, &tls, "localhost")
        .await
        .expect_err("the participant's dialer refuses a certificate that is not valid now");
    assert!(local.to_string().contains("not now"), "{local}");
    // Presented anyway, it fails at the TLS layer: no RPC reaches the roster check.
    let err = subscribe_unchecked(&fed.coord.url, &tls)
        .await
        .expect_err("a certificate outside its validity must not get in");
    assert!(
        !err.contains("PermissionDenied") && !err.contains("Unauthenticated"),
        "refused at the wrong layer: {err}"
    );
    // With TLS 1.3 the client learns of it from the server's alert on its first RPC,
    // when that alert reaches it before the connection closes (rustls sends
    // certificate_expired for "not yet valid" too).
    assert!(
        !err.contains("alert") || err.contains("CertificateExpired"),
        "{err}"
    );
    // The coordinator keeps serving, and never saw site-a.
    let p = fed.participant("site-a").await;
    assert!(p.last_seen.is_empty() && !p.connected, "{p:?}");
    // Control: the same recipe with current dates is let in.
    let now = time::OffsetDateTime::now_utc();
    let ok = material(
        &fed.pki,
        client_cert(
            &fed.pki.ca,
            &["site-a"],
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        ),
    );
    subscribe_unchecked(&fed.coord.url, &ok)
        .await
        .expect("the control certificate is accepted");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_client_certificate_fails_the_handshake() {
    let now = time::OffsetDateTime::now_utc();
    certificate_outside_its_validity_fails_the_handshake(
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_yet_valid_client_certificate_fails_the_handshake() {
    let now = time::OffsetDateTime::now_utc();
    certificate_outside_its_validity_fails_the_handshake(
        now + time::Duration::days(1),
        now + time::Duration::days(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organisation_removed_from_the_roster_gets_permission_denied_on_every_rpc() {
    // site-d still holds a valid certificate from the project CA, but the roster no
    // longer lists it.
    let mut fed = Fed::start_with(
        &support::roster(&["site-d"]),
        support::roster(&[]),
        limits(),
    )
    .await;
    let mut a = Site::join(&fed, "site-a").await;
    let mut b = Site::join(&fed, "site-b").await;
    let r = open_round(&mut fed, &mut [&mut a, &mut b], raw_plan(1, 1)).await;

    let ch = sangsaeng_common::identity::channel::connect(
        &fed.coord.url,
        &fed.pki.material("site-d"),
        "localhost",
    )
    .await
    .unwrap();
    let mut d = FederationClient::new(ch);
    let needle = "'site-d' is not on the federation's roster";
    assert_refused(
        d.subscribe(pb::SubscribeRequest::default()).await,
        Code::PermissionDenied,
        needle,
    );
    assert_refused(
        d.submit_stats(stats_report(&r.tid, &site_stats(0))).await,
        Code::PermissionDenied,
        needle,
    );
    assert_refused(
        d.download_model(pb::DownloadRequest {
            training_id: r.tid.clone(),
            model_round: 0,
            start_chunk: 0,
            control_variate: false,
        })
        .await,
        Code::PermissionDenied,
        needle,
    );
    let upload: Vec<pb::UpdateMessage> = parts(&r, &delta(r.n(), 4), 300)
        .into_iter()
        .map(|p| pb::UpdateMessage { part: Some(p) })
        .collect();
    assert_refused(
        d.upload_update(tokio_stream::iter(upload)).await,
        Code::PermissionDenied,
        needle,
    );
    assert_refused(
        d.report_problem(pb::ProblemReport::default()).await,
        Code::PermissionDenied,
        needle,
    );
    let s = fed.status().await;
    assert!(s.participants.iter().all(|p| p.org_id != "site-d"));

    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    a.upload(parts(&r, &da, 300)).await.unwrap();
    b.upload(parts(&r, &db, 500)).await.unwrap();
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_are_attributed_to_the_certificate_not_to_anything_in_messages() {
    // No message carries an identity, so "claiming to be site-b" can only mean saying
    // so in free-form fields. What this checks: site-a says it is site-b wherever it
    // can, its update is still recorded under site-a; it cannot send a second update
    // for anyone; and a certificate naming two organisations is refused.
    let mut fed = Fed::start(limits()).await;
    let ch = sangsaeng_common::identity::channel::connect(
        &fed.coord.url,
        &fed.pki.material("site-a"),
        "localhost",
    )
    .await
    .unwrap();
    let mut client = FederationClient::new(ch.clone());
    let tasks = client
        .subscribe(pb::SubscribeRequest {
            software_version: "site-b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut a = Site {
        org: "site-a".into(),
        channel: ch,
        client,
        tasks,
    };
    let mut b = Site::join(&fed, "site-b").await;
    let r = open_round(&mut fed, &mut [&mut a, &mut b], raw_plan(1, 1)).await;
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    a.upload(parts(&r, &da, 300)).await.unwrap();
    assert_eq!(fed.training().await.contributed, vec!["site-a".to_string()]);
    assert_refused(
        a.upload(parts(&r, &db, 500)).await,
        Code::AlreadyExists,
        "already received from this organisation",
    );
    let p = fed.participant("site-b").await;
    assert!(
        p.last_error.is_empty(),
        "nothing was held against site-b: {p:?}"
    );

    // A CA-signed certificate that names two organisations has no identity.
    let now = time::OffsetDateTime::now_utc();
    let two = material(
        &fed.pki,
        client_cert(
            &fed.pki.ca,
            &["site-a", "site-b"],
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        ),
    );
    let err = subscribe_unchecked(&fed.coord.url, &two)
        .await
        .expect_err("an ambiguous certificate gets nothing");
    assert!(
        err.starts_with("Unauthenticated") && err.contains("names several organisations"),
        "{err}"
    );

    b.upload(parts(&r, &db, 500)).await.unwrap();
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    drop((a, b));
    fed.stop().await;
}

// ---------------------------------------------------------------------------
// Administration
// ---------------------------------------------------------------------------

/// While `tid` is in `phase`, another StartTraining is refused and changes nothing.
async fn refuse_second_training(fed: &mut Fed, tid: &str, phase: &str) {
    assert_eq!(fed.training().await.phase, phase);
    let s = assert_refused(
        fed.admin
            .start_training(pb::StartTrainingRequest {
                plan_toml: raw_plan(3, 1),
            })
            .await,
        Code::FailedPrecondition,
        "is still running",
    );
    assert!(s.message().contains(tid), "{}", s.message());
    let t = fed.training().await;
    assert_eq!((t.training_id.as_str(), t.total_rounds), (tid, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_a_training_while_one_runs_is_failed_precondition() {
    let mut fed = Fed::start(limits()).await;
    let mut a = Site::join(&fed, "site-a").await;
    let mut b = Site::join(&fed, "site-b").await;
    fed.wait_connected(&["site-a", "site-b"]).await;
    let tid = fed.start_training(raw_plan(1, 1)).await;
    refuse_second_training(&mut fed, &tid, "collecting-statistics").await;
    a.answer_stats(0).await;
    b.answer_stats(1).await;
    let r = a.expect_train().await;
    b.expect_train().await;
    refuse_second_training(&mut fed, &tid, "training").await;
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    a.upload(parts(&r, &da, 300)).await.unwrap();
    b.upload(parts(&r, &db, 500)).await.unwrap();
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    // Once it has ended, the next one may start.
    let next = fed.start_training(raw_plan(1, 1)).await;
    assert_ne!(next, tid);
    drop((a, b));
    fed.stop().await;
}

// ---------------------------------------------------------------------------
// Real participant daemons beside bad data and a bad update
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn csv_with_a_non_numeric_cell_is_reported_with_file_line_and_column() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let roster = support::roster(&[]);
    let pki = support::pki(dir.path(), &roster);
    let files = support::site_files(dir.path(), 3);
    // Line 5 (the header is line 1) of site-c's export has "n/a" for xmeas_7.
    let text = std::fs::read_to_string(&files[2]).unwrap();
    let broken: String = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 4 {
                let mut cells: Vec<&str> = l.split(',').collect();
                cells[6] = "n/a";
                format!("{}\n", cells.join(","))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let bad = dir.path().join("line3-export.csv");
    std::fs::write(&bad, broken).unwrap();
    let files = vec![files[0].clone(), files[1].clone(), bad];

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
    let handles = support::spawn_sites(&pki, &coord.url, files, &stop);
    let admin_tls = pki.material("ops-admin");
    localnet::wait_for_status(&coord.url, &admin_tls, WAIT, |s| {
        s.participants.iter().filter(|p| p.connected).count() == 3
    })
    .await
    .expect("all three connected");
    let mut admin = AdminClient::new(
        sangsaeng_common::identity::channel::connect(&coord.url, &admin_tls, "localhost")
            .await
            .unwrap(),
    );
    admin
        .start_training(pb::StartTrainingRequest {
            plan_toml: support::plan_toml(1, 2),
        })
        .await
        .unwrap();
    let s = support::training_ended(&coord.url, &admin_tls).await;
    let t = s.training.as_ref().unwrap();
    assert_eq!(t.phase, "completed", "{}", t.error);
    let c = s
        .participants
        .iter()
        .find(|p| p.org_id == "site-c")
        .unwrap();
    for needle in [
        "line3-export.csv",
        "line 5",
        "column 'xmeas_7'",
        "\"n/a\" is not a number",
    ] {
        assert!(
            c.last_error.contains(needle),
            "site-c's problem should name {needle}: {}",
            c.last_error
        );
    }
    let out = PathBuf::from(&t.output_dir);
    let rec = &metrics(&out)[0];
    let orgs: Vec<&str> = rec["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["org_id"].as_str().unwrap())
        .collect();
    assert_eq!(orgs, ["site-a", "site-b"]);
    stop.cancel();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    tokio::time::timeout(Duration::from_secs(20), coord.stop())
        .await
        .expect("coordinator stopped in time")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_nan_update_leaves_the_fedavg_of_the_honest_participants_untouched() {
    // site-a and site-b are real daemons (keeping a copy of what they send); site-c is
    // driven by hand: NaN in round 1 (refused), a plausible delta in round 2 (accepted).
    support::init_tracing();
    let mut fed = Fed::start(Limits::default()).await;
    let files = support::site_files(fed.path(), 2);
    let stop = CancellationToken::new();
    let handles: Vec<_> = ["site-a", "site-b"]
        .iter()
        .zip(files)
        .map(|(org, f)| {
            let rec = fed.path().join("sent").join(org);
            let cfg = localnet::participant_config(
                &fed.pki,
                &fed.coord.url,
                org,
                vec![f],
                "fault",
                Some(rec),
            );
            localnet::spawn_participant(cfg, stop.clone())
        })
        .collect();
    let mut c = Site::join(&fed, "site-c").await;
    fed.wait_connected(&["site-a", "site-b", "site-c"]).await;
    let tid = fed.start_training(support::plan_toml(2, 2)).await;
    c.answer_stats(5).await;

    let r1 = c.expect_train().await;
    let mut nan = delta(r1.n(), 7);
    nan[42] = f32::NAN;
    assert_refused(
        c.upload(parts(&r1, &nan, 400)).await,
        Code::InvalidArgument,
        "delta value #42 is NaN",
    );
    c.evaluate().await;
    let r2 = c.expect_train().await;
    let dc = delta(r2.n(), 8);
    c.upload(parts(&r2, &dc, 400)).await.unwrap();
    c.evaluate().await;
    let out = fed.completed().await;

    let sent = |org: &str, round: u32| -> (Vec<f32>, u64) {
        let f = fed
            .path()
            .join("sent")
            .join(org)
            .join(&tid)
            .join(format!("delta-round-{round:04}.safetensors"));
        let d = weights::load_safetensors(&f, &layout(&out)).unwrap();
        let n = weights::safetensors_metadata(&f).unwrap()["num_examples"]
            .parse()
            .unwrap();
        (d, n)
    };
    let (a1, na1) = sent("site-a", 1);
    let (b1, nb1) = sent("site-b", 1);
    check_round(&out, 1, &[("site-a", &a1, na1), ("site-b", &b1, nb1)]);
    let (a2, na2) = sent("site-a", 2);
    let (b2, nb2) = sent("site-b", 2);
    check_round(
        &out,
        2,
        &[
            ("site-a", &a2, na2),
            ("site-b", &b2, nb2),
            ("site-c", &dc, 400),
        ],
    );
    stop.cancel();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    drop(c);
    fed.stop().await;
}

// ---------------------------------------------------------------------------
// Differential privacy: what a site reports it spent is checked, not trusted
// ---------------------------------------------------------------------------

/// The hostile plan with record-level DP-SGD (batches of 8: the raw sites'
/// statistics cover 20 rows each, so δ = 1e-5 is below 1 / rows).
fn dp_plan() -> TrainingPlan {
    use sangsaeng_common::config::privacy::{DpConfig, DpLevel, PrivacyConfig};
    let mut p = TrainingPlan::from_toml(&raw_plan(1, 1), "hostile plan").unwrap();
    p.training.batch_size = 8;
    p.privacy = Some(PrivacyConfig {
        dp: Some(DpConfig {
            level: DpLevel::Record,
            target_epsilon: 8.0,
            delta: 1e-5,
            noise_multiplier: None,
            max_grad_norm: Some(1.0),
            clip_norm: None,
        }),
        ..Default::default()
    });
    p.validate().unwrap();
    p
}

/// What the plan's accounting says a site of `rows` rows spent by `round`.
fn dp_spend(plan: &TrainingPlan, rows: u64, round: u32) -> pb::DpSpend {
    let b = sangsaeng_common::privacy::dp::budget::plan_budget(plan, Some(rows)).unwrap();
    pb::DpSpend {
        noise_multiplier: b.noise_multiplier,
        sample_rate: b.q,
        steps: b.steps_per_round,
        epsilon: b.epsilon_by_round[round as usize - 1],
    }
}

/// A correct upload in a DP training: it carries the report the plan implies.
fn dp_parts(plan: &TrainingPlan, r: &Round, delta: &[f32], rows: u64) -> Vec<Part> {
    let mut p = parts(r, delta, rows);
    header_mut(&mut p).dp = Some(dp_spend(plan, rows, r.round));
    p
}

/// site-a's upload with a wrong or missing privacy report is refused at the
/// header (it may still send a correct one), then both sites' correct updates
/// make the round, exactly.
async fn refused_dp_report(edit: impl FnOnce(&mut pb::UpdateHeader), needle: &str) {
    let plan = dp_plan();
    let (mut fed, mut a, mut b, r) = two_sites_in_round_of(limits(), plan.to_toml()).await;
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    let mut bad = dp_parts(&plan, &r, &da, 300);
    edit(header_mut(&mut bad));
    assert_refused(a.upload(bad).await, Code::InvalidArgument, needle);
    fed.after_refusal("site-a", needle, Then::StillWaitedFor)
        .await;
    a.upload(dp_parts(&plan, &r, &da, 300))
        .await
        .expect("the same update with the plan's report is accepted");
    b.upload(dp_parts(&plan, &r, &db, 500))
        .await
        .expect("another site's update is accepted");
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    check_round(&out, 1, &[("site-a", &da, 300), ("site-b", &db, 500)]);
    let line = &metrics(&out)[0];
    let want = dp_spend(&plan, 300, 1)
        .epsilon
        .max(dp_spend(&plan, 500, 1).epsilon);
    assert_eq!(
        line["privacy"]["model_epsilon"].as_f64(),
        Some(want),
        "{line}"
    );
    drop((a, b));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dp_update_without_its_privacy_report_is_invalid_argument() {
    refused_dp_report(|h| h.dp = None, "carries no dp report").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dp_update_reporting_less_epsilon_than_the_accounting_is_invalid_argument() {
    refused_dp_report(
        |h| h.dp.as_mut().unwrap().epsilon *= 0.5,
        "differs from the plan's accounting for 300 rows at round 1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dp_update_claiming_more_noise_than_it_used_is_invalid_argument() {
    refused_dp_report(
        |h| h.dp.as_mut().unwrap().noise_multiplier *= 2.0,
        "privacy report",
    )
    .await;
}

/// Client-level DP: the noise is calibrated to `clip_norm`, so the coordinator
/// checks the bound rather than trusting the sites to clip. An update above it
/// is refused at the chunk that crosses it, naming the key, and the site is out
/// of the round (as under `norm-bound`); the round completes with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_level_dp_update_above_the_clip_is_refused_naming_clip_norm() {
    use sangsaeng_common::config::privacy::{DpConfig, DpLevel, PrivacyConfig};
    let mut plan = TrainingPlan::from_toml(&raw_plan(1, 1), "hostile plan").unwrap();
    let probe = delta(4_000, 11);
    let norm = |d: &[f32]| d.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
    let clip = norm(&probe) / 2.0;
    plan.privacy = Some(PrivacyConfig {
        dp: Some(DpConfig {
            level: DpLevel::Client,
            target_epsilon: 50.0,
            delta: 1e-5,
            noise_multiplier: Some(1.0),
            max_grad_norm: None,
            clip_norm: Some(clip),
        }),
        ..Default::default()
    });
    plan.validate().unwrap();
    let (mut fed, mut a, mut b, r) = two_sites_in_round_of(limits(), plan.to_toml()).await;
    let (da, db) = (delta(r.n(), 11), delta(r.n(), 22));
    assert!(
        norm(&da) > 1.5 * clip,
        "the model is as large as the clip assumed"
    );
    let clipped = |d: &[f32]| {
        let f = (clip / norm(d) * 0.999) as f32;
        d.iter().map(|v| v * f).collect::<Vec<f32>>()
    };
    let needle = "passes privacy.dp.clip_norm";
    assert_refused(
        a.upload(parts(&r, &da, 300)).await,
        Code::InvalidArgument,
        needle,
    );
    fed.after_refusal("site-a", needle, Then::NotWaitedFor)
        .await;
    b.upload(parts(&r, &clipped(&db), 500))
        .await
        .expect("another site's clipped update is accepted");
    evaluate_all(&mut [&mut a, &mut b]).await;
    let out = fed.completed().await;
    let line = &metrics(&out)[0];
    assert_eq!(line["privacy"]["noise_added_by"], "coordinator", "{line}");
    let refused = line["refused"].to_string();
    assert!(
        refused.contains("site-a") && refused.contains(needle),
        "{line}"
    );
    drop((a, b));
    fed.stop().await;
}

/// Issue 21 (e): a site reports macro-F1 1.0 for a model the two others score
/// at 0.4. It is flagged (metrics.jsonl, audit log), the audit entry keeps
/// each site's own report, and a release policy whose quality floor trusts
/// only site-b is not fooled, while one that averages every report would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inflated_evaluation_is_flagged_and_trusted_evaluators_are_not_fooled() {
    let mut fed = Fed::start(limits()).await;
    let mut a = Site::join(&fed, "site-a").await;
    let mut b = Site::join(&fed, "site-b").await;
    let mut c = Site::join(&fed, "site-c").await;
    fed.wait_connected(&["site-a", "site-b", "site-c"]).await;
    let r = open_round(&mut fed, &mut [&mut a, &mut b, &mut c], raw_plan(1, 3)).await;
    for (s, seed, n) in [(&mut a, 11, 300), (&mut b, 22, 500), (&mut c, 33, 400)] {
        s.upload(parts(&r, &delta(r.n(), seed), n)).await.unwrap();
    }
    let t = a.task().await;
    assert!(matches!(t.kind, Some(pb::task::Kind::Evaluate(_))));
    let inflated = pb::EvaluationReport {
        macro_f1: 1.0,
        accuracy: 1.0,
        ..evaluation(&t.training_id, 1)
    };
    a.client.submit_evaluation(inflated).await.unwrap();
    b.evaluate().await; // 0.4
    c.evaluate().await; // 0.4
    let out = fed.completed().await;
    let line = &metrics(&out)[0];
    assert_eq!(line["eval_outliers"][0]["org_id"], "site-a", "{line}");
    assert_eq!(line["eval_outliers"].as_array().unwrap().len(), 1, "{line}");

    let policy = |trusted: &str| {
        include_str!("../examples/release-policy.toml").replace(
            "min_macro_f1 = 0.6",
            &format!("min_macro_f1 = 0.5\n{trusted}"),
        )
    };
    let quality = |r: pb::ReleaseResponse| {
        r.rules
            .into_iter()
            .find(|x| x.rule == "min_macro_f1")
            .expect("the quality rule is evaluated")
    };
    let release = |p: String| pb::ReleaseRequest {
        training_id: r.tid.clone(),
        policy_toml: p,
        ..Default::default()
    };
    let every = quality(
        fed.admin
            .release(release(policy("")))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(every.passed, "(1.0 + 0.4 + 0.4) / 3 = 0.6: {every:?}");
    assert!(
        every.actual.contains("the 3 sites' own reports"),
        "{every:?}"
    );
    let trusted = quality(
        fed.admin
            .release(release(policy("trusted_evaluators = [\"site-b\"]")))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(!trusted.passed, "{trusted:?}");
    assert_eq!(trusted.actual, "0.4000, from site-b (40 rows)");
    drop((a, b, c));
    fed.stop().await;
}
