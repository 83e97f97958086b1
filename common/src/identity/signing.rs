//! Signatures made with an endpoint's own TLS key: the coordinator signs every
//! audit-log entry and the DSSE envelope of each release with the P-256 key of
//! its server certificate, and anyone holding that certificate can check them.
//!
//! Why the TLS key rather than a separate signing key: the federation CA already
//! vouches for it, so a verifier needs nothing beyond the coordinator's
//! certificate (and the CA to trust it); no second key has to be distributed,
//! rotated or protected. Why ring: it is already linked for TLS.
//!
//! DSSE (Dead Simple Signing Envelope, the format in-toto and Sigstore use)
//! signs the *pre-authentication encoding* of payload type and payload, so a
//! signature over one type of document can never be replayed as another.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

fn sig_err(msg: impl Into<String>) -> Error {
    Error::Signature(msg.into())
}

/// Signs with a PKCS#8 ECDSA P-256 private key (what `pki init` and `enrol` write).
pub struct Signer {
    key: EcdsaKeyPair,
    key_id: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish()
    }
}

impl Signer {
    /// Loads the key from a PEM file (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem_file(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_pem(&text).map_err(|e| sig_err(format!("{}: {e}", path.display())))
    }

    /// Loads the key from PEM bytes.
    pub fn from_pem(pem: &[u8]) -> Result<Self> {
        let der = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| sig_err(format!("not a PEM private key: {e}")))?;
        let PrivateKeyDer::Pkcs8(pkcs8) = der else {
            return Err(sig_err(
                "the key is not PKCS#8; only ECDSA P-256 keys in PKCS#8 can sign",
            ));
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| sig_err(format!("the key is not an ECDSA P-256 key ({e})")))?;
        let key_id = key_id_of(key.public_key().as_ref());
        Ok(Signer { key, key_id, rng })
    }

    /// SHA-256 of the public key point, hex: names the key in signatures.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The matching verifier (for checking one's own log at start-up).
    pub fn verifier(&self) -> Verifier {
        let point = self.key.public_key().as_ref().to_vec();
        Verifier {
            key_id: key_id_of(&point),
            public_point: point,
        }
    }

    /// ASN.1 DER ECDSA signature over `msg`.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        self.key
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|e| sig_err(format!("signing failed: {e}")))
    }
}

fn key_id_of(public_point: &[u8]) -> String {
    hex::encode(Sha256::digest(public_point))
}

/// Checks signatures against the public key of a certificate.
#[derive(Debug, Clone)]
pub struct Verifier {
    public_point: Vec<u8>,
    key_id: String,
}

impl Verifier {
    /// The key of the first certificate in a PEM file (e.g. `coordinator.pem`).
    pub fn from_cert_pem_file(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_cert_pem(&text).map_err(|e| sig_err(format!("{}: {e}", path.display())))
    }

    pub fn from_cert_pem(pem: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(pem)
            .map_err(|_| sig_err("the certificate file is not text (PEM)"))?;
        let der = crate::identity::pki::first_cert_der(text).map_err(sig_err)?;
        Self::from_cert_der(&der)
    }

    /// The key of one DER certificate.
    pub fn from_cert_der(der: &[u8]) -> Result<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| sig_err(format!("not an X.509 certificate: {e}")))?;
        let point = cert.public_key().subject_public_key.data.to_vec();
        Ok(Verifier {
            key_id: key_id_of(&point),
            public_point: point,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Ok when `sig` is this key's signature over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<()> {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.public_point)
            .verify(msg, sig)
            .map_err(|_| sig_err("the signature does not match the data and key"))
    }
}

/// A DSSE envelope (<https://github.com/secure-systems-lab/dsse>), JSON form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Base64 of the payload bytes.
    pub payload: String,
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    pub keyid: String,
    /// Base64 of the signature over [`pae`]`(payload_type, payload)`.
    pub sig: String,
}

/// DSSE v1 pre-authentication encoding.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// Signs `payload` of `payload_type`.
    pub fn sign(signer: &Signer, payload_type: &str, payload: &[u8]) -> Result<Self> {
        let sig = signer.sign(&pae(payload_type, payload))?;
        Ok(Envelope {
            payload: B64.encode(payload),
            payload_type: payload_type.to_string(),
            signatures: vec![EnvelopeSignature {
                keyid: signer.key_id().to_string(),
                sig: B64.encode(sig),
            }],
        })
    }

    /// Verifies that `verifier`'s key signed the envelope and returns the payload.
    pub fn verify(&self, verifier: &Verifier) -> Result<Vec<u8>> {
        let payload = B64
            .decode(&self.payload)
            .map_err(|e| sig_err(format!("envelope payload is not base64: {e}")))?;
        let msg = pae(&self.payload_type, &payload);
        let mut last = sig_err("the envelope carries no signature");
        for s in &self.signatures {
            let Ok(sig) = B64.decode(&s.sig) else {
                last = sig_err("an envelope signature is not base64");
                continue;
            };
            match verifier.verify(&msg, &sig) {
                Ok(()) => return Ok(payload),
                Err(e) => last = e,
            }
        }
        Err(sig_err(format!(
            "no signature of key {} verifies: {last}",
            verifier.key_id()
        )))
    }
}

/// Base64 helpers for signatures stored next to data (audit log).
pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

pub fn from_b64(text: &str) -> Result<Vec<u8>> {
    B64.decode(text)
        .map_err(|e| sig_err(format!("not base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::pki::{CaBundle, issue_server_cert};

    fn key_and_cert() -> (Signer, Verifier) {
        let ca = CaBundle::create("test CA", 30).unwrap();
        let (cert_pem, key_pem) =
            issue_server_cert(&ca, "coordinator", &["localhost".into()], 30).unwrap();
        (
            Signer::from_pem(key_pem.as_bytes()).unwrap(),
            Verifier::from_cert_pem(cert_pem.as_bytes()).unwrap(),
        )
    }

    #[test]
    fn a_signature_verifies_only_for_its_data_and_key() {
        let (signer, verifier) = key_and_cert();
        assert_eq!(signer.key_id(), verifier.key_id());
        let sig = signer.sign(b"round 3").unwrap();
        verifier.verify(b"round 3", &sig).unwrap();
        assert!(verifier.verify(b"round 4", &sig).is_err());
        let (_, other) = key_and_cert();
        assert!(other.verify(b"round 3", &sig).is_err());
    }

    #[test]
    fn envelope_round_trip_and_tampering() {
        let (signer, verifier) = key_and_cert();
        let env = Envelope::sign(&signer, "application/vnd.in-toto+json", b"{\"a\":1}").unwrap();
        assert_eq!(env.verify(&verifier).unwrap(), b"{\"a\":1}");
        let mut bad = env.clone();
        bad.payload = b64(b"{\"a\":2}");
        assert!(bad.verify(&verifier).is_err());
        let mut bad = env.clone();
        bad.payload_type = "text/plain".into();
        assert!(bad.verify(&verifier).is_err(), "the type is signed too");
    }

    #[test]
    fn pae_matches_the_dsse_specification_example() {
        // From the DSSE protocol description.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn a_key_that_is_not_p256_pkcs8_is_refused_clearly() {
        let e = Signer::from_pem(b"not pem").unwrap_err().to_string();
        assert!(e.contains("not a PEM private key"), "{e}");
    }
}
