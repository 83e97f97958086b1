//! The coordinator's Prometheus endpoint during a real federation over mTLS:
//! its page passes Prometheus's own `promtool check metrics`, its counters say
//! what happened, and a real Prometheus server (Debian package `prometheus`,
//! installed by `.ci/run`) scrapes it and answers a query for a counter. A
//! participant daemon's own endpoint passes `promtool` too and counts its rounds.

mod support;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sangsaeng_coordinator::config::CoordinatorConfig;
use tokio_util::sync::CancellationToken;

fn require_external() -> bool {
    std::env::var("SANGSAENG_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1")
}

/// A Prometheus program, or `None` (after saying why) where it is missing and
/// not required.
fn program(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from("/usr/bin").join(name);
    if path.exists() {
        return Some(path);
    }
    assert!(
        !require_external(),
        "SANGSAENG_REQUIRE_EXTERNAL=1 but {name} is missing (apt-get install prometheus)"
    );
    eprintln!("SKIPPED: {name} is not installed (apt-get install prometheus)");
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP GET on loopback; the body.
fn get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The value of the sample `line` starts with (name and labels), if present.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_metrics_page_is_valid_prometheus_and_counts_the_federation() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let roster = support::roster(&[]);
    let pki = support::pki(dir.path(), &roster);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let config = CoordinatorConfig {
        listen: addr,
        roster,
        roster_path: "(in memory)".into(),
        initial_plan: Some(support::plan(2, 3)),
        output_dir: dir.path().join("runs"),
        tls: pki.files("server"),
        limits: Default::default(),
        durable_updates: true,
        metrics_listen: Some(metrics_addr.parse().unwrap()),
    };
    let shutdown = CancellationToken::new();
    let coordinator = tokio::spawn(sangsaeng_coordinator::run(
        listener,
        config,
        shutdown.clone(),
    ));
    let url = format!("https://127.0.0.1:{}", addr.port());
    let stop = CancellationToken::new();
    let handles = support::spawn_sites(&pki, &url, support::site_files(dir.path(), 3), &stop);
    let s = support::training_ended(&url, &pki.material("ops-admin")).await;
    assert_eq!(s.training.unwrap().phase, "completed");
    for h in handles {
        h.await.unwrap().unwrap();
    }

    let page = get(&metrics_addr, "/metrics").expect("the metrics page");
    assert_eq!(
        sample(&page, "sangsaeng_rounds_completed_total"),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "sangsaeng_updates_accepted_total"),
        Some(6.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "sangsaeng_training_phase{phase=\"completed\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&page, "sangsaeng_training_phase{phase=\"training\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&page, "sangsaeng_participants{state=\"known\"}"),
        Some(4.0)
    );
    assert_eq!(
        sample(&page, "sangsaeng_round_duration_seconds_count"),
        Some(2.0)
    );
    assert!(sample(&page, "sangsaeng_received_bytes_total").unwrap() > 0.0);
    assert!(sample(&page, "sangsaeng_sent_bytes_total").unwrap() > 0.0);
    assert!(sample(&page, "sangsaeng_audit_entries").unwrap() >= 5.0);
    let f1 = sample(&page, "sangsaeng_last_round_macro_f1").unwrap();
    assert!((0.0..=1.0).contains(&f1));

    promtool_accepts(&page);

    if let Some(prometheus) = program("prometheus") {
        let value = scrape_with_prometheus(&prometheus, &metrics_addr, dir.path());
        assert_eq!(
            value, "2",
            "Prometheus read sangsaeng_rounds_completed_total"
        );
    }

    stop.cancel();
    shutdown.cancel();
    coordinator.await.unwrap().unwrap();
}

/// `promtool check metrics` accepts `page` (where promtool is installed).
fn promtool_accepts(page: &str) {
    let Some(promtool) = program("promtool") else {
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_participants_metrics_page_is_valid_prometheus_and_counts_its_rounds() {
    use sangsaeng::localnet;
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let roster = support::roster(&[]);
    let pki = support::pki(dir.path(), &roster);
    let coord = localnet::start_coordinator(
        &pki,
        roster,
        Some(support::plan(2, 3)),
        &dir.path().join("runs"),
        Default::default(),
    )
    .await
    .unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let stop = CancellationToken::new();
    let files = support::site_files(dir.path(), 3);
    let handles: Vec<_> = support::SITES
        .iter()
        .zip(files.clone())
        .map(|(org, f)| {
            let mut cfg =
                localnet::participant_config(&pki, &coord.url, org, vec![f], "fault", None);
            if *org == "site-a" {
                // Stays up after the training, so its page can be read.
                cfg.metrics_listen = Some(metrics_addr.parse().unwrap());
                cfg.exit_after_training = false;
            }
            localnet::spawn_participant(cfg, stop.clone())
        })
        .collect();
    let s = support::training_ended(&coord.url, &pki.material("ops-admin")).await;
    assert_eq!(s.training.unwrap().phase, "completed");
    let page = get(&metrics_addr, "/metrics").expect("the participant's metrics page");
    let at = |series: &str| sample(&page, series).unwrap_or_else(|| panic!("{series} in:\n{page}"));
    assert_eq!(at("sangsaeng_participant_rounds_trained_total"), 2.0);
    assert_eq!(at("sangsaeng_participant_connected"), 1.0);
    assert_eq!(at("sangsaeng_participant_training_in_progress"), 0.0);
    assert_eq!(
        at("sangsaeng_participant_local_training_duration_seconds_count"),
        2.0
    );
    assert!(at("sangsaeng_participant_uploaded_bytes_total") > 0.0);
    // Two round models to train from, and models to evaluate.
    assert!(
        at("sangsaeng_participant_downloaded_bytes_total")
            > at("sangsaeng_participant_uploaded_bytes_total")
    );
    assert!(at("sangsaeng_participant_evaluations_total") >= 2.0);
    assert!(at("sangsaeng_participant_last_train_loss") > 0.0);
    // Errors are counted by kind; a run may have some (statistics resent
    // after a reconnect are refused with ALREADY_EXISTS), so only the
    // timestamp's presence is checked here (counting: participant/src/metrics.rs).
    at("sangsaeng_participant_last_error_timestamp_seconds");
    promtool_accepts(&page);

    // A second daemon asked to serve on the same port does not start.
    let mut busy = localnet::participant_config(
        &pki,
        &coord.url,
        "site-b",
        vec![files[1].clone()],
        "fault",
        None,
    );
    busy.metrics_listen = Some(metrics_addr.parse().unwrap());
    let e = sangsaeng_participant::run(busy, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("metrics_listen {metrics_addr}: cannot listen")),
        "{e}"
    );
    stop.cancel();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    coord.stop().await.unwrap();
    assert!(
        get(&metrics_addr, "/metrics").is_none(),
        "the page stops with the daemon"
    );
}

/// Runs a Prometheus server that scrapes `target` every second, and returns
/// the value its query API gives for the completed-rounds counter.
fn scrape_with_prometheus(prometheus: &PathBuf, target: &str, dir: &std::path::Path) -> String {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sangsaeng\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let mut server = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut answer = None;
    while Instant::now() < deadline && answer.is_none() {
        std::thread::sleep(Duration::from_millis(500));
        answer = get(&web, "/api/v1/query?query=sangsaeng_rounds_completed_total").and_then(|b| {
            let v: serde_json::Value = serde_json::from_str(&b).ok()?;
            v["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_string)
        });
    }
    let _ = server.kill();
    let _ = server.wait();
    answer.expect("Prometheus scraped the coordinator within 90 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_port_in_use_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let roster = support::roster(&[]);
    let pki = support::pki(dir.path(), &roster);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = CoordinatorConfig {
        listen: listener.local_addr().unwrap(),
        roster,
        roster_path: "(in memory)".into(),
        initial_plan: None,
        output_dir: dir.path().join("runs"),
        tls: pki.files("server"),
        limits: Default::default(),
        durable_updates: true,
        metrics_listen: Some(busy),
    };
    let e = sangsaeng_coordinator::run(listener, config, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("metrics_listen {busy}: cannot listen")),
        "{e}"
    );
}

#[test]
fn a_metrics_address_without_a_host_is_loopback() {
    use sangsaeng_coordinator::config::metrics_address;
    assert_eq!(
        metrics_address(":9464").unwrap().to_string(),
        "127.0.0.1:9464"
    );
    assert_eq!(
        metrics_address("9464").unwrap().to_string(),
        "127.0.0.1:9464"
    );
    assert_eq!(
        metrics_address("0.0.0.0:9464").unwrap().to_string(),
        "0.0.0.0:9464"
    );
    let e = metrics_address("metrics.example").unwrap_err().to_string();
    assert!(e.contains("metrics_listen 'metrics.example'"), "{e}");
}
