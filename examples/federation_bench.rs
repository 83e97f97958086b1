//! Transport and aggregation benchmark on the workload of the Flower peer harness
//! (`../shared/peers/flower/bench_app/flowerbench/common.py`), with the
//! coordinator and every participant in its own OS process, talking mutual-TLS
//! gRPC over loopback as in a deployment.
//!
//! ```text
//! cargo run --release --example federation_bench -- --params 1e6,1e7 --clients 8,32
//! ```
//!
//! Workload (as Flower's): the model is P float32 values seen as ten arrays
//! (P/10 each, the remainder in the last); participant `i` in round `r` adds one
//! seeded scalar in [-1e-3, 1e-3] to every value of array `a` and reports
//! `100 + 7i` examples; FedAvg over all K participants, 3 rounds, no evaluation.
//! Sangsaeng sends the *delta* (the scalar per value), Flower sends the arrays; on
//! the wire both are 4P bytes per update in float32.
//!
//! Differences to Flower's harness, on purpose: the model's P is the nearest an
//! MLP (100 features, two equal hidden layers, 2 classes) gets to the asked P
//! (within 0.2 %; the exact P is reported), its initial values are Sangsaeng's own
//! seeded init rather than numpy's, and the scalars come from ChaCha8 rather than
//! numpy's PCG64. Neither changes the amount of work.
//!
//! Each point reports: median seconds per round (the coordinator's own
//! `round_secs`: from opening the round to the new model committed and
//! published), the coordinator's and the largest participant's peak RSS (VmHWM,
//! read by each process just before it exits), payload bytes per update,
//! loopback bytes per round, aggregation throughput (bytes of decoded updates
//! folded per CPU-second of folding, from the coordinator's `fold_secs` (thread
//! CPU time, so preemption by the participants on the same cores is not counted), plus the
//! final apply) beside the memory bandwidth measured in the same run, and the
//! largest error of the final model against `init + Σ_r Σ_i w_i d_{i,r}`
//! computed here in f64 from the workload definition alone.
//!
//! The participants here are the benchmark's own: they stream the download
//! (checking every chunk's CRC-32C and the whole digest, BLAKE3 or SHA-256, as the daemon does)
//! and generate the upload chunk by chunk, so a participant holds one chunk, not
//! the model. The real participant daemon (`sangsaeng-participant`) trains a
//! burn model and holds it in memory.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio_util::sync::CancellationToken;

use sangsaeng::localnet;
use sangsaeng_common::aggregation::robust;
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::roster::Roster;
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::transfer::digest::{self, DigestAlgorithm};
use sangsaeng_common::transfer::encoding::{self, UpdateEncoding};
use sangsaeng_common::transfer::weights;
use sangsaeng_participant::secure::{Identity, SecureRound};
use sangsaeng_proto::v1 as pb;
use sangsaeng_proto::v1::federation_client::FederationClient;

const N_ARRAYS: usize = 10;
const N_FEATURES: usize = 100;
const ROUNDS: u32 = 3;
const SEED: u64 = 7;
/// Payload chunk size, the coordinator's default `limits.max_chunk_bytes`.
const CHUNK_BYTES: usize = 1 << 20;

#[derive(Parser)]
#[command(about = "Sangsaeng transport/aggregation benchmark on the Flower harness workload")]
struct Args {
    #[command(subcommand)]
    role: Option<Role>,
    /// Model sizes to run, comma-separated (1e6 style accepted).
    #[arg(long, default_value = "1e6", value_delimiter = ',')]
    params: Vec<String>,
    /// Participant counts to run, comma-separated.
    #[arg(long, default_value = "8", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Update encoding: float32, float16 or int8.
    #[arg(long, default_value = "float32")]
    encoding: String,
    /// Whole-object digest the participants use: `blake3` (as the daemon does with
    /// a coordinator that announces it) or `sha256` (as participants that predate
    /// BLAKE3 do; the coordinator takes both).
    #[arg(long, default_value = "blake3", value_parser = ["blake3", "sha256"])]
    digest: String,
    /// fsync each accepted update before acknowledging it (the coordinator's default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    durable_updates: bool,
    /// The coordinator's `limits.max_concurrent_uploads` (each upload in flight
    /// has a spill file of up to one update on disk).
    #[arg(long, default_value_t = 4)]
    max_concurrent_uploads: usize,
    /// The coordinator's `limits.max_concurrent_downloads`.
    #[arg(long, default_value_t = 4)]
    max_concurrent_downloads: usize,
    /// Working folder (one sub-folder per point, deleted after it).
    #[arg(long, default_value = "target/federation-bench")]
    work: PathBuf,
    /// Seconds a point may take before it is abandoned.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Run every round with secure aggregation (`[privacy] secure_aggregation`):
    /// the participants advertise keys, share them, upload masked words and
    /// answer the unmasking request, as the daemon does.
    #[arg(long)]
    secure: bool,
    /// With `--secure`: the SecAgg+ neighbour degree (`secure_aggregation_degree`;
    /// absent: every participant is every other's neighbour).
    #[arg(long, requires = "secure")]
    secure_degree: Option<u32>,
    /// The coordinator's robust rule (`[aggregation] robust`): none,
    /// norm-bound (with a bound no update reaches, so the result is still
    /// FedAvg's and the cost is the streaming norm check), trimmed-mean
    /// (trim_fraction 0.2), median or multi-krum (krum_byzantine 1).
    #[arg(long, default_value = "none", conflicts_with = "secure",
          value_parser = ["none", "norm-bound", "trimmed-mean", "median", "multi-krum"])]
    robust: String,
}

#[derive(Subcommand)]
enum Role {
    /// (internal) run the coordinator of one point
    #[command(hide = true)]
    Coordinator { dir: PathBuf },
    /// (internal) run participant `index` of one point
    #[command(hide = true)]
    Participant {
        dir: PathBuf,
        url: String,
        index: usize,
        /// Hash downloads and uploads with SHA-256 even where BLAKE3 is announced.
        #[arg(long)]
        sha256: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.role {
        Some(Role::Coordinator { ref dir }) => coordinator_process(dir),
        Some(Role::Participant {
            ref dir,
            ref url,
            index,
            sha256,
        }) => participant_process(dir, url, index, sha256),
        None => driver(&args),
    }
}

fn parse_count(s: &str) -> anyhow::Result<usize> {
    let v: f64 = s
        .trim()
        .parse()
        .with_context(|| format!("not a number: {s}"))?;
    if !(1.0..=4e9).contains(&v) {
        bail!("{s} is outside 1..=4e9");
    }
    Ok(v.round() as usize)
}

/// Two equal hidden layers whose MLP has the nearest parameter count to `p`.
fn shape_for(p: usize) -> Vec<usize> {
    // P = F*H + H + H*H + H + 2*H + 2 = H^2 + (F + 4) H + 2
    let b = (N_FEATURES + 4) as f64;
    let h = ((-b + (b * b + 4.0 * p as f64).sqrt()) / 2.0)
        .round()
        .max(1.0) as usize;
    vec![h, h]
}

fn plan_toml(
    p: usize,
    k: usize,
    encoding: &str,
    secure: Option<Option<u32>>,
    robust: &str,
) -> String {
    let cols: Vec<String> = (0..N_FEATURES).map(|i| format!("\"f{i}\"")).collect();
    let hidden = shape_for(p);
    format!(
        "[schema]\nfeature_columns = [{}]\nlabel_column = \"y\"\nclasses = [\"ok\", \"fault\"]\n\n\
         [model]\nhidden_layers = [{}, {}]\n\n\
         [training]\nrounds = {ROUNDS}\nlearning_rate = 0.01\nmin_participants = {k}\n\
         round_deadline_secs = 3600\nseed = {SEED}\nupdate_encoding = \"{encoding}\"\nevaluate = false\n{}{}",
        cols.join(", "),
        hidden[0],
        hidden[1],
        match secure {
            None => String::new(),
            Some(None) => "\n[privacy]\nsecure_aggregation = true\n".into(),
            Some(Some(d)) =>
                format!("\n[privacy]\nsecure_aggregation = true\nsecure_aggregation_degree = {d}\n"),
        },
        robust_section(robust),
    )
}

/// The plan's `[aggregation]` for `--robust` (nothing for "none").
fn robust_section(robust: &str) -> String {
    let extra = match robust {
        "none" => return String::new(),
        // Far above any workload delta's norm (at most 1e-3 × sqrt(P)).
        "norm-bound" => "max_update_norm = 1e6\n",
        "trimmed-mean" => "trim_fraction = 0.2\n",
        "multi-krum" => "krum_byzantine = 1\n",
        _ => "",
    };
    format!("\n[aggregation]\nrobust = \"{robust}\"\n{extra}")
}

/// Round `r`'s aggregate step per array, from the workload alone: each
/// participant's delta is one value per array, so every rule reduces to that
/// rule over K scalars (Multi-Krum's distances to array-length-weighted sums).
fn expected_step(k: usize, r: u32, robust: &str, p: usize) -> anyhow::Result<[f64; N_ARRAYS]> {
    let deltas: Vec<[f32; N_ARRAYS]> = (0..k).map(|i| client_deltas(i, r)).collect();
    let weighted_mean = |kept: &[usize]| -> [f64; N_ARRAYS] {
        let total: f64 = kept.iter().map(|&i| num_examples(i) as f64).sum();
        std::array::from_fn(|a| {
            kept.iter()
                .map(|&i| num_examples(i) as f64 / total * deltas[i][a] as f64)
                .sum()
        })
    };
    let sorted = |a: usize| {
        let mut v: Vec<f64> = deltas.iter().map(|d| d[a] as f64).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    Ok(match robust {
        "median" => std::array::from_fn(|a| {
            let v = sorted(a);
            match k % 2 {
                1 => v[k / 2],
                _ => (v[k / 2 - 1] + v[k / 2]) / 2.0,
            }
        }),
        "trimmed-mean" => {
            let t = robust::trimmed(k, 0.2);
            std::array::from_fn(|a| {
                let v = sorted(a);
                v[t..k - t].iter().sum::<f64>() / (k - 2 * t) as f64
            })
        }
        "multi-krum" => {
            let len: Vec<f64> = (0..N_ARRAYS)
                .map(|a| (array_end(a, p) - if a == 0 { 0 } else { array_end(a - 1, p) }) as f64)
                .collect();
            let mut dist = vec![0f64; k * k];
            for x in 0..k {
                for y in 0..k {
                    dist[x * k + y] = (0..N_ARRAYS)
                        .map(|a| len[a] * (deltas[x][a] as f64 - deltas[y][a] as f64).powi(2))
                        .sum();
                }
            }
            weighted_mean(&robust::multi_krum_keep(&dist, k, 1)?)
        }
        _ => weighted_mean(&(0..k).collect::<Vec<_>>()),
    })
}

fn org(i: usize) -> String {
    format!("supplier-{i:04}")
}

/// The scalar participant `i` adds to array `a` in round `r`.
fn client_deltas(i: usize, r: u32) -> [f32; N_ARRAYS] {
    let mut rng = ChaCha8Rng::seed_from_u64(((i as u64) << 32) | r as u64);
    std::array::from_fn(|_| rng.random_range(-1e-3f32..1e-3))
}

fn num_examples(i: usize) -> u64 {
    100 + 7 * i as u64
}

/// Which of the ten arrays value `j` of a `p`-value model belongs to.
fn array_of(j: usize, p: usize) -> usize {
    // A model of fewer than ten values is all in the last array, as in Flower's harness.
    j.checked_div(p / N_ARRAYS)
        .map_or(N_ARRAYS - 1, |a| a.min(N_ARRAYS - 1))
}

/// One past the last value of array `a` of a `p`-value model.
fn array_end(a: usize, p: usize) -> usize {
    if a == N_ARRAYS - 1 {
        p
    } else {
        (a + 1) * (p / N_ARRAYS)
    }
}

/// Peak resident set (VmHWM) of this process, KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) this process used, from /proc/self/stat (ticks of 1/100 s).
fn cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

fn loopback_tx_bytes() -> u64 {
    std::fs::read_to_string("/proc/net/dev")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.trim_start().starts_with("lo:"))
                .and_then(|l| l.split(':').nth(1)?.split_whitespace().nth(8)?.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------- coordinator

fn coordinator_process(dir: &Path) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // As `sangsaeng-coordinator` does (see its `main`).
    sangsaeng_common::process::single_malloc_arena();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let config = sangsaeng_coordinator::config::CoordinatorConfig::build(
            Some(&dir.join("coordinator.toml")),
            Default::default(),
        )?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("LISTEN {}", listener.local_addr()?.port());
        std::io::stdout().flush()?;
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(sangsaeng_coordinator::run(
            listener,
            config,
            shutdown.clone(),
        ));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        term.recv().await;
        shutdown.cancel();
        server.await??;
        anyhow::Ok(())
    })?;
    println!("PEAK_RSS_KIB {}", peak_rss_kib());
    println!("CPU_MS {}", (cpu_secs() * 1000.0) as u64);
    Ok(())
}

// ---------------------------------------------------------------- participant

fn participant_process(dir: &Path, url: &str, index: usize, sha256: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sent = rt.block_on(participate(dir, url, index, sha256))?;
    println!("SENT_BYTES {sent}");
    println!("PEAK_RSS_KIB {}", peak_rss_kib());
    println!("CPU_MS {}", (cpu_secs() * 1000.0) as u64);
    Ok(())
}

/// Follows tasks until the training finishes; returns the payload bytes uploaded.
async fn participate(dir: &Path, url: &str, index: usize, sha256: bool) -> anyhow::Result<u64> {
    let pki = dir.join("pki");
    let tls = sangsaeng_common::identity::tls::TlsFiles {
        ca: pki.join("ca.pem"),
        cert: pki.join(format!("{}.pem", org(index))),
        key: pki.join(format!("{}.key", org(index))),
    }
    .load()?;
    let channel = sangsaeng_common::identity::channel::connect(url, &tls, "localhost").await?;
    let max = CHUNK_BYTES + (64 << 10);
    let mut client = FederationClient::new(channel)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let mut tasks = client
        .subscribe(pb::SubscribeRequest {
            software_version: "federation_bench".into(),
        })
        .await?
        .into_inner();
    let mut sent = 0u64;
    // A task may come twice (sent when the phase opens and again when this
    // participant's subscription is registered); each is done once.
    let mut stats_sent = false;
    let mut uploaded = 0u32;
    let identity = sangsaeng_participant::secure::Identity::from_tls(&tls)?;
    let mut secure: Option<(SecureState, pb::ModelInfo)> = None;
    while let Some(task) = tasks.message().await? {
        match task.kind {
            Some(pb::task::Kind::Stats(_)) if stats_sent => {}
            Some(pb::task::Kind::Train(_)) if task.round <= uploaded => {}
            Some(pb::task::Kind::Stats(s)) => {
                stats_sent = true;
                let n = s.plan.map(|p| p.feature_columns.len()).unwrap_or(0);
                // The rows declared here are the weight every update must claim.
                let rows = num_examples(index);
                client
                    .submit_stats(pb::StatsReport {
                        training_id: task.training_id,
                        count: rows,
                        sum: vec![0.0; n],
                        sum_sq: vec![rows as f64; n],
                    })
                    .await?;
            }
            Some(pb::task::Kind::Train(t)) if t.secure.is_some() => {
                let info = t.model.clone().context("train task without a model")?;
                stream_download(&mut client, &task.training_id, &info, sha256).await?;
                let round = task.round;
                let attempt = t.secure.clone().expect("matched");
                let state = SecureState::begin(&identity, &task.training_id, round, attempt, &t)?;
                client
                    .secure_aggregation(state.round.advert_message())
                    .await?;
                secure = Some((state, info));
            }
            Some(pb::task::Kind::Secure(step)) => {
                let (state, info) = secure.as_mut().context("a secure step before its round")?;
                // As the daemon does: a step that fails (say, one delivered
                // twice) is logged and the site stays in the training.
                match state
                    .step(
                        &mut client,
                        &identity,
                        &task.training_id,
                        task.round,
                        info,
                        step,
                        sha256,
                    )
                    .await
                {
                    Ok(Some(n)) => {
                        sent += n;
                        uploaded = task.round;
                    }
                    Ok(None) => {}
                    Err(e) => eprintln!("{}: round {}: {e:#}", org(index), task.round),
                }
            }
            Some(pb::task::Kind::Train(t)) => {
                let plan = t.plan.context("train task without a plan")?;
                let info = t.model.context("train task without a model")?;
                let enc = UpdateEncoding::from_name(&plan.update_encoding)?;
                stream_download(&mut client, &task.training_id, &info, sha256).await?;
                sent += stream_upload(
                    &mut client,
                    &task.training_id,
                    task.round,
                    &info,
                    enc,
                    index,
                    sha256,
                )
                .await?;
                uploaded = task.round;
            }
            Some(pb::task::Kind::Finished(_)) => break,
            _ => {}
        }
    }
    Ok(sent)
}

/// One secure round at a benchmark participant: the daemon's protocol steps
/// (`sangsaeng_participant::secure`) around the workload's delta, which is held
/// whole (as the daemon holds its trained update) and masked chunk by chunk as
/// it is sent.
struct SecureState {
    round: SecureRound,
    values: Arc<Vec<f32>>,
    weight: u64,
    encoding: UpdateEncoding,
}

impl SecureState {
    fn begin(
        identity: &Identity,
        training_id: &str,
        round: u32,
        wire: pb::SecureRound,
        task: &pb::TrainTask,
    ) -> anyhow::Result<Self> {
        let plan = task.plan.as_ref().context("train task without a plan")?;
        let info = task.model.as_ref().context("train task without a model")?;
        let encoding = UpdateEncoding::from_name(&plan.update_encoding)?;
        let index = identity.org_id[org(0).len() - 4..].parse::<usize>()?;
        let p = info.num_params as usize;
        let d = client_deltas(index, round);
        let mut values: Vec<f32> = (0..p).map(|j| d[array_of(j, p)]).collect();
        if encoding != UpdateEncoding::Float32 {
            // Masking works on the values as the coordinator would decode them.
            let mut decoded = Vec::with_capacity(p);
            for c in encoding::encode_chunks(&values, encoding, CHUNK_BYTES)? {
                decoded.extend(encoding::decode_chunk(&c, encoding)?);
            }
            values = decoded;
        }
        Ok(SecureState {
            round: SecureRound::begin(identity, training_id, round, wire)?,
            values: Arc::new(values),
            weight: num_examples(index),
            encoding,
        })
    }

    /// Answers one step; returns the payload bytes uploaded, if it was the upload.
    #[allow(clippy::too_many_arguments)]
    async fn step(
        &mut self,
        client: &mut FederationClient<tonic::transport::Channel>,
        identity: &Identity,
        training_id: &str,
        round: u32,
        info: &pb::ModelInfo,
        task: pb::SecureAggregationTask,
        sha256: bool,
    ) -> anyhow::Result<Option<u64>> {
        use pb::secure_aggregation_task::Step;
        let reply = match task.step.context("a secure task without a step")? {
            Step::ShareKeys(s) => self.round.share_keys(identity, &s)?,
            Step::Unmask(s) => self.round.unmask(&s)?,
            Step::MaskInput(s) => {
                self.round.receive_shares(&s)?;
                return self
                    .upload_masked(client, training_id, round, info, sha256)
                    .await
                    .map(Some);
            }
        };
        client.secure_aggregation(reply).await?;
        Ok(None)
    }

    async fn upload_masked(
        &self,
        client: &mut FederationClient<tonic::transport::Channel>,
        training_id: &str,
        round: u32,
        info: &pb::ModelInfo,
        sha256: bool,
    ) -> anyhow::Result<u64> {
        let algorithm = digest_algorithm(info, sha256);
        let masker = self.round.masker();
        let (values, weight) = (self.values.clone(), self.weight);
        let (masked, digest) = tokio::task::spawn_blocking(move || {
            masker.chunks(values, weight, CHUNK_BYTES, algorithm)
        })
        .await??;
        let bytes =
            (self.values.len() * sangsaeng_common::privacy::secagg::wire::WORD_BYTES) as u64;
        client
            .upload_progress(pb::UploadProgressRequest {
                training_id: training_id.into(),
                round,
                delta_sha256: digest.clone(),
                reserve_slot: true,
            })
            .await
            .with_context(|| format!("upload slot for round {round}"))?;
        let upload = sangsaeng_common::transfer::wire::UpdateUpload {
            training_id: training_id.into(),
            round,
            base_model_sha256: info.sha256.clone(),
            num_params: info.num_params,
            encoding: self.encoding,
            chunks: Arc::from(Vec::new()),
            delta_digest: digest,
            num_examples: weight,
            train_loss: 0.0,
            first_chunk: 0,
            dp: None,
            masked: Some(masked),
        };
        sangsaeng_participant::session::upload(client, upload)
            .await
            .with_context(|| format!("masked upload of round {round}"))?;
        Ok(bytes)
    }
}

/// Downloads the model, checking each chunk and the whole digest, keeping nothing.
async fn stream_download(
    client: &mut FederationClient<tonic::transport::Channel>,
    training_id: &str,
    info: &pb::ModelInfo,
    sha256: bool,
) -> anyhow::Result<()> {
    let mut stream = client
        .download_model(pb::DownloadRequest {
            training_id: training_id.into(),
            model_round: info.round,
            start_chunk: 0,
            control_variate: false,
        })
        .await?
        .into_inner();
    let algorithm = digest_algorithm(info, sha256);
    let expected = match algorithm {
        DigestAlgorithm::Blake3 => info.blake3.clone(),
        DigestAlgorithm::Sha256 => hex::decode(&info.sha256)?,
    };
    let mut whole = digest::Hasher::new(algorithm);
    let mut bytes = 0u64;
    while let Some(c) = stream.message().await? {
        // As the daemon does: the CRC per chunk, one hash over the whole.
        if Some(crc32c::crc32c(&c.data)) != c.crc32c {
            bail!("model chunk {} checksum mismatch", c.index);
        }
        whole.update(&c.data);
        bytes += c.data.len() as u64;
    }
    if bytes != info.num_params * 4 || whole.finalize()[..] != expected[..] {
        bail!("downloaded model does not match its digest");
    }
    Ok(())
}

/// The daemon's choice: BLAKE3 where the coordinator announces it, unless told
/// to use SHA-256 as participants that predate BLAKE3 do.
fn digest_algorithm(info: &pb::ModelInfo, sha256: bool) -> DigestAlgorithm {
    if sha256 {
        DigestAlgorithm::Sha256
    } else {
        DigestAlgorithm::announced_by(info)
    }
}

/// Generates and streams this participant's delta chunk by chunk.
async fn stream_upload(
    client: &mut FederationClient<tonic::transport::Channel>,
    training_id: &str,
    round: u32,
    info: &pb::ModelInfo,
    enc: UpdateEncoding,
    index: usize,
    sha256: bool,
) -> anyhow::Result<u64> {
    use pb::update_message::Part;
    let p = info.num_params as usize;
    let d = client_deltas(index, round);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UpdateMessage>(4);
    let algorithm = digest_algorithm(info, sha256);
    let header = pb::UpdateHeader {
        training_id: training_id.into(),
        round,
        base_model_digest: hex::decode(&info.sha256)?,
        num_params: p as u64,
        num_examples: num_examples(index),
        train_loss: 0.0,
        first_chunk: 0,
        encoding: enc.name().into(),
        delta_digest_algorithm: algorithm.to_wire() as i32,
        ..Default::default()
    };
    // The admission step the daemon takes too: wait for an upload slot before streaming.
    client
        .upload_progress(pb::UploadProgressRequest {
            training_id: training_id.into(),
            round,
            delta_sha256: String::new(),
            reserve_slot: true,
        })
        .await
        .with_context(|| format!("upload slot for round {round}"))?;
    let producer = tokio::spawn(async move {
        let msg = |part| pb::UpdateMessage { part: Some(part) };
        tx.send(msg(Part::Header(header))).await.ok();
        let per = enc.values_per_chunk(CHUNK_BYTES);
        let mut whole = digest::Hasher::new(algorithm);
        let mut block = Vec::with_capacity(per);
        let mut sent = 0u64;
        for (index, start) in (0..p).step_by(per).enumerate() {
            let end = (start + per).min(p);
            block.clear();
            // Array by array (each is one run of a single offset), as numpy's
            // `arr + offset` does in Flower's client: the workload's own cost
            // should not weigh on the transport being measured.
            let mut j = start;
            while j < end {
                let a = array_of(j, p);
                let stop = array_end(a, p).min(end);
                block.resize(block.len() + (stop - j), d[a]);
                j = stop;
            }
            for data in encoding::encode_chunks(&block, enc, CHUNK_BYTES).expect("finite values") {
                whole.update(&data);
                sent += data.len() as u64;
                let chunk = pb::UpdateChunk {
                    index: index as u32,
                    crc32c: Some(crc32c::crc32c(&data)),
                    data: data.into(),
                    ..Default::default()
                };
                if tx.send(msg(Part::Chunk(chunk))).await.is_err() {
                    return sent;
                }
            }
        }
        let trailer = pb::UpdateTrailer {
            digest: whole.finalize().to_vec(),
            ..Default::default()
        };
        tx.send(msg(Part::Trailer(trailer))).await.ok();
        sent
    });
    client
        .upload_update(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .with_context(|| format!("upload of round {round}"))?;
    Ok(producer.await?)
}

// ---------------------------------------------------------------- driver

struct Point {
    p: usize,
    k: usize,
}

fn spawn_self(args: &[String]) -> anyhow::Result<Child> {
    Ok(Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?)
}

/// Reads `KEY value` lines of a finished child's stdout.
fn read_kv(child: &mut Child) -> Vec<(String, String)> {
    let mut out = vec![];
    if let Some(so) = child.stdout.take() {
        for line in BufReader::new(so).lines().map_while(Result::ok) {
            if let Some((k, v)) = line.split_once(' ') {
                out.push((k.to_string(), v.to_string()));
            }
        }
    }
    out
}

fn value(kv: &[(String, String)], key: &str) -> u64 {
    kv.iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn driver(args: &Args) -> anyhow::Result<()> {
    UpdateEncoding::from_name(&args.encoding)?;
    let mut points = vec![];
    for p in &args.params {
        for &k in &args.clients {
            points.push(Point {
                p: parse_count(p)?,
                k,
            });
        }
    }
    std::fs::create_dir_all(&args.work)?;
    let results = args.work.join("results.jsonl");
    println!(
        "| P (asked) | P (model) | K | encoding | s/round (median of {ROUNDS}) | rounds (s) | coordinator peak RSS MiB | participant peak RSS MiB (max) | payload B/update | loopback B/round | fold GB/s (decoded f32) | memory read GB/s | max abs error | status |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for pt in points {
        let row = match run_point(args, &pt) {
            Ok(r) => r,
            Err(e) => serde_json::json!({
                "params_asked": pt.p, "clients": pt.k, "encoding": args.encoding,
                "status": format!("failed: {e:#}"),
            }),
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&results)?;
        writeln!(f, "{row}")?;
        print_row(&row);
    }
    eprintln!("results appended to {}", results.display());
    Ok(())
}

fn print_row(r: &serde_json::Value) {
    let g = |k: &str| r.get(k).cloned().unwrap_or(serde_json::Value::Null);
    let mib = |k: &str| {
        g(k).as_u64()
            .map(|v| format!("{:.0}", v as f64 / 1024.0))
            .unwrap_or("-".into())
    };
    let f = |k: &str, d: usize| {
        g(k).as_f64()
            .map(|v| format!("{v:.d$}"))
            .unwrap_or("-".into())
    };
    let rounds = g("round_secs")
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_f64())
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or("-".into());
    println!(
        "| {:.0e} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        g("params_asked").as_f64().unwrap_or(0.0),
        g("params"),
        g("clients"),
        match (g("secure").as_bool(), g("secure_degree").as_u64()) {
            (Some(true), Some(d)) => format!(
                "{}, secure (degree {d})",
                g("encoding").as_str().unwrap_or("-")
            ),
            (Some(true), None) => format!("{}, secure", g("encoding").as_str().unwrap_or("-")),
            _ => match g("robust").as_str() {
                Some(rule) if rule != "none" => {
                    format!("{}, {rule}", g("encoding").as_str().unwrap_or("-"))
                }
                _ => g("encoding").as_str().unwrap_or("-").to_string(),
            },
        },
        f("median_round_secs", 3),
        rounds,
        mib("coordinator_peak_rss_kib"),
        mib("participant_peak_rss_kib"),
        g("payload_bytes_per_update"),
        g("loopback_bytes_per_round"),
        f("fold_gb_per_s", 2),
        f("memory_read_gb_per_s", 1),
        g("max_abs_error")
            .as_f64()
            .map(|v| format!("{v:.1e}"))
            .unwrap_or("-".into()),
        g("status").as_str().unwrap_or("-"),
    );
}

fn run_point(args: &Args, pt: &Point) -> anyhow::Result<serde_json::Value> {
    let bandwidth = sangsaeng::membw::read_bandwidth_gbs();
    let dir = args.work.join(format!(
        "P{}-K{}{}-{}",
        pt.p,
        pt.k,
        if args.secure { "-secure" } else { "" },
        args.robust
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let plan_text = plan_toml(
        pt.p,
        pt.k,
        &args.encoding,
        args.secure.then_some(args.secure_degree),
        &args.robust,
    );
    let plan = TrainingPlan::from_toml(&plan_text, "benchmark plan")?;
    let spec = ModelSpec::from_plan(&plan);
    let p = spec.num_params();
    std::fs::write(dir.join("plan.toml"), &plan_text)?;
    let mut roster = String::new();
    for i in 0..pt.k {
        roster.push_str(&format!(
            "[[organisation]]\nid = \"{}\"\nname = \"Supplier {i}\"\ntier = \"tier-1\"\nrole = \"participant\"\n\n",
            org(i)
        ));
    }
    let roster = Roster::from_toml(&roster, "benchmark roster")?;
    std::fs::write(dir.join("roster.toml"), roster.to_toml())?;
    localnet::write_pki(&dir.join("pki"), &roster)?;
    std::fs::write(
        dir.join("coordinator.toml"),
        format!(
            "roster = \"roster.toml\"\nplan = \"plan.toml\"\noutput_dir = \"runs\"\ndurable_updates = {}\n\
             [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/server.pem\"\nkey = \"pki/server.key\"\n\
             [limits]\nmax_model_params = {}\nmax_connections = {}\ntransfer_idle_secs = 600\n\
             max_concurrent_uploads = {}\nmax_concurrent_downloads = {}\n",
            args.durable_updates,
            p.max(1),
            pt.k + 64,
            args.max_concurrent_uploads,
            args.max_concurrent_downloads
        ),
    )?;

    let dir_s = dir.display().to_string();
    let mut coord = spawn_self(&["coordinator".into(), dir_s.clone()])?;
    let mut first = String::new();
    BufReader::new(coord.stdout.as_mut().context("coordinator stdout")?).read_line(&mut first)?;
    let port: u16 = first
        .strip_prefix("LISTEN ")
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("coordinator did not start: {first:?}"))?;
    let url = format!("https://127.0.0.1:{port}");
    let lo_before = loopback_tx_bytes();
    let started = Instant::now();
    let mut parts = vec![];
    for i in 0..pt.k {
        parts.push(spawn_self(
            &[
                "participant".into(),
                dir_s.clone(),
                url.clone(),
                i.to_string(),
            ]
            .into_iter()
            .chain((args.digest == "sha256").then(|| "--sha256".to_string()))
            .collect::<Vec<_>>(),
        )?);
    }
    let deadline = started + Duration::from_secs(args.timeout);
    let mut peaks = vec![];
    let mut sent = vec![];
    let mut participant_cpu_ms = 0u64;
    let mut failed = None;
    // Every participant is watched at once: the plan needs all K updates, so one
    // that exits with an error (say, its upload was refused because the disk is
    // full) means the round can never complete, and the point stops there instead
    // of waiting out the timeout.
    let mut running: Vec<usize> = (0..parts.len()).collect();
    while !running.is_empty() {
        let mut still = Vec::with_capacity(running.len());
        for i in running {
            let c = &mut parts[i];
            let Some(st) = c.try_wait()? else {
                still.push(i);
                continue;
            };
            let kv = read_kv(c);
            if !st.success() {
                failed.get_or_insert(format!("participant {i} exited with {st}"));
            }
            peaks.push(value(&kv, "PEAK_RSS_KIB"));
            sent.push(value(&kv, "SENT_BYTES"));
            participant_cpu_ms += value(&kv, "CPU_MS");
        }
        running = still;
        if !running.is_empty() && Instant::now() > deadline {
            failed.get_or_insert(format!("timed out after {}s", args.timeout));
        }
        if failed.is_some() {
            for &i in &running {
                let _ = parts[i].kill();
                let _ = parts[i].wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let lo_bytes = loopback_tx_bytes().saturating_sub(lo_before);
    // SIGTERM, the coordinator's graceful shutdown, through the standard tool.
    Command::new("kill")
        .args(["-TERM", &coord.id().to_string()])
        .status()?;
    let status = coord.wait()?;
    let ckv = read_kv(&mut coord);
    if !status.success() {
        failed.get_or_insert(format!("the coordinator exited with {status}"));
    }
    let coordinator_peak = value(&ckv, "PEAK_RSS_KIB");
    let coordinator_cpu_ms = value(&ckv, "CPU_MS");

    // The coordinator's own round records.
    let runs = dir.join("runs");
    let tdir = std::fs::read_dir(&runs)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join("metrics.jsonl").exists())
        .with_context(|| match &failed {
            // The reason the run stopped, rather than its consequence.
            Some(f) => format!("{f}, before any round completed"),
            None => "no training output".to_string(),
        })?;
    let mut round_secs = vec![];
    let mut fold_secs = 0.0;
    let mut agg_secs = 0.0;
    for line in std::fs::read_to_string(tdir.join("metrics.jsonl"))?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let t = &v["timings"];
        round_secs.push(t["round_secs"].as_f64().unwrap_or(f64::NAN));
        fold_secs += t["fold_secs"].as_f64().unwrap_or(0.0);
        agg_secs += t["aggregate_secs"].as_f64().unwrap_or(0.0);
    }
    let mut sorted = round_secs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied();

    // Independent check: init + sum_r sum_i w_i d_{i,r}, in f64, from the workload alone.
    let global = match weights::load_safetensors(&tdir.join("global.safetensors"), &spec.layout()) {
        Ok(g) => g,
        Err(_) if failed.is_some() => anyhow::bail!(
            "{}, after {} of {ROUNDS} rounds",
            failed.unwrap_or_default(),
            round_secs.len()
        ),
        Err(e) => return Err(e.into()),
    };
    let init = spec.init_params(SEED);
    let mut offset = [0f64; N_ARRAYS];
    for r in 1..=ROUNDS {
        let step = expected_step(pt.k, r, &args.robust, p)?;
        for a in 0..N_ARRAYS {
            offset[a] += step[a];
        }
    }
    let enc = UpdateEncoding::from_name(&args.encoding)?;
    let max_err = global
        .iter()
        .zip(&init)
        .enumerate()
        .map(|(j, (&g, &x))| (g as f64 - (x as f64 + offset[array_of(j, p)])).abs())
        .fold(0.0, f64::max);
    // Float32 must match to 1e-5 (Flower's criterion); lossy encodings are reported, not judged.
    let correct =
        round_secs.len() == ROUNDS as usize && (enc != UpdateEncoding::Float32 || max_err <= 1e-5);
    let status = match failed {
        Some(f) => format!("failed: {f}"),
        None if correct => "ok".into(),
        None => "wrong result".into(),
    };
    let folded_bytes = (pt.k as f64) * (p as f64) * 4.0 * ROUNDS as f64;
    let row = serde_json::json!({
        "params_asked": pt.p,
        "params": p,
        "clients": pt.k,
        "encoding": args.encoding,
        "secure": args.secure,
        "secure_degree": args.secure_degree,
        "robust": args.robust,
        "digest": args.digest,
        "durable_updates": args.durable_updates,
        "max_concurrent_uploads": args.max_concurrent_uploads,
        "max_concurrent_downloads": args.max_concurrent_downloads,
        "round_secs": round_secs,
        "median_round_secs": median,
        "coordinator_peak_rss_kib": coordinator_peak,
        "participant_peak_rss_kib": peaks.iter().max(),
        "payload_bytes_per_update": sent.iter().max().map(|s| s / ROUNDS as u64),
        "loopback_bytes_per_round": lo_bytes / ROUNDS as u64,
        "coordinator_cpu_secs": coordinator_cpu_ms as f64 / 1000.0,
        "participants_cpu_secs": participant_cpu_ms as f64 / 1000.0,
        "fold_secs": fold_secs,
        "aggregate_secs": agg_secs,
        "fold_gb_per_s": folded_bytes / (fold_secs + agg_secs) / 1e9,
        "memory_read_gb_per_s": bandwidth,
        "max_abs_error": max_err,
        "model_bytes": p * 4,
        "status": status,
    });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(row)
}
