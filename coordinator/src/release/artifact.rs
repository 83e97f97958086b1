//! The release artifact: weights (safetensors), model card (Markdown with YAML
//! front matter), provenance (an in-toto Statement) and its signature (a DSSE
//! envelope made with the coordinator's key).
//!
//! Only the model, its card and its provenance leave the anchor company; the
//! provenance names each update by digest and weight, never its values, and
//! names contributors only as far as the policy's disclosure rule allows.

use std::collections::HashMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::roster::Roster;
use sangsaeng_common::identity::signing::{Envelope, Signer};
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::transfer::weights;

use super::policy::{ContributorDisclosure, Facts, Policy, RuleResult};
use crate::error::Result;
use sangsaeng_common::config::privacy::DpLevel;

/// in-toto Statement v1 type and our predicate type.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://sangsaeng.dev/provenance/federated-training/v1";
/// DSSE payload type of an in-toto statement.
pub const INTOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// File names inside the artifact (also the ModelPack `filepath` annotations).
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CARD_FILE: &str = "MODEL_CARD.md";
pub const PROVENANCE_FILE: &str = "provenance.intoto.json";
pub const SIGNATURE_FILE: &str = "provenance.dsse.json";

/// Everything released, as bytes.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub tag: String,
    pub weights: Vec<u8>,
    pub card: Vec<u8>,
    pub statement: Vec<u8>,
    pub envelope: Vec<u8>,
    /// ModelPack model config (JSON).
    pub config: Vec<u8>,
}

/// One update in the provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvenanceUpdate {
    pub sha256: String,
    pub weight: u64,
    /// Present only under the `name` or `tier` disclosure rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contributor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvenanceRound {
    pub round: u32,
    pub updates: Vec<ProvenanceUpdate>,
    /// SHA-256 of the round's global model (little-endian f32 of the flat parameters).
    pub global_model_sha256: String,
}

/// The predicate of the in-toto statement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub training: String,
    /// The plan (TOML, with the federated scaling): model shape and input schema.
    pub plan_toml: String,
    pub plan_sha256: String,
    /// The initial model is `ModelSpec::init_params(seed)` of the plan.
    pub initial_model_sha256: String,
    pub rounds: Vec<ProvenanceRound>,
    /// SHA-256 of the released flat parameters; equals the last round's global model.
    pub final_params_sha256: String,
    pub contributors: usize,
    pub disclosure: ContributorDisclosure,
    pub policy_sha256: String,
    pub rules: Vec<RuleResult>,
    pub licence: String,
    pub usage_terms: String,
    /// The audit log entry count and head hash the release was evaluated on.
    pub audit_entries: u64,
    pub audit_head: String,
    pub released_at: String,
    /// The differential privacy the model was trained with (absent without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differential_privacy: Option<ProvenancePrivacy>,
    /// Every round was securely aggregated (the audit log's round entries say
    /// so): the coordinator only ever opened sums, never one firm's update.
    #[serde(default)]
    pub secure_aggregation: bool,
}

/// Mechanism, budget and settings of a differentially private training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvenancePrivacy {
    pub mechanism: String,
    pub level: String,
    pub epsilon: f64,
    pub delta: f64,
    pub clip: f64,
    /// The plan's noise multiplier; absent when each site derived its own from
    /// its rows (the audit log's round entries record each site's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subject {
    pub name: String,
    pub digest: HashMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub type_: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: Provenance,
}

/// Inputs of [`build`].
pub struct Inputs<'a> {
    pub tag: &'a str,
    pub facts: &'a Facts,
    pub plan: &'a TrainingPlan,
    pub params: &'a [f32],
    pub roster: &'a Roster,
    pub policy: &'a Policy,
    pub policy_sha256: &'a str,
    pub rules: &'a [RuleResult],
    pub audit_entries: u64,
    pub audit_head: &'a str,
    pub signer: &'a Signer,
}

fn disclosed(roster: &Roster, org: &str, how: ContributorDisclosure) -> Option<String> {
    match how {
        ContributorDisclosure::Name => Some(
            roster
                .get(org)
                .map_or_else(|| org.to_string(), |o| format!("{} ({})", o.name, o.id)),
        ),
        ContributorDisclosure::Tier => Some(
            roster
                .get(org)
                .map_or_else(|| "unknown".into(), |o| o.tier.clone()),
        ),
        ContributorDisclosure::Count => None,
    }
}

/// The rule results as published: organisation ids in a rule's value (the
/// largest weight share names its holder for the administrator) are replaced
/// as the disclosure rule says, so a released document never names a firm the
/// policy keeps anonymous.
fn public_rules(i: &Inputs<'_>, how: ContributorDisclosure) -> Vec<RuleResult> {
    let mut orgs: Vec<String> = i.roster.iter().map(|o| o.id.clone()).collect();
    // Longest first, so an id that contains another is replaced whole.
    orgs.sort_by_key(|o| std::cmp::Reverse(o.len()));
    i.rules
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if how != ContributorDisclosure::Name {
                for org in &orgs {
                    let label =
                        disclosed(i.roster, org, how).unwrap_or_else(|| "one organisation".into());
                    r.actual = r.actual.replace(org.as_str(), &label);
                }
            }
            r
        })
        .collect()
}

/// Builds the artifact; signs the provenance.
pub fn build(i: Inputs<'_>) -> Result<Artifact> {
    let spec = ModelSpec::from_plan(i.plan);
    let layout = spec.layout();
    let how = i.policy.disclosure.contributors;
    let released_at = crate::durable::audit::now_utc();
    let weights_bytes = weights::safetensors_bytes(
        &layout,
        i.params,
        HashMap::from([
            ("format".to_string(), "sangsaeng-mlp-v1".to_string()),
            ("training".to_string(), i.facts.training.clone()),
            ("rounds".to_string(), i.facts.rounds.len().to_string()),
            ("licence".to_string(), i.policy.licence.id.clone()),
        ]),
    )?;
    let provenance = provenance(&i, &spec, how, &released_at);
    let statement = Statement {
        type_: STATEMENT_TYPE.into(),
        subject: vec![Subject {
            name: WEIGHTS_FILE.into(),
            digest: HashMap::from([("sha256".to_string(), weights::sha256_hex(&weights_bytes))]),
        }],
        predicate_type: PREDICATE_TYPE.into(),
        predicate: provenance,
    };
    let statement_bytes = serde_json::to_vec_pretty(&statement).expect("a statement serialises");
    let envelope = Envelope::sign(i.signer, INTOTO_PAYLOAD_TYPE, &statement_bytes)?;
    let card = model_card(&i, &statement, &released_at);
    let config = modelpack_config(&i, &weights_bytes, &released_at);
    Ok(Artifact {
        tag: i.tag.to_string(),
        weights: weights_bytes,
        card: card.into_bytes(),
        statement: statement_bytes,
        envelope: serde_json::to_vec_pretty(&envelope).expect("an envelope serialises"),
        config,
    })
}

/// The provenance predicate: what a verifier replays against the audit log,
/// with contributors named only as far as the disclosure rule allows.
fn provenance(
    i: &Inputs<'_>,
    spec: &ModelSpec,
    how: ContributorDisclosure,
    released_at: &str,
) -> Provenance {
    Provenance {
        training: i.facts.training.clone(),
        plan_toml: i.plan.to_toml(),
        plan_sha256: crate::durable::audit::text_digest(&i.plan.to_toml()),
        initial_model_sha256: weights::digest(&spec.init_params(i.plan.training.seed)),
        rounds: provenance_rounds(i, how),
        final_params_sha256: weights::digest(i.params),
        contributors: i.facts.contributors().len(),
        disclosure: how,
        policy_sha256: i.policy_sha256.to_string(),
        rules: public_rules(i, how),
        licence: i.policy.licence.id.clone(),
        usage_terms: i.policy.licence.terms.clone(),
        audit_entries: i.audit_entries,
        audit_head: i.audit_head.to_string(),
        released_at: released_at.to_string(),
        differential_privacy: provenance_privacy(i),
        secure_aggregation: !i.facts.rounds.is_empty()
            && i.facts.rounds.iter().all(|r| r.secure_aggregation),
    }
}

fn provenance_privacy(i: &Inputs<'_>) -> Option<ProvenancePrivacy> {
    let (p, epsilon) = (i.facts.privacy.as_ref()?, i.facts.epsilon?);
    Some(ProvenancePrivacy {
        mechanism: match p.level {
            DpLevel::Record => {
                "DP-SGD: per-example clipping, Gaussian noise, Poisson sampling; RDP accountant"
            }
            DpLevel::Client => {
                "DP-FedAvg: per-update clipping, Gaussian noise on the sum; RDP accountant"
            }
        }
        .into(),
        level: p.level.name().into(),
        epsilon,
        delta: p.delta,
        clip: p.clip,
        noise_multiplier: p.noise_multiplier,
    })
}

/// Each round's update digests and weights, so the chain of global models can
/// be recomputed without any update's values.
fn provenance_rounds(i: &Inputs<'_>, how: ContributorDisclosure) -> Vec<ProvenanceRound> {
    i.facts
        .rounds
        .iter()
        .map(|r| ProvenanceRound {
            round: r.round,
            updates: r
                .contributions
                .iter()
                .map(|c| ProvenanceUpdate {
                    sha256: c.sha256.clone(),
                    weight: c.weight,
                    contributor: disclosed(i.roster, &c.org, how),
                })
                .collect(),
            global_model_sha256: r.global_model_sha256.clone(),
        })
        .collect()
}

/// The ModelPack model config (JSON) that OCI registries and model tooling read.
fn modelpack_config(i: &Inputs<'_>, weights_bytes: &[u8], released_at: &str) -> Vec<u8> {
    serde_json::to_vec_pretty(&serde_json::json!({
        "descriptor": {
            "name": format!("sangsaeng/{}", i.facts.training),
            "version": i.tag,
            "createdAt": released_at,
            "authors": ["Sangsaeng federation (anchor coordinator)"],
            "licenses": [i.policy.licence.id],
        },
        "config": {
            "format": "safetensors",
            "paramSize": i.params.len().to_string(),
            "architecture": "mlp",
        },
        "modelfs": {
            "type": "layers",
            "diffIds": [format!("sha256:{}", weights::sha256_hex(weights_bytes))],
        },
    }))
    .expect("a config serialises")
}

/// A YAML scalar: JSON strings are valid YAML double-quoted scalars.
fn y(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// The model card: YAML front matter for tools, then Markdown for people.
fn model_card(i: &Inputs<'_>, st: &Statement, released_at: &str) -> String {
    let p = &st.predicate;
    let mut s = String::from("---\n");
    card_front_identity(&mut s, i, st, released_at);
    card_front_schema(&mut s, i.plan);
    card_front_contributors(&mut s, i, p);
    card_front_metrics_and_rules(&mut s, i, p);
    card_front_privacy(&mut s, p);
    let _ = writeln!(s, "provenance: {}", y(PROVENANCE_FILE));
    let _ = writeln!(s, "---\n");
    let _ = writeln!(s, "# Model card: sangsaeng/{} ({})\n", p.training, i.tag);
    card_intended_use(&mut s, i.plan, p);
    card_input_schema(&mut s, i.plan);
    card_metrics_table(&mut s, i);
    card_contributors(&mut s, p);
    card_rules_table(&mut s, p);
    card_privacy(&mut s, p);
    card_plan_and_provenance(&mut s, i.plan);
    s
}

/// The card's front-matter line on differential privacy.
fn card_front_privacy(s: &mut String, p: &Provenance) {
    match &p.differential_privacy {
        Some(d) => {
            let _ = writeln!(
                s,
                "differential_privacy: {{level: {}, epsilon: {:.6}, delta: {:e}, clip: {}}}",
                y(&d.level),
                d.epsilon,
                d.delta,
                d.clip
            );
        }
        None => {
            let _ = writeln!(s, "differential_privacy: null");
        }
    }
    let _ = writeln!(s, "secure_aggregation: {}", p.secure_aggregation);
}

/// The card's privacy section, in words.
fn card_privacy(s: &mut String, p: &Provenance) {
    let _ = writeln!(
        s,
        "## Privacy
"
    );
    match &p.differential_privacy {
        Some(d) => {
            let noise = d.noise_multiplier.map_or(
                "derived by each site from its rows to meet the target".into(),
                |n| n.to_string(),
            );
            let _ = writeln!(
                s,
                "Trained with differential privacy at {} level: {}. (ε, δ) = ({:.3}, {:e}); clip {}, noise multiplier {noise}. ε is the largest any contributing site spent, accounted by the coordinator from the plan and each site's rows.\n",
                d.level, d.mechanism, d.epsilon, d.delta, d.clip
            );
        }
        None => {
            let _ = writeln!(
                s,
                "Trained without differential privacy: only weight deltas left the sites, and the released model may still reveal information about their rows.\n"
            );
        }
    }
    let how = match p.secure_aggregation {
        true => {
            "Every round was securely aggregated (SecAgg+ masks in the exact fixed-point ring): the coordinator opened only each round's sum, never one contributor's update."
        }
        false => {
            "Rounds were not securely aggregated: the coordinator received each contributor's update."
        }
    };
    let _ = writeln!(s, "{how}\n");
}

/// Front matter: what the model is, its licence, and which weights it means.
fn card_front_identity(s: &mut String, i: &Inputs<'_>, st: &Statement, released_at: &str) {
    let p = &st.predicate;
    let _ = writeln!(s, "model_name: {}", y(&format!("sangsaeng/{}", p.training)));
    let _ = writeln!(s, "version: {}", y(i.tag));
    let _ = writeln!(s, "released_at: {}", y(released_at));
    let _ = writeln!(s, "license: {}", y(&p.licence));
    let _ = writeln!(s, "usage_terms: {}", y(&p.usage_terms));
    let _ = writeln!(
        s,
        "framework: \"sangsaeng (burn MLP, federated averaging)\""
    );
    let _ = writeln!(s, "weights: {}", y(WEIGHTS_FILE));
    let _ = writeln!(s, "weights_sha256: {}", y(&st.subject[0].digest["sha256"]));
    let _ = writeln!(s, "final_params_sha256: {}", y(&p.final_params_sha256));
}

/// Front matter: the input a user must feed the model, in column order.
fn card_front_schema(s: &mut String, plan: &TrainingPlan) {
    let _ = writeln!(s, "input_schema:");
    let _ = writeln!(
        s,
        "  features: [{}]",
        plan.schema
            .feature_columns
            .iter()
            .map(|c| y(c))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if plan.regression() {
        let _ = writeln!(s, "  task: regression");
        let _ = writeln!(s, "  target: {}", y(plan.schema.target()));
    } else {
        let _ = writeln!(s, "  label: {}", y(&plan.schema.label_column));
    }
    let _ = writeln!(
        s,
        "  classes: [{}]",
        plan.schema
            .classes
            .iter()
            .map(|c| y(c))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if plan.scaling.is_some() {
        let _ = writeln!(
            s,
            "  standardisation: \"x' = (x - mean) / std, federated statistics (see plan)\""
        );
    }
}

/// Front matter: the contributors, listed only as far as the disclosure rule
/// allows (tiers deduplicated, so a tier's size is not given away).
fn card_front_contributors(s: &mut String, i: &Inputs<'_>, p: &Provenance) {
    let _ = writeln!(s, "contributors:");
    let _ = writeln!(
        s,
        "  disclosure: {}",
        y(&format!("{:?}", p.disclosure).to_lowercase())
    );
    let _ = writeln!(s, "  count: {}", p.contributors);
    if p.disclosure != ContributorDisclosure::Count {
        let mut listed: Vec<String> = i
            .facts
            .contributors()
            .iter()
            .filter_map(|o| disclosed(i.roster, o, p.disclosure))
            .collect();
        listed.sort();
        if p.disclosure == ContributorDisclosure::Tier {
            listed.dedup();
        }
        let _ = writeln!(
            s,
            "  listed: [{}]",
            listed.iter().map(|c| y(c)).collect::<Vec<_>>().join(", ")
        );
    }
}

/// Front matter: the per-round validation metrics and the release rules'
/// results, machine-readable.
fn card_front_metrics_and_rules(s: &mut String, i: &Inputs<'_>, p: &Provenance) {
    let _ = writeln!(s, "metrics:");
    let v = |x: Option<f64>| x.map_or("null".into(), |v| format!("{v:.6}"));
    for r in &i.facts.rounds {
        let _ = if r.regression() {
            writeln!(
                s,
                "  - {{round: {}, mae: {}, rmse: {}, r2: {}}}",
                r.round,
                v(r.eval_mae),
                v(r.eval_rmse),
                v(r.eval_r2)
            )
        } else {
            writeln!(
                s,
                "  - {{round: {}, macro_f1: {}, accuracy: {}}}",
                r.round,
                v(r.eval_macro_f1),
                v(r.eval_accuracy)
            )
        };
    }
    let _ = writeln!(s, "release_rules:");
    for r in &p.rules {
        let _ = writeln!(
            s,
            "  - {{rule: {}, passed: {}, requirement: {}, actual: {}}}",
            y(&r.rule),
            r.passed,
            y(&r.requirement),
            y(&r.actual)
        );
    }
}

/// "Intended use": what the model is for and, as much, what it is not for.
fn card_intended_use(s: &mut String, plan: &TrainingPlan, p: &Provenance) {
    let _ = writeln!(s, "## Intended use\n");
    let _ = if plan.regression() {
        writeln!(
            s,
            "Predicts `{}` (a soft sensor: a reading such as a product analyser's) from {} process readings \
             of one time step. Trained by federated learning across a supply chain: the line data never left \
             the sites that own it; only weight deltas did. Use it to watch quality between laboratory or \
             analyser samples on lines with the same sensor set and units; it is not a safety system.\n",
            plan.schema.target(),
            plan.schema.feature_columns.len()
        )
    } else {
        writeln!(
            s,
            "Classifies the process state of a production line into {} classes ({}) from {} sensor readings \
         of one time step. Trained by federated learning across a supply chain: the line data never left \
         the sites that own it; only weight deltas did. Use it for defect and fault screening on lines \
         with the same sensor set and units; it is not a safety system and must not replace interlocks.\n",
            plan.schema.classes.len(),
            plan.schema.classes.join(", "),
            plan.schema.feature_columns.len()
        )
    };
    let _ = writeln!(
        s,
        "Licence: **{}**. Usage terms: {}\n",
        p.licence, p.usage_terms
    );
}

/// "Input schema": the columns in order, for people.
fn card_input_schema(s: &mut String, plan: &TrainingPlan) {
    let _ = writeln!(s, "## Input schema\n");
    let _ = writeln!(
        s,
        "Columns, in this order: {}. {} column: `{}`.\n",
        plan.schema.feature_columns.join(", "),
        if plan.regression() { "Target" } else { "Label" },
        plan.schema.target()
    );
}

/// "Metrics per round": a Markdown table of the federated validation.
fn card_metrics_table(s: &mut String, i: &Inputs<'_>) {
    let _ = writeln!(
        s,
        "## Metrics per round (federated validation at the participants)\n"
    );
    let regression = i.facts.rounds.iter().any(|r| r.regression());
    let _ = if regression {
        writeln!(
            s,
            "| round | MAE | RMSE | R² | updates |\n|---:|---:|---:|---:|---:|"
        )
    } else {
        writeln!(
            s,
            "| round | macro-F1 | accuracy | updates |\n|---:|---:|---:|---:|"
        )
    };
    let v = |x: Option<f64>| x.map_or("n/a".into(), |v| format!("{v:.4}"));
    for r in &i.facts.rounds {
        let _ = if regression {
            writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                r.round,
                v(r.eval_mae),
                v(r.eval_rmse),
                v(r.eval_r2),
                r.contributions.len()
            )
        } else {
            writeln!(
                s,
                "| {} | {} | {} | {} |",
                r.round,
                v(r.eval_macro_f1),
                v(r.eval_accuracy),
                r.contributions.len()
            )
        };
    }
}

/// "Contributors": how many, and under which disclosure rule.
fn card_contributors(s: &mut String, p: &Provenance) {
    let _ = writeln!(s, "\n## Contributors\n");
    let _ = writeln!(
        s,
        "{} organisations contributed (disclosure rule: {:?}).\n",
        p.contributors, p.disclosure
    );
}

/// "Release rules": a Markdown table of each opening rule and its result.
fn card_rules_table(s: &mut String, p: &Provenance) {
    let _ = writeln!(s, "## Release rules\n");
    let _ = writeln!(
        s,
        "| rule | requirement | actual | result |\n|---|---|---|---|"
    );
    for r in &p.rules {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            r.rule,
            r.requirement,
            r.actual,
            if r.passed { "pass" } else { "FAIL" }
        );
    }
}

/// "Training plan" and "Provenance": the plan verbatim, and how to check the
/// release against the coordinator's audit log.
fn card_plan_and_provenance(s: &mut String, plan: &TrainingPlan) {
    let _ = writeln!(s, "\n## Training plan\n\n```toml\n{}```\n", plan.to_toml());
    let _ = writeln!(
        s,
        "## Provenance\n\n`{PROVENANCE_FILE}` lists every round's update digests and weights and the digest of \
         each round's global model; `{SIGNATURE_FILE}` is its DSSE signature by the coordinator. With the \
         coordinator's audit log, `sangsaeng-coordinator release verify` checks both against the weights."
    );
}
