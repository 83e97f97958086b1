//! `sangsaeng-coordinator doctor`: every failure it reports (a listen port in
//! use, a key readable by everyone, a roster without an admin, a server
//! certificate of another CA) and the all-ok path, through the library and the
//! binary.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use sangsaeng_common::identity::pki::{self, CaBundle};
use sangsaeng_coordinator::doctor::{self, Check, Outcome};

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

/// An anchor company's folder: PKI from `pki init`'s functions, the roster and
/// coordinator.toml listening on `port`.
struct Anchor {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Anchor {
    fn new(port: u16) -> Anchor {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let ca = CaBundle::create("Doctor test CA", 365).unwrap();
        ca.write(root.join("pki")).unwrap();
        let a = Anchor { _dir: dir, root };
        a.set_server_certificate(&ca);
        std::fs::write(a.root.join("roster.toml"), ROSTER).unwrap();
        std::fs::write(
            a.config(),
            format!(
                r#"
listen = "127.0.0.1:{port}"
roster = "roster.toml"
output_dir = "runs"
[tls]
ca = "pki/ca.pem"
cert = "pki/server.pem"
key = "pki/server.key"
"#
            ),
        )
        .unwrap();
        a
    }

    fn set_server_certificate(&self, ca: &CaBundle) {
        let (cert, key) =
            pki::issue_server_cert(ca, "coordinator", &["localhost".to_string()], 365).unwrap();
        pki::write_public(self.root.join("pki/server.pem"), &cert).unwrap();
        pki::write_private_key(self.root.join("pki/server.key"), &key).unwrap();
    }

    fn config(&self) -> PathBuf {
        self.root.join("coordinator.toml")
    }

    fn checks(&self) -> Vec<Check> {
        doctor::run_checks(&self.config())
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn render(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_outcome(checks: &[Check], name: &str, outcome: Outcome, needle: &str) -> Check {
    let c = checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check '{name}' in:\n{}", render(checks)))
        .clone();
    assert_eq!(c.outcome, outcome, "{}", render(checks));
    assert!(
        format!("{} {}", c.detail, c.hint.clone().unwrap_or_default()).contains(needle),
        "'{needle}' not in {c}"
    );
    c
}

#[test]
fn a_good_setup_passes_every_check() {
    let a = Anchor::new(free_port());
    let checks = a.checks();
    assert!(
        checks.iter().all(|c| c.outcome == Outcome::Ok),
        "{}",
        render(&checks)
    );
    assert_outcome(&checks, "roster", Outcome::Ok, "hanbit-admin");
    assert_outcome(&checks, "certificate validity", Outcome::Ok, "days left");
    assert_outcome(&checks, "output folder", Outcome::Ok, "does not exist yet");
    assert_outcome(&checks, "state store", Outcome::Ok, "does not exist yet");
}

#[test]
fn a_listen_port_in_use_fails_and_names_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let a = Anchor::new(port);
    let checks = a.checks();
    let c = assert_outcome(&checks, "listen address", Outcome::Fail, "in use");
    assert!(c.hint.unwrap().contains(&port.to_string()));
    assert!(doctor::any_failed(&checks));
    drop(taken);
    assert_outcome(&a.checks(), "listen address", Outcome::Ok, "can be bound");
}

#[test]
fn a_key_readable_by_everyone_fails_with_chmod_600() {
    let a = Anchor::new(free_port());
    let key = a.root.join("pki/server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = assert_outcome(&a.checks(), "private key mode", Outcome::Fail, "0644");
    assert_eq!(c.hint.unwrap(), format!("chmod 600 {}", key.display()));
}

#[test]
fn a_roster_without_an_admin_fails() {
    let a = Anchor::new(free_port());
    std::fs::write(
        a.root.join("roster.toml"),
        ROSTER.replace("role = \"admin\"", "role = \"participant\""),
    )
    .unwrap();
    let c = assert_outcome(&a.checks(), "roster", Outcome::Fail, "admin(s): none");
    assert!(c.hint.unwrap().contains("role = \"admin\""));
}

#[test]
fn a_server_certificate_of_another_ca_fails_the_chain() {
    let a = Anchor::new(free_port());
    a.set_server_certificate(&CaBundle::create("Another CA", 365).unwrap());
    let checks = a.checks();
    assert_outcome(
        &checks,
        "certificate chain",
        Outcome::Fail,
        "not issued by the CA",
    );
    assert_outcome(&checks, "certificate validity", Outcome::Ok, "days left");
}

#[test]
fn a_config_that_does_not_parse_is_one_failure() {
    let a = Anchor::new(free_port());
    std::fs::remove_file(a.root.join("roster.toml")).unwrap();
    let checks = a.checks();
    assert_eq!(checks.len(), 1, "{}", render(&checks));
    assert_outcome(&checks, "config", Outcome::Fail, "roster.toml");
}

#[test]
fn the_store_of_a_previous_run_opens_read_only() {
    let a = Anchor::new(free_port());
    // A store as `serve` leaves it, with no training yet.
    let runs = a.root.join("runs");
    sangsaeng_coordinator::durable::store::Store::open(&runs.join("coordinator-state.redb"))
        .unwrap();
    let checks = a.checks();
    assert_outcome(&checks, "state store", Outcome::Ok, "0 training(s)");
    assert_outcome(&checks, "output folder", Outcome::Ok, "is writable");
}

#[test]
fn the_binary_prints_one_line_per_check_and_exits_non_zero_on_failure() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = Anchor::new(taken.local_addr().unwrap().port());
    let out = Command::new(env!("CARGO_BIN_EXE_sangsaeng-coordinator"))
        .args(["doctor", "--config"])
        .arg(a.config())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("ok   config:"), "{stdout}");
    assert!(stdout.contains("FAIL listen address:"), "{stdout}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 check(s) failed"),
        "{stdout}"
    );
    drop(taken);
    let out = Command::new(env!("CARGO_BIN_EXE_sangsaeng-coordinator"))
        .args(["doctor", "--config"])
        .arg(a.config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
