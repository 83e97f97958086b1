//! Fuzz target: the coordinator's durable records as read back from disk.
//!
//! A damaged or foreign `coordinator-state.redb` hands these bytes to
//! `store::decode` at start-up (resume) and when a round completes. Every input
//! must give a record or a clear `corrupt` error, never a panic or an
//! unbounded allocation; a record that decodes must survive encode + decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sangsaeng_coordinator::store::{self, StoredContribution, StoredModel, TrainingRecord};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            if let Ok(rec) = store::decode::<TrainingRecord>(bytes, "training record") {
                // Compared as bytes: a record may hold a NaN loss, which is not equal to itself.
                let bytes = store::encode(&rec);
                let again = store::decode::<TrainingRecord>(&bytes, "again")
                    .expect("an encoded record decodes");
                assert_eq!(store::encode(&again), bytes);
            }
        }
        1 => {
            // Not folded: its spill path would name an arbitrary file on this machine.
            if let Ok(c) = store::decode::<StoredContribution>(bytes, "contribution") {
                let _ = c.accepted();
                let bytes = store::encode(&c);
                let again = store::decode::<StoredContribution>(&bytes, "again")
                    .expect("an encoded record decodes");
                assert_eq!(store::encode(&again), bytes);
            }
        }
        _ => {
            // Where a round's model file is, and its digest.
            if let Ok(m) = store::decode::<StoredModel>(bytes, "model record") {
                let again = store::decode::<StoredModel>(&store::encode(&m), "again")
                    .expect("an encoded record decodes");
                assert_eq!(again, m);
            }
        }
    }
});
