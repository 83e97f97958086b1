//! `sangsaeng-participant`: the supplier-side daemon and its enrolment and
//! data-check commands. Parses arguments, sets up logging, builds the typed
//! config and hands over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::identity::pki;
use sangsaeng_participant::config::{Overrides, ParticipantConfig};
use sangsaeng_participant::doctor;

/// Sangsaeng participant: trains the federation's model on this site's private
/// line data and sends back only weight deltas. It only dials out.
#[derive(Parser)]
#[command(name = "sangsaeng-participant", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: connect to the coordinator and carry out training rounds.
    Run(Box<RunArgs>),
    /// Create this site's private key and a certificate request for the anchor
    /// company's administrator to sign. The key never leaves this machine.
    Enrol {
        /// Organisation id, as listed in the federation's roster.
        #[arg(long)]
        org: String,
        /// Folder to write <org>.key (mode 0600) and <org>.csr into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check local CSV files against a training plan without connecting anywhere.
    CheckData {
        /// The training plan (TOML) the federation will use.
        #[arg(long)]
        plan: PathBuf,
        /// CSV files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Pre-flight checks before `run`: config, TLS files and certificate, the
    /// coordinator (DNS, TCP, mutual TLS, roster, clock) and the data files. Prints
    /// one line per check; exits non-zero if any check fails.
    Doctor {
        /// Config file (TOML), as given to `run --config`.
        #[arg(long, env = "SANGSAENG_PARTICIPANT_CONFIG")]
        config: PathBuf,
        /// Also load the data against this training plan, as `check-data` does.
        #[arg(long)]
        plan: Option<PathBuf>,
    },
    /// Score a CSV export of this site's line data with a trained model, here:
    /// one output row per input row (the predicted class and each class's
    /// probability). Nothing is sent anywhere.
    Predict(PredictArgs),
    /// Fine-tune a finished training's global model on this site's own training
    /// rows and compare, on its own validation rows, the global model, a model
    /// trained on its rows alone and the personalised one. Nothing is sent
    /// anywhere: the personalised model stays here.
    Personalise(PersonaliseArgs),
}

#[derive(Args)]
struct PersonaliseArgs {
    /// The participant's config file: its [data] section names the rows.
    #[arg(long, env = "SANGSAENG_PARTICIPANT_CONFIG")]
    config: PathBuf,
    /// The model, as for `predict` [default: the config's model_dir, latest training].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Epochs of fine-tuning (20: what the supply-chain example needed for
    /// every firm to gain; docs/RESULTS.md, "Personalisation").
    #[arg(long, default_value_t = 20)]
    epochs: u32,
    /// Fine-tune only the output layer.
    #[arg(long)]
    last_layer_only: bool,
    /// Where to write the personalised model [default: personalised.safetensors
    /// beside the model].
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct PredictArgs {
    /// The model: a training's folder (global.safetensors and plan.toml, as
    /// kept under this site's model_dir or in the coordinator's output), the
    /// model_dir itself (its latest training), a release folder pulled with
    /// `sangsaeng-coordinator release pull`, or a .safetensors file with
    /// plan.toml beside it.
    #[arg(long)]
    model: PathBuf,
    /// The CSV to score: the plan's feature columns, in the plan's order,
    /// optionally followed by the label column (then accuracy and macro-F1 of
    /// the predictions are printed too).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the predictions [default: <input>.predictions.csv]. Written
    /// to a temporary file first and renamed once every row is scored.
    #[arg(long)]
    out: Option<PathBuf>,
    /// burn backend: ndarray (default) or flex (if compiled in).
    #[arg(long, env = "SANGSAENG_BACKEND", default_value = "ndarray")]
    backend: String,
}

#[derive(Args)]
struct RunArgs {
    /// Config file (TOML). Its paths are relative to the file; options below override it.
    #[arg(long, env = "SANGSAENG_PARTICIPANT_CONFIG")]
    config: Option<PathBuf>,
    /// Coordinator address [default: https://127.0.0.1:7443]
    #[arg(long, env = "SANGSAENG_COORDINATOR")]
    coordinator: Option<String>,
    /// Name in the coordinator's certificate [default: localhost]
    #[arg(long, env = "SANGSAENG_SERVER_NAME")]
    server_name: Option<String>,
    /// Project CA certificate (PEM); check its fingerprint with the anchor company.
    #[arg(long, env = "SANGSAENG_CA")]
    ca: Option<PathBuf>,
    /// This site's certificate (PEM), signed by the project CA.
    #[arg(long, env = "SANGSAENG_CERT")]
    cert: Option<PathBuf>,
    /// This site's private key (PEM).
    #[arg(long, env = "SANGSAENG_KEY")]
    key: Option<PathBuf>,
    /// CSV file of line data (repeat for several files); replaces the config's list.
    #[arg(long = "data")]
    data: Vec<PathBuf>,
    /// Name of the label column in the CSV files (for a regression plan, the
    /// target column; `--target-column` is the same option).
    #[arg(long, alias = "target-column")]
    label_column: Option<String>,
    /// Largest privacy loss ε this site accepts from a plan's differential-privacy
    /// budget; a plan above it is declined (overrides `privacy.max_epsilon`).
    #[arg(long)]
    max_epsilon: Option<f64>,
    /// burn backend for local training: ndarray (default) or flex (if compiled in).
    #[arg(long, env = "SANGSAENG_BACKEND")]
    backend: Option<String>,
    /// Keep a copy of every delta sent, under this folder (the site's own audit of what left it).
    #[arg(long)]
    record_dir: Option<PathBuf>,
    /// Keep SCAFFOLD's control variate of each training under this folder
    /// (needed to take part in a plan with aggregation.strategy = "scaffold").
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Keep each finished training's global model and plan under this folder,
    /// for `predict`.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics (`host:port`, or `:port`
    /// for loopback); off unless given here or as `metrics_listen`.
    #[arg(long, env = "SANGSAENG_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Stop after the first training finishes instead of waiting for the next one.
    #[arg(long)]
    once: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The doctor reports problems itself; the library's warnings would repeat them.
    let doctor = matches!(cli.command, Command::Doctor { .. });
    sangsaeng_common::process::init_logging(if doctor { "error" } else { "info" });
    match cli.command {
        Command::Run(a) => run(*a).await,
        Command::Enrol { org, out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let (key, csr) = pki::generate_csr(&org)?;
            let key_path = out.join(format!("{org}.key"));
            let csr_path = out.join(format!("{org}.csr"));
            pki::write_private_key(&key_path, &key)?;
            pki::write_public(&csr_path, &csr)?;
            println!(
                "private key: {} (mode 0600, keep it here)",
                key_path.display()
            );
            println!("certificate request: {}", csr_path.display());
            println!(
                "send the request to the anchor company's administrator; check the CA fingerprint they give you with:"
            );
            println!("  sangsaeng-coordinator pki fingerprint ca.pem");
            Ok(())
        }
        Command::CheckData { plan, files } => {
            let plan = TrainingPlan::from_file(&plan)?;
            println!("{}", doctor::summarise_data(&plan, &files)?);
            Ok(())
        }
        Command::Predict(a) => predict(a),
        Command::Personalise(a) => personalise(a),
        Command::Doctor { config, plan } => {
            let checks = doctor::run_checks(&config, plan.as_deref()).await;
            for c in &checks {
                println!("{c}");
            }
            let failed = checks
                .iter()
                .filter(|c| c.outcome == doctor::Outcome::Fail)
                .count();
            if failed > 0 {
                eprintln!("{failed} check(s) failed");
                std::process::exit(1);
            }
            println!("all checks passed");
            Ok(())
        }
    }
}

fn predict(a: PredictArgs) -> anyhow::Result<()> {
    use sangsaeng_participant::predict::{self, Model};
    let backend: sangsaeng_common::learning::backend::BackendKind = a.backend.parse()?;
    let model = Model::open(&a.model)?;
    let out = a
        .out
        .unwrap_or_else(|| a.input.with_extension("predictions.csv"));
    tracing::info!(model = %model.weights.display(), input = %a.input.display(), "scoring");
    let p = predict::predict(&model, backend, &a.input, &out)?;
    println!(
        "{} rows scored in {:.2}s ({:.0} rows/s) into {}",
        p.rows,
        p.secs,
        p.rows_per_sec(),
        p.out.display()
    );
    match p.scored {
        Some(predict::Scored::Classes { accuracy, macro_f1 }) => {
            println!("against the file's labels: accuracy {accuracy:.4}, macro-F1 {macro_f1:.4}")
        }
        Some(predict::Scored::Values(m)) => println!(
            "against the file's target: MAE {:.4}, RMSE {:.4}, R² {:.4}",
            m.mae, m.rmse, m.r2
        ),
        None => {}
    }
    Ok(())
}

fn personalise(a: PersonaliseArgs) -> anyhow::Result<()> {
    use sangsaeng_participant::personalise::{self, Settings};
    use sangsaeng_participant::predict::Model;
    let config = ParticipantConfig::build(Some(&a.config), Overrides::default())?;
    let path = a
        .model
        .or(config.model_dir.clone())
        .context("--model, or model_dir in the config: which model to personalise")?;
    let model = Model::open(&path)?;
    let out = a
        .out
        .unwrap_or_else(|| model.weights.with_file_name("personalised.safetensors"));
    let settings = Settings {
        epochs: a.epochs,
        last_layer_only: a.last_layer_only,
    };
    let r = personalise::personalise(&config, &model, settings, &out)?;
    println!(
        "on this site's validation rows ({} rows; {} training rows):",
        r.validation_rows, r.train_rows
    );
    let regression = r.global.regression.is_some();
    if regression {
        println!("| model | R² | MAE | RMSE |\n|---|---:|---:|---:|");
    } else {
        println!("| model | macro-F1 | accuracy |\n|---|---:|---:|");
    }
    for (name, e) in [
        ("local only", &r.local_only),
        ("global (federated)", &r.global),
        ("personalised", &r.personalised),
    ] {
        match e.regression {
            Some(m) => println!("| {name} | {:.4} | {:.4} | {:.4} |", m.r2, m.mae, m.rmse),
            None => println!("| {name} | {:.4} | {:.4} |", e.macro_f1, e.accuracy),
        }
    }
    println!("personalised model kept at {}", r.saved.display());
    Ok(())
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let config = ParticipantConfig::build(
        a.config.as_deref(),
        Overrides {
            coordinator: a.coordinator,
            server_name: a.server_name,
            backend: a.backend,
            record_dir: a.record_dir,
            state_dir: a.state_dir,
            model_dir: a.model_dir,
            metrics_listen: a.metrics_listen,
            ca: a.ca,
            cert: a.cert,
            key: a.key,
            data_files: a.data,
            label_column: a.label_column,
            max_epsilon: a.max_epsilon,
            exit_after_training: a.once,
        },
    )?;
    let shutdown = CancellationToken::new();
    sangsaeng_common::process::cancel_on_signal(
        shutdown.clone(),
        "abandoning local work and leaving the federation",
    );
    sangsaeng_participant::run(config, shutdown)
        .await
        .context("participant stopped")?;
    Ok(())
}
