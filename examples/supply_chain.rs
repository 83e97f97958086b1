//! A whole supply chain on localhost: the coordinator plus four participants (an
//! anchor plant and three suppliers of different sizes) train a fault classifier
//! on Tennessee Eastman process data, split non-IID, over real mutual TLS.
//!
//! Each firm has seen normal operation plus a different subset of fault types,
//! and its sensors carry a per-firm gain and offset (different instruments).
//! At the end it compares, on one common test set, the federated model with each
//! firm's local-only model and with centralized training on the pooled data.
//! A second federation trains the same plan with record-level differential
//! privacy (DP-SGD at each firm, `--dp-epsilon`) and prints the ε it spent.
//! Then the anchor's administrator applies a policy that requires differential
//! privacy (the plain model is refused by that rule, the DP model passes it) and
//! releases the plain model under the opening rules of
//! `examples/release-policy.toml` into an OCI layout folder, then verifies it.
//!
//! Run: `cargo run --release --example supply_chain` (options: `--help`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use sangsaeng::localnet;
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::learning::data::{self, Dataset};
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::learning::train;
use sangsaeng_common::transfer::weights;

#[path = "shared/supply_chain.rs"]
mod chain;
use chain::{
    CLASSES, FIRMS, Firm, data_dir, evaluate_training, present, rounds_to_reach, split_firms,
    train_alone, validation_curve,
};

#[derive(Parser)]
#[command(
    about = "Run a four-firm federation on Tennessee Eastman data and compare it with local-only and centralized training"
)]
struct Args {
    /// Work folder for PKI, per-firm data, models and metrics (recreated).
    #[arg(long, default_value = "work/supply-chain")]
    work: PathBuf,
    /// Federated rounds.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Local epochs per round (local-only and centralized baselines train rounds × epochs).
    #[arg(long, default_value_t = 2)]
    local_epochs: u32,
    /// Seed of the data split, the sensor skew and training.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// How participants encode their deltas on the wire: float32, float16 or int8.
    #[arg(long, default_value = "float32")]
    update_encoding: String,
    /// Write the comparison table as Markdown to this file too.
    #[arg(long)]
    results: Option<PathBuf>,
    /// Also run the federation with record-level differential privacy (DP-SGD
    /// at each firm) at this ε (δ = 1e-5), and release that model under a
    /// policy that requires DP; 0 skips it.
    #[arg(long, default_value_t = 8.0)]
    dp_epsilon: f64,
    /// Level of the DP training: "record" (DP-SGD at each firm) or "client"
    /// (each firm's update clipped, noise on the sum).
    #[arg(long, default_value = "record")]
    dp_level: String,
    /// The clip of the DP training: each example's gradient (record level) or
    /// each update (client level), in L2 norm.
    #[arg(long, default_value_t = 1.0)]
    dp_max_grad_norm: f64,
    /// Batch size of the DP training (larger batches average the noise down).
    #[arg(long, default_value_t = 32)]
    dp_batch_size: usize,
    /// Learning rate of the DP training (0.01: the one clear effect in the sweep
    /// of docs/RESULTS.md, "Differential privacy").
    #[arg(long, default_value_t = 0.01)]
    dp_learning_rate: f64,
    /// Local epochs per round of the DP training (each one spends budget).
    #[arg(long, default_value_t = 2)]
    dp_local_epochs: u32,
    /// Rounds of the DP training [default: twice --rounds]. The budget is the
    /// same whatever the rounds (more rounds, more noise per step); 40 rounds
    /// averaged 0.704 macro-F1 at ε = 8 against 0.679 for 20 (docs/RESULTS.md,
    /// "Differential privacy").
    #[arg(long)]
    dp_rounds: Option<u32>,
    /// The coordinator's server optimiser (`[aggregation] strategy`): fedavg,
    /// fedavgm, fedadam, fedyogi or fedadagrad. docs/RESULTS.md, "Strategies",
    /// compares them on this example.
    #[arg(long, default_value = "fedavg")]
    strategy: String,
    /// The server optimiser's step size (`[aggregation] server_learning_rate`;
    /// absent: the strategy's default).
    #[arg(long)]
    server_learning_rate: Option<f64>,
    /// Epochs of each firm's personalisation of the federated model
    /// (`sangsaeng-participant personalise`); 0 skips it. 20: the fewest of
    /// 5 / 10 / 20 / 40 at which every firm's personalised model was at least
    /// as good as both others (docs/RESULTS.md, "Personalisation").
    #[arg(long, default_value_t = 20)]
    personalise_epochs: u32,
    /// Personalise only the output layer.
    #[arg(long)]
    personalise_last_layer: bool,
    /// FedProx's μ at every firm (`[training] proximal_mu`; 0: plain local
    /// training). 0.05: the best of the sweep in docs/RESULTS.md, "Strategies"
    /// (above FedAvg on each of six seeds, +0.05 macro-F1 on average).
    #[arg(long, default_value_t = 0.05)]
    proximal_mu: f64,
}

fn plan(args: &Args) -> anyhow::Result<TrainingPlan> {
    let server_lr = args
        .server_learning_rate
        .map(|lr| format!("server_learning_rate = {lr:?}\n"))
        .unwrap_or_default();
    let base = chain::plan_toml(
        args.rounds,
        args.local_epochs,
        args.seed,
        args.proximal_mu,
        chain::FIRMS.len(),
    );
    TrainingPlan::from_toml(
        &format!(
            "{base}\n[aggregation]\nstrategy = \"{}\"\n{server_lr}",
            args.strategy
        ),
        "supply-chain plan",
    )
    .map_err(|e| anyhow::anyhow!("--strategy, --server-learning-rate or --proximal-mu: {e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sangsaeng_common::process::init_logging(
        "info,sangsaeng_participant=warn,sangsaeng_coordinator::release=warn",
    );
    let args = Args::parse();
    let started = Instant::now();
    let mut plan = plan(&args)?;
    plan.training.update_encoding =
        sangsaeng_common::transfer::encoding::UpdateEncoding::from_name(&args.update_encoding)?;
    let roster = chain::roster(&[]);
    if args.work.exists() {
        std::fs::remove_dir_all(&args.work)
            .with_context(|| format!("clearing {}", args.work.display()))?;
    }
    std::fs::create_dir_all(&args.work)?;

    // 1. Data: the committed Tennessee Eastman subset, split into four firms.
    let pooled = data::load_csvs(&[data_dir().join("train.csv")], &plan.schema)?;
    let test = data::load_csvs(&[data_dir().join("test.csv")], &plan.schema)?;
    let firms = split_firms(&pooled, &plan, args.seed);
    let mut files = vec![];
    for (Firm { id, .. }, ds) in FIRMS.iter().zip(&firms) {
        let dir = args.work.join("sites").join(id);
        std::fs::create_dir_all(&dir)?;
        let f = dir.join("line-data.csv");
        data::write_csv(&f, ds, &plan.schema)?;
        println!(
            "{id:<20} {:>5} rows, classes {:?}",
            ds.len(),
            present(ds, &plan)
        );
        files.push(f);
    }

    // 2. PKI on the fly, coordinator and participants over mutual TLS on loopback.
    let pki = localnet::write_pki(&args.work.join("pki"), &roster)?;
    std::fs::write(args.work.join("roster.toml"), roster.to_toml())?;
    std::fs::write(args.work.join("plan.toml"), plan.to_toml())?;
    let coord = localnet::start_coordinator(
        &pki,
        roster.clone(),
        Some(plan.clone()),
        &args.work.join("runs"),
        Default::default(),
    )
    .await?;
    let admin = pki.material("hanbit-admin");
    let training = federate(&pki, &coord.url, &files, None).await?;
    let fed_secs = started.elapsed().as_secs_f64();

    // 3. Compare on the common test set.
    let out_dir = PathBuf::from(&training.output_dir);
    let fed_plan = TrainingPlan::from_file(&out_dir.join("plan.toml"))?;
    let spec = ModelSpec::from_plan(&fed_plan);
    let global = weights::load_safetensors(&out_dir.join("global.safetensors"), &spec.layout())?;
    let mut fed_test = test.clone();
    fed_test.standardise(fed_plan.scaling.as_ref().expect("federated scaling"))?;
    let backend = Default::default();
    let federated = train::evaluate(backend, &spec, &global, &fed_test)?;
    let epochs = args.rounds * args.local_epochs;
    let mut rows = vec![("federated (4 firms, Sangsaeng)".to_string(), federated)];
    let dp = if args.dp_epsilon > 0.0 {
        let mut dp_plan = with_dp(
            &plan,
            &args.dp_level,
            args.dp_epsilon,
            args.dp_max_grad_norm,
        )?;
        dp_plan.training.batch_size = args.dp_batch_size;
        dp_plan.training.learning_rate = args.dp_learning_rate;
        dp_plan.training.local_epochs = args.dp_local_epochs;
        dp_plan.training.rounds = args.dp_rounds.unwrap_or(2 * args.rounds);
        dp_plan
            .validate()
            .map_err(|e| anyhow::anyhow!("the DP plan: {e}"))?;
        let t = federate(&pki, &coord.url, &files, Some(&dp_plan)).await?;
        let (e, spent) = evaluate_training(&t, &test)?;
        println!(
            "DP training {}: epsilon spent {spent:.3} (target {}, delta 1e-5, {} level)",
            t.training_id, args.dp_epsilon, args.dp_level
        );
        let mechanism = if args.dp_level == "client" {
            "client-level DP"
        } else {
            "DP-SGD"
        };
        rows.push((
            format!("federated, {mechanism} (ε = {spent:.2}, δ = 1e-5)"),
            e,
        ));
        Some(t.training_id)
    } else {
        None
    };
    for (Firm { id, .. }, ds) in FIRMS.iter().zip(&firms) {
        rows.push((
            format!("local only: {id}"),
            train_alone(&plan, ds, &test, epochs)?,
        ));
    }
    let pooled_firms = Dataset::concat(&firms)?;
    rows.push((
        "centralized (pooled data)".to_string(),
        train_alone(&plan, &pooled_firms, &test, epochs)?,
    ));

    let mut table = String::from("| model | macro-F1 | accuracy |\n|---|---:|---:|\n");
    for (name, e) in &rows {
        table.push_str(&format!(
            "| {name} | {:.3} | {:.3} |\n",
            e.macro_f1, e.accuracy
        ));
    }
    println!(
        "\nCommon test set: {} rows, {} classes (Tennessee Eastman, faults start at sample 161)\n",
        test.len(),
        CLASSES.len()
    );
    println!("{table}");
    println!(
        "federation: {} rounds in {:.1}s; outputs in {}",
        args.rounds,
        fed_secs,
        out_dir.display()
    );
    let curve = validation_curve(&out_dir)?;
    if let Some(r) = rounds_to_reach(&curve, 0.95) {
        println!(
            "strategy {} (proximal_mu {}): validation macro-F1 by round {}; 95 % of the last round's reached at round {r}",
            args.strategy,
            args.proximal_mu,
            curve
                .iter()
                .map(|v| format!("{v:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if let Some(path) = &args.results {
        std::fs::write(path, &table)?;
    }
    if args.personalise_epochs > 0 {
        personalise_each_firm(&args, &pki, &coord.url, &out_dir, &files)?;
    }

    // 4. Release to the registry under the opening rules.
    release(
        &args,
        &coord.url,
        &pki,
        &training.training_id,
        dp.as_deref(),
    )
    .await?;
    let _ = admin;
    coord.stop().await?;
    Ok(())
}

/// Each firm personalises the federated model on its own rows, at its site:
/// its own validation split scores the model trained on its rows alone, the
/// federated one and the personalised one.
fn personalise_each_firm(
    args: &Args,
    pki: &localnet::Pki,
    url: &str,
    out_dir: &std::path::Path,
    files: &[PathBuf],
) -> anyhow::Result<()> {
    use sangsaeng_participant::personalise::{Settings, personalise};
    let model = sangsaeng_participant::predict::Model::open(out_dir)?;
    let settings = Settings {
        epochs: args.personalise_epochs,
        last_layer_only: args.personalise_last_layer,
    };
    println!(
        "\nPersonalisation ({} epochs{}), each firm's own validation split, macro-F1:\n",
        settings.epochs,
        if settings.last_layer_only {
            ", output layer only"
        } else {
            ""
        }
    );
    println!("| firm | local only | federated | personalised |\n|---|---:|---:|---:|");
    for (Firm { id, .. }, f) in FIRMS.iter().zip(files) {
        let cfg = localnet::participant_config(pki, url, id, vec![f.clone()], "fault", None);
        let out = f.with_file_name("personalised.safetensors");
        let r = personalise(&cfg, &model, settings, &out)?;
        println!(
            "| {id} | {:.3} | {:.3} | {:.3} |",
            r.local_only.macro_f1, r.global.macro_f1, r.personalised.macro_f1
        );
    }
    Ok(())
}

/// The administrator's release: first under a policy that requires differential
/// privacy (refused: the rule fails closed), then under the example policy into
/// the coordinator's OCI layout folder; then an offline pull and verification.
async fn release(
    args: &Args,
    url: &str,
    pki: &localnet::Pki,
    training: &str,
    dp_training: Option<&str>,
) -> anyhow::Result<()> {
    use sangsaeng_coordinator::release::{self as rel, oci};
    let policy = include_str!("release-policy.toml");
    let policy_path = args.work.join("release-policy.toml");
    std::fs::write(&policy_path, policy)?;
    let mut admin = sangsaeng_coordinator::client::AdminClient::connect(
        url,
        &pki.material("hanbit-admin"),
        "localhost",
    )
    .await?;
    let request = |policy: &str| sangsaeng_proto::v1::ReleaseRequest {
        training_id: training.to_string(),
        policy_toml: policy.to_string(),
        tag: "te-fault-classifier-v1".into(),
        ..Default::default()
    };
    println!("\nRelease attempt with a policy that requires differential privacy:\n");
    // The policy's ε limit is the budget the DP training was given.
    let strict = policy
        .replace(
            "require_differential_privacy = false",
            "require_differential_privacy = true",
        )
        .replace(
            "max_epsilon = 8.0",
            &format!("max_epsilon = {:?}", args.dp_epsilon.max(8.0)),
        );
    let refused = admin.release(request(&strict)).await?;
    print!(
        "{}",
        sangsaeng_coordinator::client::render_release(&refused)
    );
    anyhow::ensure!(
        !refused.released,
        "a model trained without DP must not pass a DP policy"
    );
    if let Some(dp_training) = dp_training {
        println!("\nThe same policy on the model trained with DP-SGD ({dp_training}):\n");
        let mut req = request(&strict);
        req.training_id = dp_training.to_string();
        req.tag = "te-fault-classifier-dp-v1".into();
        let r = admin.release(req).await?;
        print!("{}", sangsaeng_coordinator::client::render_release(&r));
        let dp_rule = r
            .rules
            .iter()
            .find(|x| x.rule == "require_differential_privacy");
        anyhow::ensure!(
            dp_rule.is_some_and(|x| x.passed),
            "the DP training must pass the differential-privacy rule: {dp_rule:?}"
        );
    }

    println!("\nRelease with {}:\n", policy_path.display());
    let r = admin.release(request(policy)).await?;
    print!("{}", sangsaeng_coordinator::client::render_release(&r));
    if !r.released {
        println!("(the model did not meet the example policy; nothing was released)");
        return Ok(());
    }
    let runs = args.work.join("runs");
    let pulled = oci::pull(
        &oci::Source::Layout(runs.join(rel::LAYOUT_DIR)),
        "te-fault-classifier-v1",
    )
    .await?;
    let dir = args.work.join("released");
    oci::save(&pulled, &dir)?;
    let verifier = sangsaeng_common::identity::signing::Verifier::from_cert_pem_file(
        &pki.files("server").cert,
    )?;
    let v = rel::verify(
        &dir,
        &verifier,
        Some(&runs.join(sangsaeng_coordinator::durable::audit::FILE_NAME)),
    )?;
    println!(
        "pulled into {} and verified: DSSE signature by the coordinator, weights = provenance, {} rounds match the signed audit log",
        dir.display(),
        v.rounds
    );
    Ok(())
}

/// The example plan with a DP budget of `epsilon` (δ = 1e-5) at `level`; at
/// record level each firm derives its noise from its own rows to meet it.
fn with_dp(
    plan: &TrainingPlan,
    level: &str,
    epsilon: f64,
    clip: f64,
) -> anyhow::Result<TrainingPlan> {
    use sangsaeng_common::config::privacy::{DpConfig, DpLevel, PrivacyConfig};
    let (level, max_grad_norm, clip_norm) = match level {
        "record" => (DpLevel::Record, Some(clip), None),
        "client" => (DpLevel::Client, None, Some(clip)),
        other => anyhow::bail!("--dp-level {other}: expected record or client"),
    };
    let mut dp = plan.clone();
    dp.privacy = Some(PrivacyConfig {
        dp: Some(DpConfig {
            level,
            target_epsilon: epsilon,
            delta: 1e-5,
            noise_multiplier: None,
            max_grad_norm,
            clip_norm,
        }),
        ..Default::default()
    });
    Ok(dp)
}

/// One federation of the four firms: the coordinator's pending plan (`None`),
/// or `plan` started by the administrator; returns the completed training.
async fn federate(
    pki: &localnet::Pki,
    url: &str,
    files: &[PathBuf],
    plan: Option<&TrainingPlan>,
) -> anyhow::Result<sangsaeng_proto::v1::TrainingStatus> {
    let admin = pki.material("hanbit-admin");
    let stop = CancellationToken::new();
    let participants: Vec<_> = FIRMS
        .iter()
        .zip(files)
        .map(|(Firm { id, .. }, f)| {
            let cfg = localnet::participant_config(pki, url, id, vec![f.clone()], "fault", None);
            localnet::spawn_participant(cfg, stop.clone())
        })
        .collect();
    let id = match plan {
        Some(plan) => Some(
            sangsaeng_coordinator::client::AdminClient::connect(url, &admin, "localhost")
                .await?
                .start_training(plan.to_toml())
                .await?,
        ),
        None => None,
    };
    let status = localnet::wait_for_status(url, &admin, Duration::from_secs(3600), |s| {
        s.training.as_ref().is_some_and(|t| {
            id.as_ref().is_none_or(|id| &t.training_id == id)
                && (t.phase == "completed" || t.phase == "failed")
        })
    })
    .await
    .context("the federation did not finish")?;
    let training = status.training.expect("a training ran");
    anyhow::ensure!(
        training.phase == "completed",
        "training failed: {}",
        training.error
    );
    for p in participants {
        p.await??;
    }
    Ok(training)
}
