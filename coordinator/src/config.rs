//! The coordinator's typed configuration, built once from a TOML file, command-line
//! options and environment, and validated before anything starts.
//!
//! `main.rs` turns clap arguments into overrides on top of the file; the rest of
//! the crate only ever sees a validated [`CoordinatorConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::roster::Roster;
use sangsaeng_common::identity::tls::TlsFiles;

use crate::error::{CoordinatorError, Result};

/// Resource bounds. Each keeps one misbehaving participant from exhausting the coordinator.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest model/delta chunk, in bytes. 1 MiB keeps per-message memory small
    /// while amortising per-message overhead (digest, framing).
    pub max_chunk_bytes: usize,
    /// Uploads received at the same time. Each is folded in chunk by chunk as it
    /// arrives (its chunks in flight in memory, the rest spilled to disk), so
    /// peak memory stays about 3 × the model whatever the number of
    /// participants; each upload in flight adds its HTTP/2 window and chunk
    /// buffers (measured about 7 MiB with 1 MiB chunks: 4 → 8 took 1e6 × 256 from
    /// 104 to 129–134 MiB, docs/BENCHMARKS.md) and a spill file of up to one update.
    pub max_concurrent_uploads: usize,
    /// Model downloads streamed at the same time. Each holds about two chunks in
    /// flight (the message being encoded and the one HTTP/2 is sending), so this
    /// keeps the coordinator's memory flat however many participants download at
    /// the start of a round; the others wait their turn (up to `transfer_idle_secs`).
    pub max_concurrent_downloads: usize,
    /// HTTP/2 streams one connection may open at once (Subscribe + a transfer + spare).
    pub max_streams_per_connection: u32,
    /// TCP connections open at once; more are closed on arrival. Each participant
    /// holds one; the default leaves room for hundreds of suppliers and their retries.
    pub max_connections: usize,
    /// Seconds an upload or download may sit idle between two messages before it is cut.
    pub transfer_idle_secs: u64,
    /// How many times a round that got fewer than `min_participants` updates is re-run
    /// before the training fails with a clear status.
    pub round_attempts: u32,
    /// Largest number of parameters a plan may ask for (guards against a plan typo
    /// that would allocate gigabytes).
    pub max_model_params: usize,
    /// Largest number of examples one update may claim as its FedAvg weight.
    pub max_examples_per_update: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_chunk_bytes: 1 << 20,
            max_concurrent_uploads: 4,
            max_concurrent_downloads: 4,
            max_streams_per_connection: 8,
            max_connections: 1024,
            transfer_idle_secs: 60,
            round_attempts: 3,
            max_model_params: 1 << 28,
            max_examples_per_update: 50_000_000,
        }
    }
}

impl Limits {
    pub fn transfer_idle(&self) -> Duration {
        Duration::from_secs(self.transfer_idle_secs)
    }

    /// Largest encoded gRPC message: one chunk plus room for its envelope.
    pub fn max_message_bytes(&self) -> usize {
        self.max_chunk_bytes + 64 * 1024
    }

    /// HTTP/2 receive window (per stream and per connection): one chunk, at
    /// least the protocol's default 64 KiB, at most 16 MiB. Participants wait for
    /// an upload slot before they stream (`UploadProgress` with `reserve_slot`),
    /// so queued uploads park nothing; the window bounds what an upload in
    /// flight, or a client that skips the admission step, holds in the
    /// coordinator's buffers (`max_connections` bounds the number of windows).
    /// With 64 KiB windows every 1 MiB chunk waited for 16 window updates.
    pub fn http2_window(&self) -> u32 {
        self.max_chunk_bytes.clamp(65_535, 16 << 20) as u32
    }

    /// Largest HTTP/2 frame accepted: one chunk, within HTTP/2's bounds
    /// (16 KiB..16 MiB). A chunk then crosses as one DATA frame rather than 64
    /// of the default 16 KiB, each framed, woken for and copied on its own. Not
    /// more than a chunk: a frame is delivered only whole, so a connection cut
    /// mid-frame loses the frame, and a resumed upload should lose no more than
    /// about the chunk it was sending.
    pub fn http2_max_frame(&self) -> u32 {
        self.max_chunk_bytes.clamp(16_384, (1 << 24) - 1) as u32
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if !(4096..=64 << 20).contains(&self.max_chunk_bytes)
            || !self.max_chunk_bytes.is_multiple_of(4)
        {
            return Err(format!(
                "limits.max_chunk_bytes: {} must be a multiple of 4 in 4096..=67108864",
                self.max_chunk_bytes
            ));
        }
        if self.max_concurrent_uploads == 0 || self.max_concurrent_uploads > 1024 {
            return Err("limits.max_concurrent_uploads: must be in 1..=1024".into());
        }
        if self.max_concurrent_downloads == 0 || self.max_concurrent_downloads > 1024 {
            return Err("limits.max_concurrent_downloads: must be in 1..=1024".into());
        }
        if self.max_streams_per_connection < 2 {
            return Err(
                "limits.max_streams_per_connection: must be at least 2 (subscription + transfer)"
                    .into(),
            );
        }
        if self.max_connections == 0 {
            return Err("limits.max_connections: must be at least 1".into());
        }
        if self.transfer_idle_secs == 0 {
            return Err("limits.transfer_idle_secs: must be at least 1".into());
        }
        if self.round_attempts == 0 {
            return Err("limits.round_attempts: must be at least 1".into());
        }
        if self.max_model_params == 0 {
            return Err("limits.max_model_params: must be at least 1".into());
        }
        if self.max_examples_per_update == 0
            || self.max_examples_per_update
                > sangsaeng_common::aggregation::fedavg::MAX_TOTAL_WEIGHT
        {
            return Err(format!(
                "limits.max_examples_per_update: must be in 1..={}",
                sangsaeng_common::aggregation::fedavg::MAX_TOTAL_WEIGHT
            ));
        }
        Ok(())
    }
}

/// The coordinator's config file (`coordinator.toml`). Paths are relative to the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address the mutual-TLS gRPC endpoint listens on (default `127.0.0.1:7443`;
    /// `--listen`, `SANGSAENG_LISTEN`).
    pub listen: Option<SocketAddr>,
    /// The roster of organisations (required here or as `--roster`).
    pub roster: Option<PathBuf>,
    /// A training plan to start at once (it waits for enough participants); not
    /// started while an unfinished training is pending.
    pub plan: Option<PathBuf>,
    /// Where the state store, the audit log and each training's folder live (default `runs`).
    pub output_dir: Option<PathBuf>,
    /// The coordinator's TLS files (or `--ca`, `--cert`, `--key`).
    pub tls: Option<TlsSection>,
    /// Whether an accepted update is fsynced before it is acknowledged (default
    /// true). With false, a coordinator crash loses the round in progress (its
    /// participants upload again); rounds already completed are never lost.
    pub durable_updates: Option<bool>,
    /// Where Prometheus metrics are served (`/metrics`, plain HTTP): `host:port`,
    /// or `:port` / `port` for loopback (default: not served; `--metrics-listen`).
    pub metrics_listen: Option<String>,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The federation CA's certificate (PEM); clients must present a certificate it issued.
    pub ca: PathBuf,
    /// The coordinator's server certificate (PEM), issued by the CA.
    pub cert: PathBuf,
    /// The server certificate's private key (PEM, mode 0600); it also signs the audit log.
    pub key: PathBuf,
}

/// A metrics address: `host:port`, or `:port` / `port` on loopback (the page
/// is for the anchor company's own monitoring, not for the suppliers' networks).
pub fn metrics_address(text: &str) -> Result<SocketAddr> {
    sangsaeng_common::exposition::listen_address(text)
        .map_err(|e| CoordinatorError::Config(e.to_string()))
}

/// Overrides from the command line / environment; `None` keeps the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub roster: Option<PathBuf>,
    pub plan: Option<PathBuf>,
    pub output_dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub metrics_listen: Option<String>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub roster: Roster,
    /// Where the roster came from (shown in logs).
    pub roster_path: PathBuf,
    /// A plan to start as soon as the coordinator is up (the `serve --plan` case).
    pub initial_plan: Option<TrainingPlan>,
    pub output_dir: PathBuf,
    pub tls: TlsFiles,
    pub limits: Limits,
    /// See [`ConfigFile::durable_updates`].
    pub durable_updates: bool,
    /// See [`ConfigFile::metrics_listen`].
    pub metrics_listen: Option<SocketAddr>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

impl CoordinatorConfig {
    /// The audit log, beside the state store in the output folder.
    pub fn audit_path(&self) -> PathBuf {
        self.output_dir.join(crate::durable::audit::FILE_NAME)
    }

    /// Merges file and overrides, loads roster and plan, and validates everything.
    pub fn build(file: Option<&Path>, o: Overrides) -> Result<Self> {
        let file = file
            .map(sangsaeng_common::config::file::read::<ConfigFile>)
            .transpose()?;
        let rel = |p: PathBuf| match &file {
            Some(f) => f.resolve(&p),
            None => p,
        };
        let cf = file.as_ref().map(|f| &f.values);
        let listen = o
            .listen
            .or(cf.and_then(|c| c.listen))
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        let missing = |what: &str, flag: &str| {
            CoordinatorError::Config(format!(
                "no {what} given: pass {flag} or set it in the config file"
            ))
        };
        let roster_path = o
            .roster
            .or(cf.and_then(|c| c.roster.clone()).map(rel))
            .ok_or_else(|| missing("roster", "--roster"))?;
        let roster = Roster::from_file(&roster_path)?;
        let plan_path = o.plan.or(cf.and_then(|c| c.plan.clone()).map(rel));
        let initial_plan = plan_path
            .as_deref()
            .map(TrainingPlan::from_file)
            .transpose()?;
        let output_dir = o
            .output_dir
            .or(cf.and_then(|c| c.output_dir.clone()).map(rel))
            .unwrap_or_else(|| PathBuf::from("sangsaeng-runs"));
        let tls_file = cf.and_then(|c| c.tls.clone());
        let pick = |over: Option<PathBuf>, f: Option<PathBuf>, what: &str, flag: &str| {
            over.or(f.map(rel)).ok_or_else(|| missing(what, flag))
        };
        let tls = TlsFiles {
            ca: pick(
                o.ca,
                tls_file.as_ref().map(|t| t.ca.clone()),
                "CA certificate",
                "--ca",
            )?,
            cert: pick(
                o.cert,
                tls_file.as_ref().map(|t| t.cert.clone()),
                "server certificate",
                "--cert",
            )?,
            key: pick(
                o.key,
                tls_file.as_ref().map(|t| t.key.clone()),
                "server key",
                "--key",
            )?,
        };
        let limits = cf.map(|c| c.limits.clone()).unwrap_or_default();
        limits.validate().map_err(CoordinatorError::Config)?;
        let cfg = CoordinatorConfig {
            listen,
            roster,
            roster_path,
            initial_plan,
            output_dir,
            tls,
            limits,
            durable_updates: cf.and_then(|c| c.durable_updates).unwrap_or(true),
            metrics_listen: o
                .metrics_listen
                .or(cf.and_then(|c| c.metrics_listen.clone()))
                .map(|a| metrics_address(&a))
                .transpose()?,
        };
        if let Some(p) = &cfg.initial_plan {
            cfg.check_plan(p)?;
        }
        Ok(cfg)
    }

    /// The durable state store, kept beside the trainings' outputs.
    pub fn state_path(&self) -> PathBuf {
        self.output_dir.join("coordinator-state.redb")
    }

    /// Checks a plan against this coordinator's limits (on top of the plan's own validation).
    pub fn check_plan(&self, plan: &TrainingPlan) -> Result<()> {
        let n = sangsaeng_common::learning::model::ModelSpec::from_plan(plan).num_params();
        if n > self.limits.max_model_params {
            return Err(CoordinatorError::InvalidArgument(format!(
                "the plan's model has {n} parameters, above limits.max_model_params = {}",
                self.limits.max_model_params
            )));
        }
        let participants = self
            .roster
            .with_role(sangsaeng_common::config::roster::Role::Participant)
            .count();
        if plan.training.min_participants > participants {
            return Err(CoordinatorError::InvalidArgument(format!(
                "training.min_participants = {} but the roster lists only {participants} participant organisations",
                plan.training.min_participants
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http2_window_and_frame_follow_the_chunk_limit_within_http2_bounds() {
        let with = |max_chunk_bytes| Limits {
            max_chunk_bytes,
            ..Limits::default()
        };
        let d = Limits::default();
        assert_eq!((d.http2_window(), d.http2_max_frame()), (1 << 20, 1 << 20));
        // Below HTTP/2's defaults: the defaults (a frame may not be under 16 KiB).
        assert_eq!(
            (with(4096).http2_window(), with(4096).http2_max_frame()),
            (65_535, 16_384)
        );
        // Above HTTP/2's largest frame: the largest frame, and a 16 MiB window.
        assert_eq!(
            (
                with(64 << 20).http2_window(),
                with(64 << 20).http2_max_frame()
            ),
            (16 << 20, (1 << 24) - 1)
        );
    }
}
