//! Fuzz target: every protocol message either side decodes from the network.
//!
//! The first byte picks the message type, the rest is decoded with prost as
//! tonic would. Messages that carry data the receiver converts further go
//! through that conversion too: a plan inside a task (the participant's
//! `plan_from_proto`) and a statistics report (the coordinator's
//! `FeatureStats::validate`, then merging and scaling). Nothing may panic,
//! allocate without bound, or loop; errors are fine.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sangsaeng_common::learning::data::FeatureStats;
use sangsaeng_common::transfer::wire;
use sangsaeng_proto::v1 as pb;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 16 {
        0 => {
            if let Ok(task) = pb::Task::decode(bytes) {
                let plan = match task.kind {
                    Some(pb::task::Kind::Stats(t)) => t.plan,
                    Some(pb::task::Kind::Train(t)) => t.plan,
                    _ => None,
                };
                if let Some(p) = plan
                    && let Ok(plan) = wire::plan_from_proto(&p)
                {
                    // A plan that converts must survive the round trip unchanged.
                    let again = wire::plan_from_proto(&wire::plan_to_proto(&plan))
                        .expect("a converted plan converts again");
                    assert_eq!(plan, again);
                }
            }
        }
        1 => {
            if let Ok(r) = pb::StatsReport::decode(bytes) {
                let n = r.sum.len();
                let stats = FeatureStats {
                    count: r.count,
                    sum: r.sum,
                    sum_sq: r.sum_sq,
                };
                if stats.validate(n).is_ok() {
                    let mut total = FeatureStats::empty(n);
                    total.merge(&stats).expect("same width merges");
                    let _ = total.to_scaling();
                }
            }
        }
        2 => drop(pb::UpdateMessage::decode(bytes)),
        3 => drop(pb::ModelChunk::decode(bytes)),
        4 => drop(pb::SubscribeRequest::decode(bytes)),
        5 => drop(pb::DownloadRequest::decode(bytes)),
        6 => drop(pb::UploadProgressRequest::decode(bytes)),
        7 => drop(pb::UploadProgressResponse::decode(bytes)),
        8 => drop(pb::EvaluationReport::decode(bytes)),
        9 => drop(pb::ProblemReport::decode(bytes)),
        10 => drop(pb::LeaveRequest::decode(bytes)),
        11 => drop(pb::UploadReceipt::decode(bytes)),
        12 => drop(pb::StatusResponse::decode(bytes)),
        13 => drop(pb::StartTrainingRequest::decode(bytes)),
        14 => drop(pb::StartTrainingResponse::decode(bytes)),
        _ => drop(pb::Ack::decode(bytes)),
    }
});
