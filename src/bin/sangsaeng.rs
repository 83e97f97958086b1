//! `sangsaeng`: tools that run a whole federation on one machine. `simulate`
//! tries a plan on CSV exports with the real coordinator and participants
//! (see `sangsaeng::simulate`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use sangsaeng::simulate::{self, Simulation, Sites};
use sangsaeng_common::config::plan::TrainingPlan;

#[derive(Parser)]
#[command(name = "sangsaeng", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole federation of simulated sites in this process (the real
    /// coordinator and participant daemons over mutual TLS on loopback), print
    /// the per-round table, and compare the federated model with each site's
    /// own model and with one trained on all rows pooled.
    Simulate(SimulateArgs),
}

#[derive(Args)]
struct SimulateArgs {
    /// The training plan to try (TOML).
    #[arg(long)]
    plan: PathBuf,
    /// A site and its CSV, as NAME=FILE; repeat for each site.
    #[arg(long = "site", value_name = "NAME=FILE", conflicts_with = "split")]
    sites: Vec<String>,
    /// Instead of --site: cut this one CSV into --sites sites.
    #[arg(long, requires = "num_sites")]
    split: Option<PathBuf>,
    /// With --split: how many sites (1 to 256).
    #[arg(long = "sites", id = "num_sites")]
    num_sites: Option<usize>,
    /// With --split: each site holds only this many of the plan's classes
    /// (label skew, as suppliers that see different faults); default all.
    #[arg(long, requires = "split")]
    classes_per_site: Option<usize>,
    /// Override the plan's training.rounds.
    #[arg(long)]
    rounds: Option<u32>,
    /// Override the plan's training.min_participants (default: the plan's, or
    /// the number of sites if the plan asks for more).
    #[arg(long)]
    min_participants: Option<usize>,
    /// Work folder: PKI, the sites' CSVs, the coordinator's output (recreated).
    #[arg(long, default_value = "work/simulate")]
    work: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Label-skewed sites are flagged as evaluation outliers every round: expected here.
    sangsaeng_common::process::init_logging("warn,sangsaeng_coordinator::round::record=error");
    match cli.command {
        Command::Simulate(a) => simulate_cmd(a).await,
    }
}

async fn simulate_cmd(a: SimulateArgs) -> anyhow::Result<()> {
    let mut plan = TrainingPlan::from_file(&a.plan)?;
    if let Some(r) = a.rounds {
        plan.training.rounds = r;
    }
    let sites = match (&a.split, a.num_sites) {
        (Some(file), Some(n)) => Sites::Split {
            file: file.clone(),
            sites: n,
            classes_per_site: a.classes_per_site,
        },
        _ => {
            let named = a
                .sites
                .iter()
                .map(|s| {
                    let (name, file) = s
                        .split_once('=')
                        .with_context(|| format!("--site {s}: expected NAME=FILE"))?;
                    Ok((name.trim().to_string(), PathBuf::from(file)))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            anyhow::ensure!(
                !named.is_empty(),
                "no sites: give --site NAME=FILE for each, or --split FILE --sites N"
            );
            Sites::Files(named)
        }
    };
    let n = match &sites {
        Sites::Files(f) => f.len(),
        Sites::Split { sites, .. } => *sites,
    };
    plan.training.min_participants = a
        .min_participants
        .unwrap_or(plan.training.min_participants.min(n));
    eprintln!("simulating {n} sites in {}", a.work.display());
    let report = simulate::run(Simulation {
        plan,
        sites,
        work: a.work,
    })
    .await?;
    println!("{}", report.render());
    println!(
        "federation: {} rounds of {} sites in {:.1}s; outputs in {}",
        report.rounds.len(),
        report.sites,
        report.federation_secs,
        report.output_dir.display()
    );
    Ok(())
}
