//! Secure aggregation over real mutual TLS: the coordinator opens only the
//! round's sum. The secure run's model is bit-identical to the plain run's;
//! what the coordinator spills of each update is masked; a participant that
//! vanishes after the key exchange is recovered from its neighbours' shares
//! and the round equals FedAvg of the survivors exactly; too few survivors
//! re-run the round with the reason; a forged or replayed advert, a masked
//! chunk of the wrong length and a step for the wrong round are refused with
//! a clear status while the round goes on.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use sangsaeng::localnet::{self, Pki};
use sangsaeng_common::aggregation::fedavg::{Accumulator, weighted_fixed_point};
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::privacy::PrivacyConfig;
use sangsaeng_common::transfer::digest::DigestAlgorithm;
use sangsaeng_common::transfer::encoding::UpdateEncoding;
use sangsaeng_common::transfer::wire::{MaskedChunks, UpdateUpload, upload_messages};
use sangsaeng_coordinator::durable::audit;
use sangsaeng_participant::secure::{Identity, SecureRound};
use sangsaeng_proto::v1 as pb;
use sangsaeng_proto::v1::federation_client::FederationClient;
use tokio_util::sync::CancellationToken;

fn secure_plan(rounds: u32, min: usize, deadline: u64) -> TrainingPlan {
    let mut plan = support::plan(rounds, min);
    plan.training.round_deadline_secs = deadline;
    plan.privacy = Some(PrivacyConfig {
        secure_aggregation: true,
        ..Default::default()
    });
    plan.validate().unwrap();
    plan
}

/// Runs one training of `plan` with the three test sites; returns the run folder.
async fn train(dir: &Path, plan: TrainingPlan) -> PathBuf {
    train_sites(dir, plan, &[]).await
}

/// As [`train`], with `extra` sites beside the three.
async fn train_sites(dir: &Path, plan: TrainingPlan, extra: &[&str]) -> PathBuf {
    let roster = support::roster(extra);
    let pki = support::pki(dir, &roster);
    let runs = dir.join("runs");
    let coord = localnet::start_coordinator(&pki, roster, Some(plan), &runs, Default::default())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let orgs: Vec<&str> = support::SITES
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect();
    let files = support::site_files(dir, orgs.len());
    let handles: Vec<_> = orgs
        .iter()
        .zip(files)
        .map(|(org, f)| {
            let cfg = localnet::participant_config(&pki, &coord.url, org, vec![f], "fault", None);
            localnet::spawn_participant(cfg, stop.clone())
        })
        .collect();
    let s = support::training_ended(&coord.url, &pki.material("ops-admin")).await;
    let t = s.training.unwrap();
    assert_eq!(t.phase, "completed", "{}", t.error);
    stop.cancel();
    for h in handles {
        let _ = h.await;
    }
    coord.stop().await.unwrap();
    runs.join(t.training_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_secure_model_is_bit_identical_to_the_plain_one() {
    support::init_tracing();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut plain = secure_plan(2, 3, 60);
    plain.privacy = None;
    let secure = secure_plan(2, 3, 60);
    let plain_run = train(a.path(), plain.clone()).await;
    let secure_run = train(b.path(), secure.clone()).await;
    for round in 1..=2 {
        let (p, s) = (
            support::model(&plain, &plain_run, round),
            support::model(&secure, &secure_run, round),
        );
        assert!(
            p.iter().zip(&s).all(|(x, y)| x.to_bits() == y.to_bits()),
            "round {round}: the secure model differs from the plain one"
        );
    }
    // Each secure round's audit entry says so, with its threshold and survivors.
    let entries = audit::read_unverified(&b.path().join("runs").join(audit::FILE_NAME)).unwrap();
    let rounds: Vec<&audit::Entry> = entries
        .iter()
        .filter(|e| e.kind == "round_completed")
        .collect();
    assert_eq!(rounds.len(), 2);
    for e in rounds {
        let s = &e.data["secure_aggregation"];
        assert_eq!(s["secure_aggregation"], true, "{}", e.data);
        assert_eq!(s["threshold"], 2, "{s}");
        assert_eq!(s["survivors"].as_array().unwrap().len(), 3, "{s}");
        assert!(s["dropped"].as_array().unwrap().is_empty(), "{s}");
    }
    // What a release policy's require_secure_aggregation reads from the log.
    let facts = |dir: &Path, run: &Path| {
        let entries = audit::read_unverified(&dir.join("runs").join(audit::FILE_NAME)).unwrap();
        let id = run.file_name().unwrap().to_str().unwrap().to_string();
        sangsaeng_coordinator::release::rounds_from_audit(&entries, &id)
            .iter()
            .map(|r| r.secure_aggregation)
            .collect::<Vec<_>>()
    };
    assert_eq!(facts(b.path(), &secure_run), vec![true, true]);
    assert_eq!(facts(a.path(), &plain_run), vec![false, false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn int8_updates_on_a_sparse_graph_aggregate_as_the_plain_int8_round() {
    support::init_tracing();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = ["site-d", "site-e"];
    let mut secure = secure_plan(1, 5, 60);
    secure.training.update_encoding = UpdateEncoding::Int8;
    // SecAgg+: each of the five masks against 2 neighbours, not all 4.
    secure.privacy.as_mut().unwrap().secure_aggregation_degree = Some(2);
    let mut plain = secure.clone();
    plain.privacy = None;
    let plain_run = train_sites(a.path(), plain.clone(), &extra).await;
    let secure_run = train_sites(b.path(), secure.clone(), &extra).await;
    let (p, s) = (
        support::model(&plain, &plain_run, 1),
        support::model(&secure, &secure_run, 1),
    );
    assert!(
        p.iter().zip(&s).all(|(x, y)| x.to_bits() == y.to_bits()),
        "the secure int8 model differs from the plain int8 one"
    );
    let entries = audit::read_unverified(&b.path().join("runs").join(audit::FILE_NAME)).unwrap();
    let done = entries
        .iter()
        .find(|e| e.kind == "round_completed")
        .unwrap();
    let record = &done.data["secure_aggregation"];
    assert_eq!(
        (record["degree"].as_u64(), record["threshold"].as_u64()),
        (Some(2), Some(2)),
        "{record}"
    );
    assert_eq!(record["survivors"].as_array().unwrap().len(), 5, "{record}");
}

/// A test-driven participant: real keys and checks (the participant crate's
/// own `secure` module) over a raw gRPC client, so a test decides when it
/// stops or what it sends instead.
struct Scripted {
    client: FederationClient<tonic::transport::Channel>,
    tasks: tonic::Streaming<pb::Task>,
    identity: Identity,
}

impl Scripted {
    async fn connect(pki: &Pki, url: &str, org: &str) -> Self {
        let tls = pki.material(org);
        let ch = sangsaeng_common::identity::channel::connect(url, &tls, "localhost")
            .await
            .unwrap();
        let mut client = FederationClient::new(ch);
        let tasks = client
            .subscribe(pb::SubscribeRequest::default())
            .await
            .unwrap()
            .into_inner();
        Scripted {
            client,
            tasks,
            identity: Identity::from_tls(&tls).unwrap(),
        }
    }

    async fn next(&mut self) -> pb::Task {
        tokio::time::timeout(Duration::from_secs(120), self.tasks.message())
            .await
            .expect("a task within two minutes")
            .unwrap()
            .expect("the task stream is open")
    }

    /// Answers the statistics task with a plausible report of one row (a
    /// task delivered twice is answered once: ALREADY_EXISTS the second time).
    async fn answer_stats(&mut self, task: &pb::Task, features: usize) {
        let answer = self
            .client
            .submit_stats(pb::StatsReport {
                training_id: task.training_id.clone(),
                count: 1,
                sum: vec![0.0; features],
                sum_sq: vec![1.0; features],
            })
            .await;
        if let Err(s) = answer {
            assert_eq!(s.code(), tonic::Code::AlreadyExists, "{s:?}");
        }
    }

    /// Waits for the round's TrainTask (answering statistics on the way) and
    /// starts its attempt with fresh keys.
    async fn join_round(&mut self, features: usize) -> (pb::Task, SecureRound) {
        loop {
            let task = self.next().await;
            match &task.kind {
                Some(pb::task::Kind::Stats(_)) => self.answer_stats(&task, features).await,
                Some(pb::task::Kind::Train(t)) => {
                    let wire = t.secure.clone().expect("a secure round");
                    let round =
                        SecureRound::begin(&self.identity, &task.training_id, task.round, wire)
                            .unwrap();
                    return (task, round);
                }
                other => panic!("unexpected task {other:?}"),
            }
        }
    }

    async fn send(&mut self, m: pb::SecureAggregationMessage) -> Result<(), tonic::Status> {
        self.client.secure_aggregation(m).await.map(|_| ())
    }

    /// Uploads a masked update of zeros (one example) for the round of `train`.
    async fn upload_zeros(
        &mut self,
        train: &pb::Task,
        attempt: &SecureRound,
    ) -> Result<pb::UploadReceipt, tonic::Status> {
        let Some(pb::task::Kind::Train(t)) = &train.kind else {
            panic!("not a TrainTask")
        };
        let info = t.model.clone().unwrap();
        let values = std::sync::Arc::new(vec![0.0f32; info.num_params as usize]);
        let (masked, digest) = attempt
            .masker()
            .chunks(values, 1, 1 << 20, DigestAlgorithm::Sha256)
            .unwrap();
        self.upload(train, &info, Some(masked), Vec::new(), digest)
            .await
    }

    /// Streams an upload for the round of `train`: masked chunks, or the given raw ones.
    async fn upload(
        &mut self,
        train: &pb::Task,
        info: &pb::ModelInfo,
        masked: Option<MaskedChunks>,
        raw: Vec<bytes::Bytes>,
        digest: String,
    ) -> Result<pb::UploadReceipt, tonic::Status> {
        let u = UpdateUpload {
            training_id: train.training_id.clone(),
            round: train.round,
            base_model_sha256: info.sha256.clone(),
            num_params: info.num_params,
            encoding: UpdateEncoding::Float32,
            chunks: raw.into(),
            delta_digest: digest,
            num_examples: 1,
            train_loss: 0.0,
            first_chunk: 0,
            dp: None,
            masked,
        };
        let stream = tokio_stream::iter(upload_messages(u).unwrap());
        self.client
            .upload_update(stream)
            .await
            .map(|r| r.into_inner())
    }

    /// Takes part in one attempt to the end, uploading zeros.
    async fn take_part(&mut self, train: &pb::Task, attempt: &mut SecureRound) {
        self.send(attempt.advert_message()).await.unwrap();
        loop {
            use pb::secure_aggregation_task::Step;
            match self.step().await.step.unwrap() {
                Step::ShareKeys(share) => {
                    let shares = attempt.share_keys(&self.identity, &share).unwrap();
                    self.send(shares).await.unwrap();
                }
                Step::MaskInput(inbox) => {
                    attempt.receive_shares(&inbox).unwrap();
                    self.upload_zeros(train, attempt).await.unwrap();
                }
                Step::Unmask(request) => {
                    let answer = attempt.unmask(&request).unwrap();
                    self.send(answer).await.unwrap();
                    return;
                }
            }
        }
    }

    /// Waits for the next secure step.
    async fn step(&mut self) -> pb::SecureAggregationTask {
        loop {
            if let Some(pb::task::Kind::Secure(s)) = self.next().await.kind {
                return s;
            }
        }
    }
}

/// Masked words of a spill file (its frames, as received).
fn spilled_words(path: &Path) -> Vec<i64> {
    let mut words = Vec::new();
    sangsaeng_coordinator::transfer::read_spill_raw(path, None, |_, data| {
        let mut w = Vec::new();
        sangsaeng_common::privacy::secagg::wire::decode_words(data, &mut w)?;
        words.extend(w);
        Ok(())
    })
    .unwrap();
    words
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_participant_lost_after_the_key_exchange_is_recovered_exactly() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let roster = support::roster(&["site-d", "site-e"]);
    let pki = support::pki(dir.path(), &roster);
    let runs = dir.path().join("runs");
    let plan = secure_plan(1, 3, 10);
    let coord = localnet::start_coordinator(&pki, roster, None, &runs, Default::default())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let (handles, records) = support::spawn_recording_sites(
        &pki,
        &coord.url,
        dir.path(),
        &["site-a", "site-b", "site-c", "site-d"],
        &stop,
    );
    // site-e advertises and shares its keys, then vanishes before uploading.
    let mut e = Scripted::connect(&pki, &coord.url, "site-e").await;
    support::start_when_connected(&pki, &coord.url, 5, &plan).await;
    let (_, mut attempt) = e.join_round(plan.schema.feature_columns.len()).await;
    e.send(attempt.advert_message()).await.unwrap();
    let pb::secure_aggregation_task::Step::ShareKeys(share) = e.step().await.step.unwrap() else {
        panic!("expected the adverts")
    };
    let shares = attempt.share_keys(&e.identity, &share).unwrap();
    e.send(shares).await.unwrap();
    let _ = e.step().await; // its inbox: it never uploads
    drop(e);

    // While the round waits for site-e, the four masked updates lie in spill
    // files: none resembles the update it hides.
    let spill_dir = wait_for_spills(&runs, 4).await;
    let mut spills: Vec<Vec<i64>> = std::fs::read_dir(&spill_dir)
        .unwrap()
        .flatten()
        .map(|f| spilled_words(&f.path()))
        .collect();
    spills.sort();

    let s = support::training_ended(&coord.url, &pki.material("ops-admin")).await;
    let t = s.training.unwrap();
    assert_eq!(t.phase, "completed", "{}", t.error);
    let run = runs.join(&t.training_id);
    let global0 = support::model(&plan, &run, 0);
    let mut acc = Accumulator::new(global0.len());
    for record in &records {
        let (delta, n) = support::recorded_delta(&plan, record);
        let mut plain = vec![0i64; delta.len()];
        weighted_fixed_point(&delta, n, &mut plain).unwrap();
        for masked in &spills {
            let same = masked.iter().zip(&plain).filter(|(a, b)| a == b).count();
            assert!(
                same * 100 < plain.len(),
                "a spill shares {same} of {} words with a plain update",
                plain.len()
            );
        }
        acc.add(&delta, n).unwrap();
    }
    let expected = acc.apply_to(&global0).unwrap();
    let got = support::model(&plan, &run, 1);
    assert!(
        expected
            .iter()
            .zip(&got)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "the round is not exactly FedAvg of the four survivors"
    );
    let entries = audit::read_unverified(&runs.join(audit::FILE_NAME)).unwrap();
    let round = entries
        .iter()
        .find(|e| e.kind == "round_completed")
        .unwrap();
    let secure = &round.data["secure_aggregation"];
    assert_eq!(secure["dropped"], serde_json::json!(["site-e"]), "{secure}");
    assert_eq!(secure["survivors"].as_array().unwrap().len(), 4, "{secure}");
    stop.cancel();
    for h in handles {
        let _ = h.await;
    }
    coord.stop().await.unwrap();
}

/// The round folder's spill directory once it holds `n` files.
async fn wait_for_spills(runs: &Path, n: usize) -> PathBuf {
    for _ in 0..600 {
        let dirs = glob_spill_dirs(runs);
        if let Some(d) = dirs
            .into_iter()
            .find(|d| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0) >= n)
        {
            // The last chunk may still be on its way to the file.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return d;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no round folder with {n} spilled updates appeared");
}

fn glob_spill_dirs(runs: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(runs)
        .into_iter()
        .flatten()
        .flatten()
        .map(|t| t.path().join("updates").join("round-0001"))
        .filter(|d| d.is_dir())
        .collect()
}

/// A federation of the three test sites plus `site-e`, a scripted participant.
async fn with_scripted(
    dir: &Path,
    plan: TrainingPlan,
) -> (
    localnet::RunningCoordinator,
    Pki,
    CancellationToken,
    Scripted,
) {
    let roster = support::roster(&["site-e"]);
    let pki = support::pki(dir, &roster);
    // The plan starts once all four are connected, so all four are in the
    // statistics phase and in round 1.
    let coord =
        localnet::start_coordinator(&pki, roster, None, &dir.join("runs"), Default::default())
            .await
            .unwrap();
    let stop = CancellationToken::new();
    let files = support::site_files(dir, 3);
    drop(support::spawn_sites(&pki, &coord.url, files, &stop));
    let e = Scripted::connect(&pki, &coord.url, "site-e").await;
    support::start_when_connected(&pki, &coord.url, 4, &plan).await;
    (coord, pki, stop, e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_few_survivors_rerun_the_round_with_the_reason() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // Four participants, threshold 3 of each one's 3 neighbours: losing any
    // one leaves the others with 2 surviving neighbours, too few to unmask.
    let mut plan = secure_plan(1, 3, 30);
    plan.privacy.as_mut().unwrap().secure_aggregation_threshold = Some(3);
    let (coord, pki, stop, mut e) = with_scripted(dir.path(), plan.clone()).await;
    let features = plan.schema.feature_columns.len();

    // Attempt 1: site-e shares its keys, then its upload is refused (a chunk
    // that is not whole words), so it is not in the sum.
    let (train, mut attempt) = e.join_round(features).await;
    e.send(attempt.advert_message()).await.unwrap();
    let pb::secure_aggregation_task::Step::ShareKeys(share) = e.step().await.step.unwrap() else {
        panic!("expected the adverts")
    };
    e.send(attempt.share_keys(&e.identity, &share).unwrap())
        .await
        .unwrap();
    let pb::secure_aggregation_task::Step::MaskInput(inbox) = e.step().await.step.unwrap() else {
        panic!("expected the inbox")
    };
    attempt.receive_shares(&inbox).unwrap();
    let Some(pb::task::Kind::Train(t)) = &train.kind else {
        panic!()
    };
    let info = t.model.clone().unwrap();
    let bad = bytes::Bytes::from(vec![0u8; 7]);
    let digest = sangsaeng_common::transfer::digest::Hasher::new(DigestAlgorithm::Sha256);
    let mut h = digest;
    h.update(&bad);
    let mut masked = attempt
        .masker()
        .chunks(
            std::sync::Arc::new(vec![0.0; 1]),
            1,
            1 << 20,
            DigestAlgorithm::Sha256,
        )
        .unwrap()
        .0;
    let raw = bad.clone();
    masked.count = 1;
    masked.chunk = std::sync::Arc::new(move |_| Some(raw.clone()));
    let refused = e
        .upload(&train, &info, Some(masked), Vec::new(), h.finalize_id())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("whole 8-byte words"),
        "{refused:?}"
    );

    // Attempt 2: the round is re-run with fresh keys, and site-e takes part.
    let first = attempt_of(&train);
    let (train, mut attempt) = e.join_round(features).await;
    assert_ne!(attempt_of(&train), first, "a re-run is a new attempt");
    e.take_part(&train, &mut attempt).await;

    let s = support::training_ended(&coord.url, &pki.material("ops-admin")).await;
    let t = s.training.unwrap();
    assert_eq!(t.phase, "completed", "{}", t.error);
    let entries = audit::read_unverified(&dir.path().join("runs").join(audit::FILE_NAME)).unwrap();
    let rerun = entries
        .iter()
        .find(|e| e.kind == "round_rerun")
        .expect("a re-run entry");
    let reason = rerun.data["reason"].as_str().unwrap();
    assert!(
        reason.contains("cannot unmask") && reason.contains("threshold is 3"),
        "{reason}"
    );
    let done = entries
        .iter()
        .find(|e| e.kind == "round_completed")
        .unwrap();
    assert_eq!(
        done.data["secure_aggregation"]["attempt"], 2,
        "{}",
        done.data
    );
    assert_eq!(
        done.data["secure_aggregation"]["survivors"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    stop.cancel();
    coord.stop().await.unwrap();
}

fn attempt_of(train: &pb::Task) -> u32 {
    match &train.kind {
        Some(pb::task::Kind::Train(t)) => t.secure.as_ref().unwrap().attempt,
        _ => panic!("not a TrainTask"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_replayed_and_misaddressed_steps_are_refused_and_the_round_goes_on() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let plan = secure_plan(1, 3, 30);
    let (coord, pki, stop, mut e) = with_scripted(dir.path(), plan.clone()).await;
    let (train, mut attempt) = e.join_round(plan.schema.feature_columns.len()).await;
    let wire = match &train.kind {
        Some(pb::task::Kind::Train(t)) => t.secure.clone().unwrap(),
        _ => unreachable!(),
    };

    // A forged signature.
    let mut forged = attempt.advert_message();
    if let Some(pb::secure_aggregation_message::Step::Advert(a)) = &mut forged.step {
        let mut sig = a.signature.to_vec();
        let last = sig.len() - 1;
        sig[last] ^= 1;
        a.signature = sig.into();
    }
    let r = e.send(forged).await.unwrap_err();
    assert_eq!(r.code(), tonic::Code::InvalidArgument, "{r:?}");
    assert!(r.message().contains("signature"), "{r:?}");

    // An advert signed for another attempt, replayed into this one.
    let other = SecureRound::begin(
        &e.identity,
        &train.training_id,
        train.round,
        pb::SecureRound {
            attempt: wire.attempt + 1,
            ..wire.clone()
        },
    )
    .unwrap();
    let mut replayed = other.advert_message();
    replayed.attempt = wire.attempt;
    let r = e.send(replayed).await.unwrap_err();
    assert_eq!(r.code(), tonic::Code::InvalidArgument, "{r:?}");

    // A step for the wrong round.
    let mut misaddressed = attempt.advert_message();
    misaddressed.round += 1;
    let r = e.send(misaddressed).await.unwrap_err();
    assert_eq!(r.code(), tonic::Code::FailedPrecondition, "{r:?}");

    // An unmasked upload into a secure round.
    let Some(pb::task::Kind::Train(t)) = &train.kind else {
        panic!()
    };
    let info = t.model.clone().unwrap();
    let plain = bytes::Bytes::from(vec![0u8; 4 * info.num_params as usize]);
    let mut h = sangsaeng_common::transfer::digest::Hasher::new(DigestAlgorithm::Sha256);
    h.update(&plain);
    let r = e
        .upload(&train, &info, None, vec![plain], h.finalize_id())
        .await
        .unwrap_err();
    assert_eq!(r.code(), tonic::Code::InvalidArgument, "{r:?}");
    assert!(r.message().contains("must be masked"), "{r:?}");

    // Then it takes part properly: the round completes with all four.
    e.take_part(&train, &mut attempt).await;
    let s = support::training_ended(&coord.url, &pki.material("ops-admin")).await;
    let t = s.training.unwrap();
    assert_eq!(t.phase, "completed", "{}", t.error);
    let entries = audit::read_unverified(&dir.path().join("runs").join(audit::FILE_NAME)).unwrap();
    let done = entries
        .iter()
        .find(|e| e.kind == "round_completed")
        .unwrap();
    assert_eq!(
        done.data["secure_aggregation"]["survivors"]
            .as_array()
            .unwrap()
            .len(),
        4,
        "{}",
        done.data
    );
    stop.cancel();
    coord.stop().await.unwrap();
}
