//! `sangsaeng-participant doctor` against a real coordinator on loopback: the
//! all-ok path, and an organisation whose certificate the federation's CA signed
//! but which is not on the coordinator's roster. The failures that need no
//! coordinator are in `participant/tests/doctor.rs`.

use std::path::Path;
use std::time::Duration;

use sangsaeng::localnet;
use sangsaeng_common::config::roster::Roster;
use sangsaeng_common::identity::pki;
use sangsaeng_coordinator::config::Limits;
use sangsaeng_participant::doctor::{self, Check, Outcome, PROBE_TRAINING_ID};

const ROSTER: &str = r#"
[[organisation]]
id = "daesung-precision"
name = "Daesung Precision"
tier = "tier-1"
role = "participant"

[[organisation]]
id = "hanbit-admin"
name = "Hanbit federation office"
tier = "anchor"
role = "admin"
"#;

fn render(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
    checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check '{name}' in:\n{}", render(checks)))
}

fn write_data(dir: &Path) -> std::path::PathBuf {
    let f = dir.join("line1.csv");
    std::fs::write(&f, "temp,fault\n1.0,0\n2.0,1\n").unwrap();
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_for_a_rostered_site_and_names_a_site_missing_from_the_roster() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let roster = Roster::from_toml(ROSTER, "test roster").unwrap();
    let pki = localnet::write_pki(&dir.join("pki"), &roster).unwrap();
    // Signed by the federation's CA, but not on the roster.
    let (cert, key) = pki::issue_client_cert(&pki.ca, "stranger-works", 30).unwrap();
    pki::write_public(dir.join("pki/stranger-works.pem"), &cert).unwrap();
    pki::write_private_key(dir.join("pki/stranger-works.key"), &key).unwrap();
    let coord =
        localnet::start_coordinator(&pki, roster, None, &dir.join("runs"), Limits::default())
            .await
            .unwrap();
    let data = write_data(dir);

    let config = localnet::participant_config(
        &pki,
        &coord.url,
        "daesung-precision",
        vec![data.clone()],
        "fault",
        None,
    );
    let checks = doctor::check_config(&config, None).await;
    // The local PKI is issued for 30 days: its certificates are (rightly) reported
    // as due for renewal; everything else is fine.
    assert!(
        checks.iter().all(|c| c.outcome == Outcome::Ok
            || (c.outcome == Outcome::Warn && c.name.ends_with("validity"))),
        "{}",
        render(&checks)
    );
    assert!(
        find(&checks, "roster")
            .detail
            .contains("knows 'daesung-precision'")
    );
    assert!(
        find(&checks, "clock").detail.contains("within"),
        "{}",
        render(&checks)
    );

    let stranger = localnet::participant_config(
        &pki,
        &coord.url,
        "stranger-works",
        vec![data],
        "fault",
        None,
    );
    let checks = doctor::check_config(&stranger, None).await;
    assert_eq!(
        find(&checks, "mutual TLS").outcome,
        Outcome::Ok,
        "{}",
        render(&checks)
    );
    let roster_check = find(&checks, "roster");
    assert_eq!(roster_check.outcome, Outcome::Fail, "{}", render(&checks));
    assert!(
        roster_check
            .detail
            .contains("'stranger-works' is not on the coordinator's roster"),
        "{roster_check}"
    );
    assert!(
        roster_check
            .hint
            .as_deref()
            .unwrap()
            .contains("roster.toml")
    );
    assert!(doctor::any_failed(&checks));

    // What the probe leaves at the coordinator: the site is seen, and its last
    // error names the probe training (the next Subscribe clears it).
    let status = localnet::wait_for_status(
        &coord.url,
        &pki.material("hanbit-admin"),
        Duration::from_secs(10),
        |_| true,
    )
    .await
    .expect("admin status");
    let site = status
        .participants
        .iter()
        .find(|p| p.org_id == "daesung-precision")
        .expect("the site is listed");
    assert!(!site.connected);
    assert!(site.last_error.contains(PROBE_TRAINING_ID), "{site:?}");
    coord.stop().await.unwrap();
}
