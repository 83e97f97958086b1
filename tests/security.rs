//! Who may talk to the coordinator: mutual TLS against the project CA, the roster
//! checked on every RPC, roles enforced per service, and bad input refused with a
//! clear message while the coordinator keeps serving everyone else.

mod support;

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Code;

use sangsaeng::localnet::{self, Pki};
use sangsaeng_common::identity::pki::{self, CaBundle};
use sangsaeng_common::identity::tls::TlsMaterial;
use sangsaeng_coordinator::CoordinatorError;
use sangsaeng_coordinator::client::AdminClient;
use sangsaeng_proto::v1 as pb;
use sangsaeng_proto::v1::federation_client::FederationClient;

async fn coordinator(dir: &std::path::Path) -> (Pki, localnet::RunningCoordinator) {
    let roster = support::roster(&[]);
    let pki = support::pki(dir, &roster);
    let coord =
        localnet::start_coordinator(&pki, roster, None, &dir.join("runs"), Default::default())
            .await
            .unwrap();
    // Wait until it serves.
    localnet::wait_for_status(
        &coord.url,
        &pki.material("ops-admin"),
        Duration::from_secs(10),
        |_| true,
    )
    .await
    .expect("coordinator up");
    (pki, coord)
}

fn material(ca: &CaBundle, trusted: &Pki, org: &str) -> TlsMaterial {
    let (cert_pem, key_pem) = pki::issue_client_cert(ca, org, 1).unwrap();
    TlsMaterial {
        ca_pem: trusted.ca.cert_pem.clone(),
        cert_pem,
        key_pem,
    }
}

async fn federation_client(
    url: &str,
    tls: &TlsMaterial,
) -> Result<FederationClient<tonic::transport::Channel>, String> {
    sangsaeng_common::identity::channel::connect(url, tls, "localhost")
        .await
        .map(FederationClient::new)
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_fails_the_handshake() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (pki, coord) = coordinator(dir.path()).await;
    let rogue_ca = CaBundle::create("Rogue CA", 1).unwrap();
    // Same organisation id as a real participant, but not signed by the project CA.
    let tls = material(&rogue_ca, &pki, "site-a");
    let outcome = match federation_client(&coord.url, &tls).await {
        Err(e) => Err(e),
        Ok(mut c) => c
            .subscribe(pb::SubscribeRequest::default())
            .await
            .map(|_| ())
            .map_err(|s| format!("{:?} {}", s.code(), s.message())),
    };
    let err = outcome.expect_err("a certificate from another CA must not get in");
    assert!(
        !err.contains("PermissionDenied"),
        "refused at the wrong layer: {err}"
    );
    // The coordinator still serves legitimate callers.
    let mut admin = AdminClient::connect(&coord.url, &pki.material("ops-admin"), "localhost")
        .await
        .unwrap();
    admin.status().await.unwrap();
    coord.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_certificate_not_on_the_roster_gets_permission_denied() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (pki, coord) = coordinator(dir.path()).await;
    let tls = material(&pki.ca, &pki, "stranger-co");
    let mut c = federation_client(&coord.url, &tls).await.unwrap();
    let s = c
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(
        s.message()
            .contains("'stranger-co' is not on the federation's roster"),
        "{}",
        s.message()
    );
    let s = c
        .submit_stats(pb::StatsReport::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "checked on every RPC");
    coord.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_enforced_per_service() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (pki, coord) = coordinator(dir.path()).await;
    // A participant certificate cannot use admin commands.
    let mut as_participant = AdminClient::connect(&coord.url, &pki.material("site-a"), "localhost")
        .await
        .unwrap();
    match as_participant.status().await {
        Err(CoordinatorError::PermissionDenied(m)) => {
            assert!(m.contains("needs role 'admin'"), "{m}")
        }
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }
    assert!(matches!(
        as_participant
            .start_training(support::plan_toml(1, 1))
            .await,
        Err(CoordinatorError::PermissionDenied(_))
    ));
    // An admin certificate cannot pose as a participant.
    let mut as_admin = federation_client(&coord.url, &pki.material("ops-admin"))
        .await
        .unwrap();
    let s = as_admin
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    coord.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plans_are_refused_with_the_key_and_the_coordinator_keeps_serving() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (pki, coord) = coordinator(dir.path()).await;
    let mut admin = AdminClient::connect(&coord.url, &pki.material("ops-admin"), "localhost")
        .await
        .unwrap();
    let good = support::plan_toml(1, 1);
    for (bad, needle) in [
        (good.replace("rounds = 1", "rounds = 0"), "training.rounds"),
        (good.replace("[model]", "[model]\nwidth = 3"), "width"),
        (
            good.replace("min_participants = 1", "min_participants = 9"),
            "min_participants",
        ),
        ("not toml at all [".to_string(), "submitted plan"),
        (
            format!(
                "{good}\n[privacy.dp]\nlevel = \"client\"\ntarget_epsilon = 4.0\ndelta = 1e-5\nclip_norm = 0.0\n"
            ),
            "privacy.dp.clip_norm",
        ),
    ] {
        match admin.start_training(bad).await {
            Err(CoordinatorError::InvalidArgument(m)) => {
                assert!(m.contains(needle), "{needle}: {m}")
            }
            other => panic!("expected INVALID_ARGUMENT for {needle}, got {other:?}"),
        }
    }
    let s = admin.status().await.unwrap();
    assert!(
        s.training.is_none(),
        "no training was started by a bad plan"
    );
    // Unknown training id and out-of-phase calls from a participant are refused, clearly.
    let mut site = federation_client(&coord.url, &pki.material("site-a"))
        .await
        .unwrap();
    let s = site
        .submit_evaluation(pb::EvaluationReport {
            training_id: "t-nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    assert!(s.message().contains("t-nope"), "{}", s.message());
    coord.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_whose_data_does_not_match_the_plan_is_reported_and_the_others_train() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let roster = support::roster(&["site-d"]);
    let pki = support::pki(dir.path(), &roster);
    let mut files = support::site_files(dir.path(), 3);
    // site-d's export lacks one sensor column.
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let stripped: String = text
        .lines()
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            let mut c = cells.clone();
            c.remove(5);
            format!("{}\n", c.join(","))
        })
        .collect();
    let bad = dir.path().join("site-d.csv");
    std::fs::write(&bad, stripped).unwrap();
    files.push(bad);
    let coord = localnet::start_coordinator(
        &pki,
        roster,
        Some(support::plan(2, 3)),
        &dir.path().join("runs"),
        Default::default(),
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let mut handles = vec![];
    for (org, f) in support::SITES.iter().chain(&["site-d"]).zip(files) {
        let cfg = localnet::participant_config(&pki, &coord.url, org, vec![f], "fault", None);
        handles.push(localnet::spawn_participant(cfg, stop.clone()));
    }
    let admin = pki.material("ops-admin");
    let s = support::training_ended(&coord.url, &admin).await;
    assert_eq!(s.training.as_ref().unwrap().phase, "completed");
    let d = s
        .participants
        .iter()
        .find(|p| p.org_id == "site-d")
        .unwrap();
    assert!(
        d.last_error.contains("xmeas_6"),
        "site-d's error should name the missing column: {}",
        d.last_error
    );
    // site-d sits the training out but keeps running until told to stop.
    stop.cancel();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    coord.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_and_the_others_keep_working() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let roster = support::roster(&[]);
    let pki = support::pki(dir.path(), &roster);
    let limits = sangsaeng_coordinator::config::Limits {
        max_connections: 2,
        ..Default::default()
    };
    let coord = localnet::start_coordinator(&pki, roster, None, &dir.path().join("runs"), limits)
        .await
        .unwrap();
    let admin = pki.material("ops-admin");
    let mut a = AdminClient::connect(&coord.url, &admin, "localhost")
        .await
        .unwrap();
    a.status().await.unwrap();
    let mut b = AdminClient::connect(&coord.url, &admin, "localhost")
        .await
        .unwrap();
    b.status().await.unwrap();
    let third = async {
        let mut c = AdminClient::connect(&coord.url, &admin, "localhost").await?;
        c.status().await
    }
    .await;
    assert!(third.is_err(), "a third connection must be refused");
    a.status()
        .await
        .expect("the first connection keeps working");
    b.status()
        .await
        .expect("the second connection keeps working");
    // Once a connection closes, its place is free again.
    drop(b);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = async {
            let mut c = AdminClient::connect(&coord.url, &admin, "localhost").await?;
            c.status().await
        }
        .await;
        if attempt.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed place was never reused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    coord.stop().await.unwrap();
}
