//! Checking another participant's certificate outside a TLS handshake: in a
//! secure-aggregation round each participant verifies the adverts of its
//! neighbours, which the coordinator relays. The advert is signed with the
//! neighbour's TLS key, and the certificate that carries the key must come from
//! the federation CA and name the organisation the advert claims. Otherwise the
//! coordinator could hand out keys of its own and read every share sealed to them.
//!
//! The check is rustls' client-certificate verifier (webpki), the same one the
//! coordinator's handshake runs, so "a certificate the federation accepts" means
//! one thing everywhere.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use crate::identity::checkup::pem_certificates;
use crate::identity::signing::Verifier;
use crate::{Error, Result};

/// Verifies participants' leaf certificates against the federation CA.
#[derive(Clone)]
pub struct PeerVerifier {
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerVerifier").finish_non_exhaustive()
    }
}

impl PeerVerifier {
    /// A verifier trusting the CAs of the PEM text `ca_pem` (the endpoint's `ca.pem`).
    pub fn new(ca_pem: &str) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certificates(ca_pem) {
            roots
                .add(c)
                .map_err(|e| Error::Tls(format!("CA certificate cannot be a trust anchor: {e}")))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| Error::Tls(format!("cannot use the CA to verify peers: {e}")))?;
        Ok(PeerVerifier { verifier })
    }

    /// Checks that `leaf_der` was issued by the CA, is valid now and is for
    /// client authentication; returns the organisation it names and a
    /// verifier of signatures made with its key.
    pub fn verify(&self, leaf_der: &[u8]) -> Result<(String, Verifier)> {
        let cert = CertificateDer::from(leaf_der.to_vec());
        self.verifier
            .verify_client_cert(&cert, &[], UnixTime::now())
            .map_err(|e| Error::Tls(format!("peer certificate refused: {e}")))?;
        let org = crate::identity::tls::identity_from_der(leaf_der)?;
        Ok((org, Verifier::from_cert_der(leaf_der)?))
    }
}
