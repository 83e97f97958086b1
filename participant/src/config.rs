//! The participant daemon's typed configuration: a TOML file plus command-line
//! overrides, validated once at start-up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use sangsaeng_common::identity::tls::TlsFiles;
use sangsaeng_common::learning::backend::BackendKind;
use sangsaeng_common::learning::data::SiteData;

use crate::error::{ParticipantError, Result};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// The coordinator's `https://` address (default `https://127.0.0.1:7443`); the
    /// daemon only ever dials out to it.
    coordinator: Option<String>,
    /// The name the coordinator's certificate is checked against (default `localhost`).
    server_name: Option<String>,
    /// The burn backend local training runs on: `"ndarray"` (default), or `"flex"`
    /// in a build with `--features flex`.
    backend: Option<String>,
    /// A folder that keeps a copy of every delta that left the site, for the
    /// site's own audit (default: none kept).
    record_dir: Option<PathBuf>,
    /// A folder where the site keeps what it must remember between rounds and
    /// restarts: SCAFFOLD's control variate, per training (default: none; a
    /// plan with `strategy = "scaffold"` is then declined).
    state_dir: Option<PathBuf>,
    /// A folder where the site keeps the final global model of each training
    /// it took part in (`<training>/global.safetensors` and `plan.toml`), to
    /// score its own data with (`sangsaeng-participant predict`). Default: none.
    model_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on `http://ADDR/metrics`: `host:port`, or
    /// `:port` for loopback (default: off).
    metrics_listen: Option<String>,
    /// Largest upload chunk in bytes, a multiple of 4 in 4096..=67108864 (default
    /// 1 MiB); the coordinator's `limits.max_chunk_bytes` must allow it.
    upload_chunk_bytes: Option<usize>,
    /// The site's TLS files (or `--ca`, `--cert`, `--key`).
    tls: Option<TlsSection>,
    /// The site's line data (or `--data`, `--label-column`).
    data: Option<DataSection>,
    /// What this site will accept of a plan's privacy settings.
    privacy: Option<PrivacySection>,
    /// Reconnect backoff after the coordinator could not be reached.
    #[serde(default)]
    reconnect: Reconnect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    /// The federation CA's certificate (PEM), received with its fingerprint out of band.
    ca: PathBuf,
    /// The site's certificate (PEM), signed by the anchor company from the site's CSR.
    cert: PathBuf,
    /// The site's private key (PEM, mode 0600); it never leaves the site.
    key: PathBuf,
}

/// The site's own privacy limits: the supplier decides, not the anchor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivacySection {
    /// The largest privacy loss ε this site accepts from a plan's `[privacy.dp]`
    /// `target_epsilon`; a plan above it (or without differential privacy, when
    /// `require_differential_privacy` is set) is declined. Default: any.
    max_epsilon: Option<f64>,
    /// Decline every training that does not use differential privacy.
    #[serde(default)]
    require_differential_privacy: bool,
    /// Decline every training without secure aggregation (`[privacy]
    /// secure_aggregation` in the plan): this site's update then never reaches
    /// the coordinator unmasked.
    #[serde(default)]
    require_secure_aggregation: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataSection {
    /// CSV exports from the MES/historian, all with the same header.
    files: Vec<PathBuf>,
    /// The column the model predicts: the class label, or for a regression
    /// plan its target (`target_column` is accepted as the same key).
    #[serde(alias = "target_column")]
    label_column: String,
    /// Optional: when absent the plan's feature columns are looked up by name.
    feature_columns: Option<Vec<String>>,
}

/// Capped exponential backoff with jitter for reconnecting to the coordinator.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reconnect {
    /// The first retry's delay in milliseconds; it doubles per attempt (±20 % jitter).
    pub initial_ms: u64,
    /// The longest delay between two attempts, in milliseconds.
    pub max_ms: u64,
}

impl Default for Reconnect {
    fn default() -> Self {
        // Half a second rides out a coordinator restart quickly; 30 s caps the
        // load hundreds of suppliers put on a coordinator that is down for long.
        Reconnect {
            initial_ms: 500,
            max_ms: 30_000,
        }
    }
}

impl Reconnect {
    /// Delay before attempt `n` (0-based): doubling from `initial_ms`, capped at `max_ms`,
    /// with ±20 % jitter so many suppliers do not reconnect in lockstep.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let base = self
            .initial_ms
            .saturating_mul(1u64 << attempt.min(20))
            .min(self.max_ms);
        let j = 1.0 + 0.2 * jitter.clamp(-1.0, 1.0);
        Duration::from_millis((base as f64 * j) as u64)
    }
}

/// Command-line overrides; `None` keeps the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub coordinator: Option<String>,
    pub server_name: Option<String>,
    pub backend: Option<String>,
    pub record_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub model_dir: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub data_files: Vec<PathBuf>,
    pub label_column: Option<String>,
    pub max_epsilon: Option<f64>,
    pub exit_after_training: bool,
}

/// Validated configuration of one participant daemon.
#[derive(Debug, Clone)]
pub struct ParticipantConfig {
    /// e.g. `https://coordinator.anchor.example:7443`.
    pub coordinator: String,
    /// The name in the coordinator's certificate.
    pub server_name: String,
    pub tls: TlsFiles,
    pub data: SiteData,
    /// When the data section lists no feature columns, the plan's are used.
    pub features_from_plan: bool,
    pub backend: BackendKind,
    /// If set, every delta sent is also written here (the site's own record of what left it).
    pub record_dir: Option<PathBuf>,
    /// Where the site keeps SCAFFOLD's control variates between rounds and restarts.
    pub state_dir: Option<PathBuf>,
    /// Where the site keeps each finished training's global model and plan.
    pub model_dir: Option<PathBuf>,
    /// The `/metrics` page's address, if any.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub upload_chunk_bytes: usize,
    pub reconnect: Reconnect,
    /// Stop after the first training finishes (the example and tests); a daemon keeps running.
    pub exit_after_training: bool,
    /// The site's privacy limits (`[privacy]` in participant.toml).
    pub privacy: SitePrivacy,
}

/// The largest ε a site accepts, and whether it requires differential privacy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SitePrivacy {
    pub max_epsilon: Option<f64>,
    pub require_differential_privacy: bool,
    /// Decline every training without secure aggregation.
    pub require_secure_aggregation: bool,
}

pub const DEFAULT_COORDINATOR: &str = "https://127.0.0.1:7443";
/// Matches the coordinator's default chunk limit.
pub const DEFAULT_UPLOAD_CHUNK: usize = 1 << 20;

impl ParticipantConfig {
    pub fn build(file: Option<&Path>, o: Overrides) -> Result<Self> {
        let file = file
            .map(sangsaeng_common::config::file::read::<FileConfig>)
            .transpose()?;
        let rel = |p: PathBuf| match &file {
            Some(f) => f.resolve(&p),
            None => p,
        };
        let fc = file.as_ref().map(|f| &f.values);
        let missing = |what: &str, flag: &str| {
            ParticipantError::Config(format!(
                "no {what} given: pass {flag} or set it in the config file"
            ))
        };
        let coordinator = o
            .coordinator
            .or(fc.and_then(|f| f.coordinator.clone()))
            .unwrap_or_else(|| DEFAULT_COORDINATOR.to_string());
        if !coordinator.starts_with("https://") {
            return Err(ParticipantError::Config(format!(
                "coordinator '{coordinator}' must be an https:// address (all traffic is mutual TLS)"
            )));
        }
        let server_name = o
            .server_name
            .or(fc.and_then(|f| f.server_name.clone()))
            .unwrap_or_else(|| "localhost".into());
        let tls_file = fc.and_then(|f| f.tls.clone());
        let tls = TlsFiles {
            ca: o
                .ca
                .or(tls_file.as_ref().map(|t| rel(t.ca.clone())))
                .ok_or_else(|| missing("CA certificate", "--ca"))?,
            cert: o
                .cert
                .or(tls_file.as_ref().map(|t| rel(t.cert.clone())))
                .ok_or_else(|| missing("site certificate", "--cert"))?,
            key: o
                .key
                .or(tls_file.as_ref().map(|t| rel(t.key.clone())))
                .ok_or_else(|| missing("site key", "--key"))?,
        };
        let data_file = fc.and_then(|f| f.data.clone());
        let files: Vec<PathBuf> = if o.data_files.is_empty() {
            data_file
                .as_ref()
                .map(|d| d.files.iter().cloned().map(&rel).collect())
                .unwrap_or_default()
        } else {
            o.data_files
        };
        if files.is_empty() {
            return Err(missing("data files", "--data"));
        }
        let label_column = o
            .label_column
            .or(data_file.as_ref().map(|d| d.label_column.clone()))
            .ok_or_else(|| missing("label column", "--label-column"))?;
        let feature_columns = data_file.as_ref().and_then(|d| d.feature_columns.clone());
        let backend_name = o
            .backend
            .or(fc.and_then(|f| f.backend.clone()))
            .unwrap_or_else(|| "ndarray".into());
        let backend: BackendKind = backend_name
            .parse()
            .map_err(|e| ParticipantError::Config(format!("backend: {e}")))?;
        let (upload_chunk_bytes, reconnect) = transfer_settings(fc)?;
        let privacy = site_privacy(fc.and_then(|f| f.privacy.as_ref()), o.max_epsilon)?;
        Ok(ParticipantConfig {
            privacy,
            coordinator,
            server_name,
            tls,
            features_from_plan: feature_columns.is_none(),
            data: SiteData {
                files,
                label_column,
                feature_columns: feature_columns.unwrap_or_default(),
            },
            backend,
            record_dir: o
                .record_dir
                .or(fc.and_then(|f| f.record_dir.clone()).map(&rel)),
            state_dir: o
                .state_dir
                .or(fc.and_then(|f| f.state_dir.clone()).map(&rel)),
            model_dir: o
                .model_dir
                .or(fc.and_then(|f| f.model_dir.clone()).map(&rel)),
            metrics_listen: o
                .metrics_listen
                .or(fc.and_then(|f| f.metrics_listen.clone()))
                .map(|a| sangsaeng_common::exposition::listen_address(&a))
                .transpose()?,
            upload_chunk_bytes,
            reconnect,
            exit_after_training: o.exit_after_training,
        })
    }
}

/// The upload chunk size and the reconnect backoff, checked.
fn transfer_settings(fc: Option<&FileConfig>) -> Result<(usize, Reconnect)> {
    let upload_chunk_bytes = fc
        .and_then(|f| f.upload_chunk_bytes)
        .unwrap_or(DEFAULT_UPLOAD_CHUNK);
    if !(4096..=64 << 20).contains(&upload_chunk_bytes) || !upload_chunk_bytes.is_multiple_of(4) {
        return Err(ParticipantError::Config(format!(
            "upload_chunk_bytes: {upload_chunk_bytes} must be a multiple of 4 in 4096..=67108864"
        )));
    }
    let reconnect = fc.map(|f| f.reconnect.clone()).unwrap_or_default();
    if reconnect.initial_ms == 0 || reconnect.max_ms < reconnect.initial_ms {
        return Err(ParticipantError::Config(
            "reconnect: initial_ms must be at least 1 and max_ms at least initial_ms".into(),
        ));
    }
    Ok((upload_chunk_bytes, reconnect))
}

/// The `[privacy]` section with `--max-epsilon` over it, checked.
fn site_privacy(file: Option<&PrivacySection>, max_epsilon: Option<f64>) -> Result<SitePrivacy> {
    let p = SitePrivacy {
        max_epsilon: max_epsilon.or(file.and_then(|f| f.max_epsilon)),
        require_differential_privacy: file.is_some_and(|f| f.require_differential_privacy),
        require_secure_aggregation: file.is_some_and(|f| f.require_secure_aggregation),
    };
    if let Some(e) = p.max_epsilon
        && !(e.is_finite() && e > 0.0)
    {
        return Err(ParticipantError::Config(format!(
            "privacy.max_epsilon: {e} must be a finite number above 0"
        )));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let r = Reconnect::default();
        assert_eq!(r.delay(0, 0.0), Duration::from_millis(500));
        assert_eq!(r.delay(1, 0.0), Duration::from_millis(1000));
        assert_eq!(r.delay(30, 0.0), Duration::from_millis(30_000));
        assert_eq!(r.delay(30, 1.0), Duration::from_millis(36_000));
        assert_eq!(r.delay(0, -1.0), Duration::from_millis(400));
    }

    #[test]
    fn file_with_unknown_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(&p, "coordinatr = \"https://x\"\n").unwrap();
        let e = ParticipantConfig::build(Some(&p), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("coordinatr"), "{e}");
    }

    #[test]
    fn paths_are_relative_to_the_file_and_overrides_win() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(
            &p,
            r#"
coordinator = "https://anchor.example:7443"
[tls]
ca = "pki/ca.pem"
cert = "pki/me.pem"
key = "pki/me.key"
[data]
files = ["line1.csv"]
label_column = "fault"
"#,
        )
        .unwrap();
        let c = ParticipantConfig::build(
            Some(&p),
            Overrides {
                server_name: Some("anchor.example".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.tls.ca, dir.path().join("pki/ca.pem"));
        assert_eq!(c.data.files, vec![dir.path().join("line1.csv")]);
        assert_eq!(c.server_name, "anchor.example");
        assert!(c.features_from_plan);
        let e = ParticipantConfig::build(
            Some(&p),
            Overrides {
                coordinator: Some("http://plain".into()),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("https://"), "{e}");
    }
}
