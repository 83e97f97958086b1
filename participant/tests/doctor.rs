//! `sangsaeng-participant doctor`: every failure it reports, on files an operator
//! could really have (a key with mode 0644, a certificate of another CA, an
//! expired one, a missing data file, a coordinator that is down). The checks
//! against a running coordinator (all ok, an organisation not on the roster)
//! are in the workspace's `tests/doctor.rs`, which can start one.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use sangsaeng_common::identity::pki::{self, CaBundle};
use sangsaeng_participant::doctor::{self, Check, Outcome};

const ORG: &str = "daesung-precision";

const PLAN: &str = r#"
[schema]
feature_columns = ["temp", "pressure"]
label_column = "defect"
classes = ["ok", "defect"]
[model]
hidden_layers = [4]
[training]
rounds = 1
learning_rate = 0.05
min_participants = 1
"#;

/// A site's folder: PKI files, one CSV, and participant.toml pointing at a
/// coordinator port where nothing listens.
struct Site {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ca: CaBundle,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let ca = CaBundle::create("Doctor test CA", 30).unwrap();
        ca.write(root.join("pki")).unwrap();
        let (cert, key) = pki::issue_client_cert(&ca, ORG, 365).unwrap();
        let site = Site {
            _dir: dir,
            root,
            ca,
        };
        site.set_certificate(&cert, &key);
        std::fs::write(
            site.root.join("line1.csv"),
            "temp,pressure,defect\n1.0,2.0,ok\n1.5,2.5,defect\n1.2,2.1,ok\n",
        )
        .unwrap();
        std::fs::write(site.root.join("plan.toml"), PLAN).unwrap();
        site.set_config(closed_port(), &["line1.csv"]);
        site
    }

    fn set_certificate(&self, cert: &str, key: &str) {
        pki::write_public(self.root.join("pki/site.pem"), cert).unwrap();
        pki::write_private_key(self.root.join("pki/site.key"), key).unwrap();
    }

    fn set_config(&self, port: u16, files: &[&str]) {
        let files: Vec<String> = files.iter().map(|f| format!("\"{f}\"")).collect();
        std::fs::write(
            self.config(),
            format!(
                r#"
coordinator = "https://127.0.0.1:{port}"
server_name = "localhost"
[tls]
ca = "pki/ca.pem"
cert = "pki/site.pem"
key = "pki/site.key"
[data]
files = [{}]
label_column = "defect"
"#,
                files.join(", ")
            ),
        )
        .unwrap();
    }

    fn config(&self) -> PathBuf {
        self.root.join("participant.toml")
    }

    /// The doctor's checks, with the plan when `with_plan`.
    async fn checks(&self, with_plan: bool) -> Vec<Check> {
        let plan = self.root.join("plan.toml");
        doctor::run_checks(&self.config(), with_plan.then_some(plan.as_path())).await
    }
}

/// A loopback port where nothing listens (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
    checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check '{name}' in:\n{}", render(checks)))
}

fn render(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_outcome(checks: &[Check], name: &str, outcome: Outcome, needle: &str) -> Check {
    let c = find(checks, name).clone();
    assert_eq!(c.outcome, outcome, "{}", render(checks));
    assert!(
        format!("{} {}", c.detail, c.hint.clone().unwrap_or_default()).contains(needle),
        "'{needle}' not in {c}"
    );
    c
}

/// Everything but the coordinator is fine on a fresh site; the coordinator is down.
#[tokio::test]
async fn a_coordinator_that_is_down_is_the_only_failure_and_names_the_port() {
    let site = Site::new();
    let port = closed_port();
    site.set_config(port, &["line1.csv"]);
    let checks = site.checks(true).await;
    let failed: Vec<&Check> = checks
        .iter()
        .filter(|c| c.outcome == Outcome::Fail)
        .collect();
    assert_eq!(failed.len(), 1, "{}", render(&checks));
    let c = assert_outcome(&checks, "coordinator TCP", Outcome::Fail, &port.to_string());
    assert!(c.hint.unwrap().contains("serve"));
    assert_outcome(&checks, "mutual TLS", Outcome::Skip, "cannot be reached");
    assert_outcome(&checks, "organisation", Outcome::Ok, ORG);
    assert_outcome(&checks, "certificate validity", Outcome::Ok, "days left");
    assert_outcome(&checks, "private key mode", Outcome::Ok, "0600");
    assert_outcome(&checks, "coordinator DNS", Outcome::Ok, "127.0.0.1");
    assert_outcome(
        &checks,
        "data against the plan",
        Outcome::Ok,
        "3 rows, 2 features",
    );
    assert!(doctor::any_failed(&checks));
}

#[tokio::test]
async fn a_key_readable_by_everyone_fails_with_chmod_600() {
    let site = Site::new();
    let key = site.root.join("pki/site.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let checks = site.checks(false).await;
    let c = assert_outcome(&checks, "private key mode", Outcome::Fail, "0644");
    assert_eq!(c.hint.unwrap(), format!("chmod 600 {}", key.display()));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let checks = site.checks(false).await;
    assert_outcome(&checks, "private key mode", Outcome::Warn, "chmod 600");
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails_the_chain() {
    let site = Site::new();
    let other = CaBundle::create("Another federation", 30).unwrap();
    let (cert, key) = pki::issue_client_cert(&other, ORG, 365).unwrap();
    site.set_certificate(&cert, &key);
    let checks = site.checks(false).await;
    assert_outcome(
        &checks,
        "certificate chain",
        Outcome::Fail,
        "not issued by the CA",
    );
    // The rest of what can be said about it still is.
    assert_outcome(&checks, "certificate validity", Outcome::Ok, "days left");
    assert_outcome(&checks, "organisation", Outcome::Ok, ORG);
}

#[tokio::test]
async fn an_expired_certificate_fails_and_a_nearly_expired_one_warns() {
    let site = Site::new();
    let now = time::OffsetDateTime::now_utc();
    let (cert, key) = client_cert(
        &site.ca,
        now - time::Duration::days(40),
        now - time::Duration::days(2),
    );
    site.set_certificate(&cert, &key);
    let checks = site.checks(false).await;
    let c = assert_outcome(&checks, "certificate validity", Outcome::Fail, "expired on");
    assert!(c.hint.unwrap().contains("clock"));
    // The chain itself is fine: the two problems are told apart.
    assert_outcome(
        &checks,
        "certificate chain",
        Outcome::Ok,
        "issued by the CA",
    );

    let (cert, key) = client_cert(
        &site.ca,
        now - time::Duration::days(1),
        now + time::Duration::days(9),
    );
    site.set_certificate(&cert, &key);
    let checks = site.checks(false).await;
    assert_outcome(
        &checks,
        "certificate validity",
        Outcome::Warn,
        "8 days left",
    );

    let (cert, key) = client_cert(
        &site.ca,
        now + time::Duration::days(2),
        now + time::Duration::days(60),
    );
    site.set_certificate(&cert, &key);
    let checks = site.checks(false).await;
    assert_outcome(
        &checks,
        "certificate validity",
        Outcome::Fail,
        "not valid before",
    );
}

#[tokio::test]
async fn a_missing_data_file_fails_and_names_it() {
    let site = Site::new();
    site.set_config(closed_port(), &["line1.csv", "line2.csv"]);
    let checks = site.checks(true).await;
    let name = format!("data file {}", site.root.join("line2.csv").display());
    assert_outcome(&checks, &name, Outcome::Fail, "cannot open");
    assert_outcome(&checks, "data against the plan", Outcome::Skip, "unusable");
}

#[tokio::test]
async fn a_data_file_without_the_label_column_fails_and_lists_the_header() {
    let site = Site::new();
    std::fs::write(site.root.join("line1.csv"), "temp,pressure,fault\n1,2,ok\n").unwrap();
    let checks = site.checks(false).await;
    let name = format!("data file {}", site.root.join("line1.csv").display());
    assert_outcome(&checks, &name, Outcome::Fail, "'defect'");
    // With a plan the data is also loaded as training would: a bad label is named.
    std::fs::write(
        site.root.join("line1.csv"),
        "temp,pressure,defect\n1,2,ok\n1,2,broken\n",
    )
    .unwrap();
    let checks = site.checks(true).await;
    assert_outcome(&checks, "data against the plan", Outcome::Fail, "line 3");
}

#[tokio::test]
async fn a_config_that_does_not_parse_is_one_failure() {
    let site = Site::new();
    std::fs::write(site.config(), "coordinatr = \"https://x\"\n").unwrap();
    let checks = site.checks(false).await;
    assert_eq!(checks.len(), 1, "{}", render(&checks));
    assert_outcome(&checks, "config", Outcome::Fail, "coordinatr");
    // Missing TLS files are named too.
    let site = Site::new();
    std::fs::remove_file(site.root.join("pki/site.pem")).unwrap();
    let checks = site.checks(false).await;
    assert_outcome(&checks, "certificate file", Outcome::Fail, "site.pem");
    assert_outcome(&checks, "certificate", Outcome::Skip, "unusable");
}

#[test]
fn the_binary_prints_one_line_per_check_and_exits_non_zero_on_failure() {
    let site = Site::new();
    std::fs::set_permissions(
        site.root.join("pki/site.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sangsaeng-participant"))
        .args(["doctor", "--config"])
        .arg(site.config())
        .arg("--plan")
        .arg(site.root.join("plan.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("ok   config:"), "{stdout}");
    assert!(stdout.contains("FAIL private key mode:"), "{stdout}");
    assert!(stdout.contains("fix: chmod 600"), "{stdout}");
    assert!(stdout.contains("FAIL coordinator TCP:"), "{stdout}");
    assert!(stderr.contains("2 check(s) failed"), "{stderr}");
}

/// A client certificate made like the project's, valid from `not_before` to `not_after`.
fn client_cert(
    ca: &CaBundle,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> (String, String) {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, ORG);
    params.subject_alt_names = vec![SanType::URI(pki::org_uri(ORG).try_into().unwrap())];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert_pem, KeyPair::from_pem(&ca.key_pem).unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}
