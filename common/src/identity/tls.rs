//! Mutual TLS between the coordinator and participant daemons: loading the
//! three PEM files every endpoint has (CA, own certificate, own key), building
//! the tonic server/client TLS configurations, and reading an organisation id
//! from a peer's certificate.
//!
//! The coordinator *requires* a client certificate issued by the federation CA
//! (see [`server_tls_config`]): that certificate is the only proof of which
//! organisation is calling, so an anonymous connection must never reach a
//! handler. Authorisation (roles) is a separate, roster-based step done by the
//! coordinator with the id from [`peer_identity`].
//!
//! tonic reports bad PEM, a key that does not match its certificate, or a
//! certificate from another CA only when the server starts or the first
//! connection fails, and then in generic terms. The config builders here
//! therefore check the material eagerly with the same rustls policy and say
//! precisely what is wrong.
//!
//! Crypto provider: this workspace compiles rustls with `ring` only, so tonic
//! picks it automatically and nothing needs installing. [`install_crypto_provider`]
//! makes that choice explicit for binaries (harmless to call more than once).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::error::{Error, Result};
use crate::identity::pki::{ORG_URI_PREFIX, first_cert_der, validate_org_id};

/// Longest a TLS handshake may take. Without a limit, a peer that opens a TCP
/// connection and then stalls holds a coordinator task for ever; ten seconds is
/// generous for a handshake even over a slow plant uplink.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// ALPN id of HTTP/2, which gRPC runs on (tonic sets the same).
const ALPN_H2: &[u8] = b"h2";

/// Paths of an endpoint's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The federation CA certificate (`ca.pem`).
    pub ca: PathBuf,
    /// This endpoint's certificate (leaf first, optionally followed by a chain).
    pub cert: PathBuf,
    /// This endpoint's private key.
    pub key: PathBuf,
}

/// The contents of [`TlsFiles`]. `Debug` is implemented by hand and never
/// prints the key.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl TlsFiles {
    /// Reads the three files and checks that each holds the PEM it should
    /// (certificates in `ca` and `cert`, a private key in `key`); every error
    /// names the file concerned, so swapped paths are easy to spot.
    pub fn load(&self) -> Result<TlsMaterial> {
        let ca_pem = read(&self.ca)?;
        let cert_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;
        certs(&ca_pem).map_err(|m| file_err(&self.ca, &m))?;
        certs(&cert_pem).map_err(|m| file_err(&self.cert, &m))?;
        private_key(&key_pem).map_err(|m| file_err(&self.key, &m))?;
        warn_if_key_exposed(&self.key);
        Ok(TlsMaterial {
            ca_pem,
            cert_pem,
            key_pem,
        })
    }
}

/// Makes `ring` the process-wide rustls crypto provider. Optional (see the
/// module docs); returns quietly if a provider is already installed.
pub fn install_crypto_provider() {
    // Err only means "already installed", which is the state we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// tonic server TLS for the coordinator: presents `cert`/`key` and requires
/// every client to present a certificate issued by `ca` with the clientAuth
/// purpose (`client_auth_optional(false)`).
///
/// Fails now, with a precise message, if the material would be unusable.
pub fn server_tls_config(m: &TlsMaterial) -> Result<ServerTlsConfig> {
    rustls_server_config(m)?;
    check_own_certificate(m, Purpose::Server)?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(&m.cert_pem, &m.key_pem))
        .client_ca_root(Certificate::from_pem(&m.ca_pem))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT))
}

/// tonic client TLS for a participant (or admin tool): trusts only the
/// federation CA (no system roots, so no public CA can vouch for a fake
/// coordinator), verifies the server against `server_name` (a DNS name or IP
/// that must be among the server certificate's SANs), and presents `cert`/`key`.
pub fn client_tls_config(m: &TlsMaterial, server_name: &str) -> Result<ClientTlsConfig> {
    let server_name = server_name.trim();
    ServerName::try_from(server_name).map_err(|_| {
        Error::Tls(format!(
            "server name '{}' is neither a DNS name nor an IP address",
            server_name.escape_default()
        ))
    })?;
    rustls_client_config(m)?;
    check_own_certificate(m, Purpose::Client)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&m.ca_pem))
        .identity(Identity::from_pem(&m.cert_pem, &m.key_pem))
        .domain_name(server_name)
        .timeout(HANDSHAKE_TIMEOUT))
}

/// The rustls server configuration equivalent to what tonic builds from
/// [`server_tls_config`] (same verifier, certificate and ALPN), using the
/// `ring` provider explicitly. For non-tonic listeners and tests.
pub fn rustls_server_config(m: &TlsMaterial) -> Result<ServerConfig> {
    let provider = ring_provider();
    let roots = Arc::new(root_store(m)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| Error::Tls(format!("cannot use the CA to verify clients: {e}")))?;
    let (chain, key) = own_identity(m)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(format!("TLS protocol versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(key_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The rustls client configuration equivalent to what tonic builds from
/// [`client_tls_config`], using the `ring` provider explicitly.
pub fn rustls_client_config(m: &TlsMaterial) -> Result<ClientConfig> {
    let roots = root_store(m)?;
    let (chain, key) = own_identity(m)?;
    let mut config = ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(format!("TLS protocol versions: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(key_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The organisation id in a DER certificate: its `sangsaeng://org/<id>` URI
/// SAN if it has one, else its subject CN. The id's syntax is checked either
/// way, and a certificate naming two different organisations is refused.
///
/// This reads names only; it does not verify the certificate. Use it on
/// certificates the TLS layer has already verified (see [`peer_identity`]).
pub fn identity_from_der(der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Tls(format!("peer certificate is not valid X.509: {e}")))?;
    let sans = cert.subject_alternative_name().map_err(|e| {
        Error::Tls(format!(
            "peer certificate has a malformed SAN extension: {e}"
        ))
    })?;
    let mut ids: Vec<&str> = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(ORG_URI_PREFIX),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let id = match ids.as_slice() {
        [id] => (*id).to_owned(),
        [] => common_name(&cert)?,
        several => {
            return Err(Error::Tls(format!(
                "peer certificate names several organisations ({})",
                several.join(", ")
            )));
        }
    };
    validate_org_id(&id).map_err(|e| Error::Tls(format!("peer certificate identity: {e}")))?;
    Ok(id)
}

/// The organisation id of the client that sent `req`, from the leaf of the
/// certificate chain it presented during the (already verified) handshake.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Result<String> {
    let no_cert = || Error::Tls("no client certificate presented".into());
    let certs = req.peer_certs().ok_or_else(no_cert)?;
    let leaf = certs.first().ok_or_else(no_cert)?;
    identity_from_der(leaf)
}

/// What an endpoint's own certificate is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Server,
    Client,
}

/// Checks that the endpoint's own certificate will be accepted by its peers:
/// issued by the CA in the same material, currently valid, and carrying the
/// extended key usage its role needs. A client certificate must also carry a
/// well-formed organisation id.
fn check_own_certificate(m: &TlsMaterial, purpose: Purpose) -> Result<()> {
    let leaf =
        first_cert_der(&m.cert_pem).map_err(|e| Error::Tls(format!("own certificate: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|e| Error::Tls(format!("own certificate is not valid X.509: {e}")))?;
    let subject = cert.subject().to_string();

    let ca_ders = certs(&m.ca_pem).map_err(|e| Error::Tls(format!("CA certificate: {e}")))?;
    let issued_by_ca = ca_ders.iter().any(|ca| {
        x509_parser::parse_x509_certificate(ca)
            .is_ok_and(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
    });
    if !issued_by_ca {
        return Err(Error::Tls(format!(
            "own certificate ({subject}) was not issued by the CA in the CA file; \
             it belongs to another CA (another federation, or a re-created CA)"
        )));
    }

    let validity = cert.validity();
    if !validity.is_valid() {
        return Err(Error::Tls(format!(
            "own certificate ({subject}) is valid from {} to {}, not now; renew it \
             (or check this machine's clock)",
            validity.not_before, validity.not_after
        )));
    }

    let eku = cert.extended_key_usage().map_err(|e| {
        Error::Tls(format!(
            "own certificate has a malformed EKU extension: {e}"
        ))
    })?;
    if let Some(eku) = eku {
        let (allowed, needed, hint) = match purpose {
            Purpose::Server => (
                eku.value.server_auth,
                "serverAuth",
                "use the certificate from issuing a server certificate, not a participant's",
            ),
            Purpose::Client => (
                eku.value.client_auth,
                "clientAuth",
                "use the certificate from enrolment (sign-csr), not the server's",
            ),
        };
        if !(allowed || eku.value.any) {
            return Err(Error::Tls(format!(
                "own certificate ({subject}) lacks the {needed} extended key usage; {hint}"
            )));
        }
    }

    if purpose == Purpose::Client {
        identity_from_der(&leaf)
            .map_err(|e| Error::Tls(format!("own certificate carries no usable identity: {e}")))?;
    }
    Ok(())
}

fn common_name(cert: &X509Certificate<'_>) -> Result<String> {
    let mut cns = cert.subject().iter_common_name();
    let cn = cns.next().ok_or_else(|| {
        Error::Tls(format!(
            "peer certificate has neither a {ORG_URI_PREFIX}<id> URI SAN nor a common name"
        ))
    })?;
    if cns.next().is_some() {
        return Err(Error::Tls(
            "peer certificate has several common names and no organisation URI".into(),
        ));
    }
    cn.as_str()
        .map(str::to_owned)
        .map_err(|e| Error::Tls(format!("peer certificate common name is unreadable: {e}")))
}

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(m: &TlsMaterial) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for der in certs(&m.ca_pem).map_err(|e| Error::Tls(format!("CA certificate: {e}")))? {
        roots
            .add(der)
            .map_err(|e| Error::Tls(format!("CA certificate cannot be a trust anchor: {e}")))?;
    }
    Ok(roots)
}

fn key_err(e: rustls::Error) -> Error {
    match e {
        rustls::Error::InconsistentKeys(_) => Error::Tls(
            "own private key does not belong to own certificate (key and certificate files \
             are from different issues)"
                .into(),
        ),
        other => Error::Tls(format!("own certificate or key is unusable: {other}")),
    }
}

/// All `CERTIFICATE` blocks of a PEM string, in order; at least one.
/// This site's certificate chain and private key, with errors that say which is wrong.
fn own_identity(m: &TlsMaterial) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = certs(&m.cert_pem).map_err(|e| Error::Tls(format!("own certificate: {e}")))?;
    let key = private_key(&m.key_pem).map_err(|e| Error::Tls(format!("own key: {e}")))?;
    Ok((chain, key))
}

fn certs(pem: &str) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate ('-----BEGIN CERTIFICATE-----') found".into());
    }
    Ok(certs)
}

fn private_key(pem: &str) -> std::result::Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            "no PEM private key ('-----BEGIN PRIVATE KEY-----') found".to_owned()
        }
        other => format!("not valid PEM: {other}"),
    })
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn file_err(path: &Path, message: &str) -> Error {
    Error::Tls(format!("{}: {message}", path.display()))
}

/// Warns (does not fail: keys mounted from secret stores often have other
/// modes) when a private key is readable by group or others.
fn warn_if_key_exposed(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{mode:o}"),
                    "private key is readable by other users; run chmod 600 on it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::pki::{self, CaBundle};
    use rustls::{ClientConnection, ServerConnection};

    struct Federation {
        ca: CaBundle,
        server: TlsMaterial,
    }

    fn federation() -> Federation {
        let ca = CaBundle::create("Test CA", 30).unwrap();
        let sans = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let (cert_pem, key_pem) = pki::issue_server_cert(&ca, "coordinator", &sans, 30).unwrap();
        let server = TlsMaterial {
            ca_pem: ca.cert_pem.clone(),
            cert_pem,
            key_pem,
        };
        Federation { ca, server }
    }

    fn client_of(ca: &CaBundle, trusted_ca_pem: &str, org: &str) -> TlsMaterial {
        let (cert_pem, key_pem) = pki::issue_client_cert(ca, org, 30).unwrap();
        TlsMaterial {
            ca_pem: trusted_ca_pem.to_owned(),
            cert_pem,
            key_pem,
        }
    }

    /// Runs a TLS handshake between the two configurations entirely in memory,
    /// pumping records between them, and returns the server side on success.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
    ) -> std::result::Result<ServerConnection, rustls::Error> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = ClientConnection::new(Arc::new(client), name)?;
        let mut server = ServerConnection::new(Arc::new(server))?;
        for _ in 0..16 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).unwrap();
                server.process_new_packets()?;
            }
            buf.clear();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
                client.process_new_packets()?;
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(server);
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn mtls_accepts_our_client_and_yields_its_identity() {
        let f = federation();
        let client = client_of(&f.ca, &f.ca.cert_pem, "hanbit-motors");
        let server = handshake(
            rustls_client_config(&client).unwrap(),
            rustls_server_config(&f.server).unwrap(),
        )
        .unwrap();
        assert_eq!(server.alpn_protocol(), Some(ALPN_H2));
        let peer = server.peer_certificates().unwrap();
        assert_eq!(identity_from_der(&peer[0]).unwrap(), "hanbit-motors");
    }

    #[test]
    fn mtls_rejects_a_client_from_another_ca() {
        let f = federation();
        let rogue_ca = CaBundle::create("Rogue CA", 30).unwrap();
        // The rogue client trusts our CA (so it accepts the server), but its
        // own certificate comes from a CA the server does not know.
        let rogue = client_of(&rogue_ca, &f.ca.cert_pem, "hanbit-motors");
        // Our own eager check refuses this material outright...
        let err = client_tls_config(&rogue, "localhost").unwrap_err();
        assert!(err.to_string().contains("not issued by the CA"), "{err}");
        // ...and the server refuses it during the handshake.
        let err = handshake(
            rustls_client_config(&rogue).unwrap(),
            rustls_server_config(&f.server).unwrap(),
        )
        .map(|_| ())
        .unwrap_err();
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "unexpected error {err:?}"
        );
    }

    #[test]
    fn mtls_rejects_a_client_without_certificate() {
        let f = federation();
        let mut roots = RootCertStore::empty();
        roots.add(first_cert_der(&f.ca.cert_pem).unwrap()).unwrap();
        let anonymous = ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let err = handshake(anonymous, rustls_server_config(&f.server).unwrap())
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(err, rustls::Error::NoCertificatesPresented),
            "unexpected error {err:?}"
        );
    }

    #[test]
    fn mtls_rejects_a_server_certificate_used_as_client_certificate() {
        let f = federation();
        // Same CA, but serverAuth only: the client verifier demands clientAuth.
        let err = handshake(
            rustls_client_config(&f.server).unwrap(),
            rustls_server_config(&f.server).unwrap(),
        )
        .map(|_| ())
        .unwrap_err();
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "unexpected error {err:?}"
        );
        let err = client_tls_config(&f.server, "localhost").unwrap_err();
        assert!(err.to_string().contains("clientAuth"), "{err}");
    }

    #[test]
    fn tonic_configs_build_for_good_material() {
        let f = federation();
        server_tls_config(&f.server).unwrap();
        let client = client_of(&f.ca, &f.ca.cert_pem, "daeil-parts");
        client_tls_config(&client, "localhost").unwrap();
        client_tls_config(&client, "127.0.0.1").unwrap();
        assert!(client_tls_config(&client, "not a name").is_err());
        // A participant certificate cannot serve.
        let err = server_tls_config(&client).unwrap_err();
        assert!(err.to_string().contains("serverAuth"), "{err}");
    }

    #[test]
    fn configs_refuse_a_key_from_another_certificate() {
        let f = federation();
        let other = client_of(&f.ca, &f.ca.cert_pem, "daeil-parts");
        let mixed = TlsMaterial {
            key_pem: other.key_pem,
            ..f.server.clone()
        };
        let err = server_tls_config(&mixed).unwrap_err().to_string();
        assert!(err.contains("does not belong"), "{err}");
        let mut client = client_of(&f.ca, &f.ca.cert_pem, "hanbit-motors");
        client.key_pem = f.server.key_pem.clone();
        let err = client_tls_config(&client, "localhost")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not belong"), "{err}");
    }

    #[test]
    fn tls_files_load_and_name_the_bad_file() {
        let f = federation();
        let dir = tempfile::tempdir().unwrap();
        let (ca_path, ca_key_path) = f.ca.write(dir.path()).unwrap();
        let cert = dir.path().join("server.pem");
        let key = dir.path().join("server.key");
        pki::write_public(&cert, &f.server.cert_pem).unwrap();
        pki::write_private_key(&key, &f.server.key_pem).unwrap();

        let files = TlsFiles {
            ca: ca_path.clone(),
            cert: cert.clone(),
            key: key.clone(),
        };
        let m = files.load().unwrap();
        assert_eq!(m.cert_pem, f.server.cert_pem);
        assert!(!format!("{m:?}").contains("PRIVATE KEY"));
        server_tls_config(&m).unwrap();

        let missing = TlsFiles {
            cert: dir.path().join("missing.pem"),
            ..files.clone()
        };
        let err = missing.load().unwrap_err().to_string();
        assert!(err.contains("missing.pem"), "{err}");

        // Key and CA paths swapped.
        let swapped = TlsFiles {
            ca: ca_key_path.clone(),
            ..files.clone()
        };
        let err = swapped.load().unwrap_err().to_string();
        assert!(
            err.contains("ca.key") && err.contains("CERTIFICATE"),
            "{err}"
        );
        let not_a_key = TlsFiles {
            key: cert.clone(),
            ..files
        };
        let err = not_a_key.load().unwrap_err().to_string();
        assert!(
            err.contains("server.pem") && err.contains("private key"),
            "{err}"
        );
    }

    #[test]
    fn identity_prefers_uri_san_and_falls_back_to_cn() {
        use rcgen::{CertificateParams, DnType, KeyPair, SanType};
        let key = KeyPair::generate().unwrap();
        let make = |cn: &str, uris: &[&str]| {
            let mut p = CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.subject_alt_names = uris
                .iter()
                .map(|u| SanType::URI((*u).try_into().unwrap()))
                .collect();
            p.self_signed(&key).unwrap().der().to_vec()
        };
        assert_eq!(
            identity_from_der(&make("ignored-cn", &["sangsaeng://org/hanbit-motors"])).unwrap(),
            "hanbit-motors"
        );
        assert_eq!(
            identity_from_der(&make("daeil-parts", &["https://example.com/x"])).unwrap(),
            "daeil-parts"
        );
        assert!(identity_from_der(&make("Bad CN", &[])).is_err());
        assert!(identity_from_der(&make("ok", &["sangsaeng://org/Bad"])).is_err());
        assert!(
            identity_from_der(&make("ok", &["sangsaeng://org/aa", "sangsaeng://org/bb"])).is_err()
        );
        assert!(identity_from_der(b"not der").is_err());
    }

    #[test]
    fn peer_identity_without_tls_is_an_error() {
        let err = peer_identity(&tonic::Request::new(())).unwrap_err();
        assert_eq!(err.to_string(), "TLS: no client certificate presented");
    }
}
