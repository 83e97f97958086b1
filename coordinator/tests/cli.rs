//! The `sangsaeng-coordinator` binary as an operator uses it: help texts, PKI
//! commands (key modes, fingerprints), and clear refusals of bad configuration.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sangsaeng-coordinator"))
}

const ROSTER: &str = r#"
[[organisation]]
id = "hanbit-motors"
name = "Hanbit Motors"
tier = "anchor"
role = "participant"

[[organisation]]
id = "hanbit-admin"
name = "Hanbit federation office"
tier = "anchor"
role = "admin"
"#;

#[test]
fn help_explains_every_subcommand() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["pki", "init", "--help"],
        vec!["admin", "--help"],
    ] {
        let out = bin().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage"), "{args:?}: {text}");
    }
    let text = String::from_utf8_lossy(&bin().args(["serve", "--help"]).output().unwrap().stdout)
        .to_string();
    for opt in [
        "--roster",
        "--plan",
        "--listen",
        "--ca",
        "--cert",
        "--key",
        "--output-dir",
        "--config",
    ] {
        assert!(text.contains(opt), "serve --help lacks {opt}");
    }
}

#[test]
fn pki_init_writes_private_keys_0600_and_prints_the_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["pki", "init", "--out"])
        .arg(dir.path())
        .args(["--san", "coordinator.example", "--san", "10.1.2.3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fp = bin()
        .args(["pki", "fingerprint"])
        .arg(dir.path().join("ca.pem"))
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout).trim().to_string();
    assert_eq!(fp.split(':').count(), 32, "{fp}");
    assert!(
        stdout.contains(&fp),
        "init must print the CA fingerprint: {stdout}"
    );
    for key in ["ca.key", "server.key"] {
        let mode = std::fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    // A second init in the same folder must not replace the CA.
    let before = std::fs::read(dir.path().join("ca.key")).unwrap();
    let again = bin()
        .args(["pki", "init", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to replace"));
    assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), before);
}

#[test]
fn csr_enrolment_signs_only_the_named_organisation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("roster.toml"), ROSTER).unwrap();
    assert!(
        bin()
            .args(["pki", "init", "--out"])
            .arg(d)
            .output()
            .unwrap()
            .status
            .success()
    );
    // What `sangsaeng-participant enrol` does on the supplier's machine.
    let (key, csr) = sangsaeng_common::identity::pki::generate_csr("hanbit-motors").unwrap();
    sangsaeng_common::identity::pki::write_private_key(d.join("site.key"), &key).unwrap();
    std::fs::write(d.join("site.csr"), csr).unwrap();
    let sign = |org: &str| {
        bin()
            .args(["pki", "sign", "--ca-dir"])
            .arg(d)
            .arg("--csr")
            .arg(d.join("site.csr"))
            .args(["--org", org, "--roster"])
            .arg(d.join("roster.toml"))
            .arg("--out")
            .arg(d.join(format!("{org}.pem")))
            .output()
            .unwrap()
    };
    let ok = sign("hanbit-motors");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let pem = std::fs::read_to_string(d.join("hanbit-motors.pem")).unwrap();
    let der = rustls_pemfile_der(&pem);
    assert_eq!(
        sangsaeng_common::identity::tls::identity_from_der(&der).unwrap(),
        "hanbit-motors"
    );
    // A request for one organisation cannot be signed as another.
    let wrong = sign("hanbit-admin");
    assert!(!wrong.status.success());
    // An organisation not on the roster is refused before signing.
    let stranger = sign("stranger-co");
    assert!(!stranger.status.success());
    assert!(String::from_utf8_lossy(&stranger.stderr).contains("not in"));
}

fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn serve_refuses_bad_configuration_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("roster.toml"),
        ROSTER.replace(
            "tier = \"anchor\"\nrole = \"admin\"",
            "tier = \"gold\"\nrole = \"admin\"",
        ),
    )
    .unwrap();
    let out = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--roster"])
        .arg(d.join("roster.toml"))
        .args(["--ca", "x", "--cert", "y", "--key", "z"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("roster.toml") && err.contains("tier 'gold'"),
        "{err}"
    );
    // Missing TLS files are named.
    std::fs::write(d.join("roster.toml"), ROSTER).unwrap();
    let out = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--roster"])
        .arg(d.join("roster.toml"))
        .args(["--ca", "/nonexistent/ca.pem", "--cert", "y", "--key", "z"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ca.pem"));
}

#[test]
fn audit_verify_reports_an_intact_log_and_names_the_broken_line() {
    use sangsaeng_coordinator::durable::audit::AuditLog;
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["pki", "init", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = dir.path().join("server.key");
    let cert = dir.path().join("server.pem");
    let log_path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(
        &log_path,
        sangsaeng_common::identity::signing::Signer::from_pem_file(&key).unwrap(),
    )
    .unwrap();
    for org in ["a", "b", "c"] {
        log.append("joined", serde_json::json!({ "org": org }))
            .unwrap();
    }
    drop(log);
    let verify = || {
        bin()
            .args(["audit", "verify", "--log"])
            .arg(&log_path)
            .arg("--cert")
            .arg(&cert)
            .output()
            .unwrap()
    };
    let ok = verify();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("3 entries, chain and signatures intact"));

    let text = std::fs::read_to_string(&log_path).unwrap();
    std::fs::write(&log_path, text.replacen("\"b\"", "\"x\"", 1)).unwrap();
    let bad = verify();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("line 2 (entry 1)") && err.contains("altered"),
        "{err}"
    );
}

#[test]
fn release_commands_explain_themselves_and_refuse_a_missing_source() {
    let out = bin().args(["release", "pull", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--layout") && text.contains("--registry"),
        "{text}"
    );
    let out = bin()
        .args(["release", "pull", "--tag", "v1", "--out", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = bin()
        .args([
            "admin", "--ca", "a", "--cert", "b", "--key", "c", "release", "--help",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--policy") && text.contains("exits with status 1"),
        "{text}"
    );
}

const DP_PLAN: &str = r#"
[schema]
feature_columns = ["a", "b"]
label_column = "y"
classes = ["0", "1"]
[model]
hidden_layers = [8]
[training]
rounds = 5
local_epochs = 2
batch_size = 64
learning_rate = 0.01
min_participants = 1
[privacy.dp]
level = "record"
target_epsilon = 4.0
delta = 1e-5
max_grad_norm = 1.0
"#;

#[test]
fn privacy_prints_the_epsilon_a_plan_spends_and_refuses_impossible_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, DP_PLAN).unwrap();
    let run = |args: &[&str]| {
        let out = bin()
            .arg("privacy")
            .arg("--plan")
            .arg(&plan)
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = run(&["--rows", "20000"]);
    assert!(ok, "{text}");
    assert!(text.contains("derived from the target"), "{text}");
    assert!(
        text.contains("626 steps per round"),
        "2 epochs x ceil(20000/64): {text}"
    );
    let last = text
        .lines()
        .find_map(|l| l.strip_prefix("total epsilon "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no total epsilon line: {text}"));
    assert!(
        last <= 4.0 && last > 3.9,
        "calibrated to the target: {last}"
    );

    // Record level needs the site's rows; delta must be below 1/rows.
    let (ok, text) = run(&[]);
    assert!(!ok && text.contains("training rows"), "{text}");
    let (ok, text) = run(&["--rows", "100000"]);
    assert!(!ok && text.contains("privacy.dp.delta"), "{text}");

    // A fixed noise multiplier too small for the target: refused with the figures.
    std::fs::write(
        &plan,
        DP_PLAN.replace("max_grad_norm", "noise_multiplier = 0.3\nmax_grad_norm"),
    )
    .unwrap();
    let (ok, text) = run(&["--rows", "20000"]);
    assert!(!ok && text.contains("above its target 4"), "{text}");

    // Bad values are refused at plan load, naming the key.
    std::fs::write(
        &plan,
        DP_PLAN.replace("max_grad_norm = 1.0", "max_grad_norm = 0.0"),
    )
    .unwrap();
    let (ok, text) = run(&["--rows", "20000"]);
    assert!(!ok && text.contains("privacy.dp.max_grad_norm"), "{text}");
}
