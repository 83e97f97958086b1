//! The checks both daemons' `doctor` subcommands share: the shape of one
//! check's outcome, the TLS files (present, readable, PEM, the private key's
//! mode) and certificate validity windows, read with rustls' own verifier (the
//! one the real handshake uses), so a doctor never disagrees with a connection.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::CertificateError;
use rustls::pki_types::UnixTime;

use crate::identity::tls::{TlsFiles, TlsMaterial};

/// A certificate with fewer days left than this is a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Warn,
    Fail,
    /// Not run because something it needs failed earlier.
    Skip,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        }
    }
}

/// One line of the doctor's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked, e.g. "private key mode".
    pub name: String,
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// How to fix it (problems only).
    pub hint: Option<String>,
}

impl Check {
    pub fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Check::new(name, Outcome::Ok, detail, None)
    }
    pub fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Check::new(name, Outcome::Warn, detail, Some(hint.into()))
    }
    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Check::new(name, Outcome::Fail, detail, Some(hint.into()))
    }
    pub fn skip(name: impl Into<String>, why: impl Into<String>) -> Self {
        Check::new(name, Outcome::Skip, why, None)
    }
    fn new(
        name: impl Into<String>,
        outcome: Outcome,
        detail: impl Into<String>,
        hint: Option<String>,
    ) -> Self {
        Check {
            name: name.into(),
            outcome,
            detail: detail.into(),
            hint,
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<4} {}: {}",
            self.outcome.label(),
            self.name,
            self.detail
        )?;
        if let Some(h) = &self.hint {
            write!(f, "\n       fix: {h}")?;
        }
        Ok(())
    }
}

/// Whether any check failed (the binary then exits non-zero).
pub fn any_failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.outcome == Outcome::Fail)
}

/// Presence and readability of the three files, the key's mode, and their PEM.
pub fn tls_file_checks(
    files: &TlsFiles,
    origin_hint: &str,
    out: &mut Vec<Check>,
) -> Option<TlsMaterial> {
    let mut readable = true;
    for (what, path) in [
        ("CA certificate file", &files.ca),
        ("certificate file", &files.cert),
        ("private key file", &files.key),
    ] {
        match std::fs::read(path) {
            Ok(_) => out.push(Check::ok(what, format!("{} is readable", path.display()))),
            Err(e) => {
                readable = false;
                out.push(Check::fail(
                    what,
                    format!("{}: {e}", path.display()),
                    "check the path in [tls] (relative to the config file) and that this user may read it",
                ));
            }
        }
    }
    if !readable {
        return None;
    }
    out.push(key_mode_check(&files.key));
    match files.load() {
        Ok(m) => {
            out.push(Check::ok(
                "TLS files",
                "CA and certificate hold PEM certificates, the key a PEM private key",
            ));
            Some(m)
        }
        Err(e) => {
            out.push(Check::fail("TLS files", e.to_string(), origin_hint));
            None
        }
    }
}

/// A private key must be readable by its owner only.
pub fn key_mode_check(path: &Path) -> Check {
    const NAME: &str = "private key mode";
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                let hint = format!("chmod 600 {}", path.display());
                if mode & 0o007 != 0 {
                    Check::fail(
                        NAME,
                        format!(
                            "{} has mode {mode:04o}: every user of this machine can read it",
                            path.display()
                        ),
                        hint,
                    )
                } else if mode & 0o070 != 0 {
                    Check::warn(
                        NAME,
                        format!(
                            "{} has mode {mode:04o}: its group can read it",
                            path.display()
                        ),
                        hint,
                    )
                } else {
                    Check::ok(NAME, format!("{mode:04o}"))
                }
            }
            Err(e) => Check::fail(
                NAME,
                format!("{}: {e}", path.display()),
                "check the key's path",
            ),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Check::skip(NAME, "file modes are not checked on this system")
    }
}

/// When `verify_at` says a certificate starts and ends. webpki checks a
/// certificate's own validity before anything else and names the bound it
/// missed, so asking about 1970 and about 9999 yields both bounds.
pub fn validity_window(
    verify_at: impl Fn(UnixTime) -> Result<(), rustls::Error>,
) -> (Option<SystemTime>, Option<SystemTime>) {
    let bound = |secs: u64| match verify_at(UnixTime::since_unix_epoch(Duration::from_secs(secs))) {
        Err(rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext {
            not_before,
            ..
        })) => Some(system(not_before)),
        Err(rustls::Error::InvalidCertificate(CertificateError::ExpiredContext {
            not_after,
            ..
        })) => Some(system(not_after)),
        _ => None,
    };
    // 9999-12-31T23:59:58Z, just before the "no expiry" date of RFC 5280.
    (bound(0), bound(253_402_300_798))
}

pub fn validity_check(
    name: &str,
    start: Option<SystemTime>,
    end: Option<SystemTime>,
    now: SystemTime,
    renew_hint: &str,
) -> Check {
    if let Some(s) = start
        && now < s
    {
        return Check::fail(
            name,
            format!(
                "not valid before {} (this machine's clock says {})",
                date(s),
                date(now)
            ),
            "check this machine's clock (NTP); otherwise wait or ask for a certificate valid now",
        );
    }
    expiry_check(name, end, now, renew_hint)
}

pub fn expiry_check(
    name: &str,
    end: Option<SystemTime>,
    now: SystemTime,
    renew_hint: &str,
) -> Check {
    let Some(end) = end else {
        return Check::ok(name, "no expiry date could be read (treated as valid)");
    };
    match end.duration_since(now) {
        Err(_) => Check::fail(
            name,
            format!(
                "expired on {} (this machine's clock says {})",
                date(end),
                date(now)
            ),
            format!("{renew_hint}; or check this machine's clock"),
        ),
        Ok(left) => {
            let days = (left.as_secs() / 86_400) as i64;
            let text = format!("valid until {} ({days} days left)", date(end));
            if days < EXPIRY_WARNING_DAYS {
                Check::warn(name, text, format!("renew it soon: {renew_hint}"))
            } else {
                Check::ok(name, text)
            }
        }
    }
}

pub fn system(t: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.as_secs())
}

pub fn unix(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

/// `2026-12-06 22:30 UTC`.
pub fn date(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(d) => format!(
            "{}-{:02}-{:02} {:02}:{:02} UTC",
            d.year(),
            d.month() as u8,
            d.day(),
            d.hour(),
            d.minute()
        ),
        Err(_) => format!("{secs} s after 1970"),
    }
}

/// The certificates of a PEM text (unreadable blocks skipped: the chain check
/// then reports what is missing).
pub fn pem_certificates(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(|c| c.ok())
        .collect()
}

/// The CA file's certificates as trust anchors, as both ends of the real
/// handshake load them; a certificate that cannot be one is a failed check.
pub fn trust_roots(
    cas: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<std::sync::Arc<rustls::RootCertStore>, Check> {
    let mut roots = rustls::RootCertStore::empty();
    for c in cas {
        if let Err(e) = roots.add(c.clone()) {
            return Err(Check::fail(
                "CA certificate",
                format!("cannot be a trust anchor: {e}"),
                "ca = must be the federation's ca.pem",
            ));
        }
    }
    Ok(std::sync::Arc::new(roots))
}

/// A verifier that could not be built from the roots.
pub fn verifier_failure(e: impl std::fmt::Display) -> Check {
    Check::fail(
        "CA certificate",
        format!("cannot verify certificates: {e}"),
        "ca = must be the federation's ca.pem",
    )
}
