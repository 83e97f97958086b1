//! End-to-end runs of the example binaries (built by `cargo test` alongside
//! the tests): `supply_chain`, a short federation, plain and with DP-SGD, that
//! must print the comparison table and release the DP model past the
//! differential-privacy rule; `attack_study`, five firms of which one is
//! hostile, under each robust rule.

use std::path::PathBuf;
use std::process::Command;

/// `cargo test` builds examples into `target/<profile>/examples`, next to `deps/` where this test runs.
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

#[test]
fn supply_chain_example_trains_and_prints_the_comparison_table() {
    let bin = example_binary("supply_chain");
    assert!(
        bin.exists(),
        "{} not built; run through `cargo test`",
        bin.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.md");
    let out = Command::new(&bin)
        .args(["--rounds", "3", "--local-epochs", "1", "--work"])
        .arg(dir.path().join("work"))
        .arg("--results")
        .arg(&results)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "example failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = std::fs::read_to_string(&results).unwrap();
    for row in [
        "federated (4 firms, Sangsaeng)",
        "local only: hanbit-motors",
        "local only: daesung-precision",
        "local only: mirae-castings",
        "local only: jinwoo-sensors",
        "centralized (pooled data)",
    ] {
        assert!(table.contains(row), "missing row {row}:\n{table}");
    }
    // Every metric is a number in [0, 1].
    for line in table.lines().skip(2) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        for v in &cells[2..4] {
            let x: f64 = v.parse().unwrap();
            assert!((0.0..=1.0).contains(&x), "{line}");
        }
    }
    assert!(stdout.contains("| model | macro-F1 | accuracy |"));
    // The DP-SGD federation ran, said what it spent, and its model passed the
    // differential-privacy rule that the plain model failed (the example
    // checks both and fails otherwise).
    assert!(table.contains("federated, DP-SGD (ε = "), "{table}");
    assert!(stdout.contains("epsilon spent"), "{stdout}");
    assert!(
        stdout.contains("require_differential_privacy  pass    trained with differential privacy"),
        "{stdout}"
    );
}

/// Test macro-F1 of each (attack, rule) run of `attack_study`, and who its
/// rule left out (organisation → rounds).
type Grid = std::collections::BTreeMap<(String, String), (f64, serde_json::Value)>;

fn attack_grid(attacks: &str, rules: &str) -> Grid {
    let bin = example_binary("attack_study");
    assert!(bin.exists(), "{} not built", bin.display());
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("runs.jsonl");
    let out = Command::new(&bin)
        .args(["--attacks", attacks, "--rules", rules, "--work"])
        .arg(dir.path().join("work"))
        .arg("--json")
        .arg(&json)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "attack_study failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let s = |k: &str| v[k].as_str().unwrap().to_string();
            (
                (s("attack"), s("rule")),
                (v["macro_f1"].as_f64().unwrap(), v["excluded"].clone()),
            )
        })
        .collect()
}

/// Issue 21's attack tests (a) and (b), 20 rounds of five firms over mTLS:
/// the hostile firm's delta × 100 and × −10 wreck plain FedAvg (more than
/// 10 points of test macro-F1 lost against the clean run); the norm bound
/// and Multi-Krum leave it out every round and stay within 2 points of the
/// clean run under both; median and trimmed mean within 2 points under (a).
/// Under (b) they do not hold with five label-skewed firms (docs/RESULTS.md,
/// "Attacks": one order statistic of honest values moves each coordinate the
/// attacker's way, round after round); that is recorded there, not asserted.
#[test]
fn attack_study_one_hostile_firm_wrecks_fedavg_and_the_robust_rules_hold() {
    let grid = attack_grid(
        "none,scale,sign-flip",
        "none,norm-bound,trimmed-mean,median,multi-krum",
    );
    let f1 = |attack: &str, rule: &str| grid[&(attack.to_string(), rule.to_string())].clone();
    let (clean, _) = f1("none", "none");
    assert!(clean > 0.8, "the clean federation learns: {clean}");
    for attack in ["scale", "sign-flip"] {
        let (attacked, _) = f1(attack, "none");
        assert!(
            attacked < clean - 0.10,
            "{attack} must bite plain FedAvg: {attacked} against {clean}"
        );
        for rule in ["norm-bound", "multi-krum"] {
            let (held, excluded) = f1(attack, rule);
            assert!(
                held >= clean - 0.02,
                "{rule} under {attack}: {held} against {clean}"
            );
            assert_eq!(
                excluded,
                serde_json::json!({ "sinil-plastics": 20 }),
                "{rule} leaves the hostile update out every round, and only it"
            );
        }
    }
    for rule in ["median", "trimmed-mean"] {
        let (held, _) = f1("scale", rule);
        assert!(
            held >= clean - 0.02,
            "{rule} under scale: {held} against {clean}"
        );
    }
}
