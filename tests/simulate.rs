//! `sangsaeng simulate`: a whole federation of simulated sites in one process,
//! with the real coordinator and participant daemons over mutual TLS. The
//! library call a script makes, the command an operator types, and the
//! refusals of settings that cannot run.

mod support;

use std::process::Command;

use sangsaeng::simulate::{self, Simulation, Sites};

/// A third of the committed training rows, restricted to the test plan's four classes.
fn train_csv(dir: &std::path::Path) -> std::path::PathBuf {
    support::site_files(dir, 1).remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_label_skewed_split_federates_every_site_and_compares_the_models() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let plan = support::plan(3, 6);
    let source = train_csv(dir.path());
    let report = simulate::run(Simulation {
        plan: plan.clone(),
        sites: Sites::Split {
            file: source.clone(),
            sites: 6,
            classes_per_site: Some(2),
        },
        work: dir.path().join("sim"),
    })
    .await
    .unwrap();
    assert_eq!(report.sites, 6);
    assert_eq!(report.rounds.len(), 3);
    assert!(
        report.rounds.iter().all(|r| r.updates == 6),
        "{:?}",
        report.rounds
    );
    assert_eq!(report.local_only.len(), 6);
    // Each site holds two of the four classes: its own model cannot know the
    // others, so on everyone's rows it falls short of the pooled one.
    let best_local = report
        .local_only
        .values()
        .map(|e| e.macro_f1)
        .fold(0.0, f64::max);
    assert!(report.pooled.macro_f1 > best_local, "{}", report.render());
    let table = report.render();
    for row in [
        "| federated (6 sites) |",
        "| local only, mean over sites |",
        "| pooled",
    ] {
        assert!(table.contains(row), "{table}");
    }
    // The sites' CSVs are the split: every row of the plan's classes dealt once.
    let rows: usize = (1..=6)
        .map(|i| {
            let f = dir.path().join(format!("sim/sites/site-{i:03}.csv"));
            std::fs::read_to_string(f).unwrap().lines().count() - 1
        })
        .sum();
    let all = sangsaeng_common::learning::data::load_csvs(&[source], &plan.schema).unwrap();
    assert_eq!(rows, all.len());
    assert!(report.validation_rows > 0 && report.validation_rows < rows);
}

#[tokio::test]
async fn settings_that_cannot_run_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let source = train_csv(dir.path());
    let run = |plan, sites| {
        simulate::run(Simulation {
            plan,
            sites,
            work: dir.path().join("sim"),
        })
    };
    let split = |sites, classes_per_site| Sites::Split {
        file: source.clone(),
        sites,
        classes_per_site,
    };
    let e = run(support::plan(1, 1), split(0, None)).await.unwrap_err();
    assert!(e.to_string().contains("--sites 0"), "{e}");
    let e = run(support::plan(1, 1), split(3, Some(9)))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("--classes-per-site 9: the plan has 4 classes"),
        "{e}"
    );
    let e = run(support::plan(1, 5), split(3, None)).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("3 sites cannot meet the plan's training.min_participants = 5"),
        "{e}"
    );
    let missing = Sites::Files(vec![("a".into(), dir.path().join("nope.csv"))]);
    let e = run(support::plan(1, 1), missing).await.unwrap_err();
    assert!(e.to_string().contains("--site a="), "{e}");
}

#[test]
fn the_command_takes_named_sites_and_prints_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let files = support::site_files(dir.path(), 2);
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, support::plan_toml(2, 2)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sangsaeng"))
        .args(["simulate", "--plan"])
        .arg(&plan)
        .arg("--site")
        .arg(format!("north={}", files[0].display()))
        .arg("--site")
        .arg(format!("south={}", files[1].display()))
        .arg("--work")
        .arg(dir.path().join("sim"))
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("| 2 | 2 |"),
        "round 2 with both updates: {stdout}"
    );
    assert!(stdout.contains("| federated (2 sites) |"), "{stdout}");
    assert!(
        stdout.contains("local only, best site (north)")
            || stdout.contains("local only, best site (south)")
    );

    let out = Command::new(env!("CARGO_BIN_EXE_sangsaeng"))
        .args(["simulate", "--plan"])
        .arg(&plan)
        .args(["--site", "north"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--site north: expected NAME=FILE"));
}
