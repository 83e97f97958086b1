//! Storing a release as OCI content: in an OCI image-layout folder on disk (the
//! default; no server needed) or in a registry over the OCI distribution API.
//!
//! The model is one manifest with the CNCF ModelPack media types (artifact type
//! `application/vnd.cncf.model.manifest.v1+json`, a ModelPack config, the
//! weights as a raw weight layer, card and provenance as doc layers). The DSSE
//! signature is a second manifest whose `subject` is the model manifest, so
//! registries with the referrers API list it; for registries without one, an
//! index listing it is also tagged `sha256-<model digest hex>` (the referrers
//! tag schema of the distribution spec).
//!
//! Nothing half-released is left tagged: blobs go first, then both manifests by
//! digest, then the referrers tag, and the release tag last. A failure at any
//! step leaves at most untagged content, which registries garbage-collect. In a
//! layout folder, `index.json` is replaced atomically as the last step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::{Value, json};

use sangsaeng_common::transfer::weights::sha256_hex;

use super::artifact::{Artifact, CARD_FILE, PROVENANCE_FILE, SIGNATURE_FILE, WEIGHTS_FILE};
use crate::error::{CoordinatorError, Result};

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const MODEL_ARTIFACT_TYPE: &str = "application/vnd.cncf.model.manifest.v1+json";
pub const MODEL_CONFIG_TYPE: &str = "application/vnd.cncf.model.config.v1+json";
pub const WEIGHT_LAYER_TYPE: &str = "application/vnd.cncf.model.weight.v1.raw";
pub const DOC_LAYER_TYPE: &str = "application/vnd.cncf.model.doc.v1.raw";
pub const FILEPATH_ANNOTATION: &str = "org.cncf.model.filepath";
pub const DSSE_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
pub const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_JSON: &[u8] = b"{}";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Registry calls get bounded waits: a registry that hangs must fail the
/// release with a clear error, not hold the admin's request for ever.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(60);

/// One content-addressed blob.
#[derive(Debug, Clone)]
pub struct Blob {
    pub media_type: &'static str,
    pub digest: String,
    pub bytes: Vec<u8>,
    pub filepath: Option<&'static str>,
}

impl Blob {
    fn new(media_type: &'static str, bytes: Vec<u8>, filepath: Option<&'static str>) -> Self {
        Blob {
            media_type,
            digest: format!("sha256:{}", sha256_hex(&bytes)),
            bytes,
            filepath,
        }
    }

    fn descriptor(&self) -> Value {
        let mut d = json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        });
        if let Some(p) = self.filepath {
            d["annotations"] = json!({ FILEPATH_ANNOTATION: p });
        }
        d
    }
}

/// The release as OCI objects.
#[derive(Debug, Clone)]
pub struct Assembled {
    pub tag: String,
    pub blobs: Vec<Blob>,
    pub model_manifest: Blob,
    pub signature_manifest: Blob,
    /// The referrers-tag-schema index listing the signature.
    pub referrers_index: Blob,
}

impl Assembled {
    /// `sha256-<hex>`: the tag under which registries without the referrers API find the signature.
    pub fn referrers_tag(&self) -> String {
        self.model_manifest.digest.replace(':', "-")
    }
}

/// Builds the manifests of an artifact.
pub fn assemble(a: &Artifact) -> Assembled {
    let config = Blob::new(MODEL_CONFIG_TYPE, a.config.clone(), None);
    let weights = Blob::new(WEIGHT_LAYER_TYPE, a.weights.clone(), Some(WEIGHTS_FILE));
    let card = Blob::new(DOC_LAYER_TYPE, a.card.clone(), Some(CARD_FILE));
    let provenance = Blob::new(DOC_LAYER_TYPE, a.statement.clone(), Some(PROVENANCE_FILE));
    let model = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": MODEL_ARTIFACT_TYPE,
        "config": config.descriptor(),
        "layers": [weights.descriptor(), card.descriptor(), provenance.descriptor()],
        "annotations": {
            "org.opencontainers.image.title": format!("sangsaeng model {}", a.tag),
            "org.opencontainers.image.version": a.tag,
        },
    });
    let model_manifest = Blob::new(
        MANIFEST_TYPE,
        serde_json::to_vec(&model).expect("json"),
        None,
    );
    let empty = Blob::new(EMPTY_TYPE, EMPTY_JSON.to_vec(), None);
    let envelope = Blob::new(DSSE_TYPE, a.envelope.clone(), Some(SIGNATURE_FILE));
    let sig = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": DSSE_TYPE,
        "config": empty.descriptor(),
        "layers": [envelope.descriptor()],
        "subject": {
            "mediaType": MANIFEST_TYPE,
            "digest": model_manifest.digest,
            "size": model_manifest.bytes.len(),
        },
    });
    let signature_manifest =
        Blob::new(MANIFEST_TYPE, serde_json::to_vec(&sig).expect("json"), None);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_TYPE,
            "digest": signature_manifest.digest,
            "size": signature_manifest.bytes.len(),
            "artifactType": DSSE_TYPE,
        }],
    });
    let referrers_index = Blob::new(INDEX_TYPE, serde_json::to_vec(&index).expect("json"), None);
    Assembled {
        tag: a.tag.clone(),
        blobs: vec![config, weights, card, provenance, empty, envelope],
        model_manifest,
        signature_manifest,
        referrers_index,
    }
}

fn io(ctx: impl Into<String>, e: std::io::Error) -> CoordinatorError {
    CoordinatorError::io(ctx, e)
}

/// Writes a file atomically (temporary file, fsync, rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).map_err(|e| io(format!("creating {}", tmp.display()), e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(format!("renaming to {}", path.display()), e))
}

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Stores the release in an OCI image-layout folder (created if needed).
pub fn write_layout(dir: &Path, a: &Assembled) -> Result<()> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))
        .map_err(|e| io(format!("creating {}", dir.display()), e))?;
    write_atomic(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    for b in a
        .blobs
        .iter()
        .chain([&a.model_manifest, &a.signature_manifest])
    {
        let p = blob_path(dir, &b.digest);
        if !p.exists() {
            write_atomic(&p, &b.bytes)?;
        }
    }
    let index_path = dir.join("index.json");
    let mut index: Value = match std::fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            CoordinatorError::Registry(format!("{} is not an OCI index: {e}", index_path.display()))
        })?,
        Err(_) => json!({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": []}),
    };
    let manifests = index["manifests"].as_array_mut().ok_or_else(|| {
        CoordinatorError::Registry(format!("{} has no manifests list", index_path.display()))
    })?;
    // A re-release under the same tag moves the tag.
    manifests.retain(|m| {
        m["annotations"][REF_NAME] != json!(a.tag)
            && m["digest"] != json!(a.signature_manifest.digest)
    });
    let mut model = json!({
        "mediaType": MANIFEST_TYPE,
        "digest": a.model_manifest.digest,
        "size": a.model_manifest.bytes.len(),
        "artifactType": MODEL_ARTIFACT_TYPE,
        "annotations": { REF_NAME: a.tag },
    });
    if model["annotations"].is_null() {
        model["annotations"] = json!({});
    }
    manifests.push(model);
    manifests.push(json!({
        "mediaType": MANIFEST_TYPE,
        "digest": a.signature_manifest.digest,
        "size": a.signature_manifest.bytes.len(),
        "artifactType": DSSE_TYPE,
    }));
    write_atomic(
        &index_path,
        &serde_json::to_vec_pretty(&index).expect("json"),
    )
}

/// A registry repository, e.g. `127.0.0.1:5000/ai-factory/te-classifier`.
#[derive(Debug, Clone)]
pub struct Registry {
    pub registry: String,
    pub repository: String,
    pub plain_http: bool,
}

impl Registry {
    /// Parses `host[:port]/path`; a scheme, tag or digest is refused with the reason.
    pub fn parse(target: &str, plain_http: bool) -> Result<Self> {
        let bad = |why: &str| {
            CoordinatorError::InvalidArgument(format!(
                "registry '{target}': {why}; expected host[:port]/repository, e.g. registry.example.kr/ai-factory/model"
            ))
        };
        if target.contains("://") {
            return Err(bad("leave out the scheme (use plain_http for HTTP)"));
        }
        let (registry, repository) = target.split_once('/').ok_or_else(|| bad("no repository"))?;
        if registry.is_empty() || repository.is_empty() {
            return Err(bad("empty host or repository"));
        }
        if repository.contains('@')
            || repository
                .rsplit('/')
                .next()
                .is_some_and(|l| l.contains(':'))
        {
            return Err(bad("give the tag separately, not in the repository"));
        }
        // Let the distribution reference grammar have the final word.
        format!("{target}:probe")
            .parse::<Reference>()
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Registry {
            registry: registry.to_string(),
            repository: repository.to_string(),
            plain_http,
        })
    }

    fn client(&self) -> Client {
        Client::new(ClientConfig {
            protocol: if self.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            read_timeout: Some(REGISTRY_TIMEOUT),
            connect_timeout: Some(Duration::from_secs(10)),
            ..Default::default()
        })
    }

    fn by_digest(&self, digest: &str) -> Reference {
        Reference::with_digest(
            self.registry.clone(),
            self.repository.clone(),
            digest.to_string(),
        )
    }

    fn by_tag(&self, tag: &str) -> Reference {
        Reference::with_tag(
            self.registry.clone(),
            self.repository.clone(),
            tag.to_string(),
        )
    }

    pub fn location(&self, tag: &str) -> String {
        format!("{}/{}:{tag}", self.registry, self.repository)
    }
}

fn reg_err(step: &str, r: &Registry, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Registry(format!(
        "{step} at {}/{} failed: {e}",
        r.registry, r.repository
    ))
}

fn content_type(t: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(t).expect("a media type is a valid header value")
}

/// Pushes the release in the order that never leaves a half-release tagged.
pub async fn push(r: &Registry, a: &Assembled) -> Result<()> {
    let client = r.client();
    let any = r.by_tag(&a.tag);
    client
        .store_auth_if_needed(any.resolve_registry(), &RegistryAuth::Anonymous)
        .await;
    for b in &a.blobs {
        client
            .push_blob(&any, b.bytes.clone(), &b.digest)
            .await
            .map_err(|e| {
                reg_err(
                    &format!("uploading blob {}", b.filepath.unwrap_or(b.media_type)),
                    r,
                    e,
                )
            })?;
    }
    client
        .push_manifest_raw(
            &r.by_digest(&a.model_manifest.digest),
            a.model_manifest.bytes.clone(),
            content_type(MANIFEST_TYPE),
        )
        .await
        .map_err(|e| reg_err("pushing the model manifest", r, e))?;
    client
        .push_manifest_raw(
            &r.by_digest(&a.signature_manifest.digest),
            a.signature_manifest.bytes.clone(),
            content_type(MANIFEST_TYPE),
        )
        .await
        .map_err(|e| reg_err("pushing the signature manifest", r, e))?;
    client
        .push_manifest_raw(
            &r.by_tag(&a.referrers_tag()),
            a.referrers_index.bytes.clone(),
            content_type(INDEX_TYPE),
        )
        .await
        .map_err(|e| {
            reg_err(
                "tagging the signature for registries without referrers",
                r,
                e,
            )
        })?;
    client
        .push_manifest_raw(
            &r.by_tag(&a.tag),
            a.model_manifest.bytes.clone(),
            content_type(MANIFEST_TYPE),
        )
        .await
        .map_err(|e| reg_err("tagging the release", r, e))?;
    Ok(())
}

/// Where to pull a release from.
#[derive(Debug, Clone)]
pub enum Source {
    Layout(PathBuf),
    Registry(Registry),
}

/// A pulled release: the files of the artifact plus the manifest digests.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub model_digest: String,
    pub signature_digest: String,
    pub files: Vec<(&'static str, Vec<u8>)>,
}

fn check_digest(what: &str, digest: &str, bytes: &[u8]) -> Result<()> {
    let got = format!("sha256:{}", sha256_hex(bytes));
    if got != digest {
        return Err(CoordinatorError::Registry(format!(
            "{what}: content hashes to {got}, its descriptor says {digest}"
        )));
    }
    Ok(())
}

fn layers_by_path(manifest: &Value) -> Vec<(String, String)> {
    manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            Some((
                l["annotations"][FILEPATH_ANNOTATION].as_str()?.to_string(),
                l["digest"].as_str()?.to_string(),
            ))
        })
        .collect()
}

const FILES: [&str; 3] = [WEIGHTS_FILE, CARD_FILE, PROVENANCE_FILE];

/// Pulls a tagged release and its signature, checking every digest on the way.
pub async fn pull(source: &Source, tag: &str) -> Result<Pulled> {
    match source {
        Source::Layout(dir) => pull_layout(dir, tag),
        Source::Registry(r) => pull_registry(r, tag).await,
    }
}

fn pull_layout(dir: &Path, tag: &str) -> Result<Pulled> {
    let read_blob = |digest: &str| -> Result<Vec<u8>> {
        let p = blob_path(dir, digest);
        let bytes = std::fs::read(&p).map_err(|e| io(format!("reading {}", p.display()), e))?;
        check_digest(&p.display().to_string(), digest, &bytes)?;
        Ok(bytes)
    };
    let index_path = dir.join("index.json");
    let index: Value = serde_json::from_slice(
        &std::fs::read(&index_path)
            .map_err(|e| io(format!("reading {}", index_path.display()), e))?,
    )
    .map_err(|e| CoordinatorError::Registry(format!("{}: {e}", index_path.display())))?;
    let entries = index["manifests"].as_array().cloned().unwrap_or_default();
    let model_digest = entries
        .iter()
        .find(|m| m["annotations"][REF_NAME] == json!(tag))
        .and_then(|m| m["digest"].as_str())
        .ok_or_else(|| {
            CoordinatorError::NotFound(format!("no release tagged '{tag}' in {}", dir.display()))
        })?
        .to_string();
    let manifest: Value = serde_json::from_slice(&read_blob(&model_digest)?)
        .map_err(|e| CoordinatorError::Registry(format!("model manifest: {e}")))?;
    let mut files = Vec::new();
    let layers = layers_by_path(&manifest);
    for name in FILES {
        let (_, d) = layers
            .iter()
            .find(|(p, _)| p == name)
            .ok_or_else(|| CoordinatorError::Registry(format!("the release has no {name}")))?;
        files.push((name, read_blob(d)?));
    }
    // The signature: the manifest whose subject is the model manifest.
    let mut signature = None;
    for m in &entries {
        let Some(d) = m["digest"].as_str() else {
            continue;
        };
        if m["artifactType"] != json!(DSSE_TYPE) {
            continue;
        }
        let sig: Value = serde_json::from_slice(&read_blob(d)?)
            .map_err(|e| CoordinatorError::Registry(format!("signature manifest: {e}")))?;
        if sig["subject"]["digest"] == json!(model_digest) {
            signature = Some((d.to_string(), sig));
        }
    }
    let (signature_digest, sig) = signature.ok_or_else(|| {
        CoordinatorError::Registry(format!("no signature refers to release '{tag}'"))
    })?;
    let (_, env_digest) = layers_by_path(&sig)
        .into_iter()
        .find(|(p, _)| p == SIGNATURE_FILE)
        .ok_or_else(|| {
            CoordinatorError::Registry("the signature manifest has no envelope".into())
        })?;
    files.push((SIGNATURE_FILE, read_blob(&env_digest)?));
    Ok(Pulled {
        model_digest,
        signature_digest,
        files,
    })
}

async fn pull_registry(r: &Registry, tag: &str) -> Result<Pulled> {
    let client = r.client();
    let by_tag = r.by_tag(tag);
    let (bytes, model_digest) = client
        .pull_manifest_raw(&by_tag, &RegistryAuth::Anonymous, &[MANIFEST_TYPE])
        .await
        .map_err(|e| reg_err(&format!("fetching release '{tag}'"), r, e))?;
    check_digest("model manifest", &model_digest, &bytes)?;
    let manifest: Value = serde_json::from_slice(&bytes)
        .map_err(|e| CoordinatorError::Registry(format!("model manifest: {e}")))?;
    let layers = layers_by_path(&manifest);
    let mut files = Vec::new();
    for name in FILES {
        let (_, d) = layers
            .iter()
            .find(|(p, _)| p == name)
            .ok_or_else(|| CoordinatorError::Registry(format!("the release has no {name}")))?;
        files.push((name, pull_blob(&client, r, d.clone()).await?));
    }
    let referrers = signature_referrers(&client, r, &model_digest).await?;
    for d in referrers {
        let (bytes, digest) = client
            .pull_manifest_raw(&r.by_digest(&d), &RegistryAuth::Anonymous, &[MANIFEST_TYPE])
            .await
            .map_err(|e| reg_err("fetching the signature manifest", r, e))?;
        check_digest("signature manifest", &d, &bytes)?;
        let sig: Value = serde_json::from_slice(&bytes)
            .map_err(|e| CoordinatorError::Registry(format!("signature manifest: {e}")))?;
        if sig["subject"]["digest"] != json!(model_digest) {
            continue;
        }
        if let Some((_, env)) = layers_by_path(&sig)
            .into_iter()
            .find(|(p, _)| p == SIGNATURE_FILE)
        {
            files.push((SIGNATURE_FILE, pull_blob(&client, r, env).await?));
            return Ok(Pulled {
                model_digest,
                signature_digest: digest,
                files,
            });
        }
    }
    Err(CoordinatorError::Registry(format!(
        "no signature refers to release '{tag}' at {}",
        r.location(tag)
    )))
}

/// One blob, checked against its digest: a registry is not trusted to serve
/// what it was asked for.
async fn pull_blob(client: &Client, r: &Registry, digest: String) -> Result<Vec<u8>> {
    let reference = r.by_digest(&digest);
    let mut out = Vec::new();
    client
        .pull_blob(&reference, digest.as_str(), &mut out)
        .await
        .map_err(|e| reg_err(&format!("fetching blob {digest}"), r, e))?;
    check_digest(&digest, &digest, &out)?;
    Ok(out)
}

/// Digests of the manifests that may sign the model manifest.
async fn signature_referrers(
    client: &Client,
    r: &Registry,
    model_digest: &str,
) -> Result<Vec<String>> {
    // Referrers API first; the tag schema for registries without it.
    let referrers = match client
        .pull_referrers(&r.by_digest(model_digest), Some(DSSE_TYPE))
        .await
    {
        Ok(index) if !index.manifests.is_empty() => {
            index.manifests.into_iter().map(|m| m.digest).collect()
        }
        _ => {
            let tag = model_digest.replace(':', "-");
            let (bytes, _) = client
                .pull_manifest_raw(&r.by_tag(&tag), &RegistryAuth::Anonymous, &[INDEX_TYPE])
                .await
                .map_err(|e| reg_err("finding the release's signature (referrers tag)", r, e))?;
            let index: Value = serde_json::from_slice(&bytes)
                .map_err(|e| CoordinatorError::Registry(format!("referrers index: {e}")))?;
            index["manifests"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["digest"].as_str().map(String::from))
                .collect::<Vec<_>>()
        }
    };
    Ok(referrers)
}

/// Writes pulled files into `dir`.
pub fn save(p: &Pulled, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(format!("creating {}", dir.display()), e))?;
    for (name, bytes) in &p.files {
        write_atomic(&dir.join(name), bytes)?;
    }
    Ok(())
}
