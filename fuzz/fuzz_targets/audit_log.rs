//! Fuzz target: the audit log as read back from disk by `audit verify`, by a
//! release (which rebuilds the rounds from it) and by the coordinator at start.
//!
//! Any text must give a verdict (intact, or the first broken line), never a
//! panic; entries parsed without verification must still turn into round facts
//! without panicking.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sangsaeng_common::identity::pki::{CaBundle, issue_server_cert};
use sangsaeng_common::identity::signing::Verifier;
use sangsaeng_coordinator::audit;
use sangsaeng_coordinator::release;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let ca = CaBundle::create("fuzz CA", 30).unwrap();
        let (cert, _) = issue_server_cert(&ca, "coordinator", &["localhost".into()], 30).unwrap();
        Verifier::from_cert_pem(cert.as_bytes()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(brk) = audit::verify_text(text, "fuzz.jsonl", verifier()) {
        let _ = brk.to_string();
    }
    let entries = audit::parse_unverified(text);
    let _ = release::rounds_from_audit(&entries, "t-1");
});
