//! The Sangsaeng coordinator, run by the anchor company.
//!
//! It serves two gRPC services on one mutual-TLS endpoint: `Federation` for
//! participant daemons and `Admin` for administrators, and drives trainings
//! round by round with FedAvg over weight deltas.
//!
//! Map of the crate, bottom-up (each depends only on those above it):
//! - [`error`]: the crate's error enum and its single mapping to gRPC status codes.
//! - [`config`]: typed, validated configuration (file + CLI + env) and resource limits.
//! - [`durable`]: the crash-safe store (redb) and the signed, hash-chained audit log.
//! - [`transfer`]: the published model, the checks on uploaded deltas, spill files.
//! - [`state`]: shared in-memory state: presence of participants and the training
//!   in progress.
//! - [`secure`]: secure aggregation's per-attempt bookkeeping and the
//!   `SecureAggregation` RPC's steps.
//! - [`round`]: the round driver and its steps (statistics, open, collect, close,
//!   aggregate, commit, evaluate, record).
//! - [`release`]: opening rules, the release artifact (safetensors, model card,
//!   in-toto provenance, DSSE signature) and OCI layout/registry storage.
//! - [`rpc`]: the `Federation` and `Admin` gRPC services, authorisation, and
//!   connection admission.
//! - [`metrics`]: Prometheus metrics on the optional `metrics_listen` address.
//! - [`client`]: an admin client used by the CLI and tests.
//! - [`doctor`]: pre-flight checks for operators (`sangsaeng-coordinator doctor`).
//!
//! [`run`] is what `sangsaeng-coordinator serve` calls; tests call it too with a
//! listener on `127.0.0.1:0`.

pub mod client;
pub mod config;
pub mod doctor;
pub mod durable;
pub mod error;
pub mod metrics;
pub mod release;
pub mod round;
pub mod rpc;
pub mod secure;
pub mod state;
pub mod transfer;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use sangsaeng_proto::v1::admin_server::AdminServer;
use sangsaeng_proto::v1::federation_server::FederationServer;

pub use config::CoordinatorConfig;
pub use error::{CoordinatorError, Result};
pub use state::Shared;

/// Keepalive pings detect a participant whose machine or network vanished
/// without closing its connection, so operators see it offline within a minute.
const HTTP2_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(20);

/// Serves the coordinator on `listener` until `shutdown` is cancelled.
///
/// An unfinished training found in the state store is resumed; otherwise, if the
/// config holds an initial plan, that training starts at once (and waits for
/// enough participants). Returns after in-flight RPCs have ended.
pub async fn run(
    listener: TcpListener,
    config: CoordinatorConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    // Several crates may link rustls; tonic needs one process-wide provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = sangsaeng_common::identity::tls::server_tls_config(&config.tls.load()?)?;
    let limits = config.limits.clone();
    let addr = listener
        .local_addr()
        .map_err(|e| CoordinatorError::io("reading the listener address", e))?;
    std::fs::create_dir_all(&config.output_dir).map_err(|e| {
        CoordinatorError::io(format!("creating {}", config.output_dir.display()), e)
    })?;
    let initial_plan = config.initial_plan.clone();
    let store = durable::store::Store::open(&config.state_path())?;
    let signer = sangsaeng_common::identity::signing::Signer::from_pem_file(&config.tls.key)?;
    let audit = durable::audit::AuditLog::open(&config.audit_path(), signer)?;
    record_start(&audit, &config)?;
    let shared = Shared::new(config, store, audit, shutdown.clone());
    tracing::info!(
        %addr,
        roster = %shared.config.roster_path.display(),
        organisations = shared.roster.iter().count(),
        output = %shared.config.output_dir.display(),
        "coordinator listening (mutual TLS)"
    );
    resume_or_start(&shared, initial_plan)?;
    if let Some(addr) = shared.config.metrics_listen {
        metrics::serve(addr, shared.clone(), shutdown.clone()).await?;
    }
    // Subscriptions are long-lived streams; graceful shutdown waits for open RPCs, so
    // end them when shutdown starts. Participants see the stream close and reconnect
    // with backoff, which is what should happen when the coordinator restarts.
    let closer = shared.clone();
    tokio::spawn(async move {
        closer.shutdown.cancelled().await;
        sangsaeng_common::process::notify_stopping();
        for p in closer.participants().values_mut() {
            p.tasks = None;
        }
    });
    let federation = FederationServer::new(rpc::federation::FederationService::new(shared.clone()))
        .max_decoding_message_size(limits.max_message_bytes())
        .max_encoding_message_size(limits.max_message_bytes());
    let admin = AdminServer::new(rpc::admin::AdminService::new(shared.clone()))
        .max_decoding_message_size(limits.max_message_bytes());
    sangsaeng_common::process::notify_ready(&format!("serving on {addr}"));
    Server::builder()
        .tls_config(tls)?
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE))
        // Both sized by the chunk limit (see `Limits::http2_window`): measured on
        // 2026-11-30 (docs/BENCHMARKS.md), 1 MiB windows and frames instead of
        // 64 KiB and 16 KiB took 17 % of the coordinator's CPU off P = 1e7, K = 32.
        .initial_stream_window_size(limits.http2_window())
        .initial_connection_window_size(limits.http2_window())
        .max_frame_size(Some(limits.http2_max_frame()))
        .add_service(federation)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            rpc::incoming::limited(listener, limits.max_connections),
            shutdown.cancelled(),
        )
        .await?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// An unfinished training (the coordinator stopped or crashed during it) is
/// resumed where it was; a plan given on the command line only starts when none
/// is pending.
fn resume_or_start(
    shared: &std::sync::Arc<Shared>,
    initial_plan: Option<sangsaeng_common::config::plan::TrainingPlan>,
) -> Result<()> {
    let mut pending = shared.store.unfinished()?;
    pending.sort_by(|a, b| a.id.cmp(&b.id));
    if let Some(rec) = pending.pop() {
        for stale in pending {
            tracing::warn!(training = %stale.id, "an older unfinished training is abandoned; one training runs at a time");
            round::abandon(shared, stale)?;
        }
        if initial_plan.is_some() {
            tracing::warn!(training = %rec.id, "resuming the unfinished training; the --plan given is not started");
        }
        round::resume(shared, rec)?;
    } else if let Some(plan) = initial_plan {
        round::start(shared, plan)?;
    }
    Ok(())
}

/// Records the configuration this run uses, and what changed in the roster since
/// the last run, as the first audit entries of the run.
fn record_start(audit: &durable::audit::AuditLog, config: &CoordinatorConfig) -> Result<()> {
    let roster_toml = config.roster.to_toml();
    let orgs: Vec<serde_json::Value> = config
        .roster
        .iter()
        .map(|o| {
            serde_json::json!({
                "id": o.id, "tier": o.tier, "role": o.role,
                "agreement_signed": o.agreement.signed, "agreement_date": o.agreement.date,
            })
        })
        .collect();
    let previous = durable::audit::read_unverified(audit.path())?
        .into_iter()
        .rev()
        .find(|e| e.kind == "coordinator_started");
    audit.append(
        "coordinator_started",
        serde_json::json!({
            "version": version(),
            "listen": config.listen.to_string(),
            "output_dir": config.output_dir.display().to_string(),
            "limits": format!("{:?}", config.limits),
            "roster_sha256": durable::audit::text_digest(&roster_toml),
            "organisations": orgs,
        }),
    )?;
    if let Some(prev) = previous
        && prev.data["roster_sha256"]
            != serde_json::json!(durable::audit::text_digest(&roster_toml))
    {
        let before: std::collections::BTreeMap<String, serde_json::Value> =
            prev.data["organisations"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|o| Some((o["id"].as_str()?.to_string(), o.clone())))
                .collect();
        let after: std::collections::BTreeMap<String, serde_json::Value> = orgs
            .iter()
            .filter_map(|o| Some((o["id"].as_str()?.to_string(), o.clone())))
            .collect();
        let added: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
        let removed: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
        let changed: Vec<&String> = after
            .iter()
            .filter(|(k, v)| before.get(*k).is_some_and(|b| b != *v))
            .map(|(k, _)| k)
            .collect();
        tracing::info!(
            ?added,
            ?removed,
            ?changed,
            "the roster changed since the last run"
        );
        audit.append(
            "roster_changed",
            serde_json::json!({"added": added, "removed": removed, "changed": changed}),
        )?;
    }
    Ok(())
}

/// The coordinator's version, reported in logs.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
