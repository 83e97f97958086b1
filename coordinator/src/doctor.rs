//! `sangsaeng-coordinator doctor`: pre-flight checks the anchor company's
//! operator runs before `serve`, one line each (`ok`, `warn`, `FAIL`, or `skip`
//! when an earlier failure makes a check meaningless), with a fix hint on every
//! problem.
//!
//! What is checked: the config file (which also loads the roster and any plan);
//! the TLS files (present, readable, PEM, the key's mode); the server certificate
//! (chains to the CA with rustls' verifier, for server authentication, its
//! validity and days left, the CA's, the key belongs to it and can sign the audit
//! log); the listen address can be bound (bound, then released at once); the
//! roster lists an admin; the output folder is writable; the state store opens
//! read-only (a store held by a running coordinator is reported, not opened).
//!
//! Nothing here panics on bad input; [`run_checks`] returns the checks and the
//! binary prints them and sets the exit status. The participant has a doctor of
//! its own (`sangsaeng-participant doctor`) for the network side.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::CertificateError;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use sangsaeng_common::config::roster::Role;
pub use sangsaeng_common::identity::checkup::{
    Check, EXPIRY_WARNING_DAYS, Outcome, any_failed, key_mode_check,
};
use sangsaeng_common::identity::checkup::{
    expiry_check, tls_file_checks, unix, validity_check, validity_window,
};
use sangsaeng_common::identity::checkup::{pem_certificates, trust_roots, verifier_failure};
use sangsaeng_common::identity::tls::{self, TlsFiles, TlsMaterial};

use crate::config::{CoordinatorConfig, Overrides};

/// Every check for the coordinator configured by `config_path`.
pub fn run_checks(config_path: &Path) -> Vec<Check> {
    match CoordinatorConfig::build(Some(config_path), Overrides::default()) {
        Ok(config) => {
            let mut out = vec![Check::ok(
                "config",
                format!(
                    "{} parses (roster {}{})",
                    config_path.display(),
                    config.roster_path.display(),
                    if config.initial_plan.is_some() {
                        ", plan"
                    } else {
                        ""
                    }
                ),
            )];
            out.extend(check_config(&config));
            out
        }
        Err(e) => vec![Check::fail(
            "config",
            e.to_string(),
            "correct the file or key named; docs/CONFIGURATION.md lists every key",
        )],
    }
}

/// The checks after the config file.
pub fn check_config(config: &CoordinatorConfig) -> Vec<Check> {
    let mut out = Vec::new();
    match tls_file_checks(
        &config.tls,
        "ca = ca.pem, cert = server.pem, key = server.key from `sangsaeng-coordinator pki init`",
        &mut out,
    ) {
        Some(m) => certificate_checks(&m, &config.tls, SystemTime::now(), &mut out),
        None => out.push(Check::skip(
            "certificate",
            "not checked: the TLS files above are unusable",
        )),
    }
    out.push(listen_check(config));
    out.push(roster_check(config));
    out.push(output_dir_check(&config.output_dir));
    out.push(store_check(&config.state_path()));
    out
}

/// Chain (for server authentication), validity of the certificate and of the
/// CA, and the key.
fn certificate_checks(m: &TlsMaterial, files: &TlsFiles, now: SystemTime, out: &mut Vec<Check>) {
    let chain = pem_certificates(&m.cert_pem);
    let cas = pem_certificates(&m.ca_pem);
    let (Some(leaf), Some(ca)) = (chain.first(), cas.first()) else {
        out.push(Check::fail(
            "certificate",
            "no certificate could be read",
            "check the PEM files",
        ));
        return;
    };
    let verifier = match server_verifier(&cas) {
        Ok(v) => v,
        Err(check) => {
            out.push(check);
            return;
        }
    };
    // The coordinator does not know which of its names clients dial, so any name
    // will do: the name is checked last, after the chain and validity.
    let Ok(name) = ServerName::try_from("sangsaeng-doctor.invalid") else {
        return;
    };
    let verify = |cert: &CertificateDer<'_>, at: UnixTime| match verifier.verify_server_cert(
        cert,
        &chain[1..],
        &name,
        &[],
        at,
    ) {
        Ok(_)
        | Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => Ok(()),
        Err(e) => Err(e),
    };
    let window = |cert: &CertificateDer<'_>| validity_window(|at| verify(cert, at));

    let (_, ca_end) = window(ca);
    out.push(expiry_check(
        "CA validity",
        ca_end,
        now,
        "create a new CA (`pki init` in a new folder) and re-issue every certificate",
    ));
    let (start, end) = window(leaf);
    let probe_at = match (start, end) {
        (Some(s), Some(e)) if !(s..=e).contains(&now) => s + Duration::from_secs(1),
        _ => now,
    };
    out.push(chain_check(verify(leaf, unix(probe_at))));
    out.push(validity_check(
        "certificate validity",
        start,
        end,
        now,
        "issue a new server certificate with the same CA and names",
    ));
    out.push(key_check(m, files));
}

/// rustls' verifier for server certificates issued by the CA file's CAs: the
/// one participants use.
fn server_verifier(cas: &[CertificateDer<'static>]) -> Result<Arc<WebPkiServerVerifier>, Check> {
    let roots = trust_roots(cas)?;
    WebPkiServerVerifier::builder_with_provider(
        roots,
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(verifier_failure)
}

/// What the verifier said of the server certificate at a time it is valid.
fn chain_check(result: Result<(), rustls::Error>) -> Check {
    match result {
        Ok(()) => Check::ok(
            "certificate chain",
            "issued by the CA in the CA file, for server authentication",
        ),
        Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => Check::fail(
            "certificate chain",
            "the server certificate was not issued by the CA in the CA file",
            "use ca.pem and server.pem written together by `pki init`",
        ),
        Err(e) => Check::fail(
            "certificate chain",
            format!("refused by the verifier participants use: {e}"),
            "cert = must be the server certificate from `pki init`, not a participant's",
        ),
    }
}

/// The key belongs to the certificate (rustls accepts the pair) and can sign.
fn key_check(m: &TlsMaterial, files: &TlsFiles) -> Check {
    let key = tls::rustls_server_config(m).map(|_| ()).and_then(|()| {
        sangsaeng_common::identity::signing::Signer::from_pem_file(&files.key).map(|_| ())
    });
    match key {
        Ok(()) => Check::ok(
            "private key",
            "belongs to the certificate and can sign the audit log",
        ),
        Err(e) => Check::fail(
            "private key",
            e.to_string(),
            "key = must be the key written with the server certificate (server.key)",
        ),
    }
}

/// The listen address can be bound now (and is released at once).
fn listen_check(config: &CoordinatorConfig) -> Check {
    const NAME: &str = "listen address";
    match std::net::TcpListener::bind(config.listen) {
        Ok(l) => {
            drop(l);
            Check::ok(NAME, format!("{} can be bound", config.listen))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Check::fail(
            NAME,
            format!("{} is in use: {e}", config.listen),
            format!(
                "stop whatever listens on port {} (another coordinator?) or choose another `listen`",
                config.listen.port()
            ),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("cannot bind {}: {e}", config.listen),
            "use an address of this machine (or 0.0.0.0) and a port this user may open (1024 and above)",
        ),
    }
}

/// The roster names someone who can run `admin` commands.
fn roster_check(config: &CoordinatorConfig) -> Check {
    const NAME: &str = "roster";
    let admins: Vec<&str> = config
        .roster
        .with_role(Role::Admin)
        .map(|o| o.id.as_str())
        .collect();
    let participants = config.roster.with_role(Role::Participant).count();
    let detail = format!(
        "{}: {} organisation(s), {participants} participant(s), admin(s): {}",
        config.roster_path.display(),
        config.roster.iter().count(),
        if admins.is_empty() {
            "none".to_string()
        } else {
            admins.join(", ")
        }
    );
    if admins.is_empty() {
        Check::fail(
            NAME,
            detail,
            "add an [[organisation]] with role = \"admin\" (the federation office) to the roster; without one nobody can start or release a training",
        )
    } else if participants == 0 {
        Check::warn(
            NAME,
            detail,
            "add the suppliers as [[organisation]] with role = \"participant\"",
        )
    } else {
        Check::ok(NAME, detail)
    }
}

/// The output folder (or, before the first run, the folder it will be created
/// in) accepts a file.
fn output_dir_check(dir: &Path) -> Check {
    const NAME: &str = "output folder";
    // A relative path's last ancestor is "", the current folder.
    let existing = dir
        .ancestors()
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .find(|a| a.is_dir());
    let Some(target) = existing else {
        return Check::fail(
            NAME,
            format!("{}: no existing parent folder", dir.display()),
            "set output_dir to a path on this machine",
        );
    };
    let probe = target.join(format!(".sangsaeng-doctor-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe);
    match written {
        Ok(f) => {
            drop(f);
            let _ = std::fs::remove_file(&probe);
            if target == dir {
                Check::ok(NAME, format!("{} is writable", dir.display()))
            } else {
                Check::ok(
                    NAME,
                    format!(
                        "{} does not exist yet; serve creates it in {}, which is writable",
                        dir.display(),
                        target.display()
                    ),
                )
            }
        }
        Err(e) => Check::fail(
            NAME,
            format!("cannot write in {}: {e}", target.display()),
            format!(
                "let the coordinator's user write there (chown/chmod {}) or set output_dir elsewhere",
                target.display()
            ),
        ),
    }
}

/// The state store opens read-only and its training records decode.
fn store_check(path: &Path) -> Check {
    const NAME: &str = "state store";
    if !path.exists() {
        return Check::ok(
            NAME,
            format!(
                "{} does not exist yet; the first serve creates it",
                path.display()
            ),
        );
    }
    let db = match redb::ReadOnlyDatabase::open(path) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Check::warn(
                NAME,
                format!(
                    "{} is open in a running coordinator; not checked",
                    path.display()
                ),
                "run the doctor while the coordinator is stopped to check the store",
            );
        }
        Err(e) => {
            return Check::warn(
                NAME,
                format!("{} cannot be opened read-only: {e}", path.display()),
                "if the coordinator stopped uncleanly, `serve` repairs the store when it starts; otherwise restore it from a backup",
            );
        }
    };
    match trainings(&db) {
        Ok((all, unfinished)) => Check::ok(
            NAME,
            format!(
                "{}: {all} training(s){}",
                path.display(),
                if unfinished.is_empty() {
                    String::new()
                } else {
                    format!(", unfinished (resumed by serve): {}", unfinished.join(", "))
                }
            ),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("{}: {e}", path.display()),
            "the store is damaged: restore it from a backup, or move it away to start afresh",
        ),
    }
}

/// The number of training records and the ids of the unfinished ones.
fn trainings(db: &redb::ReadOnlyDatabase) -> Result<(usize, Vec<String>), String> {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    // The table of `durable::store` (training id → record).
    const TRAININGS: TableDefinition<&str, &[u8]> = TableDefinition::new("trainings");
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let table = match tx.open_table(TRAININGS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((0, vec![])),
        Err(e) => return Err(e.to_string()),
    };
    let mut all = 0;
    let mut unfinished = vec![];
    for entry in table.iter().map_err(|e| e.to_string())? {
        let (_, v) = entry.map_err(|e| e.to_string())?;
        let rec: crate::durable::store::TrainingRecord =
            crate::durable::store::decode(v.value(), "training record")
                .map_err(|e| e.to_string())?;
        all += 1;
        if !rec.finished {
            unfinished.push(rec.id);
        }
    }
    Ok((all, unfinished))
}
