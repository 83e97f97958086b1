//! The `Admin` service: status, starting trainings and releasing models, for
//! organisations whose roster role is `admin`. A participant certificate gets
//! PERMISSION_DENIED; a refused release attempt is written to the audit log too.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::roster::Role;
use sangsaeng_proto::v1 as pb;
use sangsaeng_proto::v1::admin_server::Admin;

use crate::rpc::auth::authorize;
use crate::state::Shared;

pub struct AdminService {
    shared: Arc<Shared>,
}

impl AdminService {
    pub fn new(shared: Arc<Shared>) -> Self {
        AdminService { shared }
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Builds the status report (also used for the coordinator's own log).
pub fn status(shared: &Shared) -> pb::StatusResponse {
    let participants = {
        let parts = shared.participants();
        shared
            .roster
            .iter()
            .map(|o| {
                let p = parts.get(&o.id);
                pb::ParticipantStatus {
                    org_id: o.id.clone(),
                    display_name: o.name.clone(),
                    tier: o.tier.clone(),
                    role: o.role.to_string(),
                    connected: p.is_some_and(|p| p.connected()),
                    last_seen: p.and_then(|p| p.last_seen).map(rfc3339).unwrap_or_default(),
                    last_error: p.and_then(|p| p.last_error.clone()).unwrap_or_default(),
                }
            })
            .collect()
    };
    let training = shared.training().as_ref().map(|t| pb::TrainingStatus {
        training_id: t.id.clone(),
        phase: t.phase.name().to_string(),
        round: t.round,
        total_rounds: t.plan.training.rounds,
        contributed: t.accepted.keys().cloned().collect(),
        waiting_for: if t.phase.is_finished() {
            vec![]
        } else {
            t.selected
                .iter()
                .filter(|o| !t.has_answered(o))
                .cloned()
                .collect()
        },
        output_dir: t.output_dir.display().to_string(),
        error: t.error.clone().unwrap_or_default(),
    });
    pb::StatusResponse {
        participants,
        training,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        authorize(&self.shared, &req, Role::Admin, "Status")?;
        Ok(Response::new(status(&self.shared)))
    }

    async fn start_training(
        &self,
        req: Request<pb::StartTrainingRequest>,
    ) -> Result<Response<pb::StartTrainingResponse>, Status> {
        let admin = authorize(&self.shared, &req, Role::Admin, "StartTraining")?;
        let plan = TrainingPlan::from_toml(&req.get_ref().plan_toml, "submitted plan")
            .map_err(crate::error::CoordinatorError::from)?;
        let training_id = crate::round::start(&self.shared, plan)?;
        tracing::info!(admin, training = %training_id, "training started by admin");
        Ok(Response::new(pb::StartTrainingResponse { training_id }))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let admin = match authorize(&self.shared, &req, Role::Admin, "Release") {
            Ok(a) => a,
            Err(e) => {
                // Who tried matters as much as who succeeded.
                let caller = sangsaeng_common::identity::tls::peer_identity(&req)
                    .unwrap_or_else(|_| "(no valid certificate identity)".into());
                self.shared.audit.record(
                    "release_attempted",
                    serde_json::json!({
                        "by": caller,
                        "training": req.get_ref().training_id,
                        "outcome": "denied",
                        "error": e.to_string(),
                    }),
                );
                return Err(e.into());
            }
        };
        let r = req.into_inner();
        let outcome = crate::release::release(
            &self.shared,
            &admin,
            crate::release::ReleaseRequest {
                training_id: r.training_id,
                policy_toml: r.policy_toml,
                registry: (!r.registry.is_empty()).then_some(r.registry),
                plain_http: r.plain_http,
                tag: r.tag,
            },
        )
        .await?;
        Ok(Response::new(pb::ReleaseResponse {
            released: outcome.released,
            rules: outcome
                .rules
                .into_iter()
                .map(|r| pb::RuleResult {
                    rule: r.rule,
                    requirement: r.requirement,
                    actual: r.actual,
                    passed: r.passed,
                })
                .collect(),
            manifest_digest: outcome.manifest_digest,
            location: outcome.location,
            signature_digest: outcome.signature_digest,
            audit_seq: outcome.audit_seq,
        }))
    }
}
