//! Release of a training's global model to the government registry under the
//! delegation type's opening rules.
//!
//! - [`policy`]: the rules file and their evaluation against the audit log.
//! - [`artifact`]: weights, model card, in-toto provenance and its DSSE signature.
//! - [`oci`]: storing the artifact in an OCI layout folder or a registry, and pulling it back.
//!
//! [`release`] is what the `Admin.Release` RPC runs: every input comes from the
//! coordinator's own verified audit log and durable store, never from the
//! caller, who supplies only the policy and the destination. Every attempt —
//! refused, failed or released — ends with an audit entry. [`verify`] is the
//! offline check anyone holding the artifact (and optionally the audit log and
//! the coordinator's certificate) can run.

pub mod artifact;
pub mod oci;
pub mod policy;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::identity::signing::{Envelope, Signer, Verifier};
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::transfer::weights;

use crate::durable::audit::{self, Entry};
use crate::error::{CoordinatorError, Result};
use crate::state::Shared;
use artifact::{
    PROVENANCE_FILE, Provenance, ProvenanceRound, SIGNATURE_FILE, Statement, WEIGHTS_FILE,
};
use policy::{Contribution, Facts, Policy, RoundFact, RuleResult};

/// Folder (under the coordinator's output folder) of the default OCI layout target.
pub const LAYOUT_DIR: &str = "registry";

/// What the administrator asks for.
#[derive(Debug, Clone)]
pub struct ReleaseRequest {
    pub training_id: String,
    pub policy_toml: String,
    /// `None`: the coordinator's OCI layout folder.
    pub registry: Option<String>,
    pub plain_http: bool,
    /// Empty: the training id.
    pub tag: String,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseOutcome {
    pub released: bool,
    pub rules: Vec<RuleResult>,
    pub manifest_digest: String,
    pub signature_digest: String,
    pub location: String,
    pub audit_seq: u64,
}

/// The per-round facts of a training, from audit entries (the last entry of a
/// round wins: a coordinator that restarted between writing a round's entry and
/// recording it may write the same round twice).
pub fn rounds_from_audit(entries: &[Entry], training: &str) -> Vec<RoundFact> {
    let mut rounds: BTreeMap<u32, RoundFact> = BTreeMap::new();
    for e in entries
        .iter()
        .filter(|e| e.kind == "round_completed" && e.data["training"] == json!(training))
    {
        let Some(round) = e.data["round"].as_u64().and_then(|r| u32::try_from(r).ok()) else {
            continue;
        };
        let contributions = e.data["contributions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some(Contribution {
                    org: c["org"].as_str()?.to_string(),
                    sha256: c["sha256"].as_str()?.to_string(),
                    weight: c["weight"].as_u64()?,
                })
            })
            .collect();
        rounds.insert(
            round,
            RoundFact {
                round,
                contributions,
                global_model_sha256: e.data["global_model_sha256"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                eval_macro_f1: e.data["eval_macro_f1"].as_f64(),
                eval_accuracy: e.data["eval_accuracy"].as_f64(),
                eval_mae: e.data["eval_mae"].as_f64(),
                eval_rmse: e.data["eval_rmse"].as_f64(),
                eval_r2: e.data["eval_r2"].as_f64(),
                dp_epsilon: e.data["dp"]["model_epsilon"].as_f64(),
                secure_aggregation: e.data["secure_aggregation"]["secure_aggregation"]
                    == json!(true),
                evaluations: e.data["evaluations"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| {
                        let figures = v
                            .as_object()?
                            .iter()
                            .filter(|(k, _)| !matches!(k.as_str(), "org" | "examples"))
                            .filter_map(|(k, x)| Some((k.clone(), x.as_f64()?)))
                            .collect();
                        Some(policy::EvaluationFact {
                            org: v["org"].as_str()?.to_string(),
                            examples: v["examples"].as_u64()?,
                            figures,
                        })
                    })
                    .collect(),
            },
        );
    }
    rounds.into_values().collect()
}

/// The model's ε: the largest any round's entry records (a site that stopped
/// contributing keeps what it spent), and only when the plan trained with
/// differential privacy and every completed round's entry says what it spent;
/// otherwise the model counts as trained without it (a rule requiring it fails closed).
fn dp_epsilon(
    plan: &sangsaeng_common::config::plan::TrainingPlan,
    rounds: &[RoundFact],
) -> Option<f64> {
    plan.privacy.as_ref()?.dp.as_ref()?;
    if rounds.is_empty() {
        return None;
    }
    rounds
        .iter()
        .map(|r| r.dp_epsilon)
        .try_fold(0.0f64, |max, e| Some(max.max(e?)))
}

fn dp_facts(plan: &sangsaeng_common::config::plan::TrainingPlan) -> Option<policy::DpFacts> {
    let dp = plan.privacy.as_ref()?.dp.as_ref()?;
    Some(policy::DpFacts {
        level: dp.level,
        delta: dp.delta,
        clip: dp.clip(),
        noise_multiplier: dp.noise_multiplier,
    })
}

/// A valid OCI tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn check_tag(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(CoordinatorError::InvalidArgument(format!(
            "tag '{tag}' is not a valid OCI tag (letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-')"
        )))
    }
}

fn failed_names(rules: &[RuleResult]) -> Vec<String> {
    rules
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.rule.clone())
        .collect()
}

/// Runs a release for `admin` (already authorised as an admin by the caller).
pub async fn release(shared: &Shared, admin: &str, req: ReleaseRequest) -> Result<ReleaseOutcome> {
    let attempt = Attempt::new(shared, admin, &req);
    let prepared = prepare(shared, &req);
    let (policy, rules, inputs) = match prepared {
        Ok(p) => p,
        Err(e) => {
            attempt.record("invalid", json!({"error": e.to_string()}))?;
            return Err(e);
        }
    };
    let failed = failed_names(&rules);
    for r in &rules {
        tracing::info!(rule = %r.rule, passed = r.passed, "release rule: {} — {}", r.requirement, r.actual);
    }
    if !failed.is_empty() {
        return refused(&attempt, &req.training_id, failed, rules);
    }
    let a = build_artifact(shared, &req, &policy, &rules, &inputs)?;
    let assembled = oci::assemble(&a);
    let location = match store(shared, &assembled, &inputs).await {
        Ok(l) => l,
        Err(e) => {
            attempt.record("failed", json!({"error": e.to_string(), "rules": rules}))?;
            tracing::error!(training = %req.training_id, "release failed: {e}");
            return Err(e);
        }
    };
    let seq = attempt.record(
        "released",
        json!({
            "location": location,
            "manifest_digest": assembled.model_manifest.digest,
            "signature_digest": assembled.signature_manifest.digest,
            "weights_sha256": weights::sha256_hex(&a.weights),
            "final_params_sha256": weights::digest(&inputs.params),
            "rules": rules,
        }),
    )?;
    tracing::info!(training = %req.training_id, %location, digest = %assembled.model_manifest.digest, "model released");
    Ok(ReleaseOutcome {
        released: true,
        rules,
        manifest_digest: assembled.model_manifest.digest.clone(),
        signature_digest: assembled.signature_manifest.digest.clone(),
        location,
        audit_seq: seq,
    })
}

/// One release attempt's audit entries: every outcome repeats who asked for
/// what, so each entry stands on its own in the log.
struct Attempt<'a> {
    shared: &'a Shared,
    data: serde_json::Value,
}

impl<'a> Attempt<'a> {
    /// The request's fields as the audit log records them.
    fn new(shared: &'a Shared, admin: &str, req: &ReleaseRequest) -> Self {
        let data = json!({
            "by": admin,
            "training": req.training_id,
            "policy_sha256": audit::text_digest(&req.policy_toml),
            "target": req.registry.clone().unwrap_or_else(|| "oci-layout".into()),
            "tag": req.tag,
        });
        Attempt { shared, data }
    }

    /// Appends the attempt with its outcome and the outcome's own fields.
    fn record(&self, outcome: &str, extra: serde_json::Value) -> Result<u64> {
        let mut data = self.data.clone();
        data["outcome"] = json!(outcome);
        if let (Some(d), Some(x)) = (data.as_object_mut(), extra.as_object()) {
            d.extend(x.clone());
        }
        self.shared.audit.append("release_attempted", data)
    }
}

/// A refusal is an answer, not an error: it is logged with the failed rules and
/// returned so the administrator sees every rule's result.
fn refused(
    attempt: &Attempt<'_>,
    training: &str,
    failed: Vec<String>,
    rules: Vec<RuleResult>,
) -> Result<ReleaseOutcome> {
    let seq = attempt.record("refused", json!({"failed_rules": failed, "rules": rules}))?;
    tracing::warn!(training = %training, ?failed, "release refused");
    Ok(ReleaseOutcome {
        released: false,
        rules,
        manifest_digest: String::new(),
        signature_digest: String::new(),
        location: String::new(),
        audit_seq: seq,
    })
}

/// Builds and signs the artifact from the prepared inputs, all of which come
/// from the coordinator's own log and store.
fn build_artifact(
    shared: &Shared,
    req: &ReleaseRequest,
    policy: &Policy,
    rules: &[RuleResult],
    inputs: &Prepared,
) -> Result<artifact::Artifact> {
    artifact::build(artifact::Inputs {
        tag: &inputs.tag,
        facts: &inputs.facts,
        plan: &inputs.plan,
        params: &inputs.params,
        roster: &shared.roster,
        policy,
        policy_sha256: &audit::text_digest(&req.policy_toml),
        rules,
        audit_entries: inputs.audit_entries,
        audit_head: &inputs.audit_head,
        signer: &inputs.signer,
    })
}

/// Stores the assembled artifact in the coordinator's OCI layout folder or
/// pushes it to the requested registry; returns where it now is.
async fn store(shared: &Shared, assembled: &oci::Assembled, inputs: &Prepared) -> Result<String> {
    let tag = &inputs.tag;
    match &inputs.registry {
        None => {
            let dir = shared.config.output_dir.join(LAYOUT_DIR);
            oci::write_layout(&dir, assembled).map(|_| format!("{}:{tag}", dir.display()))
        }
        Some(r) => oci::push(r, assembled).await.map(|_| r.location(tag)),
    }
}

struct Prepared {
    plan: TrainingPlan,
    params: Vec<f32>,
    facts: Facts,
    audit_entries: u64,
    audit_head: String,
    signer: Signer,
    tag: String,
    registry: Option<oci::Registry>,
}

/// Checks the request and evaluates every rule. Integrity checks (the audit log
/// verifies; the stored model is the one the log names) are rules too, so a
/// refusal says exactly what is wrong.
fn prepare(shared: &Shared, req: &ReleaseRequest) -> Result<(Policy, Vec<RuleResult>, Prepared)> {
    let policy = Policy::from_toml(&req.policy_toml, "submitted with the release")?;
    let (tag, registry) = release_target(req)?;
    let rec = shared.store.training(&req.training_id)?.ok_or_else(|| {
        CoordinatorError::NotFound(format!(
            "no training '{}' at this coordinator",
            req.training_id
        ))
    })?;
    let plan = TrainingPlan::from_toml(&rec.plan_toml, &format!("stored plan of {}", rec.id))?;
    let signer = Signer::from_pem_file(&shared.config.tls.key)?;
    let verifier = signer.verifier();

    let mut rules = Vec::new();
    let (audit_rule, entries, hashes) = audit_log_rule(shared, &verifier)?;
    rules.push(audit_rule);
    let rounds = rounds_from_audit(&entries, &rec.id);
    let finished_entry = entries
        .iter()
        .rev()
        .find(|e| e.kind == "training_finished" && e.data["training"] == json!(rec.id));
    let params = shared.store.model(&rec.id)?.unwrap_or_default();
    rules.push(model_matches_audit_rule(
        &plan,
        &params,
        &rounds,
        finished_entry,
    ));
    let facts = Facts {
        training: rec.id.clone(),
        finished: rec.finished && rec.error.is_none() && finished_entry.is_some(),
        planned_rounds: plan.training.rounds,
        epsilon: dp_epsilon(&plan, &rounds),
        privacy: dp_facts(&plan),
        rounds,
    };
    rules.extend(policy::evaluate(&policy, &facts, &shared.roster));
    Ok((
        policy,
        rules,
        Prepared {
            plan,
            params,
            facts,
            audit_entries: hashes.len() as u64,
            audit_head: hashes
                .last()
                .cloned()
                .unwrap_or_else(|| audit::GENESIS.to_string()),
            signer,
            tag,
            registry,
        },
    ))
}

/// The tag (the training id when none is given) and the registry to release
/// to, checked before anything is read, so a typo costs nothing.
fn release_target(req: &ReleaseRequest) -> Result<(String, Option<oci::Registry>)> {
    let tag = if req.tag.is_empty() {
        req.training_id.clone()
    } else {
        req.tag.clone()
    };
    check_tag(&tag)?;
    let registry = req
        .registry
        .as_deref()
        .map(|r| oci::Registry::parse(r, req.plain_http))
        .transpose()?;
    Ok((tag, registry))
}

/// The `audit_log_intact` rule, with the log's entries and entry hashes; a log
/// that does not verify yields no entries, so no other rule can pass on it.
fn audit_log_rule(
    shared: &Shared,
    verifier: &Verifier,
) -> Result<(RuleResult, Vec<Entry>, Vec<String>)> {
    Ok(
        match audit::verified_hashes(shared.audit.path(), verifier) {
            Ok(h) => (
                policy_rule(
                    "audit_log_intact",
                    "the audit log's chain and signatures verify",
                    format!("{} entries verify", h.len()),
                    true,
                ),
                audit::read_unverified(shared.audit.path())?,
                h,
            ),
            Err(e) => (
                policy_rule(
                    "audit_log_intact",
                    "the audit log's chain and signatures verify",
                    e.to_string(),
                    false,
                ),
                vec![],
                vec![],
            ),
        },
    )
}

/// The `model_matches_audit` rule: the stored model has the plan's shape and is
/// the global model of both the last logged round and the finished entry.
fn model_matches_audit_rule(
    plan: &TrainingPlan,
    params: &[f32],
    rounds: &[RoundFact],
    finished_entry: Option<&Entry>,
) -> RuleResult {
    let stored_digest = weights::digest(params);
    let logged = rounds.last().map(|r| r.global_model_sha256.clone());
    let matches = !params.is_empty()
        && params.len() == ModelSpec::from_plan(plan).num_params()
        && logged.as_deref() == Some(stored_digest.as_str())
        && finished_entry.is_some_and(|e| e.data["global_model_sha256"] == json!(stored_digest));
    policy_rule(
        "model_matches_audit",
        "the model to release is the last global model the audit log records",
        if matches {
            format!("sha256 {}…", &stored_digest[..16])
        } else {
            format!(
                "stored model {}…, audit log's last round model {}",
                &stored_digest[..16],
                logged.map_or("none".into(), |l| format!("{}…", &l[..l.len().min(16)]))
            )
        },
        matches,
    )
}

fn policy_rule(rule: &str, requirement: &str, actual: String, passed: bool) -> RuleResult {
    RuleResult {
        rule: rule.into(),
        requirement: requirement.into(),
        actual,
        passed,
    }
}

/// What [`verify`] checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub training: String,
    pub rounds: usize,
    pub final_params_sha256: String,
    /// Whether the audit log was checked too.
    pub audit_checked: bool,
}

fn bad(msg: impl Into<String>) -> CoordinatorError {
    CoordinatorError::FailedPrecondition(format!("verification failed: {}", msg.into()))
}

/// Checks a pulled artifact folder: the DSSE signature by the coordinator's key,
/// the provenance's subject against the weights file, the final parameters
/// against the provenance; with `audit`, the signed audit log against the
/// provenance round by round, and that the log records this release.
pub fn verify(dir: &Path, coordinator: &Verifier, audit_log: Option<&Path>) -> Result<Verified> {
    let st = signed_statement(dir, coordinator)?;
    let weights_bytes = read_artifact_file(dir, WEIGHTS_FILE)?;
    let wsha = weights::sha256_hex(&weights_bytes);
    if st.subject.first().and_then(|s| s.digest.get("sha256")) != Some(&wsha) {
        return Err(bad(format!(
            "{WEIGHTS_FILE} (sha256 {wsha}) is not the file the provenance names"
        )));
    }
    let p = &st.predicate;
    let final_sha = final_params_digest(p, &weights_bytes)?;
    let mut audit_checked = false;
    if let Some(path) = audit_log {
        check_against_audit_log(path, coordinator, p, &wsha)?;
        audit_checked = true;
    }
    Ok(Verified {
        training: p.training.clone(),
        rounds: p.rounds.len(),
        final_params_sha256: final_sha,
        audit_checked,
    })
}

/// One file of a pulled artifact folder.
fn read_artifact_file(dir: &Path, name: &str) -> Result<Vec<u8>> {
    std::fs::read(dir.join(name))
        .map_err(|e| CoordinatorError::io(format!("reading {}", dir.join(name).display()), e))
}

/// The provenance statement, accepted only as the exact document the
/// coordinator's DSSE signature covers.
fn signed_statement(dir: &Path, coordinator: &Verifier) -> Result<Statement> {
    let envelope: Envelope = serde_json::from_slice(&read_artifact_file(dir, SIGNATURE_FILE)?)
        .map_err(|e| bad(format!("{SIGNATURE_FILE} is not a DSSE envelope: {e}")))?;
    if envelope.payload_type != artifact::INTOTO_PAYLOAD_TYPE {
        return Err(bad(format!(
            "the envelope carries '{}', not an in-toto statement",
            envelope.payload_type
        )));
    }
    let payload = envelope
        .verify(coordinator)
        .map_err(|e| bad(format!("{SIGNATURE_FILE}: {e}")))?;
    if payload != read_artifact_file(dir, PROVENANCE_FILE)? {
        return Err(bad(format!(
            "{PROVENANCE_FILE} is not the document the signature covers"
        )));
    }
    serde_json::from_slice(&payload).map_err(|e| bad(format!("provenance: {e}")))
}

/// The digest of the released parameters, read with the provenance plan's
/// layout; they must be the final model and the last round's global model.
fn final_params_digest(p: &Provenance, weights_bytes: &[u8]) -> Result<String> {
    let plan =
        TrainingPlan::from_toml(&p.plan_toml, "provenance plan").map_err(|e| bad(e.to_string()))?;
    let params = weights::parse_safetensors(
        weights_bytes,
        &ModelSpec::from_plan(&plan).layout(),
        WEIGHTS_FILE,
    )
    .map_err(|e| bad(e.to_string()))?;
    let final_sha = weights::digest(&params);
    if final_sha != p.final_params_sha256
        || p.rounds.last().map(|r| r.global_model_sha256.as_str()) != Some(final_sha.as_str())
    {
        return Err(bad(
            "the weights are not the last round's global model in the provenance",
        ));
    }
    Ok(final_sha)
}

/// Checks the signed audit log against the provenance: it holds the entries the
/// release was evaluated on, the same rounds, and a record of this release.
fn check_against_audit_log(
    path: &Path,
    coordinator: &Verifier,
    p: &Provenance,
    wsha: &str,
) -> Result<()> {
    let hashes =
        audit::verified_hashes(path, coordinator).map_err(|e| bad(format!("audit log: {e}")))?;
    let entries = audit::read_unverified(path)?;
    let idx = p.audit_entries as usize;
    if idx == 0 || hashes.get(idx - 1) != Some(&p.audit_head) {
        return Err(bad(
            "the audit log does not contain the entries the release was evaluated on",
        ));
    }
    let logged = rounds_from_audit(&entries[..idx], &p.training);
    check_rounds_match(&logged, &p.rounds)?;
    let recorded = entries[idx..].iter().any(|e| {
        e.kind == "release_attempted"
            && e.data["outcome"] == json!("released")
            && e.data["weights_sha256"] == json!(wsha)
    });
    if !recorded {
        return Err(bad("the audit log does not record this release"));
    }
    Ok(())
}

/// Round by round, the provenance names the same updates (by digest and weight,
/// in any order) and the same global model as the audit log.
fn check_rounds_match(logged: &[RoundFact], rounds: &[ProvenanceRound]) -> Result<()> {
    if logged.len() != rounds.len() {
        return Err(bad(format!(
            "the audit log has {} rounds, the provenance {}",
            logged.len(),
            rounds.len()
        )));
    }
    for (l, r) in logged.iter().zip(rounds) {
        let mut a: Vec<(String, u64)> = l
            .contributions
            .iter()
            .map(|c| (c.sha256.clone(), c.weight))
            .collect();
        let mut b: Vec<(String, u64)> = r
            .updates
            .iter()
            .map(|u| (u.sha256.clone(), u.weight))
            .collect();
        a.sort();
        b.sort();
        if l.round != r.round || l.global_model_sha256 != r.global_model_sha256 || a != b {
            return Err(bad(format!(
                "round {}: the provenance differs from the audit log",
                r.round
            )));
        }
    }
    Ok(())
}
