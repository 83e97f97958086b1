//! A federation of separate OS processes, as deployed: the coordinator binary and
//! two participant binaries talk mutual-TLS gRPC over loopback. Also checks that a
//! participant told to stop (SIGTERM) leaves cleanly and tells the coordinator.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn participant() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sangsaeng-participant"))
}

/// The coordinator binary is built next to ours by `cargo test --workspace`.
fn coordinator() -> Command {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_sangsaeng-participant")).with_file_name(format!(
        "sangsaeng-coordinator{}",
        std::env::consts::EXE_SUFFIX
    ));
    assert!(
        p.exists(),
        "{} missing: run through `cargo test --workspace`",
        p.display()
    );
    Command::new(p)
}

/// Three sites and the federation office; shared with `benches/daemon_memory.sh`.
const ROSTER: &str = include_str!("data/roster.toml");

const PLAN: &str = r#"
[schema]
feature_columns = ["temp", "pressure", "vibration"]
label_column = "defect"
classes = ["ok", "defect"]
[model]
hidden_layers = [8]
[training]
rounds = 3
learning_rate = 0.05
min_participants = 2
round_deadline_secs = 60
seed = 1
"#;

/// A separable toy line-data export: defects run hot and vibrate.
fn write_csv(path: &Path, rows: usize, seed: u64) {
    let mut s = String::from("timestamp,temp,pressure,vibration,defect\n");
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) as f64) / (1u64 << 31) as f64
    };
    for i in 0..rows {
        let defect = i % 3 == 0;
        let t = if defect { 80.0 } else { 60.0 } + 10.0 * next();
        let v = if defect { 2.0 } else { 0.5 } + next();
        s.push_str(&format!(
            "2026-11-27T00:{:02}:00,{t:.3},{:.3},{v:.3},{}\n",
            i % 60,
            1.0 + next(),
            if defect { "defect" } else { "ok" }
        ));
    }
    std::fs::write(path, s).unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killer(Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn admin_status(d: &Path, url: &str) -> String {
    let out = coordinator()
        .args(["admin", "--coordinator", url, "--ca"])
        .arg(d.join("pki/ca.pem"))
        .arg("--cert")
        .arg(d.join("pki/ops.pem"))
        .arg("--key")
        .arg(d.join("pki/ops.key"))
        .arg("status")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn separate_processes_train_and_shut_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d, "plan.toml", PLAN);

    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let mut coord = Killer(serve(d, port, "runs", "plan.toml"));
    // Participants started before the coordinator listens must back off and retry.
    let mut a = Killer(start_site(d, &url, "plant-a", "a.csv"));
    let mut b = Killer(start_site(d, &url, "supplier-b", "b.csv"));
    for p in [&mut a, &mut b] {
        let status = wait_exit(&mut p.0, Duration::from_secs(240)).expect("participant finished");
        assert!(status.success());
    }
    let status = admin_status(d, &url);
    assert!(status.contains("phase completed, round 3/3"), "{status}");
    let run = only_run(&d.join("runs"));
    assert!(run.join("global.safetensors").exists());
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );

    // A daemon (no --once) stopped with SIGTERM leaves and exits 0.
    let mut daemon = Killer(
        site(d, &url, "plant-a", "a.csv")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !admin_status(d, &url)
        .lines()
        .any(|l| l.starts_with("plant-a") && l.contains(" yes "))
    {
        assert!(Instant::now() < deadline, "daemon never connected");
        std::thread::sleep(Duration::from_millis(100));
    }
    sigterm(&daemon.0);
    let s = wait_exit(&mut daemon.0, Duration::from_secs(20)).expect("daemon stopped");
    assert!(s.success());
    let mut log = String::new();
    use std::io::Read;
    daemon
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("told the coordinator we are leaving"), "{log}");
    assert!(
        admin_status(d, &url)
            .lines()
            .any(|l| l.starts_with("plant-a") && l.contains(" no "))
    );

    // The coordinator stops gracefully on SIGTERM.
    sigterm(&coord.0);
    let s = wait_exit(&mut coord.0, Duration::from_secs(20)).expect("coordinator stopped");
    assert!(s.success());
}

/// Starts `sangsaeng-coordinator serve` for the given folder layout.
fn serve(d: &Path, port: u16, runs: &str, plan: &str) -> Child {
    coordinator()
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--roster",
        ])
        .arg(d.join("roster.toml"))
        .arg("--plan")
        .arg(d.join(plan))
        .arg("--output-dir")
        .arg(d.join(runs))
        .arg("--ca")
        .arg(d.join("pki/ca.pem"))
        .arg("--cert")
        .arg(d.join("pki/server.pem"))
        .arg("--key")
        .arg(d.join("pki/server.key"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn only_run(runs: &Path) -> PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(v.len(), 1, "{v:?}");
    v.pop().unwrap()
}

/// The two sites of most tests: organisation and CSV file.
const TWO_SITES: &[(&str, &str)] = &[("plant-a", "a.csv"), ("supplier-b", "b.csv")];

/// Runs a whole training with two `--once` participants; returns its output folder.
fn train(d: &Path, runs: &str, plan: &str, kill_after_rounds: Option<usize>) -> PathBuf {
    train_with(d, runs, plan, kill_after_rounds, TWO_SITES)
}

/// Runs a whole training with one `--once` participant per site, SIGKILLing the
/// coordinator (and restarting it) once `kill_after_rounds` rounds are recorded.
fn train_with(
    d: &Path,
    runs: &str,
    plan: &str,
    kill_after_rounds: Option<usize>,
    sites: &[(&str, &str)],
) -> PathBuf {
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let mut coord = Killer(serve(d, port, runs, plan));
    let mut parts: Vec<Killer> = sites
        .iter()
        .map(|(org, csv)| Killer(start_site(d, &url, org, csv)))
        .collect();
    if let Some(k) = kill_after_rounds {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(Instant::now() < deadline, "rounds never completed");
            let done = std::fs::read_dir(d.join(runs))
                .ok()
                .and_then(|mut r| r.find_map(|e| e.ok().filter(|e| e.path().is_dir())))
                .and_then(|e| std::fs::read_to_string(e.path().join("metrics.jsonl")).ok())
                .map(|m| m.lines().count())
                .unwrap_or(0);
            if done >= k {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SIGKILL: no shutdown path runs, exactly like a crash or power loss.
        coord.0.kill().unwrap();
        coord.0.wait().unwrap();
        let run = only_run(&d.join(runs));
        assert!(
            !run.join("global.safetensors").exists(),
            "the training ended before the kill"
        );
        coord = Killer(serve(d, port, runs, plan));
    }
    for p in &mut parts {
        let status = wait_exit(&mut p.0, Duration::from_secs(300)).expect("participant finished");
        assert!(status.success());
    }
    drop(coord);
    only_run(&d.join(runs))
}

/// A folder with the roster, a plan (`plan_file`), two sites' CSV files and a demo PKI.
fn setup(d: &Path, plan_file: &str, plan: &str) {
    std::fs::write(d.join("roster.toml"), ROSTER).unwrap();
    std::fs::write(d.join(plan_file), plan).unwrap();
    write_csv(&d.join("a.csv"), 300, 1);
    write_csv(&d.join("b.csv"), 120, 2);
    let demo = coordinator()
        .args(["pki", "demo", "--roster"])
        .arg(d.join("roster.toml"))
        .arg("--out")
        .arg(d.join("pki"))
        .output()
        .unwrap();
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
}

/// Asserts two trainings ended with the same model, bit for bit, and that every
/// round 1..=rounds of `resumed` is recorded (one round may be evaluated twice around a kill).
fn assert_same_outcome(reference: &Path, resumed: &Path, rounds: u64, context: &str) {
    let plan = sangsaeng_common::config::plan::TrainingPlan::from_file(&resumed.join("plan.toml"))
        .unwrap();
    let layout = sangsaeng_common::learning::model::ModelSpec::from_plan(&plan).layout();
    let bits = |p: &Path| {
        sangsaeng_common::transfer::weights::load_safetensors(
            &p.join("global.safetensors"),
            &layout,
        )
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect::<Vec<_>>()
    };
    assert_eq!(
        bits(reference),
        bits(resumed),
        "{context}: the final model differs from the uninterrupted run"
    );
    let metrics = std::fs::read_to_string(resumed.join("metrics.jsonl")).unwrap();
    let mut seen: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["round"]
                .as_u64()
                .unwrap()
        })
        .collect();
    seen.dedup();
    assert_eq!(
        seen,
        (1..=rounds).collect::<Vec<_>>(),
        "{context}: a committed round was lost or redone"
    );
}

#[test]
fn a_coordinator_killed_mid_training_resumes_and_ends_with_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Enough local work per round that the kill lands mid-training.
    let slow = PLAN.replace(
        "rounds = 3",
        "rounds = 5\nlocal_epochs = 150\nbatch_size = 16",
    );
    setup(d, "slow-plan.toml", &slow);
    let reference = train(d, "runs-uninterrupted", "slow-plan.toml", None);
    let resumed = train(d, "runs-killed", "slow-plan.toml", Some(2));
    assert_same_outcome(&reference, &resumed, 5, "killed after round 2");
}

/// A server optimiser's moments are part of each round's record: killed
/// mid-training, the coordinator resumes FedAdam from the state saved with
/// the last committed round and ends with the uninterrupted run's model.
#[test]
fn a_coordinator_killed_mid_fedadam_training_resumes_its_optimizer_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let adam = PLAN.replace(
        "rounds = 3",
        "rounds = 4\nlocal_epochs = 150\nbatch_size = 16",
    ) + "[aggregation]\nstrategy = \"fedadam\"\n";
    setup(d, "adam-plan.toml", &adam);
    let reference = train(d, "runs-uninterrupted", "adam-plan.toml", None);
    let resumed = train(d, "runs-killed", "adam-plan.toml", Some(2));
    assert_same_outcome(&reference, &resumed, 4, "FedAdam, killed after round 2");
    // Only the last committed round's state is kept.
    let states: Vec<String> = std::fs::read_dir(&resumed)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("server-optimizer-round-"))
        .collect();
    assert_eq!(states, vec!["server-optimizer-round-0004.safetensors"]);
}

/// SCAFFOLD: the server control variate is saved with each round as optimiser
/// state and every site's own c_i under its state_dir, so a coordinator killed
/// mid-training resumes both and ends with the uninterrupted run's model.
#[test]
fn a_coordinator_killed_mid_scaffold_training_resumes_its_control_variates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let scaffold = PLAN.replace(
        "rounds = 3",
        "rounds = 4\nlocal_epochs = 150\nbatch_size = 16",
    ) + "[aggregation]\nstrategy = \"scaffold\"\n";
    setup(d, "scaffold-plan.toml", &scaffold);
    let reference = train(d, "runs-uninterrupted", "scaffold-plan.toml", None);
    let resumed = train(d, "runs-killed", "scaffold-plan.toml", Some(2));
    assert_same_outcome(&reference, &resumed, 4, "SCAFFOLD, killed after round 2");
    for org in ["plant-a", "supplier-b"] {
        let kept = std::fs::read_dir(d.join(format!("state-{org}")))
            .unwrap()
            .count();
        assert_eq!(kept, 2, "{org} keeps one control variate per training");
    }
}

/// Secure aggregation: the coordinator killed during a secure round (its
/// attempt's keys and shares die with it) redoes the round with fresh keys,
/// and the final model is the uninterrupted run's, bit for bit.
#[test]
fn a_coordinator_killed_in_a_secure_round_redoes_it_and_ends_with_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secure = PLAN
        .replace(
            "rounds = 3",
            "rounds = 4\nlocal_epochs = 150\nbatch_size = 16",
        )
        .replace("min_participants = 2", "min_participants = 3")
        + "[privacy]\nsecure_aggregation = true\n";
    setup(d, "secure-plan.toml", &secure);
    write_csv(&d.join("c.csv"), 200, 3);
    let sites = &[
        ("plant-a", "a.csv"),
        ("supplier-b", "b.csv"),
        ("supplier-c", "c.csv"),
    ];
    let reference = train_with(d, "runs-uninterrupted", "secure-plan.toml", None, sites);
    let resumed = train_with(d, "runs-killed", "secure-plan.toml", Some(2), sites);
    assert_same_outcome(&reference, &resumed, 4, "killed in secure round 3");
    let metrics = std::fs::read_to_string(resumed.join("metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["secure"]["secure_aggregation"], true, "{v}");
    }
}

/// Tiny deterministic generator for kill timings (the seed is printed to reproduce a run).
fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

/// `sangsaeng-participant run` for `org`'s site, training on `csv`.
fn site(d: &Path, url: &str, org: &str, csv: &str) -> Command {
    let mut c = participant();
    c.args([
        "run",
        "--coordinator",
        url,
        "--label-column",
        "defect",
        "--data",
    ])
    .arg(d.join(csv))
    .arg("--ca")
    .arg(d.join("pki/ca.pem"))
    .arg("--cert")
    .arg(d.join(format!("pki/{org}.pem")))
    .arg("--key")
    .arg(d.join(format!("pki/{org}.key")))
    // SCAFFOLD's control variates live here (unused by other plans).
    .arg("--state-dir")
    .arg(d.join(format!("state-{org}")));
    c
}

/// A site that takes part in one training and exits (`--once`).
fn start_site(d: &Path, url: &str, org: &str, csv: &str) -> Child {
    site(d, url, org, csv)
        .arg("--once")
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Fault injection: SIGKILL the coordinator at random moments N times (N from
/// `SANGSAENG_FAULT_KILLS`, default 3) and once a participant, restarting each.
/// Every committed round must survive and the final model must equal the
/// uninterrupted run's, bit for bit. `docs/RELIABILITY.md` records a run with N = 20.
#[test]
fn fault_injection_random_kills_of_coordinator_and_participant() {
    let kills: usize = std::env::var("SANGSAENG_FAULT_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut seed: u64 = std::env::var("SANGSAENG_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("fault injection: {kills} coordinator kills, seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rounds = 6 + kills as u32;
    let plan = PLAN.replace(
        "rounds = 3",
        &format!("rounds = {rounds}\nlocal_epochs = 100\nbatch_size = 16"),
    );
    setup(d, "fault-plan.toml", &plan);
    let reference = train(d, "runs-reference", "fault-plan.toml", None);

    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let runs = "runs-faults";
    let mut coord = Killer(serve(d, port, runs, "fault-plan.toml"));
    let mut a = Killer(start_site(d, &url, "plant-a", "a.csv"));
    let mut b = Killer(start_site(d, &url, "supplier-b", "b.csv"));
    let finished = |d: &Path| {
        std::fs::read_dir(d.join(runs))
            .ok()
            .and_then(|mut r| r.find_map(|e| e.ok().filter(|e| e.path().is_dir())))
            .is_some_and(|e| e.path().join("global.safetensors").exists())
    };
    let mut done = 0;
    while done < kills && !finished(d) {
        std::thread::sleep(Duration::from_millis(200 + lcg(&mut seed) % 1300));
        if finished(d) {
            break;
        }
        coord.0.kill().unwrap();
        coord.0.wait().unwrap();
        done += 1;
        coord = Killer(serve(d, port, runs, "fault-plan.toml"));
        if done == 1 {
            // A participant dies too (mid-training or mid-upload) and is restarted.
            std::thread::sleep(Duration::from_millis(lcg(&mut seed) % 800));
            b.0.kill().unwrap();
            b.0.wait().unwrap();
            b = Killer(start_site(d, &url, "supplier-b", "b.csv"));
        }
    }
    eprintln!("fault injection: {done} coordinator kills done");
    assert!(
        done >= kills.min(3),
        "the training ended after only {done} kills; make it longer"
    );
    for p in [&mut a, &mut b] {
        let status = wait_exit(&mut p.0, Duration::from_secs(600)).expect("participant finished");
        assert!(status.success());
    }
    drop(coord);
    let resumed = only_run(&d.join(runs));
    assert_same_outcome(
        &reference,
        &resumed,
        rounds as u64,
        &format!("after {done} kills"),
    );
}
