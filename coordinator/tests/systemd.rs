//! The systemd units in `packaging/systemd` are valid for systemd itself:
//! `systemd-analyze verify` (Debian package `systemd`, which `.ci/run`
//! installs) accepts each one, pointed at the binaries this build produced,
//! without a single warning (an unknown or misspelt key is only a warning to
//! systemd, and would silently drop a hardening setting).

use std::path::{Path, PathBuf};
use std::process::Command;

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd")
}

/// `systemd-analyze`, or `None` (with the reason printed) where it is missing
/// and `SANGSAENG_REQUIRE_EXTERNAL` is not set.
fn systemd_analyze() -> Option<PathBuf> {
    let path = PathBuf::from("/usr/bin/systemd-analyze");
    if path.exists() {
        return Some(path);
    }
    if std::env::var("SANGSAENG_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1") {
        panic!(
            "SANGSAENG_REQUIRE_EXTERNAL=1 but systemd-analyze is missing (apt-get install systemd)"
        );
    }
    eprintln!(
        "SKIPPED: systemd-analyze verify: no /usr/bin/systemd-analyze (apt-get install systemd)"
    );
    None
}

/// Verifies `unit` with its `ExecStart` binary replaced by `binary`; returns
/// systemd-analyze's complaints (empty when the unit is clean).
fn verify(analyze: &Path, unit: &str, installed: &str, binary: &Path) -> String {
    let text = std::fs::read_to_string(units_dir().join(unit)).unwrap();
    assert!(text.contains(installed), "{unit} starts {installed}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(unit);
    std::fs::write(
        &path,
        text.replace(installed, &binary.display().to_string()),
    )
    .unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return format!("exit {}: {complaints}", out.status);
    }
    // Warnings about the unit itself (not about the host's own units).
    complaints
        .lines()
        .filter(|l| l.contains(unit))
        .collect::<Vec<_>>()
        .join("\n")
}

fn participant_binary() -> PathBuf {
    // Built beside this crate's binary by `cargo test --workspace`.
    Path::new(env!("CARGO_BIN_EXE_sangsaeng-coordinator")).with_file_name("sangsaeng-participant")
}

#[test]
fn the_units_pass_systemd_analyze_verify_without_warnings() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let coordinator = Path::new(env!("CARGO_BIN_EXE_sangsaeng-coordinator"));
    let complaints = verify(
        &analyze,
        "sangsaeng-coordinator.service",
        "/usr/local/bin/sangsaeng-coordinator",
        coordinator,
    );
    assert!(complaints.is_empty(), "{complaints}");
    let participant = participant_binary();
    if participant.exists() {
        let complaints = verify(
            &analyze,
            "sangsaeng-participant.service",
            "/usr/local/bin/sangsaeng-participant",
            &participant,
        );
        assert!(complaints.is_empty(), "{complaints}");
    } else {
        // `cargo test -p sangsaeng-coordinator` alone builds only this crate's binary.
        eprintln!("participant unit: verified with the coordinator's binary as a stand-in");
        let complaints = verify(
            &analyze,
            "sangsaeng-participant.service",
            "/usr/local/bin/sangsaeng-participant",
            coordinator,
        );
        assert!(complaints.is_empty(), "{complaints}");
    }
}

#[test]
fn a_misspelt_hardening_key_is_caught() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let text = std::fs::read_to_string(units_dir().join("sangsaeng-coordinator.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let unit = "sangsaeng-typo.service";
    std::fs::write(
        dir.path().join(unit),
        text.replace("NoNewPrivileges", "NoNewPrivilegs"),
    )
    .unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(dir.path().join(unit))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Unknown key 'NoNewPrivilegs'"), "{text}");
}

/// Under a `Type=notify` unit systemd waits for `READY=1` on `NOTIFY_SOCKET`;
/// the daemon sends it once it serves, and `STOPPING=1` when SIGTERM starts its
/// graceful stop. A datagram socket stands in for systemd.
#[test]
fn the_coordinator_tells_systemd_when_it_is_ready_and_when_it_stops() {
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("roster.toml"),
        "[[organisation]]\nid = \"ops\"\nname = \"Ops\"\ntier = \"anchor\"\nrole = \"admin\"\n",
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_sangsaeng-coordinator");
    let pki = Command::new(bin)
        .args(["pki", "demo", "--roster"])
        .arg(d.join("roster.toml"))
        .arg("--out")
        .arg(d.join("pki"))
        .output()
        .unwrap();
    assert!(
        pki.status.success(),
        "{}",
        String::from_utf8_lossy(&pki.stderr)
    );
    let socket_path = d.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--roster"])
        .arg(d.join("roster.toml"))
        .arg("--ca")
        .arg(d.join("pki/ca.pem"))
        .arg("--cert")
        .arg(d.join("pki/server.pem"))
        .arg("--key")
        .arg(d.join("pki/server.key"))
        .arg("--output-dir")
        .arg(d.join("runs"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let read = |buf: &mut [u8]| {
        let n = socket.recv(buf).expect("a notice within 60 s");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let ready = read(&mut buf);
    assert!(
        ready.contains("READY=1") && ready.contains("STATUS=serving on 127.0.0.1:"),
        "{ready}"
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopping = read(&mut buf);
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    let status = child.wait().unwrap();
    assert!(status.success(), "a SIGTERM is a clean stop: {status}");
}
