//! An admin client for a running coordinator, over mutual TLS with an admin
//! certificate. Used by `sangsaeng-coordinator admin ...` and by tests.

use sangsaeng_common::identity::tls::TlsMaterial;
use sangsaeng_proto::v1 as pb;
use sangsaeng_proto::v1::admin_client::AdminClient as Raw;
use tonic::transport::Channel;

use crate::error::{CoordinatorError, Result};

pub struct AdminClient {
    inner: Raw<Channel>,
}

fn status_error(s: tonic::Status) -> CoordinatorError {
    let m = format!("{:?}: {}", s.code(), s.message());
    match s.code() {
        tonic::Code::PermissionDenied => CoordinatorError::PermissionDenied(m),
        tonic::Code::Unauthenticated => CoordinatorError::Unauthenticated(m),
        tonic::Code::InvalidArgument => CoordinatorError::InvalidArgument(m),
        tonic::Code::FailedPrecondition => CoordinatorError::FailedPrecondition(m),
        tonic::Code::NotFound => CoordinatorError::NotFound(m),
        tonic::Code::Unavailable => CoordinatorError::Registry(m),
        _ => CoordinatorError::Aborted(m),
    }
}

impl AdminClient {
    pub async fn connect(url: &str, tls: &TlsMaterial, server_name: &str) -> Result<Self> {
        let ch = sangsaeng_common::identity::channel::connect(url, tls, server_name).await?;
        Ok(AdminClient {
            inner: Raw::new(ch),
        })
    }

    pub async fn status(&mut self) -> Result<pb::StatusResponse> {
        self.inner
            .status(pb::StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(status_error)
    }

    pub async fn start_training(&mut self, plan_toml: String) -> Result<String> {
        self.inner
            .start_training(pb::StartTrainingRequest { plan_toml })
            .await
            .map(|r| r.into_inner().training_id)
            .map_err(status_error)
    }
}

impl AdminClient {
    /// Asks the coordinator to release a training's model (see [`crate::release`]).
    pub async fn release(&mut self, req: pb::ReleaseRequest) -> Result<pb::ReleaseResponse> {
        self.inner
            .release(req)
            .await
            .map(|r| r.into_inner())
            .map_err(status_error)
    }
}

/// Renders the rule evaluation and outcome of a release for the administrator.
pub fn render_release(r: &pb::ReleaseResponse) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let w_rule = r
        .rules
        .iter()
        .map(|x| x.rule.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let w_req = r
        .rules
        .iter()
        .map(|x| x.requirement.chars().count())
        .max()
        .unwrap_or(11)
        .max(11);
    let _ = writeln!(
        out,
        "{:<w_rule$}  {:<6}  {:<w_req$}  actual",
        "rule", "result", "requirement"
    );
    for rule in &r.rules {
        let _ = writeln!(
            out,
            "{:<w_rule$}  {:<6}  {:<w_req$}  {}",
            rule.rule,
            if rule.passed { "pass" } else { "FAIL" },
            rule.requirement,
            rule.actual
        );
    }
    if r.released {
        let _ = writeln!(out, "\nreleased to {}", r.location);
        let _ = writeln!(out, "  model manifest     {}", r.manifest_digest);
        let _ = writeln!(out, "  signature manifest {}", r.signature_digest);
    } else {
        let failed: Vec<&str> = r
            .rules
            .iter()
            .filter(|x| !x.passed)
            .map(|x| x.rule.as_str())
            .collect();
        let _ = writeln!(
            out,
            "\nrelease REFUSED: rule(s) failed: {}",
            failed.join(", ")
        );
    }
    let _ = writeln!(out, "audit log entry {}", r.audit_seq);
    out
}

/// Renders a status report as a table for operators.
pub fn render_status(s: &pb::StatusResponse) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<28} {:<8} {:<12} {:<10} {:<22} last error",
        "organisation", "name", "tier", "role", "connected", "last seen"
    );
    for p in &s.participants {
        let _ = writeln!(
            out,
            "{:<20} {:<28} {:<8} {:<12} {:<10} {:<22} {}",
            p.org_id,
            p.display_name,
            p.tier,
            p.role,
            if p.connected { "yes" } else { "no" },
            if p.last_seen.is_empty() {
                "never"
            } else {
                &p.last_seen
            },
            p.last_error
        );
    }
    match &s.training {
        None => out.push_str("\nno training has been started\n"),
        Some(t) => {
            let _ = writeln!(
                out,
                "\ntraining {}: phase {}, round {}/{}",
                t.training_id, t.phase, t.round, t.total_rounds
            );
            let _ = writeln!(out, "  contributed this round: {}", list(&t.contributed));
            let _ = writeln!(out, "  waiting for:            {}", list(&t.waiting_for));
            let _ = writeln!(out, "  outputs:                {}", t.output_dir);
            if !t.error.is_empty() {
                let _ = writeln!(out, "  error:                  {}", t.error);
            }
        }
    }
    out
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}
