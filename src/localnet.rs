//! A federation on localhost: writes a demo PKI for a roster, starts the
//! coordinator on `127.0.0.1:0` and participants in the same process, all talking
//! mutual-TLS gRPC over loopback exactly as separate machines would.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::roster::Roster;
use sangsaeng_common::identity::pki::{self, CaBundle};
use sangsaeng_common::identity::tls::{TlsFiles, TlsMaterial};
use sangsaeng_common::learning::data::SiteData;
use sangsaeng_coordinator::config::{CoordinatorConfig, Limits};
use sangsaeng_participant::config::{ParticipantConfig, Reconnect};

/// Paths of a demo PKI written by [`write_pki`].
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca: CaBundle,
}

impl Pki {
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Certificate and key files of an organisation (or "server").
    pub fn files(&self, who: &str) -> TlsFiles {
        TlsFiles {
            ca: self.ca_path(),
            cert: self.dir.join(format!("{who}.pem")),
            key: self.dir.join(format!("{who}.key")),
        }
    }

    pub fn material(&self, who: &str) -> TlsMaterial {
        self.files(who).load().expect("demo PKI files are readable")
    }
}

/// Creates a CA, a server certificate for localhost/127.0.0.1 and a client
/// certificate for every organisation of the roster.
pub fn write_pki(dir: &Path, roster: &Roster) -> sangsaeng_common::Result<Pki> {
    std::fs::create_dir_all(dir).map_err(|e| sangsaeng_common::Error::io(dir, e))?;
    let ca = CaBundle::create("Sangsaeng local CA", 30)?;
    ca.write(dir)?;
    let (cert, key) = pki::issue_server_cert(
        &ca,
        "sangsaeng-coordinator",
        &["localhost".to_string(), "127.0.0.1".to_string()],
        30,
    )?;
    pki::write_public(dir.join("server.pem"), &cert)?;
    pki::write_private_key(dir.join("server.key"), &key)?;
    for org in roster.iter() {
        let (cert, key) = pki::issue_client_cert(&ca, &org.id, 30)?;
        pki::write_public(dir.join(format!("{}.pem", org.id)), &cert)?;
        pki::write_private_key(dir.join(format!("{}.key", org.id)), &key)?;
    }
    Ok(Pki {
        dir: dir.to_path_buf(),
        ca,
    })
}

/// A coordinator running in this process.
pub struct RunningCoordinator {
    pub url: String,
    pub output_dir: PathBuf,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<sangsaeng_coordinator::Result<()>>,
}

impl RunningCoordinator {
    /// Stops the coordinator and waits for it.
    pub async fn stop(self) -> sangsaeng_coordinator::Result<()> {
        self.shutdown.cancel();
        self.handle.await.expect("coordinator task panicked")
    }
}

/// Starts a coordinator on an ephemeral loopback port.
pub async fn start_coordinator(
    pki: &Pki,
    roster: Roster,
    plan: Option<TrainingPlan>,
    output_dir: &Path,
    limits: Limits,
) -> std::io::Result<RunningCoordinator> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = CoordinatorConfig {
        listen: addr,
        roster,
        roster_path: PathBuf::from("(in memory)"),
        initial_plan: plan,
        output_dir: output_dir.to_path_buf(),
        tls: pki.files("server"),
        limits,
        durable_updates: true,
        metrics_listen: None,
    };
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(sangsaeng_coordinator::run(
        listener,
        config,
        shutdown.clone(),
    ));
    Ok(RunningCoordinator {
        url: format!("https://127.0.0.1:{}", addr.port()),
        output_dir: output_dir.to_path_buf(),
        shutdown,
        handle,
    })
}

/// A participant config for an organisation of the demo PKI, reading `files`.
pub fn participant_config(
    pki: &Pki,
    url: &str,
    org: &str,
    files: Vec<PathBuf>,
    label_column: &str,
    record_dir: Option<PathBuf>,
) -> ParticipantConfig {
    // Beside the site's data, as a deployment would keep them.
    let beside = |what: &str| {
        files
            .first()
            .and_then(|f| f.parent())
            .map(|d| d.join(format!("{org}-{what}")))
    };
    let (state_dir, model_dir) = (beside("state"), beside("models"));
    ParticipantConfig {
        coordinator: url.to_string(),
        server_name: "localhost".into(),
        tls: pki.files(org),
        data: SiteData {
            files,
            label_column: label_column.to_string(),
            feature_columns: vec![],
        },
        features_from_plan: true,
        backend: Default::default(),
        state_dir,
        model_dir,
        metrics_listen: None,
        record_dir,
        upload_chunk_bytes: sangsaeng_participant::config::DEFAULT_UPLOAD_CHUNK,
        // Loopback: reconnect quickly so tests that restart things stay fast.
        reconnect: Reconnect {
            initial_ms: 100,
            max_ms: 2000,
        },
        exit_after_training: true,
        privacy: Default::default(),
    }
}

/// Starts a participant in this process.
pub fn spawn_participant(
    config: ParticipantConfig,
    shutdown: CancellationToken,
) -> JoinHandle<sangsaeng_participant::Result<()>> {
    tokio::spawn(sangsaeng_participant::run(config, shutdown))
}

/// Polls the coordinator's status over mTLS (as an admin) until `done` holds or `timeout` passes.
pub async fn wait_for_status(
    url: &str,
    admin: &TlsMaterial,
    timeout: Duration,
    mut done: impl FnMut(&sangsaeng_proto::v1::StatusResponse) -> bool,
) -> Option<sangsaeng_proto::v1::StatusResponse> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut client = loop {
        match sangsaeng_coordinator::client::AdminClient::connect(url, admin, "localhost").await {
            Ok(c) => break c,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(_) => return None,
        }
    };
    loop {
        if let Ok(s) = client.status().await
            && done(&s)
        {
            return Some(s);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
