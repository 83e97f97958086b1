//! The project's small public-key infrastructure: one self-signed CA per
//! federation, server certificates for the coordinator, and enrolment of
//! participants through certificate signing requests (CSRs).
//!
//! Enrolment is CSR based on purpose: a participant runs [`generate_csr`] on its
//! own machine, sends only the CSR to the anchor company, and gets back a
//! certificate from [`sign_csr`]. Its private key never leaves the site, so the
//! anchor company can never impersonate a supplier.
//!
//! Identity model: an organisation id (`hanbit-motors`, see [`validate_org_id`])
//! is written both as the subject CN and as a URI SAN `sangsaeng://org/<id>`
//! ([`org_uri`]). The URI SAN is the authoritative form ([`crate::identity::tls`] prefers
//! it); the CN is kept so that `openssl x509 -subject` shows who a certificate
//! belongs to. Roles are deliberately *not* in certificates: they live in the
//! coordinator's roster, so changing a role does not require re-issuing.
//!
//! All keys are ECDSA P-256: small, fast, and supported by every rustls provider
//! and by `ring`, which is the only crypto backend this workspace builds.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

pub use crate::config::roster::{MAX_ORG_ID_LEN, validate_org_id};
use crate::error::{Error, Result};

/// Scheme and path prefix of the URI SAN that carries an organisation id.
pub const ORG_URI_PREFIX: &str = "sangsaeng://org/";

/// Suggested CA lifetime: five years. Replacing the root is a coordinated event
/// (every site must install the new `ca.pem`), so it should outlive a typical
/// consortium project, yet stay short enough that a forgotten CA key does not
/// remain a trust anchor forever.
pub const DEFAULT_CA_VALIDITY_DAYS: u32 = 5 * 365;

/// Suggested lifetime of server and participant certificates: one year. The
/// project has no CRL/OCSP, so expiry is the backstop that eventually retires a
/// certificate; removing an organisation from the roster is the immediate one.
pub const DEFAULT_CERT_VALIDITY_DAYS: u32 = 365;

/// Certificates start this long before the moment they are issued, so a site
/// whose clock lags the CA's by a few minutes does not reject a fresh
/// certificate as "not yet valid".
const BACKDATE: Duration = Duration::hours(1);

/// The federation's certificate authority: certificate and private key, PEM.
///
/// `Debug` is implemented by hand and never prints the key.
#[derive(Clone)]
pub struct CaBundle {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaBundle")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl CaBundle {
    /// Creates a new self-signed CA (ECDSA P-256) valid for `validity_days`.
    ///
    /// The CA may sign end-entity certificates only (path length 0): the
    /// project has no intermediate CAs, and forbidding them means a leaked
    /// participant key can never be turned into a signing authority.
    pub fn create(common_name: &str, validity_days: u32) -> Result<Self> {
        let common_name = common_name.trim();
        if common_name.is_empty() {
            return Err(Error::Pki("the CA common name must not be empty".into()));
        }
        let key = KeyPair::generate().map_err(|e| pki_err("generating the CA key", e))?;
        let mut params = base_params(common_name, validity_days)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params
            .self_signed(&key)
            .map_err(|e| pki_err("self-signing the CA certificate", e))?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Loads a CA written by [`CaBundle::write`] (or any PEM CA with a PKCS#8
    /// key), and checks that the certificate is a CA and that the key is its key.
    pub fn load(cert_path: impl AsRef<Path>, key_path: impl AsRef<Path>) -> Result<Self> {
        let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
        let cert_pem = fs::read_to_string(cert_path).map_err(|e| Error::io(cert_path, e))?;
        let key_pem = fs::read_to_string(key_path).map_err(|e| Error::io(key_path, e))?;

        let der = first_cert_der(&cert_pem)
            .map_err(|m| Error::Pki(format!("{}: {m}", cert_path.display())))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
            Error::Pki(format!(
                "{}: not a valid X.509 certificate: {e}",
                cert_path.display()
            ))
        })?;
        if !cert.is_ca() {
            return Err(Error::Pki(format!(
                "{}: this certificate is not a CA certificate (basicConstraints CA:TRUE missing)",
                cert_path.display()
            )));
        }
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            Error::Pki(format!(
                "{}: not a usable PKCS#8 PEM private key: {e}",
                key_path.display()
            ))
        })?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::Pki(format!(
                "{} does not belong to the certificate {} (public keys differ)",
                key_path.display(),
                cert_path.display()
            )));
        }
        Ok(Self { cert_pem, key_pem })
    }

    /// Writes `ca.pem` (0644: it is public and every site needs it) and `ca.key`
    /// (0600: whoever reads it can enrol anyone) into `dir`, creating `dir` if
    /// needed. Existing files are replaced atomically. Returns (cert, key) paths.
    pub fn write(&self, dir: impl AsRef<Path>) -> Result<(PathBuf, PathBuf)> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        write_private_key(&key_path, &self.key_pem)?;
        write_public(&cert_path, &self.cert_pem)?;
        Ok((cert_path, key_path))
    }

    /// SHA-256 fingerprint of the CA certificate, for out-of-band comparison
    /// (a participant checks it before trusting a `ca.pem` it was sent).
    pub fn fingerprint(&self) -> Result<String> {
        fingerprint_sha256(&self.cert_pem)
    }

    /// The rcgen issuer for this CA: DN and key identifier come from the CA
    /// certificate itself, so issued certificates chain to exactly this file.
    fn issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        let key = KeyPair::from_pem(&self.key_pem)
            .map_err(|e| pki_err("reading the CA private key", e))?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key)
            .map_err(|e| pki_err("reading the CA certificate", e))
    }
}

/// The URI SAN for an organisation: `sangsaeng://org/<org_id>`.
pub fn org_uri(org_id: &str) -> String {
    format!("{ORG_URI_PREFIX}{org_id}")
}

/// Issues the coordinator's TLS server certificate, signed by `ca`.
///
/// `sans` are the names clients dial: DNS names, or IP addresses (`10.0.0.5`,
/// `::1` or `[::1]`), each becoming the matching SAN type. At least one is
/// required because rustls checks the dialled name against SANs only, never
/// against the CN. Returns (certificate PEM, private key PEM).
pub fn issue_server_cert(
    ca: &CaBundle,
    common_name: &str,
    sans: &[String],
    validity_days: u32,
) -> Result<(String, String)> {
    if sans.is_empty() {
        return Err(Error::Pki(
            "a server certificate needs at least one SAN (DNS name or IP address): \
             clients verify the name they connect to against the SANs only"
                .into(),
        ));
    }
    let mut params = base_params(common_name, validity_days)?;
    params.subject_alt_names = sans
        .iter()
        .map(|s| server_san(s))
        .collect::<Result<Vec<_>>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;

    let issuer = ca.issuer()?;
    let key = KeyPair::generate().map_err(|e| pki_err("generating the server key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| pki_err("signing the server certificate", e))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Creates a participant's key pair and a CSR for `org_id` (CN and URI SAN).
/// Runs on the participant's machine; only the CSR is sent to the CA.
/// Returns (private key PEM, CSR PEM).
pub fn generate_csr(org_id: &str) -> Result<(String, String)> {
    validate_org_id(org_id)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, org_id.to_owned());
    params.subject_alt_names = vec![org_san(org_id)?];
    let key = KeyPair::generate().map_err(|e| pki_err("generating the participant key", e))?;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| pki_err("creating the certificate signing request", e))?;
    let csr_pem = csr
        .pem()
        .map_err(|e| pki_err("encoding the certificate signing request", e))?;
    Ok((key.serialize_pem(), csr_pem))
}

/// Verifies a participant's CSR and issues its client certificate.
///
/// The CSR's self-signature must verify (proof that the requester holds the
/// key), its organisation id (URI SAN, else CN) must be well formed, and, when
/// `expected_org_id` is given, equal to it. Nothing else from the CSR is copied:
/// key usages, extensions and validity are set here by the CA, so a CSR cannot
/// ask for more than a plain client certificate.
pub fn sign_csr(
    ca: &CaBundle,
    csr_pem: &str,
    expected_org_id: Option<&str>,
    validity_days: u32,
) -> Result<String> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| {
        Error::Pki(format!(
            "not a PEM certificate signing request (expected a \
             '-----BEGIN CERTIFICATE REQUEST-----' block): {e}"
        ))
    })?;
    sign_csr_der(ca, &der, expected_org_id, validity_days)
}

/// [`sign_csr`] on an already decoded CSR.
fn sign_csr_der(
    ca: &CaBundle,
    der: &CertificateSigningRequestDer<'_>,
    expected_org_id: Option<&str>,
    validity_days: u32,
) -> Result<String> {
    let csr = CertificateSigningRequestParams::from_der(der).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => Error::Pki(
            "the CSR's signature does not verify: the request was corrupted or altered \
             after it was made"
                .into(),
        ),
        rcgen::Error::UnsupportedExtension => Error::Pki(
            "the CSR requests an extension this CA does not handle; create it with \
             `generate_csr` (the participant's enrol command)"
                .into(),
        ),
        other => pki_err("reading the certificate signing request", other),
    })?;
    if matches!(csr.params.is_ca, IsCa::Ca(_)) {
        return Err(Error::Pki(
            "the CSR asks for a CA certificate; participants only get client certificates".into(),
        ));
    }

    let org_id = csr_org_id(&csr.params)?;
    validate_org_id(&org_id)?;
    if let Some(expected) = expected_org_id
        && expected != org_id
    {
        return Err(Error::Pki(format!(
            "the CSR is for organisation '{org_id}', but '{expected}' was expected; \
             refusing to sign"
        )));
    }

    let mut params = base_params(&org_id, validity_days)?;
    params.subject_alt_names = vec![org_san(&org_id)?];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;

    let cert = params
        .signed_by(&csr.public_key, &ca.issuer()?)
        .map_err(|e| pki_err("signing the client certificate", e))?;
    Ok(cert.pem())
}

/// One-shot client credentials for local demos and tests: the same path as real
/// enrolment ([`generate_csr`] then [`sign_csr`]), just on one machine.
/// Returns (certificate PEM, private key PEM).
pub fn issue_client_cert(
    ca: &CaBundle,
    org_id: &str,
    validity_days: u32,
) -> Result<(String, String)> {
    let (key_pem, csr_pem) = generate_csr(org_id)?;
    let cert_pem = sign_csr(ca, &csr_pem, Some(org_id), validity_days)?;
    Ok((cert_pem, key_pem))
}

/// Writes a private key with mode 0600, atomically.
///
/// The key goes to a fresh temporary file in the same directory that is
/// *created* with mode 0600 (so it is never readable by others, not even for
/// the moment between create and chmod), is synced, and is then renamed over
/// `path`. A crash therefore leaves either the old key or the new one, never a
/// truncated file, and a pre-existing file's looser mode is not inherited.
pub fn write_private_key(path: impl AsRef<Path>, pem: &str) -> Result<()> {
    write_atomic(path.as_ref(), pem.as_bytes(), 0o600)
}

/// Writes a public file (certificate, CSR) with mode 0644, atomically.
pub fn write_public(path: impl AsRef<Path>, pem: &str) -> Result<()> {
    write_atomic(path.as_ref(), pem.as_bytes(), 0o644)
}

/// SHA-256 fingerprint of the first certificate in `cert_pem`, over its DER
/// encoding, as upper-case hex pairs joined by ':' — the format of
/// `openssl x509 -noout -fingerprint -sha256`, so operators can compare the two.
pub fn fingerprint_sha256(cert_pem: &str) -> Result<String> {
    let der = first_cert_der(cert_pem).map_err(Error::Pki)?;
    let digest = Sha256::digest(der.as_ref());
    Ok(digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// Decodes the first `CERTIFICATE` block of a PEM string.
pub fn first_cert_der(pem: &str) -> std::result::Result<CertificateDer<'static>, String> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            "no '-----BEGIN CERTIFICATE-----' block found".to_owned()
        }
        other => format!("not valid PEM: {other}"),
    })
}

fn pki_err(what: &str, e: rcgen::Error) -> Error {
    Error::Pki(format!("{what}: {e}"))
}

/// Parameters common to every certificate issued here: subject CN, a random
/// serial and the validity window.
fn base_params(common_name: &str, validity_days: u32) -> Result<CertificateParams> {
    if validity_days == 0 {
        return Err(Error::Pki("validity must be at least one day".into()));
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name.to_owned());
    // Random rather than rcgen's default (a hash of the public key): a renewed
    // certificate for the same key must still get a distinct serial.
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f; // keep the DER INTEGER positive without a padding byte
    serial[0] |= 0x01; // and non-zero leading, so every serial has the same length
    params.serial_number = Some(SerialNumber::from_slice(&serial));

    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now
        .checked_add(Duration::days(i64::from(validity_days)))
        .filter(|t| t.year() <= 9999)
        .ok_or_else(|| Error::Pki(format!("validity of {validity_days} days is too long")))?;
    Ok(params)
}

fn org_san(org_id: &str) -> Result<SanType> {
    let uri = Ia5String::try_from(org_uri(org_id))
        .map_err(|e| Error::Pki(format!("organisation URI for '{org_id}': {e}")))?;
    Ok(SanType::URI(uri))
}

fn server_san(name: &str) -> Result<SanType> {
    let name = name.trim();
    let unbracketed = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid_dns = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
        });
    if !valid_dns {
        return Err(Error::Pki(format!(
            "server SAN '{}' is neither an IP address nor a DNS name",
            name.escape_default()
        )));
    }
    let dns = Ia5String::try_from(name.to_ascii_lowercase())
        .map_err(|e| Error::Pki(format!("server SAN '{name}': {e}")))?;
    Ok(SanType::DnsName(dns))
}

/// The organisation a CSR asks for: its `sangsaeng://org/` URI SAN, else its CN.
/// A CSR naming two different organisations is refused as ambiguous.
fn csr_org_id(params: &CertificateParams) -> Result<String> {
    let mut uri_ids: Vec<&str> = params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => uri.as_str().strip_prefix(ORG_URI_PREFIX),
            _ => None,
        })
        .collect();
    uri_ids.sort_unstable();
    uri_ids.dedup();
    let cn = match params.distinguished_name.get(&DnType::CommonName) {
        None => None,
        Some(DnValue::Utf8String(s)) => Some(s.as_str()),
        Some(DnValue::PrintableString(s)) => Some(s.as_str()),
        Some(DnValue::Ia5String(s)) => Some(s.as_str()),
        Some(DnValue::TeletexString(s)) => Some(s.as_str()),
        Some(_) => {
            return Err(Error::Pki(
                "the CSR's common name uses a string type this CA does not read".into(),
            ));
        }
    };
    match (uri_ids.as_slice(), cn) {
        ([], Some(cn)) => Ok(cn.to_owned()),
        ([], None) => Err(Error::Pki(format!(
            "the CSR names no organisation: it has neither a {ORG_URI_PREFIX}<id> URI nor a \
             common name"
        ))),
        ([id], Some(cn)) if *id != cn => Err(Error::Pki(format!(
            "the CSR is ambiguous: its URI names organisation '{id}' but its common name is \
             '{cn}'"
        ))),
        ([id], _) => Ok((*id).to_owned()),
        (ids, _) => Err(Error::Pki(format!(
            "the CSR names several organisations ({}); refusing to sign",
            ids.join(", ")
        ))),
    }
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Pki(format!("{}: not a file path", path.display())))?;
    // Process id plus a per-process counter: concurrent writers, in this
    // process or another, never share a temporary file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));

    let result = (|| {
        let mut options = OpenOptions::new();
        // create_new: never follow or reuse something already at the temporary
        // name (a stale file or a planted symlink).
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut file = options.open(&tmp).map_err(|e| Error::io(&tmp, e))?;
        file.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn ca() -> CaBundle {
        CaBundle::create("Sangsaeng Test CA", 30).unwrap()
    }

    fn parse(pem: &str) -> Vec<u8> {
        first_cert_der(pem).unwrap().to_vec()
    }

    #[test]
    fn org_id_syntax() {
        for ok in ["hanbit-motors", "a", "0", "x-1-y", "a".repeat(64).as_str()] {
            validate_org_id(ok).unwrap();
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "Hanbit",
            "hanbit_motors",
            "hanbit motors",
            "é",
            long.as_str(),
        ] {
            assert!(validate_org_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ca_create_write_load_round_trip() {
        let ca = ca();
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = ca.write(dir.path().join("pki")).unwrap();
        assert_eq!(cert_path.file_name().unwrap(), "ca.pem");
        assert_eq!(key_path.file_name().unwrap(), "ca.key");
        let loaded = CaBundle::load(&cert_path, &key_path).unwrap();
        assert_eq!(loaded.cert_pem, ca.cert_pem);
        assert_eq!(loaded.key_pem, ca.key_pem);

        let der = parse(&loaded.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(cert.is_ca());
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert!(format!("{ca:?}").contains("<redacted>"));
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn ca_load_rejects_a_foreign_key_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, _) = ca().write(dir.path()).unwrap();
        let other = dir.path().join("other.key");
        write_private_key(&other, &ca().key_pem).unwrap();
        let err = CaBundle::load(&cert_path, &other).unwrap_err().to_string();
        assert!(err.contains("other.key"), "{err}");

        let missing = CaBundle::load(dir.path().join("nope.pem"), &other).unwrap_err();
        assert!(missing.to_string().contains("nope.pem"), "{missing}");
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_0600_and_public_files_0644() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = ca().write(dir.path()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key_path), 0o600);
        // 0644 unless the umask removes more; never group/world-writable.
        assert_eq!(mode(&cert_path) & !0o644, 0);

        // Replacing a key that someone loosened to 0644 yields a 0600 file again.
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        write_private_key(&key_path, "new").unwrap();
        assert_eq!(mode(&key_path), 0o600);
        assert_eq!(fs::read_to_string(&key_path).unwrap(), "new");
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn fingerprint_is_colon_separated_sha256_of_der() {
        let ca = ca();
        let fp = fingerprint_sha256(&ca.cert_pem).unwrap();
        let parts: Vec<&str> = fp.split(':').collect();
        assert_eq!(parts.len(), 32);
        assert!(parts.iter().all(|p| {
            p.len() == 2
                && p.chars()
                    .all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c))
        }));
        let expected = hex::encode_upper(Sha256::digest(parse(&ca.cert_pem)));
        assert_eq!(fp.replace(':', ""), expected);
        assert_eq!(ca.fingerprint().unwrap(), fp);
        assert!(fingerprint_sha256("not pem").is_err());
    }

    #[test]
    fn csr_round_trip_gives_a_client_cert_for_the_org() {
        let ca = ca();
        let (key_pem, csr_pem) = generate_csr("hanbit-motors").unwrap();
        assert!(key_pem.contains("PRIVATE KEY"));
        assert!(csr_pem.contains("BEGIN CERTIFICATE REQUEST"));
        let cert_pem = sign_csr(&ca, &csr_pem, Some("hanbit-motors"), 30).unwrap();
        let der = parse(&cert_pem);
        assert_eq!(
            crate::identity::tls::identity_from_der(&der).unwrap(),
            "hanbit-motors"
        );

        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "hanbit-motors");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());
        let sans = &cert.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(
            sans.general_names,
            vec![GeneralName::URI("sangsaeng://org/hanbit-motors")]
        );
        // Issued by our CA.
        let ca_der = parse(&ca.cert_pem);
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        // Validity is what was asked for, allowing for the backdate.
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / 86_400;
        assert_eq!(days, 30);

        // Without an expected id the CSR's own id is used.
        sign_csr(&ca, &csr_pem, None, 30).unwrap();
    }

    #[test]
    fn issue_client_cert_pairs_cert_and_key() {
        let ca = ca();
        let (cert_pem, key_pem) = issue_client_cert(&ca, "daeil-parts", 30).unwrap();
        let der = parse(&cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let key = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        assert!(issue_client_cert(&ca, "Bad Id", 30).is_err());
    }

    #[test]
    fn sign_csr_refuses_a_mismatching_expected_id() {
        let (_, csr) = generate_csr("hanbit-motors").unwrap();
        let err = sign_csr(&ca(), &csr, Some("daeil-parts"), 30)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("hanbit-motors") && err.contains("daeil-parts"),
            "{err}"
        );
    }

    #[test]
    fn sign_csr_refuses_malformed_input() {
        let ca = ca();
        for bad in ["", "hello", ca.cert_pem.as_str()] {
            let err = sign_csr(&ca, bad, None, 30).unwrap_err().to_string();
            assert!(err.contains("CERTIFICATE REQUEST"), "{err}");
        }
        assert!(
            sign_csr(
                &ca,
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                None,
                30
            )
            .is_err()
        );
        let (_, csr) = generate_csr("hanbit-motors").unwrap();
        assert!(sign_csr(&ca, &csr, None, 0).is_err());
    }

    #[test]
    fn sign_csr_refuses_a_tampered_csr() {
        let (_, csr_pem) = generate_csr("hanbit-motors").unwrap();
        let mut der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        // Change one character of the CN inside the signed part ("hanbit" -> "hanbiu").
        let at = der.windows(6).position(|w| w == b"hanbit").unwrap();
        der[at + 5] = b'u';
        let err = sign_csr_der(&ca(), &der.into(), None, 30)
            .unwrap_err()
            .to_string();
        assert!(err.contains("signature"), "{err}");
    }

    /// A CSR made outside `generate_csr`, with whatever names a requester chose.
    fn custom_csr(cn: Option<&str>, uris: &[&str]) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(DnType::CommonName, cn.to_owned());
        }
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI(Ia5String::try_from(*u).unwrap()))
            .collect();
        let key = KeyPair::generate().unwrap();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn sign_csr_refuses_bad_or_ambiguous_org_ids() {
        let ca = ca();
        for (cn, uris) in [
            (Some("Hanbit_Motors"), &[][..]),
            (None, &["sangsaeng://org/Bad Id"][..]),
            (None, &[][..]),
            (Some("hanbit-motors"), &["sangsaeng://org/daeil-parts"][..]),
            (
                None,
                &[
                    "sangsaeng://org/hanbit-motors",
                    "sangsaeng://org/daeil-parts",
                ][..],
            ),
        ] {
            assert!(
                sign_csr(&ca, &custom_csr(cn, uris), None, 30).is_err(),
                "accepted cn={cn:?} uris={uris:?}"
            );
        }
        // A CN alone is enough; the issued certificate still gets the URI SAN.
        let cert = sign_csr(&ca, &custom_csr(Some("daeil-parts"), &[]), None, 30).unwrap();
        let der = parse(&cert);
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans = &c.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(
            sans.general_names,
            vec![GeneralName::URI("sangsaeng://org/daeil-parts")]
        );
    }

    #[test]
    fn sign_csr_refuses_a_ca_request() {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "hanbit-motors");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let err = sign_csr(&ca(), &csr, None, 30).unwrap_err().to_string();
        assert!(err.contains("CA certificate"), "{err}");
    }

    #[test]
    fn server_cert_has_ip_and_dns_sans_and_server_auth() {
        let ca = ca();
        let sans = vec![
            "coordinator.example".to_owned(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "[::1]".to_owned(),
        ];
        let (cert_pem, key_pem) = issue_server_cert(&ca, "coordinator", &sans, 30).unwrap();
        assert!(key_pem.contains("PRIVATE KEY"));
        let der = parse(&cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let names = &cert.subject_alternative_name().unwrap().unwrap().value;
        let names = &names.general_names;
        assert!(names.contains(&GeneralName::DNSName("coordinator.example")));
        assert!(names.contains(&GeneralName::DNSName("localhost")));
        assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        let v6 = "::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert!(names.contains(&GeneralName::IPAddress(&v6)));
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!cert.is_ca());

        assert!(issue_server_cert(&ca, "coordinator", &[], 30).is_err());
        assert!(issue_server_cert(&ca, "coordinator", &["bad name".into()], 30).is_err());
    }

    #[test]
    fn serials_differ_between_issues() {
        let ca = ca();
        let sans = ["localhost".to_owned()];
        let a = parse(&issue_server_cert(&ca, "c", &sans, 1).unwrap().0);
        let b = parse(&issue_server_cert(&ca, "c", &sans, 1).unwrap().0);
        let (_, a) = x509_parser::parse_x509_certificate(&a).unwrap();
        let (_, b) = x509_parser::parse_x509_certificate(&b).unwrap();
        assert_ne!(a.raw_serial(), b.raw_serial());
    }
}
