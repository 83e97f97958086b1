//! `sangsaeng-participant doctor`: pre-flight checks a supplier's operator runs
//! before `run`, one line each (`ok`, `warn`, `FAIL`, or `skip` when an earlier
//! failure makes a check meaningless), with a fix hint on every problem.
//!
//! What is checked, in order: the config file; the TLS files (present, readable,
//! PEM, the key's mode); the certificate (chains to the CA with the same rustls
//! verifier the coordinator uses, its validity and days left, the organisation
//! id it carries, the key belongs to it); the coordinator's address (DNS, TCP);
//! the mutual-TLS handshake and whether the coordinator's roster knows this
//! organisation; the clock against the coordinator's HTTP `date` header; the
//! data files (readable CSV with the configured columns, and with `--plan` the
//! whole load `check-data` does).
//!
//! The roster probe is `UploadProgress` for a training that cannot exist
//! ([`PROBE_TRAINING_ID`]): a known organisation gets NOT_FOUND, an unknown one
//! PERMISSION_DENIED. Its only effects at the coordinator are those of any
//! refused call: the organisation's "last seen" and "last error" in `admin
//! status` (the error names the probe training, and the next `Subscribe` clears it).
//!
//! Nothing here panics on bad input; [`run_checks`] returns the checks and the
//! binary prints them and sets the exit status.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::CertificateError;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::identity::channel;
pub use sangsaeng_common::identity::checkup::{
    Check, EXPIRY_WARNING_DAYS, Outcome, any_failed, key_mode_check,
};
use sangsaeng_common::identity::checkup::{
    expiry_check, tls_file_checks, unix, validity_check, validity_window,
};
use sangsaeng_common::identity::checkup::{pem_certificates, trust_roots, verifier_failure};
use sangsaeng_common::identity::tls::{self, TlsMaterial};
use sangsaeng_common::learning::data;
use sangsaeng_proto::v1 as pb;
use sangsaeng_proto::v1::federation_client::FederationClient;

use crate::config::{Overrides, ParticipantConfig};

/// Bound on DNS resolution and on each TCP connect attempt.
pub const NET_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on the TLS dial and on the probe RPC, each.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// The training id of the roster probe; no real training has it (ids are `t-…`).
pub const PROBE_TRAINING_ID: &str = "sangsaeng-doctor-probe";

/// Clock difference to the coordinator above which the doctor warns (the
/// coordinator's `date` header has one-second resolution).
pub const MAX_CLOCK_SKEW_SECS: i64 = 60;

/// Every check for the participant configured by `config_path`; with `plan`, the
/// data is also loaded against that training plan.
pub async fn run_checks(config_path: &Path, plan: Option<&Path>) -> Vec<Check> {
    match ParticipantConfig::build(Some(config_path), Overrides::default()) {
        Ok(config) => {
            let mut out = vec![Check::ok(
                "config",
                format!("{} parses", config_path.display()),
            )];
            out.extend(check_config(&config, plan).await);
            out
        }
        Err(e) => vec![Check::fail(
            "config",
            e.to_string(),
            "correct the file or key named; docs/CONFIGURATION.md lists every key",
        )],
    }
}

/// The checks after the config file: TLS, coordinator, data.
pub async fn check_config(config: &ParticipantConfig, plan: Option<&Path>) -> Vec<Check> {
    let mut out = Vec::new();
    let material = tls_file_checks(
        &config.tls,
        "ca = the federation's ca.pem, cert = this site's signed certificate, key = the key from `sangsaeng-participant enrol`",
        &mut out,
    );
    let org = match &material {
        Some(m) => certificate_checks(m, &config.server_name, SystemTime::now(), &mut out),
        None => {
            out.push(Check::skip(
                "certificate",
                "not checked: the TLS files above are unusable",
            ));
            None
        }
    };
    coordinator_checks(config, material.as_ref(), org.as_deref(), &mut out).await;
    data_checks(config, plan, &mut out);
    out
}

// ---------------------------------------------------------------------------
// TLS files and certificate
// ---------------------------------------------------------------------------

/// Chain, validity, organisation id, key and server name. Returns the
/// organisation id when the certificate carries one.
fn certificate_checks(
    m: &TlsMaterial,
    server_name: &str,
    now: SystemTime,
    out: &mut Vec<Check>,
) -> Option<String> {
    let chain = pem_certificates(&m.cert_pem);
    let cas = pem_certificates(&m.ca_pem);
    let (Some(leaf), Some(ca)) = (chain.first(), cas.first()) else {
        out.push(Check::fail(
            "certificate",
            "no certificate could be read",
            "check the PEM files",
        ));
        return None;
    };
    let verifier = match client_verifier(&cas) {
        Ok(v) => v,
        Err(check) => {
            out.push(check);
            return None;
        }
    };
    let verify = |cert: &CertificateDer<'_>, at: UnixTime| {
        verifier
            .verify_client_cert(cert, &chain[1..], at)
            .map(|_| ())
    };
    let window = |cert: &CertificateDer<'_>| validity_window(|at| verify(cert, at));

    // The CA's own lifetime: when it ends, every certificate of the federation stops working.
    let (_, ca_end) = window(ca);
    out.push(expiry_check(
        "CA validity",
        ca_end,
        now,
        "the federation CA must be replaced; ask the anchor company's administrator",
    ));

    // The chain, checked at a moment the certificate itself is valid, so that
    // "another CA" and "expired" are reported apart.
    let (start, end) = window(leaf);
    let probe_at = match (start, end) {
        (Some(s), Some(e)) if !(s..=e).contains(&now) => s + Duration::from_secs(1),
        _ => now,
    };
    out.push(client_chain_check(verify(leaf, unix(probe_at))));
    out.push(validity_check(
        "certificate validity",
        start,
        end,
        now,
        "ask the anchor company's administrator to sign a new request (`sangsaeng-participant enrol`, then `pki sign`)",
    ));

    let org = organisation_check(leaf, out);
    out.extend(key_and_name_checks(m, server_name));
    org
}

/// rustls' verifier for client certificates issued by the CA file's CAs: the
/// one the coordinator uses.
fn client_verifier(
    cas: &[CertificateDer<'static>],
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, Check> {
    let roots = trust_roots(cas)?;
    WebPkiClientVerifier::builder_with_provider(
        roots,
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(verifier_failure)
}

/// What the verifier said of the site's certificate at a time it is valid.
fn client_chain_check(result: Result<(), rustls::Error>) -> Check {
    match result {
        Ok(()) => Check::ok(
            "certificate chain",
            "issued by the CA in the CA file, for client authentication",
        ),
        Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => Check::fail(
            "certificate chain",
            "the certificate was not issued by the CA in the CA file (another federation, or a re-created CA)",
            "use the ca.pem and the certificate the anchor company's administrator gave you together; re-enrol if the CA changed",
        ),
        Err(e) => Check::fail(
            "certificate chain",
            format!("refused by the verifier the coordinator uses: {e}"),
            "use the certificate signed from this site's request (`pki sign`), not the server's",
        ),
    }
}

/// The organisation the certificate names, as the coordinator will read it.
fn organisation_check(leaf: &CertificateDer<'_>, out: &mut Vec<Check>) -> Option<String> {
    match tls::identity_from_der(leaf) {
        Ok(id) => {
            out.push(Check::ok(
                "organisation",
                format!("the certificate names '{id}'"),
            ));
            Some(id)
        }
        Err(e) => {
            out.push(Check::fail(
                "organisation",
                e.to_string(),
                "the certificate must come from `sangsaeng-participant enrol --org <id>` and `pki sign`",
            ));
            None
        }
    }
}

/// The key belongs to the certificate, and `server_name` can be dialled.
fn key_and_name_checks(m: &TlsMaterial, server_name: &str) -> Vec<Check> {
    let mut out = Vec::new();
    match tls::rustls_client_config(m) {
        Ok(_) => out.push(Check::ok("private key", "belongs to the certificate")),
        Err(e) => out.push(Check::fail(
            "private key",
            e.to_string(),
            "key = must be the key made with the request the certificate was signed from",
        )),
    }
    match ServerName::try_from(server_name.trim()) {
        Ok(_) => {}
        Err(_) => out.push(Check::fail(
            "server name",
            format!(
                "'{}' is neither a DNS name nor an IP address",
                server_name.escape_default()
            ),
            "server_name = one of the names given to `pki init --san`",
        )),
    }
    out
}

async fn coordinator_checks(
    config: &ParticipantConfig,
    material: Option<&TlsMaterial>,
    org: Option<&str>,
    out: &mut Vec<Check>,
) {
    let url = &config.coordinator;
    let (host, port) = match host_port(url) {
        Ok(hp) => hp,
        Err(e) => {
            out.push(Check::fail(
                "coordinator address",
                e,
                "coordinator = \"https://<host>:<port>\"",
            ));
            return;
        }
    };
    let addrs =
        match tokio::time::timeout(NET_TIMEOUT, tokio::net::lookup_host((host.as_str(), port)))
            .await
        {
            Ok(Ok(a)) => a.collect::<Vec<SocketAddr>>(),
            Ok(Err(e)) => {
                out.push(Check::fail(
                    "coordinator DNS",
                    format!("cannot resolve '{host}': {e}"),
                    "check the host name in `coordinator` and this machine's DNS",
                ));
                return;
            }
            Err(_) => {
                out.push(Check::fail(
                    "coordinator DNS",
                    format!("resolving '{host}' took over {} s", NET_TIMEOUT.as_secs()),
                    "check this machine's DNS servers",
                ));
                return;
            }
        };
    let Some(first) = addrs.first() else {
        out.push(Check::fail(
            "coordinator DNS",
            format!("'{host}' resolves to no address"),
            "check the host name in `coordinator`",
        ));
        return;
    };
    out.push(Check::ok(
        "coordinator DNS",
        format!(
            "{host} resolves to {first}{}",
            if addrs.len() > 1 {
                format!(" (and {} more)", addrs.len() - 1)
            } else {
                String::new()
            }
        ),
    ));
    let mut last_err = String::new();
    let mut connected = None;
    for a in &addrs {
        match tokio::time::timeout(NET_TIMEOUT, tokio::net::TcpStream::connect(a)).await {
            Ok(Ok(_)) => {
                connected = Some(*a);
                break;
            }
            Ok(Err(e)) => last_err = format!("{a}: {e}"),
            Err(_) => last_err = format!("{a}: no answer within {} s", NET_TIMEOUT.as_secs()),
        }
    }
    match connected {
        Some(a) => out.push(Check::ok("coordinator TCP", format!("connected to {a}"))),
        None => {
            out.push(Check::fail(
                "coordinator TCP",
                format!("cannot connect: {last_err}"),
                format!("is the coordinator running (`sangsaeng-coordinator serve`) and listening on port {port}? does a firewall allow outgoing connections to it?"),
            ));
            out.push(Check::skip(
                "mutual TLS",
                "not checked: the coordinator cannot be reached",
            ));
            return;
        }
    }
    let Some(m) = material else {
        out.push(Check::skip(
            "mutual TLS",
            "not checked: the TLS files are unusable",
        ));
        return;
    };
    probe(config, m, org.unwrap_or("(unknown)"), out).await;
}

/// `https://host:port/…` → (host, port), the port 443 if absent.
fn host_port(url: &str) -> Result<(String, u16), String> {
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .map_err(|e| format!("'{url}' is not an address: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("'{url}' names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

/// The handshake, the roster probe and the clock.
async fn probe(config: &ParticipantConfig, m: &TlsMaterial, org: &str, out: &mut Vec<Check>) {
    let channel = match tokio::time::timeout(
        RPC_TIMEOUT,
        channel::connect(&config.coordinator, m, &config.server_name),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            out.push(handshake_failure(&e.to_string(), &config.server_name));
            out.push(Check::skip(
                "roster",
                "not checked: no mutual-TLS connection",
            ));
            return;
        }
        Err(_) => {
            out.push(Check::fail(
                "mutual TLS",
                format!("no TLS connection within {} s", RPC_TIMEOUT.as_secs()),
                "is the port the coordinator's (not another service's)?",
            ));
            out.push(Check::skip(
                "roster",
                "not checked: no mutual-TLS connection",
            ));
            return;
        }
    };
    let mut client = FederationClient::new(channel);
    let request = pb::UploadProgressRequest {
        training_id: PROBE_TRAINING_ID.into(),
        round: 0,
        delta_sha256: String::new(),
        reserve_slot: false,
    };
    let before = SystemTime::now();
    let answer = tokio::time::timeout(RPC_TIMEOUT, client.upload_progress(request)).await;
    let after = SystemTime::now();
    let metadata = match answer {
        Err(_) => {
            out.push(Check::fail(
                "mutual TLS",
                format!(
                    "the coordinator did not answer within {} s",
                    RPC_TIMEOUT.as_secs()
                ),
                "the coordinator may be overloaded; try again",
            ));
            return;
        }
        Ok(Ok(resp)) => {
            out.push(Check::ok("mutual TLS", "handshake and a call succeeded"));
            out.push(Check::ok(
                "roster",
                format!("the coordinator accepts calls from '{org}'"),
            ));
            resp.metadata().clone()
        }
        Ok(Err(status)) => {
            use tonic::Code;
            match status.code() {
                Code::NotFound | Code::FailedPrecondition => {
                    out.push(Check::ok("mutual TLS", "handshake and a call succeeded"));
                    out.push(Check::ok(
                        "roster",
                        format!("the coordinator knows '{org}' (the probe call for training '{PROBE_TRAINING_ID}' was answered {:?}, as expected)", status.code()),
                    ));
                }
                Code::PermissionDenied => {
                    out.push(Check::ok("mutual TLS", "handshake and a call succeeded"));
                    out.push(Check::fail(
                        "roster",
                        format!("organisation '{org}' is not on the coordinator's roster as a participant ({})", status.message()),
                        format!("ask the anchor company's administrator to add id = \"{org}\" with role = \"participant\" to roster.toml and restart the coordinator"),
                    ));
                }
                Code::Unauthenticated => {
                    out.push(Check::ok("mutual TLS", "handshake succeeded"));
                    out.push(Check::fail(
                        "roster",
                        format!("the coordinator cannot tell who this is: {}", status.message()),
                        "the certificate must carry the organisation id (`enrol --org`, `pki sign --org`)",
                    ));
                }
                _ => {
                    out.push(handshake_failure(
                        &channel::error_chain(&status),
                        &config.server_name,
                    ));
                    out.push(Check::skip("roster", "not checked: the call failed"));
                    return;
                }
            }
            status.metadata().clone()
        }
    };
    out.push(clock_check(
        metadata.get("date").and_then(|v| v.to_str().ok()),
        before,
        after,
    ));
}

/// A failed dial or call, with the fix its cause suggests.
fn handshake_failure(message: &str, server_name: &str) -> Check {
    let hint = if message.contains("own certificate") || message.contains("own key") {
        "fix this site's certificate or key first (see the checks above)".to_string()
    } else if message.contains("NotValidForName") {
        format!(
            "server_name = \"{server_name}\" is not among the coordinator certificate's names; use one given to `pki init --san`"
        )
    } else if message.contains("UnknownIssuer") || message.contains("BadSignature") {
        "the coordinator's certificate is not from the CA in ca.pem: compare ca.pem's fingerprint with the anchor company's".into()
    } else if message.contains("alert") || message.contains("certificate") {
        "the coordinator refused this site's certificate: it must be signed by the federation's CA and valid".into()
    } else {
        "check that `coordinator` points at the Sangsaeng coordinator's port".into()
    };
    Check::fail("mutual TLS", message.to_string(), hint)
}

/// The coordinator's HTTP `date` header against this machine's clock.
fn clock_check(date_header: Option<&str>, before: SystemTime, after: SystemTime) -> Check {
    const NAME: &str = "clock";
    let Some(text) = date_header else {
        return Check::skip(
            NAME,
            "not checked: the coordinator's answer carries no date",
        );
    };
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let Ok(theirs) = time::PrimitiveDateTime::parse(text, format) else {
        return Check::skip(NAME, format!("not checked: unreadable date '{text}'"));
    };
    let theirs = theirs.assume_utc().unix_timestamp();
    let secs = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    };
    let ours = (secs(before) + secs(after)) / 2.0;
    // The header is truncated to the second: theirs lies in [t, t + 1).
    let skew = theirs as f64 + 0.5 - ours;
    if skew.abs() as i64 > MAX_CLOCK_SKEW_SECS {
        Check::warn(
            NAME,
            format!(
                "this machine's clock is {:.0} s {} the coordinator's",
                skew.abs(),
                if skew > 0.0 { "behind" } else { "ahead of" }
            ),
            "synchronise the clock (NTP): certificates are checked against it",
        )
    } else {
        Check::ok(
            NAME,
            format!(
                "within {MAX_CLOCK_SKEW_SECS} s of the coordinator's ({:+} s)",
                skew.round() as i64
            ),
        )
    }
}

// ---------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------

fn data_checks(config: &ParticipantConfig, plan_path: Option<&Path>, out: &mut Vec<Check>) {
    let d = &config.data;
    let mut all_good = true;
    for file in &d.files {
        let c = header_check(file, &d.label_column, &d.feature_columns);
        all_good &= c.outcome != Outcome::Fail;
        out.push(c);
    }
    let Some(plan_path) = plan_path else {
        return;
    };
    let plan = match TrainingPlan::from_file(plan_path) {
        Ok(p) => {
            out.push(Check::ok("plan", format!("{} parses", plan_path.display())));
            p
        }
        Err(e) => {
            out.push(Check::fail("plan", e.to_string(), "correct the plan file"));
            return;
        }
    };
    if !all_good {
        out.push(Check::skip(
            "data against the plan",
            "not checked: a data file above is unusable",
        ));
        return;
    }
    let features = if config.features_from_plan {
        &plan.schema.feature_columns
    } else {
        &d.feature_columns
    };
    let checked = data::check_schema(&d.label_column, features, &plan.schema)
        .and_then(|()| summarise_data(&plan, &d.files));
    match checked {
        Ok(summary) => out.push(Check::ok(
            "data against the plan",
            summary.replace("\n ", ";").replace('\n', ""),
        )),
        Err(e) => out.push(Check::fail(
            "data against the plan",
            e.to_string(),
            "fix the file, line and column named (or the [data] section), then `sangsaeng-participant check-data --plan …`",
        )),
    }
}

/// Loads `files` against `plan` as local training will, and says how many rows
/// of each class they hold: what `check-data` prints.
pub fn summarise_data(plan: &TrainingPlan, files: &[PathBuf]) -> sangsaeng_common::Result<String> {
    let ds = data::load_csvs(files, &plan.schema)?;
    let counts = ds.class_counts(plan.n_classes());
    let mut s = format!("{} rows, {} features: OK", ds.len(), ds.n_features);
    for (c, n) in plan.schema.classes.iter().zip(counts) {
        s.push_str(&format!("\n  class {c}: {n} rows"));
    }
    Ok(s)
}

/// One data file: readable, a CSV header with the configured columns, a data row.
fn header_check(file: &Path, label: &str, features: &[String]) -> Check {
    let name = format!("data file {}", file.display());
    let fix_path = "check [data] files (paths are relative to the config file) and that this user may read them";
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) => return Check::fail(name, format!("cannot open: {e}"), fix_path),
    };
    let mut lines = BufReader::new(f).lines();
    let header = match lines.next() {
        Some(Ok(h)) => h,
        Some(Err(e)) => return Check::fail(name, format!("cannot read: {e}"), fix_path),
        None => {
            return Check::fail(
                name,
                "the file is empty",
                "export the data again with a header row",
            );
        }
    };
    let columns = header_columns(&header);
    let missing: Vec<&str> = std::iter::once(label)
        .chain(features.iter().map(String::as_str))
        .filter(|c| !columns.iter().any(|h| h == c))
        .collect();
    if !missing.is_empty() {
        return Check::fail(
            name,
            format!(
                "the header lacks {} (it has: {})",
                missing
                    .iter()
                    .map(|c| format!("'{c}'"))
                    .collect::<Vec<_>>()
                    .join(", "),
                columns.join(", ")
            ),
            "set [data] label_column (and feature_columns) to the export's column names",
        );
    }
    let has_row = lines.any(|l| l.is_ok_and(|l| !l.trim().is_empty()));
    if !has_row {
        return Check::fail(name, "a header but no data rows", "export the data again");
    }
    Check::ok(
        name,
        format!("CSV with {} columns, label column '{label}'", columns.len()),
    )
}

/// The names in a CSV header line (double quotes removed, a UTF-8 BOM ignored).
fn header_columns(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line
        .trim_start_matches('\u{feff}')
        .trim_end_matches(['\r', '\n'])
        .chars()
        .peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur).trim().to_string()),
            c => cur.push(c),
        }
    }
    out.push(cur.trim().to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_columns_handle_quotes_and_bom() {
        assert_eq!(
            header_columns("\u{feff}a, \"b,c\",\"d\"\"e\"\r\n"),
            vec!["a", "b,c", "d\"e"]
        );
    }

    #[test]
    fn clock_check_reads_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT.
        let c = clock_check(Some("Tue, 14 Nov 2023 22:13:20 GMT"), now, now);
        assert_eq!(c.outcome, Outcome::Ok, "{c}");
        let c = clock_check(Some("Tue, 14 Nov 2023 22:23:20 GMT"), now, now);
        assert_eq!(c.outcome, Outcome::Warn, "{c}");
        assert!(c.detail.contains("behind"), "{c}");
        assert_eq!(clock_check(None, now, now).outcome, Outcome::Skip);
        assert_eq!(
            clock_check(Some("yesterday"), now, now).outcome,
            Outcome::Skip
        );
    }

    #[test]
    fn host_port_defaults_to_443() {
        assert_eq!(
            host_port("https://a.example").unwrap(),
            ("a.example".into(), 443)
        );
        assert_eq!(
            host_port("https://[::1]:7443").unwrap(),
            ("::1".into(), 7443)
        );
        assert!(host_port("https://").is_err());
    }
}
