//! Fuzz target: a delta upload as the coordinator receives it.
//!
//! The input is a sequence of length-delimited `UpdateMessage`s, exactly the
//! frames of the `UploadUpdate` client stream. They drive the coordinator's own
//! `DeltaReceiver` (chunk order, size limit, per-chunk and whole digests,
//! length) and, when a delta is complete, the exact FedAvg accumulator's checks.
//! The header's encoding (float32, float16, int8) picks the chunk decoder.
//! Invariants checked besides "no panic": an accepted delta has the declared
//! length and digest, and a refused update leaves the accumulator untouched.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sangsaeng_common::encoding::UpdateEncoding;
use sangsaeng_common::fedavg::Accumulator;
use sangsaeng_coordinator::transfer::DeltaReceiver;
use sangsaeng_proto::v1 as pb;

/// Small on purpose: the fuzzer should reach "complete delta" often.
const NUM_PARAMS: usize = 16;
const MAX_CHUNK_BYTES: usize = 24;

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    let mut receiver: Option<DeltaReceiver> = None;
    let mut weight = 1u64;
    let mut acc = Accumulator::new(NUM_PARAMS);
    acc.add(&[0.25; NUM_PARAMS], 3)
        .expect("a valid first update");
    let before = acc.mean_delta().expect("non-empty");

    while let Ok(msg) = pb::UpdateMessage::decode_length_delimited(&mut buf) {
        match msg.part {
            Some(pb::update_message::Part::Header(h)) => {
                weight = h.num_examples;
                let Ok(encoding) = UpdateEncoding::from_name(&h.encoding) else {
                    return;
                };
                receiver = Some(DeltaReceiver::new(NUM_PARAMS, MAX_CHUNK_BYTES, encoding));
            }
            Some(pb::update_message::Part::Chunk(c)) => {
                let Some(r) = receiver.as_mut() else { return };
                if r.push(&c).is_err() {
                    return;
                }
            }
            Some(pb::update_message::Part::Trailer(t)) => {
                let Some(r) = receiver.take() else { return };
                let Ok((delta, digest)) = r.finish(&t) else {
                    return;
                };
                assert_eq!(delta.len(), NUM_PARAMS);
                assert_eq!(digest, t.sha256);
                match acc.check(&delta, weight) {
                    Ok(()) => acc.add(&delta, weight).expect("checked first"),
                    Err(_) => {
                        assert!(acc.add(&delta, weight).is_err());
                        assert_eq!(acc.mean_delta().unwrap(), before);
                    }
                }
                return;
            }
            None => return,
        }
    }
});
