//! End-to-end run of the `supply_chain` example binary (built by `cargo test`
//! alongside the tests): a short federation, plain and with DP-SGD, that must print
//! the comparison table and release the DP model past the differential-privacy rule.

use std::path::PathBuf;
use std::process::Command;

/// `cargo test` builds examples into `target/<profile>/examples`, next to `deps/` where this test runs.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    profile_dir
        .join("examples")
        .join(format!("supply_chain{}", std::env::consts::EXE_SUFFIX))
}

#[test]
fn supply_chain_example_trains_and_prints_the_comparison_table() {
    let bin = example_binary();
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
