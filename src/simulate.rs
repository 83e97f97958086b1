//! `sangsaeng simulate`: a whole federation in one process, to try a plan
//! (strategy, robust rule, privacy settings) on real CSV exports before
//! anyone deploys anything. It runs the real coordinator and the real
//! participant daemons ([`crate::localnet`]: PKI, roster, mutual TLS on
//! loopback), one per site, so what it shows is what a deployment would do.
//!
//! Sites come from files (one CSV per site) or from one CSV cut into N sites,
//! optionally label-skewed (each site holds only some classes). Afterwards
//! every model is scored on the same rows, the union of the sites' own
//! validation splits (the split each daemon made, scaled with the federation's
//! scaling): the federated model, each site's model trained on its rows alone
//! (rounds × local epochs), and a model trained on all sites' rows pooled.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::roster::Roster;
use sangsaeng_common::learning::data::{self, Dataset, SiteData};
use sangsaeng_common::learning::metrics::Evaluation;
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::learning::train::{self, LocalTraining};
use sangsaeng_common::transfer::weights;
use sangsaeng_participant::site::{self, Site};

use crate::localnet;

/// What can go wrong in a simulation; each message names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Common(#[from] sangsaeng_common::Error),
    #[error(transparent)]
    Participant(#[from] sangsaeng_participant::ParticipantError),
    #[error(transparent)]
    Coordinator(#[from] sangsaeng_coordinator::CoordinatorError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, SimulateError>;

/// The most sites one simulation runs: each is a daemon with its own TLS
/// connection and training thread in this process.
pub const MAX_SITES: usize = 256;

/// Where the sites' rows come from.
#[derive(Debug, Clone)]
pub enum Sites {
    /// One CSV per site, named.
    Files(Vec<(String, PathBuf)>),
    /// One CSV cut into `sites` sites; with `classes_per_site`, site i holds
    /// only the classes i, i + 1, … (mod the plan's classes), so sites are
    /// label-skewed as suppliers that see different faults are.
    Split {
        file: PathBuf,
        sites: usize,
        classes_per_site: Option<usize>,
    },
}

/// One simulation.
#[derive(Debug, Clone)]
pub struct Simulation {
    pub plan: TrainingPlan,
    pub sites: Sites,
    /// Work folder (PKI, the sites' CSVs, the coordinator's output); recreated.
    pub work: PathBuf,
}

/// One round of the federation, from its metrics.jsonl line.
#[derive(Debug, Clone)]
pub struct RoundRow {
    pub round: u32,
    pub updates: usize,
    pub train_loss: f64,
    pub eval_macro_f1: Option<f64>,
    pub round_secs: f64,
}

/// What a simulation found.
#[derive(Debug, Clone)]
pub struct Report {
    pub sites: usize,
    pub rounds: Vec<RoundRow>,
    pub validation_rows: usize,
    pub federated: Evaluation,
    /// Each site's own model, by site name.
    pub local_only: BTreeMap<String, Evaluation>,
    pub pooled: Evaluation,
    pub federation_secs: f64,
    /// The training's output folder (model, plan, metrics, audit).
    pub output_dir: PathBuf,
}

impl Report {
    /// The per-round table and the comparison, as Markdown.
    pub fn render(&self) -> String {
        let mut s = String::from(
            "| round | updates | train loss | sites' validation macro-F1 (weighted mean) | seconds |\n|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.rounds {
            let f1 = r.eval_macro_f1.map_or("-".into(), |v| format!("{v:.4}"));
            s.push_str(&format!(
                "| {} | {} | {:.4} | {f1} | {:.2} |\n",
                r.round, r.updates, r.train_loss, r.round_secs
            ));
        }
        let locals: Vec<&Evaluation> = self.local_only.values().collect();
        let mean = |f: fn(&Evaluation) -> f64| {
            locals.iter().map(|e| f(e)).sum::<f64>() / locals.len() as f64
        };
        let (best_name, best) = self
            .local_only
            .iter()
            .max_by(|a, b| a.1.macro_f1.total_cmp(&b.1.macro_f1))
            .expect("at least one site");
        s.push_str(&format!(
            "\nAll sites' validation rows ({} rows):\n\n| model | macro-F1 | accuracy |\n|---|---:|---:|\n",
            self.validation_rows
        ));
        s.push_str(&format!(
            "| federated ({} sites) | {:.4} | {:.4} |\n",
            self.sites, self.federated.macro_f1, self.federated.accuracy
        ));
        s.push_str(&format!(
            "| local only, mean over sites | {:.4} | {:.4} |\n",
            mean(|e| e.macro_f1),
            mean(|e| e.accuracy)
        ));
        s.push_str(&format!(
            "| local only, best site ({best_name}) | {:.4} | {:.4} |\n",
            best.macro_f1, best.accuracy
        ));
        s.push_str(&format!(
            "| pooled (all sites' rows in one place) | {:.4} | {:.4} |\n",
            self.pooled.macro_f1, self.pooled.accuracy
        ));
        s
    }
}

/// Runs the simulation: the federation, then the comparison.
pub async fn run(sim: Simulation) -> Result<Report> {
    sim.plan
        .validate()
        .map_err(|e| SimulateError::Input(format!("the plan: {e}")))?;
    if sim.work.exists() {
        std::fs::remove_dir_all(&sim.work).map_err(|source| SimulateError::Io {
            what: format!("clearing {}", sim.work.display()),
            source,
        })?;
    }
    let sites = site_files(&sim)?;
    let min = sim.plan.training.min_participants;
    if sites.len() < min {
        return Err(SimulateError::Input(format!(
            "{} sites cannot meet the plan's training.min_participants = {min}",
            sites.len()
        )));
    }
    let roster = roster(&sites)?;
    let pki = localnet::write_pki(&sim.work.join("pki"), &roster)?;
    let coord = localnet::start_coordinator(
        &pki,
        roster,
        None,
        &sim.work.join("runs"),
        Default::default(),
    )
    .await
    .map_err(|source| SimulateError::Io {
        what: "starting the coordinator".into(),
        source,
    })?;
    let started = Instant::now();
    let training = federate(&pki, &coord.url, &sites, &sim.plan).await;
    let federation_secs = started.elapsed().as_secs_f64();
    coord.stop().await?;
    let output_dir = PathBuf::from(&training?.output_dir);
    compare(&sites, &output_dir, federation_secs)
}

/// Each site's name and CSV: as given, or cut from one file.
fn site_files(sim: &Simulation) -> Result<Vec<(String, PathBuf)>> {
    let sites = match &sim.sites {
        Sites::Files(files) => {
            for (name, f) in files {
                if !f.is_file() {
                    return Err(SimulateError::Input(format!(
                        "--site {name}={}: no such file",
                        f.display()
                    )));
                }
            }
            files.clone()
        }
        Sites::Split {
            file,
            sites,
            classes_per_site,
        } => split(&sim.plan, file, *sites, *classes_per_site, &sim.work)?,
    };
    if sites.is_empty() || sites.len() > MAX_SITES {
        return Err(SimulateError::Input(format!(
            "{} sites: a simulation runs 1 to {MAX_SITES}",
            sites.len()
        )));
    }
    let mut names: Vec<&String> = sites.iter().map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    if names.len() != sites.len() {
        return Err(SimulateError::Input("two sites have the same name".into()));
    }
    Ok(sites)
}

/// Cuts `file` into `n` sites: rows of each class dealt in turn to the sites
/// that hold that class.
fn split(
    plan: &TrainingPlan,
    file: &Path,
    n: usize,
    classes_per_site: Option<usize>,
    work: &Path,
) -> Result<Vec<(String, PathBuf)>> {
    let classes = plan.n_classes();
    if n == 0 || n > MAX_SITES {
        return Err(SimulateError::Input(format!(
            "--sites {n}: a simulation runs 1 to {MAX_SITES} sites"
        )));
    }
    let per_site = classes_per_site.unwrap_or(classes);
    if per_site == 0 || per_site > classes {
        return Err(SimulateError::Input(format!(
            "--classes-per-site {per_site}: the plan has {classes} classes"
        )));
    }
    let all = data::load_csvs(&[file.to_path_buf()], &plan.schema)?;
    let holders: Vec<Vec<usize>> = (0..classes)
        .map(|c| {
            (0..n)
                .filter(|s| (0..per_site).any(|j| (s + j) % classes == c))
                .collect()
        })
        .collect();
    let mut parts: Vec<Dataset> = (0..n)
        .map(|_| Dataset {
            n_features: all.n_features,
            ..Dataset::default()
        })
        .collect();
    let mut dealt = vec![0usize; classes];
    for i in 0..all.len() {
        let c = all.labels[i] as usize;
        let Some(&s) = holders[c].get(dealt[c] % holders[c].len().max(1)) else {
            continue;
        };
        dealt[c] += 1;
        parts[s].features.extend_from_slice(all.row(i));
        parts[s].labels.push(all.labels[i]);
    }
    let dir = work.join("sites");
    std::fs::create_dir_all(&dir).map_err(|source| SimulateError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    parts
        .iter()
        .enumerate()
        .map(|(i, ds)| {
            let name = format!("site-{:03}", i + 1);
            let f = dir.join(format!("{name}.csv"));
            data::write_csv(&f, ds, &plan.schema)?;
            Ok((name, f))
        })
        .collect()
}

fn roster(sites: &[(String, PathBuf)]) -> Result<Roster> {
    let mut text = String::new();
    for (name, _) in sites {
        text.push_str(&format!(
            "[[organisation]]\nid = \"{name}\"\nname = \"{name}\"\ntier = \"tier-2\"\nrole = \"participant\"\n\n"
        ));
    }
    text.push_str("[[organisation]]\nid = \"sim-admin\"\nname = \"Simulation\"\ntier = \"anchor\"\nrole = \"admin\"\n");
    Roster::from_toml(&text, "simulated roster")
        .map_err(|e| SimulateError::Input(format!("site names: {e}")))
}

/// Starts `plan` once every site is connected and waits for it to end.
async fn federate(
    pki: &localnet::Pki,
    url: &str,
    sites: &[(String, PathBuf)],
    plan: &TrainingPlan,
) -> Result<sangsaeng_proto::v1::TrainingStatus> {
    let stop = CancellationToken::new();
    let label = plan.schema.label_column.clone();
    let daemons: Vec<_> = sites
        .iter()
        .map(|(name, f)| {
            let cfg = localnet::participant_config(pki, url, name, vec![f.clone()], &label, None);
            localnet::spawn_participant(cfg, stop.clone())
        })
        .collect();
    let admin = pki.material("sim-admin");
    let connected = localnet::wait_for_status(url, &admin, Duration::from_secs(120), |s| {
        s.participants.iter().filter(|p| p.connected).count() == sites.len()
    })
    .await;
    let outcome = async {
        connected.ok_or_else(|| {
            SimulateError::Input(format!(
                "the {} sites did not all connect within 2 minutes",
                sites.len()
            ))
        })?;
        let id = sangsaeng_coordinator::client::AdminClient::connect(url, &admin, "localhost")
            .await?
            .start_training(plan.to_toml())
            .await?;
        let status = localnet::wait_for_status(url, &admin, Duration::from_secs(24 * 3600), |s| {
            s.training.as_ref().is_some_and(|t| {
                t.training_id == id && (t.phase == "completed" || t.phase == "failed")
            })
        })
        .await
        .and_then(|s| s.training)
        .ok_or_else(|| SimulateError::Input("the coordinator stopped answering".into()))?;
        if status.phase != "completed" {
            return Err(SimulateError::Input(format!(
                "the training failed: {}",
                status.error
            )));
        }
        Ok(status)
    }
    .await;
    stop.cancel();
    for d in daemons {
        let _ = d.await;
    }
    outcome
}

/// Scores the federated, local-only and pooled models on the union of the
/// sites' validation splits.
fn compare(sites: &[(String, PathBuf)], out: &Path, federation_secs: f64) -> Result<Report> {
    let plan = TrainingPlan::from_file(&out.join("plan.toml"))?;
    let spec = ModelSpec::from_plan(&plan);
    let global = weights::load_safetensors(&out.join("global.safetensors"), &spec.layout())?;
    let mut trains = vec![];
    let mut vals = vec![];
    for (name, f) in sites {
        let mut s = Site::new(
            SiteData {
                files: vec![f.clone()],
                label_column: plan.schema.label_column.clone(),
                feature_columns: vec![],
            },
            true,
        );
        let prepared = s.prepare(name, &plan)?;
        let (t, v) = site::scaled(&prepared, &plan)?;
        trains.push(t);
        vals.push(v);
    }
    let validation = Dataset::concat(&vals)?;
    let backend = Default::default();
    let score = |params: &[f32]| train::evaluate(backend, &spec, params, &validation);
    let cfg = LocalTraining {
        epochs: plan.training.rounds * plan.training.local_epochs,
        proximal_mu: 0.0,
        ..LocalTraining::from_plan(&plan, 1)
    };
    let init = spec.init_params(plan.training.seed);
    let mut local_only = BTreeMap::new();
    for ((name, _), t) in sites.iter().zip(&trains) {
        let out = train::train_local(backend, &spec, &init, t, &cfg)?;
        local_only.insert(name.clone(), score(&out.params)?);
    }
    let pooled = train::train_local(backend, &spec, &init, &Dataset::concat(&trains)?, &cfg)?;
    Ok(Report {
        sites: sites.len(),
        rounds: rounds(out)?,
        validation_rows: validation.len(),
        federated: score(&global)?,
        local_only,
        pooled: score(&pooled.params)?,
        federation_secs,
        output_dir: out.to_path_buf(),
    })
}

fn rounds(out: &Path) -> Result<Vec<RoundRow>> {
    let path = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|source| SimulateError::Io {
        what: format!("reading {}", path.display()),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| RoundRow {
            round: v["round"].as_u64().unwrap_or(0) as u32,
            updates: v["participants"].as_array().map_or(0, Vec::len),
            train_loss: v["train_loss"].as_f64().unwrap_or(f64::NAN),
            eval_macro_f1: v["eval_macro_f1"].as_f64(),
            round_secs: v["timings"]["round_secs"].as_f64().unwrap_or(f64::NAN),
        })
        .collect())
}
