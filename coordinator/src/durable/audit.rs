//! The audit log: an append-only, hash-chained, signed record of everything a
//! release may later have to justify — who joined and left, each round's
//! accepted updates (organisation, digest, weight) and resulting global model,
//! the configuration and roster the coordinator ran with, and every release
//! attempt with its outcome.
//!
//! Format: one JSON object per line, `{"entry":{...},"hash":"…","sig":"…"}`.
//! `entry` holds `seq` (0, 1, 2, …), `time` (UTC, RFC 3339), `kind`, `data` and
//! `prev`, the hash of the entry before (64 zeros for the first). `hash` is the
//! SHA-256 of the exact bytes of `entry` as written in the line, and `sig` an
//! ECDSA P-256 signature over the same bytes with the coordinator's TLS key.
//! Hashing the bytes as written (read back with serde_json's `RawValue`) rather
//! than a re-serialisation means verification never depends on how a JSON
//! library prints numbers.
//!
//! What each check catches: an edited entry breaks its `hash` (or, if the hash
//! was recomputed, its `sig`, which needs the coordinator's key); a deleted or
//! reordered entry breaks `seq` and the next entry's `prev`; a truncated tail is
//! visible by comparing the last `seq` with any copy (the release provenance
//! names the audit entry it was built from).
//!
//! Durability: each append is one `write` of a whole line followed by
//! `fsync`, and happens after the state it records is committed to the store.
//! A crash in the middle of a write leaves a torn last line without its newline;
//! opening the log cuts that fragment off (it was never an entry) and says so.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use sangsaeng_common::identity::signing::{self, Signer, Verifier};

use crate::error::{CoordinatorError, Result};

/// `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// File name of the log inside the coordinator's output folder.
pub const FILE_NAME: &str = "audit.jsonl";

/// One entry, as signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    pub time: String,
    pub kind: String,
    pub data: serde_json::Value,
    pub prev: String,
}

#[derive(Serialize)]
struct LineOut<'a> {
    entry: &'a RawValue,
    hash: &'a str,
    sig: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineIn<'a> {
    #[serde(borrow)]
    entry: &'a RawValue,
    hash: String,
    sig: String,
}

struct Tail {
    file: File,
    next_seq: u64,
    last_hash: String,
}

/// The coordinator's open audit log. Appends are serialised by a mutex: the
/// chain needs a total order, and entries are rare (per join, round, release).
pub struct AuditLog {
    path: PathBuf,
    signer: Signer,
    tail: Mutex<Tail>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

fn audit_err(msg: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Audit(msg.into())
}

impl AuditLog {
    /// Opens (or creates) the log and positions it after its last entry.
    ///
    /// The existing chain is checked with the signer's own key; a broken chain
    /// does not stop the coordinator (training must go on) but is logged as an
    /// error with the first broken entry, and `audit verify` keeps reporting it.
    pub fn open(path: &Path, signer: Signer) -> Result<Self> {
        cut_torn_tail(path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| CoordinatorError::io(format!("opening {}", path.display()), e))?;
        let (next_seq, last_hash) = match read_lines(path)?.last() {
            None => (0, GENESIS.to_string()),
            Some((n, line)) => {
                let parsed: LineIn<'_> = serde_json::from_str(line).map_err(|e| {
                    audit_err(format!(
                        "{} line {n}: not an audit entry: {e}",
                        path.display()
                    ))
                })?;
                let entry: Entry = serde_json::from_str(parsed.entry.get()).map_err(|e| {
                    audit_err(format!(
                        "{} line {n}: not an audit entry: {e}",
                        path.display()
                    ))
                })?;
                (entry.seq + 1, parsed.hash)
            }
        };
        let verifier = signer.verifier();
        match verify_file(path, &verifier) {
            Ok(report) => tracing::info!(
                path = %path.display(),
                entries = report.entries,
                "audit log opened; chain and signatures intact"
            ),
            Err(e) => tracing::error!(
                path = %path.display(),
                "the audit log does not verify: {e}. Appending continues; investigate before any release"
            ),
        }
        Ok(AuditLog {
            path: path.to_path_buf(),
            signer,
            tail: Mutex::new(Tail {
                file,
                next_seq,
                last_hash,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries in the log (this run's and earlier runs').
    pub fn entries(&self) -> u64 {
        self.tail.lock().unwrap_or_else(|p| p.into_inner()).next_seq
    }

    /// Appends one signed entry and makes it durable; returns its sequence number.
    pub fn append(&self, kind: &str, data: serde_json::Value) -> Result<u64> {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let entry = Entry {
            seq: tail.next_seq,
            time: now_utc(),
            kind: kind.to_string(),
            data,
            prev: tail.last_hash.clone(),
        };
        let entry_json = serde_json::to_string(&entry).expect("an audit entry always serialises");
        let hash = hex::encode(Sha256::digest(entry_json.as_bytes()));
        let sig = signing::b64(&self.signer.sign(entry_json.as_bytes())?);
        let raw = RawValue::from_string(entry_json).expect("serde_json output is valid JSON");
        let mut line = serde_json::to_string(&LineOut {
            entry: &raw,
            hash: &hash,
            sig: &sig,
        })
        .expect("an audit line always serialises");
        line.push('\n');
        tail.file
            .write_all(line.as_bytes())
            .and_then(|_| tail.file.sync_data())
            .map_err(|e| {
                CoordinatorError::io(format!("appending to {}", self.path.display()), e)
            })?;
        tail.next_seq += 1;
        tail.last_hash = hash;
        tracing::debug!(seq = entry.seq, kind, "audit entry appended");
        Ok(entry.seq)
    }

    /// Appends, logging instead of failing: for events (joins, leaves) whose
    /// operation must not fail because the log could not be written.
    pub fn record(&self, kind: &str, data: serde_json::Value) {
        if let Err(e) = self.append(kind, data) {
            tracing::error!(kind, "could not write the audit log: {e}");
        }
    }
}

/// The result of a successful verification.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    pub entries: u64,
    /// Hash of the last entry: the head of the chain.
    pub head: String,
}

/// Where and why a chain breaks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: line {line}{}: {reason}", .seq.map(|s| format!(" (entry {s})")).unwrap_or_default())]
pub struct ChainBreak {
    pub file: String,
    pub line: usize,
    pub seq: Option<u64>,
    pub reason: String,
}

/// Checks every line: form, hash, signature, sequence and link to the one before.
/// Stops at the first problem and names its line.
pub fn verify_file(
    path: &Path,
    verifier: &Verifier,
) -> std::result::Result<VerifyReport, ChainBreak> {
    let hashes = verified_hashes(path, verifier)?;
    Ok(VerifyReport {
        entries: hashes.len() as u64,
        head: hashes
            .last()
            .cloned()
            .unwrap_or_else(|| GENESIS.to_string()),
    })
}

/// The hash of every entry, in order, after checking the whole chain.
pub fn verified_hashes(
    path: &Path,
    verifier: &Verifier,
) -> std::result::Result<Vec<String>, ChainBreak> {
    let origin = path.display().to_string();
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| ChainBreak {
            file: origin.clone(),
            line: 0,
            seq: None,
            reason: "the file is not UTF-8 text".into(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(ChainBreak {
                file: origin,
                line: 0,
                seq: None,
                reason: e.to_string(),
            });
        }
    };
    verify_text(&text, &origin, verifier)
}

/// [`verified_hashes`] on the log's text; `origin` names it in the report.
/// This is also what the `audit_log` fuzz target drives.
pub fn verify_text(
    text: &str,
    origin: &str,
    verifier: &Verifier,
) -> std::result::Result<Vec<String>, ChainBreak> {
    let brk = |line: usize, seq: Option<u64>, reason: String| ChainBreak {
        file: origin.to_string(),
        line,
        seq,
        reason,
    };
    let mut prev = GENESIS.to_string();
    let mut hashes: Vec<String> = Vec::new();
    for (i, text) in text.lines().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let expected_seq = hashes.len() as u64;
        let line: LineIn<'_> = serde_json::from_str(text)
            .map_err(|e| brk(n, None, format!("not an audit line: {e}")))?;
        let bytes = line.entry.get().as_bytes();
        let entry: Entry = serde_json::from_slice(bytes)
            .map_err(|e| brk(n, None, format!("not an audit entry: {e}")))?;
        let seq = Some(entry.seq);
        let hash = hex::encode(Sha256::digest(bytes));
        if hash != line.hash {
            return Err(brk(
                n,
                seq,
                format!(
                    "the entry was altered: it hashes to {hash}, the line says {}",
                    line.hash
                ),
            ));
        }
        let sig = signing::from_b64(&line.sig).map_err(|e| brk(n, seq, e.to_string()))?;
        verifier.verify(bytes, &sig).map_err(|_| {
            brk(
                n,
                seq,
                format!(
                    "the signature is not the coordinator's (key {}): the entry was rewritten",
                    verifier.key_id()
                ),
            )
        })?;
        if entry.seq != expected_seq {
            return Err(brk(
                n,
                seq,
                format!(
                    "expected entry {expected_seq} here: an entry was deleted, inserted or moved"
                ),
            ));
        }
        if entry.prev != prev {
            return Err(brk(
                n,
                seq,
                "its link to the entry before does not match: an entry was deleted, inserted or moved"
                    .into(),
            ));
        }
        prev = hash.clone();
        hashes.push(hash);
    }
    Ok(hashes)
}

/// Reads the entries after verifying the chain; what a release builds on.
pub fn read_verified(path: &Path, verifier: &Verifier) -> Result<Vec<Entry>> {
    verify_file(path, verifier)
        .map_err(|e| audit_err(format!("the audit log does not verify: {e}")))?;
    read_lines(path)?
        .iter()
        .map(|(n, text)| {
            let line: LineIn<'_> =
                serde_json::from_str(text).map_err(|e| audit_err(format!("line {n}: {e}")))?;
            serde_json::from_str(line.entry.get()).map_err(|e| audit_err(format!("line {n}: {e}")))
        })
        .collect()
}

/// Reads the entries without checking the chain (for the coordinator's own
/// bookkeeping at start-up, and for a release only after the chain verified).
pub fn read_unverified(path: &Path) -> Result<Vec<Entry>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => {
            return Err(CoordinatorError::io(
                format!("reading {}", path.display()),
                e,
            ));
        }
    };
    Ok(parse_unverified(&text))
}

/// The entries of a log's text; lines that are not entries are skipped.
pub fn parse_unverified(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|text| {
            let line: LineIn<'_> = serde_json::from_str(text).ok()?;
            serde_json::from_str(line.entry.get()).ok()
        })
        .collect()
}

/// Non-empty lines with their 1-based numbers.
fn read_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => {
            return Err(CoordinatorError::io(
                format!("reading {}", path.display()),
                e,
            ));
        }
    };
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line =
            line.map_err(|e| CoordinatorError::io(format!("reading {}", path.display()), e))?;
        if !line.trim().is_empty() {
            out.push((i + 1, line));
        }
    }
    Ok(out)
}

/// Cuts a final line that has no newline: the fragment of an append a crash interrupted.
fn cut_torn_tail(path: &Path) -> Result<()> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(());
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    tracing::warn!(
        path = %path.display(),
        bytes = bytes.len() - keep,
        "cutting a torn last line from the audit log (a crash interrupted that append)"
    );
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| CoordinatorError::io(format!("opening {}", path.display()), e))?;
    f.set_len(keep as u64)
        .and_then(|_| f.sync_all())
        .map_err(|e| CoordinatorError::io(format!("truncating {}", path.display()), e))
}

/// Current time, UTC, RFC 3339.
pub fn now_utc() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formatting of a UTC time cannot fail")
}

/// SHA-256 hex of a text (plans, rosters, policies are logged by digest and content).
pub fn text_digest(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sangsaeng_common::identity::pki::{CaBundle, issue_server_cert};
    use serde_json::json;

    fn keys() -> (String, String) {
        let ca = CaBundle::create("test CA", 30).unwrap();
        issue_server_cert(&ca, "coordinator", &["localhost".into()], 30).unwrap()
    }

    fn log_with(n: usize) -> (tempfile::TempDir, PathBuf, Verifier, String) {
        let (cert, key) = keys();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let log = AuditLog::open(&path, Signer::from_pem(key.as_bytes()).unwrap()).unwrap();
        for i in 0..n {
            log.append(
                "joined",
                json!({"org": format!("org-{i}"), "weight": 0.1 * i as f64}),
            )
            .unwrap();
        }
        (
            dir,
            path,
            Verifier::from_cert_pem(cert.as_bytes()).unwrap(),
            key,
        )
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn write(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    #[test]
    fn an_untouched_log_verifies_and_reopening_continues_the_chain() {
        let (_d, path, verifier, key) = log_with(3);
        let r = verify_file(&path, &verifier).unwrap();
        assert_eq!(r.entries, 3);
        let log = AuditLog::open(&path, Signer::from_pem(key.as_bytes()).unwrap()).unwrap();
        assert_eq!(log.append("left", json!({"org": "org-1"})).unwrap(), 3);
        assert_eq!(verify_file(&path, &verifier).unwrap().entries, 4);
        let entries = read_verified(&path, &verifier).unwrap();
        assert_eq!(entries[3].kind, "left");
        assert_eq!(entries[0].prev, GENESIS);
        assert!(entries[1].time.ends_with('Z'), "{}", entries[1].time);
    }

    #[test]
    fn an_edited_entry_is_found() {
        let (_d, path, verifier, _) = log_with(4);
        let mut l = lines(&path);
        l[2] = l[2].replace("org-2", "org-9");
        write(&path, &l);
        let e = verify_file(&path, &verifier).unwrap_err();
        assert_eq!((e.line, e.seq), (3, Some(2)));
        assert!(e.reason.contains("altered"), "{e}");
    }

    #[test]
    fn an_edit_with_a_recomputed_hash_fails_the_signature() {
        let (_d, path, verifier, _) = log_with(3);
        let mut l = lines(&path);
        let line: serde_json::Value = serde_json::from_str(&l[1]).unwrap();
        let entry = line["entry"].to_string().replace("org-1", "org-7");
        let hash = hex::encode(Sha256::digest(entry.as_bytes()));
        l[1] = format!(
            r#"{{"entry":{entry},"hash":"{hash}","sig":{}}}"#,
            line["sig"]
        );
        write(&path, &l);
        let e = verify_file(&path, &verifier).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("signature"), "{e}");
    }

    #[test]
    fn a_deleted_or_reordered_entry_is_found() {
        let (_d, path, verifier, _) = log_with(5);
        let original = lines(&path);
        let mut l = original.clone();
        l.remove(2);
        write(&path, &l);
        let e = verify_file(&path, &verifier).unwrap_err();
        assert_eq!((e.line, e.seq), (3, Some(3)));
        assert!(e.reason.contains("deleted"), "{e}");

        let mut l = original.clone();
        l.swap(1, 2);
        write(&path, &l);
        let e = verify_file(&path, &verifier).unwrap_err();
        assert_eq!(e.line, 2);

        write(&path, &original);
        verify_file(&path, &verifier).unwrap();
    }

    #[test]
    fn another_key_does_not_verify() {
        let (_d, path, _, _) = log_with(2);
        let (other_cert, _) = keys();
        let other = Verifier::from_cert_pem(other_cert.as_bytes()).unwrap();
        let e = verify_file(&path, &other).unwrap_err();
        assert_eq!(e.line, 1);
    }

    #[test]
    fn a_torn_last_line_is_cut_at_open() {
        let (_d, path, verifier, key) = log_with(2);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(br#"{"entry":{"seq":2,"ti"#);
        std::fs::write(&path, bytes).unwrap();
        let log = AuditLog::open(&path, Signer::from_pem(key.as_bytes()).unwrap()).unwrap();
        assert_eq!(log.append("left", json!({})).unwrap(), 2);
        assert_eq!(verify_file(&path, &verifier).unwrap().entries, 3);
    }
}
