//! Release of a trained model under the opening rules, end to end: a real
//! coordinator and participants train over mTLS, then an administrator releases
//! the model. Covers refusals (each failing rule is named), a participant
//! certificate trying to release, a malformed policy, the audit log recording
//! every attempt, pull + offline verification (signature, provenance, audit
//! log), tamper detection, a real OCI registry (Debian's `docker-registry`,
//! the CNCF distribution registry) with push, pull, referrers fallback, a
//! registry that is down or read-only, inspection with `skopeo`, and loading
//! the released weights with Python's `safetensors` + NumPy.
//!
//! The registry, skopeo and Python parts need those programs; `.ci/run`
//! installs them and sets `SANGSAENG_REQUIRE_EXTERNAL=1`, which turns a missing
//! program into a failure instead of a skipped part.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use sangsaeng::localnet;
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::roster::Roster;
use sangsaeng_common::identity::signing::Verifier;
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::learning::{backend::BackendKind, train};
use sangsaeng_common::transfer::weights;
use sangsaeng_coordinator::client::AdminClient;
use sangsaeng_coordinator::durable::audit;
use sangsaeng_coordinator::release::{self, oci};
use sangsaeng_proto::v1 as pb;

const POLICY: &str = r#"
[rules]
require_consent = true
min_contributors = 3
max_weight_share = 0.6
min_rounds = 2
min_macro_f1 = 0.05
require_differential_privacy = false
max_epsilon = 8.0

[disclosure]
contributors = "tier"

[licence]
id = "Apache-2.0"
terms = "Defect and fault screening within the AI Factory programme."
"#;

/// Three participants that signed the data agreement (tiers 1 and 2), and an admin.
fn roster() -> Roster {
    let mut t = String::new();
    for (i, id) in support::SITES.iter().enumerate() {
        t.push_str(&format!(
            "[[organisation]]\nid = \"{id}\"\nname = \"Supplier {id}\"\ntier = \"tier-{}\"\nrole = \"participant\"\nagreement = {{ signed = true, date = \"2026-03-0{}\" }}\n\n",
            i % 2 + 1,
            i + 1
        ));
    }
    t.push_str("[[organisation]]\nid = \"ops-admin\"\nname = \"Ops\"\ntier = \"anchor\"\nrole = \"admin\"\n");
    Roster::from_toml(&t, "release test roster").unwrap()
}

fn require_external() -> bool {
    std::env::var("SANGSAENG_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1")
}

/// Finds an external program, or says loudly why a part of the test is skipped.
fn external(program: &str, why: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            !require_external(),
            "{program} is required ({why}) but not installed; .ci/run installs it"
        );
        eprintln!("SKIPPED: {why}: `{program}` is not installed (run .ci/run to install it)");
    }
    found
}

/// A CNCF distribution registry on 127.0.0.1 with a random port and its own storage.
struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start(binary: &Path, read_only: bool) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        // The stock config listens on every interface and wants htpasswd: write our own.
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    readonly:\n      enabled: {read_only}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let mut child = Command::new(binary)
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        for _ in 0..200 {
            if http_get(&addr, "/v2/").is_some_and(|(code, _)| code == 200) {
                return Registry {
                    child,
                    addr,
                    _dir: dir,
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("docker-registry did not come up on {addr}");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare HTTP/1.0 GET (the registry API is plain JSON over HTTP here).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

fn tags(addr: &str, repo: &str) -> Vec<String> {
    match http_get(addr, &format!("/v2/{repo}/tags/list")) {
        Some((200, body)) => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(String::from))
                .collect()
        }
        _ => vec![],
    }
}

fn request(training: &str, policy: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        training_id: training.into(),
        policy_toml: policy.into(),
        ..Default::default()
    }
}

fn audit_entries(out: &Path) -> Vec<audit::Entry> {
    audit::read_unverified(&out.join(audit::FILE_NAME)).unwrap()
}

fn last_release_entry(out: &Path) -> audit::Entry {
    audit_entries(out)
        .into_iter()
        .rev()
        .find(|e| e.kind == "release_attempted")
        .expect("a release_attempted entry")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn release_under_the_opening_rules_end_to_end() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let roster = roster();
    let pki = support::pki(dir.path(), &roster);
    let runs = dir.path().join("runs");
    let coord = localnet::start_coordinator(
        &pki,
        roster,
        Some(support::plan(2, 3)),
        &runs,
        Default::default(),
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let files = support::site_files(dir.path(), 3);
    let handles = support::spawn_sites(&pki, &coord.url, files, &stop);
    let admin_tls = pki.material("ops-admin");
    let s = support::training_ended(&coord.url, &admin_tls).await;
    let t = s.training.unwrap();
    assert_eq!(t.phase, "completed", "{}", t.error);
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let training = t.training_id.clone();
    let mut admin = AdminClient::connect(&coord.url, &admin_tls, "localhost")
        .await
        .unwrap();
    let verifier = Verifier::from_cert_pem_file(&pki.files("server").cert).unwrap();
    let audit_path = runs.join(audit::FILE_NAME);

    // The audit log recorded the run: joins, both rounds with each update's
    // digest and weight, the end of the training.
    let entries = audit_entries(&runs);
    let kinds: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds[0], "coordinator_started");
    assert!(kinds.contains(&"joined") && kinds.contains(&"training_started"));
    let rounds = release::rounds_from_audit(&entries, &training);
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|r| r.contributions.len() == 3));
    assert!(kinds.contains(&"training_finished"));
    audit::verify_file(&audit_path, &verifier).unwrap();

    // 1. A participant certificate cannot release; the attempt is logged.
    let mut participant = AdminClient::connect(&coord.url, &pki.material("site-a"), "localhost")
        .await
        .unwrap();
    let e = participant
        .release(request(&training, POLICY))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("PermissionDenied"), "{e}");
    let logged = last_release_entry(&runs);
    assert_eq!(logged.data["by"], "site-a");
    assert_eq!(logged.data["outcome"], "denied");

    // 2. A policy with an unknown rule is refused by name, and logged.
    let e = admin
        .release(request(
            &training,
            &POLICY.replace("min_rounds", "min_runds"),
        ))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("min_runds"), "{e}");
    assert_eq!(last_release_entry(&runs).data["outcome"], "invalid");

    // 3. Failing rules: each failing rule is named, nothing is released.
    let strict = POLICY
        .replace("min_contributors = 3", "min_contributors = 4")
        .replace("min_macro_f1 = 0.05", "min_macro_f1 = 0.999")
        .replace(
            "require_differential_privacy = false",
            "require_differential_privacy = true",
        );
    let r = admin.release(request(&training, &strict)).await.unwrap();
    assert!(!r.released);
    let failed: Vec<&str> = r
        .rules
        .iter()
        .filter(|x| !x.passed)
        .map(|x| x.rule.as_str())
        .collect();
    assert_eq!(
        failed,
        [
            "min_contributors",
            "min_macro_f1",
            "require_differential_privacy"
        ]
    );
    let dp = r
        .rules
        .iter()
        .find(|x| x.rule == "require_differential_privacy")
        .unwrap();
    assert_eq!(dp.actual, "trained without differential privacy");
    let logged = last_release_entry(&runs);
    assert_eq!(logged.data["outcome"], "refused");
    assert_eq!(logged.data["failed_rules"].as_array().unwrap().len(), 3);
    assert!(
        !runs.join(release::LAYOUT_DIR).exists(),
        "a refusal writes nothing"
    );

    // 4. A passing policy releases to the OCI layout folder.
    let mut req = request(&training, POLICY);
    req.tag = "v1".into();
    let r = admin.release(req).await.unwrap();
    assert!(
        r.released,
        "{}",
        sangsaeng_coordinator::client::render_release(&r)
    );
    assert_eq!(
        r.rules.len(),
        9,
        "two integrity checks and seven policy rules"
    );
    assert!(r.rules.iter().all(|x| x.passed));
    assert_eq!(last_release_entry(&runs).data["outcome"], "released");
    let layout = runs.join(release::LAYOUT_DIR);
    let pulled = oci::pull(&oci::Source::Layout(layout.clone()), "v1")
        .await
        .unwrap();
    assert_eq!(pulled.model_digest, r.manifest_digest);
    let got = dir.path().join("got");
    oci::save(&pulled, &got).unwrap();
    let v = release::verify(&got, &verifier, Some(&audit_path)).unwrap();
    assert_eq!((v.rounds, v.audit_checked), (2, true));
    let card = std::fs::read_to_string(got.join("MODEL_CARD.md")).unwrap();
    assert!(card.starts_with("---\n") && card.contains("license: \"Apache-2.0\""));
    assert!(card.contains("disclosure: \"tier\""));
    assert!(
        !card.contains("site-a"),
        "tier disclosure must not name firms"
    );
    // The released weights are the coordinator's final global model.
    let plan: TrainingPlan = TrainingPlan::from_toml(
        &std::fs::read_to_string(PathBuf::from(&t.output_dir).join("plan.toml")).unwrap(),
        "plan",
    )
    .unwrap();
    let spec = ModelSpec::from_plan(&plan);
    let params = weights::load_safetensors(&got.join("model.safetensors"), &spec.layout()).unwrap();
    let global = weights::load_safetensors(
        &PathBuf::from(&t.output_dir).join("global.safetensors"),
        &spec.layout(),
    )
    .unwrap();
    assert_eq!(params, global);
    // A site can score its data with the pulled release as it is: the plan
    // and its federated scaling come from the signed provenance.
    let released = sangsaeng_participant::predict::Model::open(&got).unwrap();
    assert_eq!(released.params, global);
    assert_eq!(released.plan, plan);

    // 5. Tampering is detected: weights, provenance, and the audit log.
    let tampered = dir.path().join("tampered");
    oci::save(&pulled, &tampered).unwrap();
    let mut w = std::fs::read(tampered.join("model.safetensors")).unwrap();
    let last = w.len() - 1;
    w[last] ^= 1;
    std::fs::write(tampered.join("model.safetensors"), &w).unwrap();
    let e = release::verify(&tampered, &verifier, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    oci::save(&pulled, &tampered).unwrap();
    let prov = std::fs::read_to_string(tampered.join("provenance.intoto.json")).unwrap();
    std::fs::write(
        tampered.join("provenance.intoto.json"),
        prov.replace("\"weight\": ", "\"weight\": 1"),
    )
    .unwrap();
    assert!(release::verify(&tampered, &verifier, None).is_err());
    let log_copy = dir.path().join("audit-copy.jsonl");
    let text = std::fs::read_to_string(&audit_path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let edited: String = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    std::fs::write(&log_copy, edited).unwrap();
    let e = release::verify(&got, &verifier, Some(&log_copy))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("line 4"),
        "a deleted entry is reported where it was: {e}"
    );

    // A tampered live audit log stops releases: the integrity rule fails and names the line.
    let original = std::fs::read_to_string(&audit_path).unwrap();
    let victim = original.lines().nth(2).unwrap().to_string();
    std::fs::write(
        &audit_path,
        original.replacen(&victim, &victim.replacen("\"seq\":2", "\"seq\":7", 1), 1),
    )
    .unwrap();
    let r = admin.release(request(&training, POLICY)).await.unwrap();
    assert!(!r.released);
    let integrity = &r.rules[0];
    assert_eq!(
        (integrity.rule.as_str(), integrity.passed),
        ("audit_log_intact", false)
    );
    assert!(integrity.actual.contains("line 3"), "{}", integrity.actual);
    // Put the entry back; the refusal appended meanwhile still chains on.
    let now = std::fs::read_to_string(&audit_path).unwrap();
    let tampered_line = victim.replacen("\"seq\":2", "\"seq\":7", 1);
    std::fs::write(&audit_path, now.replacen(&tampered_line, &victim, 1)).unwrap();
    audit::verify_file(&audit_path, &verifier).unwrap();

    // 6. The released weights work outside Sangsaeng: Python safetensors + NumPy.
    if let Some(python) = python_with_safetensors() {
        let n = 5;
        let inputs: Vec<f32> = (0..n * spec.n_features)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let logits =
            train::predict_logits(BackendKind::NdArray, &spec, &params, &inputs, n).unwrap();
        let cases = serde_json::json!({
            "activation": sangsaeng_common::transfer::wire::activation_name(plan.model.activation),
            "inputs": inputs.chunks(spec.n_features).collect::<Vec<_>>(),
            "logits": logits.chunks(spec.n_classes).collect::<Vec<_>>(),
        });
        let cases_path = dir.path().join("cases.json");
        std::fs::write(&cases_path, cases.to_string()).unwrap();
        let out = Command::new(&python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_release.py"))
            .arg(got.join("model.safetensors"))
            .arg(&cases_path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "python check failed: {text}");
        assert!(text.contains("5 inputs"), "{text}");
    }

    // 7. A real registry: push, pull back, verify; down and read-only registries.
    if let Some(binary) = external("docker-registry", "push/pull against a real OCI registry") {
        let reg = Registry::start(&binary, false);
        let repo = "ai-factory/te-classifier";
        let mut req = request(&training, POLICY);
        req.registry = format!("{}/{repo}", reg.addr);
        req.plain_http = true;
        req.tag = "v1".into();
        let r = admin.release(req).await.unwrap();
        assert!(r.released);
        let mut t = tags(&reg.addr, repo);
        t.sort();
        let referrers_tag = r.manifest_digest.replace(':', "-");
        assert_eq!(t, vec![referrers_tag.clone(), "v1".to_string()]);
        let source = oci::Source::Registry(
            oci::Registry::parse(&format!("{}/{repo}", reg.addr), true).unwrap(),
        );
        let pulled = oci::pull(&source, "v1").await.unwrap();
        assert_eq!(pulled.model_digest, r.manifest_digest);
        assert_eq!(pulled.signature_digest, r.signature_digest);
        let from_registry = dir.path().join("from-registry");
        oci::save(&pulled, &from_registry).unwrap();
        release::verify(&from_registry, &verifier, Some(&audit_path)).unwrap();

        // Inspected with a tool that is not ours.
        if let Some(skopeo) = external("skopeo", "inspecting the release with skopeo") {
            let out = Command::new(skopeo)
                .args(["inspect", "--raw", "--tls-verify=false"])
                .arg(format!("docker://{}/{repo}:v1", reg.addr))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                m["artifactType"],
                "application/vnd.cncf.model.manifest.v1+json"
            );
            assert_eq!(
                m["layers"][0]["mediaType"],
                "application/vnd.cncf.model.weight.v1.raw"
            );
            let digest = format!("sha256:{}", weights::sha256_hex(&out.stdout));
            assert_eq!(
                digest, r.manifest_digest,
                "skopeo sees the manifest we pushed"
            );
        }

        // A registry that rejects the push: nothing is tagged, the failure is logged.
        let ro = Registry::start(&binary, true);
        let mut req = request(&training, POLICY);
        req.registry = format!("{}/{repo}", ro.addr);
        req.plain_http = true;
        req.tag = "v1".into();
        let e = admin.release(req).await.unwrap_err().to_string();
        assert!(e.contains("registry"), "{e}");
        assert!(tags(&ro.addr, repo).is_empty());
        let logged = last_release_entry(&runs);
        assert_eq!(logged.data["outcome"], "failed");
        drop(ro);

        // A registry that is down.
        let down = reg.addr.clone();
        drop(reg);
        let mut req = request(&training, POLICY);
        req.registry = format!("{down}/{repo}");
        req.plain_http = true;
        let e = admin.release(req).await.unwrap_err().to_string();
        assert!(e.contains("uploading blob"), "{e}");
        assert_eq!(last_release_entry(&runs).data["outcome"], "failed");
    }

    // Every attempt above is in the log, and the log still verifies.
    let outcomes: Vec<String> = audit_entries(&runs)
        .iter()
        .filter(|e| e.kind == "release_attempted")
        .map(|e| e.data["outcome"].as_str().unwrap().to_string())
        .collect();
    assert!(
        outcomes.starts_with(&[
            "denied".into(),
            "invalid".into(),
            "refused".into(),
            "released".into()
        ]),
        "{outcomes:?}"
    );
    audit::verify_file(&audit_path, &verifier).unwrap();
    coord.stop().await.unwrap();
}

/// A Python interpreter with `safetensors` and NumPy: `SANGSAENG_PYTHON`
/// (`.ci/run` points it at its virtualenv), else `python3` if it has them.
fn python_with_safetensors() -> Option<PathBuf> {
    let candidate = std::env::var_os("SANGSAENG_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| "python3".into());
    let ok = Command::new(&candidate)
        .args(["-c", "import safetensors.numpy, numpy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !require_external(),
            "{} cannot import safetensors and numpy; .ci/run installs them",
            candidate.display()
        );
        eprintln!(
            "SKIPPED: Python check of the released weights: no python with safetensors + numpy (set SANGSAENG_PYTHON)"
        );
        return None;
    }
    Some(candidate)
}
