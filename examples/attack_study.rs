//! Attack study: the supply chain of the `supply_chain` example with a fifth
//! firm, Sinil Plastics, that turns hostile, federated over real mutual TLS
//! under each robust rule of `[aggregation] robust`.
//!
//! Attacks (the hostile firm trains honestly on its rows, then):
//! - `scale`: sends its delta × 100 (a broken export, or a firm pulling the
//!   model its way);
//! - `sign-flip`: sends its delta × −10;
//! - `label-flip`: an ordinary daemon on its rows with every label rotated by
//!   one class.
//!
//! `none` is the clean run (the fifth firm honest). For each attack × rule the
//! final global model is scored on the common test set; the table goes to
//! stdout (and `--results`), every figure to `--json`. docs/RESULTS.md,
//! "Attacks", is this example's output; `tests/example.rs` runs a short grid
//! and checks what the issue asks of each rule.
//!
//! Run: `cargo run --release --example attack_study` (options: `--help`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use sangsaeng::localnet;
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::learning::data::{self, Dataset};
use sangsaeng_common::learning::metrics::Evaluation;

#[path = "shared/adversary.rs"]
mod adversary;
#[path = "shared/supply_chain.rs"]
mod chain;
use chain::{FIRMS, Firm};

#[derive(Parser)]
#[command(
    about = "Federate the supply chain with one hostile firm under each robust aggregation rule and score every final model on the common test set"
)]
struct Args {
    /// Work folder (recreated).
    #[arg(long, default_value = "work/attack-study")]
    work: PathBuf,
    /// Federated rounds.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Local epochs per round.
    #[arg(long, default_value_t = 2)]
    local_epochs: u32,
    /// Seed of the data split and training.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// FedProx's μ at every firm (the supply-chain example's default).
    #[arg(long, default_value_t = 0.05)]
    proximal_mu: f64,
    /// Attacks to run, comma-separated: none (the clean run), scale,
    /// sign-flip, label-flip.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,scale,sign-flip,label-flip"
    )]
    attacks: Vec<String>,
    /// Rules to run each attack under, comma-separated: none (plain FedAvg),
    /// norm-bound, trimmed-mean, median, multi-krum.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,norm-bound,trimmed-mean,median,multi-krum"
    )]
    rules: Vec<String>,
    /// norm-bound's `max_update_norm`: well above every honest update of the
    /// clean run (the largest, in round 1, is under 2.5 at the default seed),
    /// far below a delta × 100.
    #[arg(long, default_value_t = 5.0)]
    max_update_norm: f64,
    /// trimmed-mean's `trim_fraction` (of five updates, one dropped at each end).
    #[arg(long, default_value_t = 0.2)]
    trim_fraction: f64,
    /// multi-krum's `krum_byzantine`.
    #[arg(long, default_value_t = 1)]
    krum_byzantine: u32,
    /// Write the table as Markdown to this file too.
    #[arg(long)]
    results: Option<PathBuf>,
    /// Write every run's figures as JSON lines to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The fifth firm: a tier-2 supplier holding a tenth of every class's rows.
const HOSTILE: Firm = Firm {
    id: "sinil-plastics",
    name: "Sinil Plastics",
    tier: "tier-2",
    faults: &[],
    normal_share: 0.1,
    fault_share: 0.1,
};

#[derive(Clone, Copy, PartialEq)]
enum Attack {
    None,
    Scale,
    SignFlip,
    LabelFlip,
}

impl Attack {
    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "none" => Attack::None,
            "scale" => Attack::Scale,
            "sign-flip" => Attack::SignFlip,
            "label-flip" => Attack::LabelFlip,
            other => {
                anyhow::bail!("--attacks {other}: expected none, scale, sign-flip or label-flip")
            }
        })
    }

    fn describe(self) -> &'static str {
        match self {
            Attack::None => "none (clean run)",
            Attack::Scale => "(a) delta × 100",
            Attack::SignFlip => "(b) delta × −10",
            Attack::LabelFlip => "(c) labels rotated by one class",
        }
    }

    /// What the hostile firm multiplies its delta by (1: sends it as trained).
    fn factor(self) -> f32 {
        match self {
            Attack::Scale => 100.0,
            Attack::SignFlip => -10.0,
            _ => 1.0,
        }
    }
}

/// The plan under `rule`, for five firms.
fn plan(args: &Args, rule: &str) -> anyhow::Result<TrainingPlan> {
    // A refused update leaves four: the round goes on with them.
    let quorum = FIRMS.len() + usize::from(rule != "norm-bound");
    let base = chain::plan_toml(
        args.rounds,
        args.local_epochs,
        args.seed,
        args.proximal_mu,
        quorum,
    );
    let knob = match rule {
        "norm-bound" => format!("max_update_norm = {:?}\n", args.max_update_norm),
        "trimmed-mean" => format!("trim_fraction = {:?}\n", args.trim_fraction),
        "multi-krum" => format!("krum_byzantine = {}\n", args.krum_byzantine),
        _ => String::new(),
    };
    TrainingPlan::from_toml(
        &format!("{base}\n[aggregation]\nrobust = \"{rule}\"\n{knob}"),
        "attack-study plan",
    )
    .map_err(|e| anyhow::anyhow!("--rules {rule}: {e}"))
}

/// The hostile firm's rows with every label moved to the next class.
fn rotated(ds: &Dataset, classes: usize) -> Dataset {
    let mut out = ds.clone();
    for l in &mut out.labels {
        *l = (*l + 1) % classes as u32;
    }
    out
}

/// One finished run.
struct Run {
    attack: Attack,
    rule: String,
    test: Evaluation,
    /// Who the rule left out or refused, how many rounds (from metrics.jsonl).
    excluded: BTreeMap<String, usize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sangsaeng_common::process::init_logging(
        "warn,sangsaeng_coordinator::round=error,attack_study=info",
    );
    let args = Args::parse();
    let attacks = args
        .attacks
        .iter()
        .map(|a| Attack::parse(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for rule in &args.rules {
        plan(&args, rule)?;
    }
    if args.work.exists() {
        std::fs::remove_dir_all(&args.work)
            .with_context(|| format!("clearing {}", args.work.display()))?;
    }
    std::fs::create_dir_all(&args.work)?;

    let schema_plan = plan(&args, "none")?;
    let pooled = data::load_csvs(&[chain::data_dir().join("train.csv")], &schema_plan.schema)?;
    let test = data::load_csvs(&[chain::data_dir().join("test.csv")], &schema_plan.schema)?;
    let mut firms = chain::split_firms(&pooled, &schema_plan, args.seed);
    firms.push(chain::sample_firm(&pooled, HOSTILE.normal_share, args.seed));
    let files = write_sites(&args.work, &firms, &schema_plan)?;
    let flipped = args.work.join("sites").join(HOSTILE.id).join("rotated.csv");
    data::write_csv(
        &flipped,
        &rotated(&firms[FIRMS.len()], schema_plan.n_classes()),
        &schema_plan.schema,
    )?;

    let roster = chain::roster(&[HOSTILE]);
    let pki = localnet::write_pki(&args.work.join("pki"), &roster)?;
    let coord = localnet::start_coordinator(
        &pki,
        roster,
        None,
        &args.work.join("runs"),
        Default::default(),
    )
    .await?;
    let mut runs = vec![];
    for &attack in &attacks {
        for rule in &args.rules {
            let plan = plan(&args, rule)?;
            let mut sites = files.clone();
            if attack == Attack::LabelFlip {
                *sites.last_mut().expect("five sites") = flipped.clone();
            }
            let t = federate(&pki, &coord.url, &sites, attack, &plan).await?;
            let (e, _) = chain::evaluate_training(&t, &test)?;
            let excluded = excluded_updates(Path::new(&t.output_dir))?;
            tracing::info!(
                attack = attack.describe(),
                rule,
                macro_f1 = e.macro_f1,
                ?excluded,
                "run finished"
            );
            runs.push(Run {
                attack,
                rule: rule.clone(),
                test: e,
                excluded,
            });
        }
    }
    coord.stop().await?;
    report(&args, &runs)
}

/// Writes each firm's CSV under `work/sites/<id>/`.
fn write_sites(
    work: &Path,
    firms: &[Dataset],
    plan: &TrainingPlan,
) -> anyhow::Result<Vec<PathBuf>> {
    FIRMS
        .iter()
        .chain(std::iter::once(&HOSTILE))
        .zip(firms)
        .map(|(firm, ds)| {
            let dir = work.join("sites").join(firm.id);
            std::fs::create_dir_all(&dir)?;
            let f = dir.join("line-data.csv");
            data::write_csv(&f, ds, &plan.schema)?;
            Ok(f)
        })
        .collect()
}

/// One training of the five firms under `plan`; the last site is the hostile
/// one, run as `attack` says.
async fn federate(
    pki: &localnet::Pki,
    url: &str,
    files: &[PathBuf],
    attack: Attack,
    plan: &TrainingPlan,
) -> anyhow::Result<sangsaeng_proto::v1::TrainingStatus> {
    let stop = CancellationToken::new();
    let ids = FIRMS.iter().chain(std::iter::once(&HOSTILE)).map(|f| f.id);
    let mut sites = vec![];
    for (id, f) in ids.zip(files) {
        let cfg = localnet::participant_config(pki, url, id, vec![f.clone()], "fault", None);
        sites.push(if id == HOSTILE.id && attack.factor() != 1.0 {
            tokio::spawn(adversary::run(cfg, attack.factor()))
        } else {
            let stop = stop.clone();
            tokio::spawn(async move { Ok(sangsaeng_participant::run(cfg, stop).await?) })
        });
    }
    let admin = pki.material("hanbit-admin");
    // Every firm connected first, so all five are selected from round 1.
    localnet::wait_for_status(url, &admin, Duration::from_secs(60), |s| {
        s.participants.iter().filter(|p| p.connected).count() == files.len()
    })
    .await
    .context("the five firms did not connect")?;
    let id = sangsaeng_coordinator::client::AdminClient::connect(url, &admin, "localhost")
        .await?
        .start_training(plan.to_toml())
        .await?;
    let status = localnet::wait_for_status(url, &admin, Duration::from_secs(3600), |s| {
        s.training
            .as_ref()
            .is_some_and(|t| t.training_id == id && (t.phase == "completed" || t.phase == "failed"))
    })
    .await
    .context("the training did not finish")?;
    let training = status.training.expect("a training ran");
    anyhow::ensure!(
        training.phase == "completed",
        "training failed: {}",
        training.error
    );
    for s in sites {
        s.await??;
    }
    Ok(training)
}

/// Who was left out or refused over a training, and how many times, as its
/// metrics.jsonl names them.
fn excluded_updates(out_dir: &Path) -> anyhow::Result<BTreeMap<String, usize>> {
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl"))?;
    let mut who = BTreeMap::new();
    for v in metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        for map in [&v["robust"]["excluded"], &v["refused"]] {
            for org in map.as_object().into_iter().flat_map(|m| m.keys()) {
                *who.entry(org.clone()).or_default() += 1;
            }
        }
    }
    Ok(who)
}

/// The table (one row per attack, one column pair per rule) and the JSON lines.
fn report(args: &Args, runs: &[Run]) -> anyhow::Result<()> {
    let mut table = String::from("| attack |");
    let mut rule_line = String::from("|---|");
    for rule in &args.rules {
        table.push_str(&format!(" {rule}: macro-F1 | accuracy | left out |"));
        rule_line.push_str("---:|---:|---:|");
    }
    table.push('\n');
    table.push_str(&rule_line);
    table.push('\n');
    let mut seen = vec![];
    for r in runs {
        if seen.contains(&(r.attack as u8)) {
            continue;
        }
        seen.push(r.attack as u8);
        table.push_str(&format!("| {} |", r.attack.describe()));
        for run in runs.iter().filter(|x| x.attack == r.attack) {
            table.push_str(&format!(
                " {:.3} | {:.3} | {} |",
                run.test.macro_f1,
                run.test.accuracy,
                run.excluded.values().sum::<usize>()
            ));
        }
        table.push('\n');
    }
    println!(
        "\nCommon test set, final global model, {} rounds:\n\n{table}",
        args.rounds
    );
    if let Some(p) = &args.results {
        std::fs::write(p, &table)?;
    }
    if let Some(p) = &args.json {
        let lines: Vec<String> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "attack": args.attacks[attack_index(args, r.attack)],
                    "rule": r.rule,
                    "macro_f1": r.test.macro_f1,
                    "accuracy": r.test.accuracy,
                    "excluded": r.excluded,
                    "excluded_updates": r.excluded.values().sum::<usize>(),
                })
                .to_string()
            })
            .collect();
        std::fs::write(p, lines.join("\n") + "\n")?;
    }
    Ok(())
}

fn attack_index(args: &Args, a: Attack) -> usize {
    args.attacks
        .iter()
        .position(|x| Attack::parse(x).is_ok_and(|y| y == a))
        .expect("every run's attack was asked for")
}
